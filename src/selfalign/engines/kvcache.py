"""KV caches for the hf engine: preallocated buffers, windows of rows, a prefix shared across rows.

Used by the hf engine (:func:`selfalign.engines.hf_inputs.prefill`, called by :class:`selfalign.engines.hf.HFEngine`) to prefill a batch of prompts as
``[shared prefix | masked gap | suffix]`` rows (the prefix computed once, suffixes of similar
length prefilled together) and then decode all rows with one token written per step.

On the CPU the decode can also keep the prompts' keys/values *unrepeated*
(:func:`start_shared_decode`): one copy of the batch's common prefix, one copy of each
prompt's suffix however many samples the prompt has, and a buffer per sample row for the
tokens it generates. :func:`selfalign.engines.attention.grouped_decode_attention` then reads
the prefix once for all rows and each suffix once for its prompt's samples (one softmax over
the three parts, so the result is that of attending over the concatenated row). Measured on
the 2-core development machine with the judge's prompts (a ~350-token rubric shared by all
prompts, ~140-token suffixes, K samples per prompt), see benchmarks/judge.py.
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
            self.full_decode = False  # decode steps see the whole buffer (see enable_full_decode)
            self.shared: SharedRows | None = None  # set by start_shared_decode
            self.prefix_next = False  # the next forward is the common prefix (see compute_prefix_apart)
            self.pk = self.pv = None  # that prefix, [1, KV, P, D], when kept apart from the row buffers

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            # zeros, not empty: masked-out slots still enter the matmuls, and garbage could be inf/nan
            self._k = key_states.new_zeros((rows, key_states.shape[1], capacity, key_states.shape[-1]))
            self._v = value_states.new_zeros((rows, value_states.shape[1], capacity, value_states.shape[-1]))

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if self.shared is not None:
                return _shared_update(self, key_states, value_states)
            if self.prefix_next:  # this forward computes the batch's common prefix: kept apart, once
                self.prefix_next = False
                self.pk, self.pv = key_states.contiguous(), value_states.contiguous()
                self.start = key_states.shape[-2]
                return key_states, value_states
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            held = 0 if self.pk is None else self.pk.shape[-2]  # positions before the row buffers' first column
            a, end = self.start - held, self.start - held + key_states.shape[-2]
            if end > self._k.shape[-2]:
                raise RuntimeError(f"KV buffer of {self._k.shape[-2]} tokens is full")  # the engine plans capacity
            self._k[self.rows, :, a:end] = key_states
            self._v[self.rows, :, a:end] = value_states
            self.start += key_states.shape[-2]
            self.keys, self.values = self._k[self.rows, :, :end], self._v[self.rows, :, :end]
            if held:  # a prefill chunk attends over the prefix too (a copy for this chunk only)
                n = self.keys.shape[0]
                return (torch.cat([self.pk.expand(n, -1, -1, -1), self.keys], dim=2),
                        torch.cat([self.pv.expand(n, -1, -1, -1), self.values], dim=2))
            if self.full_decode and key_states.shape[-2] == 1 and self.rows == slice(None):
                return self._k, self._v  # contiguous: the attention masks the slots past `end`
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.start  # tokens before the next query: sizes the attention mask

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.shared is not None or self.pk is not None:
                raise RuntimeError("a prefix kept apart or a shared decode selects rows with kvcache.select_rows")
            if self.is_initialized:
                self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
                self.rows = slice(None)
                self.keys, self.values = self._k[:, :, : self.start], self._v[:, :, : self.start]

    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [BufferLayer() for _ in cache.layers]
    return cache


class SharedRows:
    """Which prompt each sample row of a shared decode belongs to, laid out for batched matmuls.

    ``owner[r]`` is row ``r``'s prompt; ``slot`` [prompts, kmax] lists each prompt's rows
    (``rows`` = an all-zero padding row where a prompt has fewer than ``kmax``); ``rowpos[r]``
    is row ``r``'s place in ``slot`` flattened. ``suffix_bias`` [rows, 1, 1, W] is the additive
    mask of the row's prompt suffix (0 for a prompt token, -inf for the padding gap).
    """

    def __init__(self, owner: torch.Tensor, suffix_valid: torch.Tensor) -> None:
        rows, prompts = owner.shape[0], suffix_valid.shape[0]
        counts = torch.bincount(owner, minlength=prompts)
        self.kmax = int(counts.max()) if rows else 1
        order = torch.argsort(owner, stable=True)
        first = torch.cumsum(counts, 0) - counts  # where each prompt's rows start in `order`
        rank = torch.empty_like(owner)
        rank[order] = torch.arange(rows, device=owner.device) - first[owner[order]]
        self.owner, self.suffix_valid = owner, suffix_valid
        self.rowpos = owner * self.kmax + rank
        slot = torch.full((prompts * self.kmax,), rows, dtype=torch.long, device=owner.device)
        slot[self.rowpos] = torch.arange(rows, device=owner.device)
        self.slot = slot.view(prompts, self.kmax)
        bias = torch.zeros(suffix_valid.shape, dtype=torch.float32, device=owner.device)
        bias.masked_fill_(~suffix_valid, float("-inf"))
        self.suffix_bias = bias[owner][:, None, None, :]
        self._bias_as: dict[torch.dtype, torch.Tensor] = {torch.float32: self.suffix_bias}

    def suffix_bias_as(self, dtype: torch.dtype) -> torch.Tensor:
        """``suffix_bias`` in the scores' dtype, converted once per plan (not once per layer and step)."""
        if dtype not in self._bias_as:
            self._bias_as[dtype] = self.suffix_bias.to(dtype)
        return self._bias_as[dtype]


