"""KV caches for the hf engine: preallocated buffers, windows of rows, a prefix shared across rows.

Used by :class:`selfalign.engines.hf.HFEngine` to prefill a batch of prompts as
``[shared prefix | masked gap | suffix]`` rows (the prefix computed once, suffixes of similar
length prefilled together) and then decode all rows with one token written per step.
"""

from __future__ import annotations

import torch


def buffer_cache(config, rows: int, capacity: int):
    """A ``DynamicCache`` whose layers write into preallocated ``[rows, heads, capacity, dim]`` buffers.

    transformers' ``DynamicLayer`` appends each new token with ``torch.cat``, copying the layer's
    whole cache every step (measured: a fifth of a CPU decode step at batch 64); here a step
    writes only the new token. The engine also points a forward pass at a range of rows and a
    start position (:func:`set_window`), so prompts that share a prefix get it computed once and
    copied, and prompt suffixes of different lengths are prefilled in separate, less padded
    chunks that land right-aligned in one decode batch. Returns None for models whose cache
    layers are not all plain full-attention layers (sliding windows, ...).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self.rows, self.start = slice(None), 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            # zeros, not empty: masked-out slots still enter the matmuls, and garbage could be inf/nan
            self._k = key_states.new_zeros((rows, key_states.shape[1], capacity, key_states.shape[-1]))
            self._v = value_states.new_zeros((rows, value_states.shape[1], capacity, value_states.shape[-1]))

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.start + key_states.shape[-2]
            if end > self._k.shape[-2]:
                raise RuntimeError(f"KV buffer of {self._k.shape[-2]} tokens is full")  # the engine plans capacity
            self._k[self.rows, :, self.start : end] = key_states
            self._v[self.rows, :, self.start : end] = value_states
            self.start = end
            self.keys, self.values = self._k[self.rows, :, :end], self._v[self.rows, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.start  # tokens before the next query: sizes the attention mask

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
                self.rows = slice(None)
                self.keys, self.values = self._k[:, :, : self.start], self._v[:, :, : self.start]

    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [BufferLayer() for _ in cache.layers]
    return cache


def set_window(cache, rows: slice, start: int) -> None:
    """Point the next forward pass at buffer ``rows``, writing its tokens from position ``start``."""
    for layer in cache.layers:
        layer.rows, layer.start = rows, start


def copy_prefix(cache, length: int) -> None:
    """Copy row 0's first ``length`` cached tokens to every row (the shared prefix)."""
    for layer in cache.layers:
        layer._k[1:, :, :length] = layer._k[:1, :, :length]
        layer._v[1:, :, :length] = layer._v[:1, :, :length]


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest prefix all ``seqs`` share."""
    first, n = seqs[0], min(len(x) for x in seqs)
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in seqs):
            return i
    return n