def start_shared_decode(cache, shared: int, width: int, owner: torch.Tensor, capacity: int, suffix_valid: torch.Tensor) -> None:
    """Turn a prefilled cache of one row per prompt into a decode over ``owner``'s sample rows.

    After the prefill each buffer row is ``[shared prefix | gap | suffix]`` (``shared`` +
    ``width`` tokens), or ``[gap | suffix]`` with the prefix kept apart
    (:func:`compute_prefix_apart`); this keeps one contiguous copy of the prefix, one of each
    prompt's ``width``-token suffix part (with ``suffix_valid`` [prompts, width] saying which of
    its slots hold prompt tokens), and gives every sample row a ``capacity``-token buffer for
    the tokens it generates. The prefill buffers are released. Decode steps then go through
    :func:`selfalign.engines.attention.grouped_decode_attention`, which recognises the
    layers' generation buffers (``key._selfalign_shared``).
    """
    plan = SharedRows(owner, suffix_valid)
    for layer in cache.layers:
        k, v = layer._k, layer._v
        if layer.pk is not None:  # prefilled apart (compute_prefix_apart): rows hold [gap | suffix] only
            layer.pk, layer.pv = layer.pk[0], layer.pv[0]  # [KV, P, D]
            first = 0
        else:
            layer.pk = k[0, :, :shared].contiguous() if shared else None  # [KV, P, D]
            layer.pv = v[0, :, :shared].contiguous() if shared else None
            first = shared
        whole = first == 0 and k.shape[2] == width  # the row buffers are exactly the suffixes: no copy
        layer.sk = k if whole else k[:, :, first : first + width].contiguous()  # [prompts, KV, W, D]
        layer.sv = v if whole else v[:, :, first : first + width].contiguous()
        layer._k = k.new_zeros((owner.shape[0], k.shape[1], capacity, k.shape[-1]))  # [rows, KV, C, D]
        layer._v = v.new_zeros((owner.shape[0], v.shape[1], capacity, v.shape[-1]))
        layer._k._selfalign_shared = layer  # how the attention function finds the parts
        layer._v._selfalign_shared = layer
        layer.shared, layer.generated = plan, 0
        layer.keys, layer.values = layer._k, layer._v


def _shared_update(layer, key_states: torch.Tensor, value_states: torch.Tensor):
    """A shared decode step's keys/values go to the rows' generation buffers."""
    if key_states.shape[-2] != 1:
        raise RuntimeError("a shared decode takes one token per step")
    t = layer.generated
    if t >= layer._k.shape[-2]:
        raise RuntimeError(f"generation buffer of {layer._k.shape[-2]} tokens is full")
    layer._k[:, :, t] = key_states[:, :, 0]
    layer._v[:, :, t] = value_states[:, :, 0]
    layer.generated = t + 1
    layer.start += 1
    return layer._k, layer._v


def select_rows(cache, indices: torch.Tensor) -> None:
    """Keep only the cache rows ``indices`` (both for a plain buffer cache and a shared decode)."""
    layers = cache.layers
    plan = getattr(layers[0], "shared", None) if layers else None
    if plan is None:
        cache.batch_select_indices(indices)
        return
    used, owner = torch.unique(plan.owner.index_select(0, indices), return_inverse=True)
    compact = used.shape[0] < plan.suffix_valid.shape[0]  # prompts whose samples are all done go
    new_plan = SharedRows(owner, plan.suffix_valid.index_select(0, used) if compact else plan.suffix_valid)
    for layer in layers:
        if compact:
            layer.sk, layer.sv = layer.sk.index_select(0, used), layer.sv.index_select(0, used)
        layer._k, layer._v = layer._k.index_select(0, indices), layer._v.index_select(0, indices)
        layer._k._selfalign_shared = layer
        layer._v._selfalign_shared = layer
        layer.keys, layer.values = layer._k, layer._v
        layer.shared = new_plan


def enable_full_decode(cache) -> None:
    """Hand decode steps the whole preallocated buffers instead of their first ``end`` tokens.

    A slice ``[:, :, :end]`` of a ``[rows, heads, capacity, dim]`` buffer is not contiguous, and
    CPU ``matmul`` copies such a key/value cache before multiplying -- measured on the 2-core
    development machine at batch 192 and 560 cached tokens: 29 ms per layer with the slice
    against 5.4 ms over the full buffer, the copy being 59% of a whole decode step. Only for an
    attention function that masks the slots past the attention mask's length
    (:func:`selfalign.engines.attention.grouped_decode_attention` does); prefill chunks and
    windows of rows still get exact slices.
    """
    for layer in cache.layers:
        layer.full_decode = True


def compute_prefix_apart(cache) -> None:
    """Have the next forward (one row: the batch's common prefix) stored once, apart from the row buffers.

    The row buffers then start at the first position after the prefix, so a batch of prompts
    holds the prefix once instead of once per prompt (a judge rubric is most of each prompt);
    prefill chunks see it through a per-chunk copy. Rows of such a cache are selected with
    :func:`start_shared_decode` / :func:`select_rows`, never repeated whole.
    """
    for layer in cache.layers:
        layer.prefix_next = True


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
