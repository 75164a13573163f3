"""A decode-step attention for the hf engine on CPU, registered with transformers' attention interface.

Measured on a 2-core AVX-512-BF16 CPU with SmolLM2-135M (9 query heads sharing 3 key/value heads,
head size 64), batch 64, 100 cached tokens, one thread: ``scaled_dot_product_attention`` in bf16
takes ~12.9 ms a layer for one new token (its CPU flash kernel is built for long queries), so
attention was over half of every decode step. Done as two batched matmuls with the query heads
grouped by the key/value head they share (no ``repeat_kv`` copies), the same step takes ~0.6 ms.

:data:`ATTN_IMPLEMENTATION` names the function for ``from_pretrained(attn_implementation=...)``.
It handles the decode step (one query token) of plain causal attention; everything else -- the
prefill, sliding windows, soft-capping, attention sinks, dropout -- goes to transformers' own
``sdpa`` (or ``eager`` when asked for attention weights) with the same mask, so any model that uses
the attention interface gives the same results as with ``sdpa``, up to rounding.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTN_IMPLEMENTATION = "selfalign_grouped"

# keyword arguments the grouped path understands; any other non-None one goes to sdpa
_HANDLED = {"position_ids", "cache_position", "past_key_values", "output_attentions", "use_cache", "sliding_window", "is_causal"}


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query`` [B, H, Q, D], ``key``/``value`` [B, KV, L, D], ``attention_mask`` additive [B, 1, Q, L] or None.

    Returns the attention output as [B, Q, H, D] (the layout transformers' attention functions return).
    """
    b, h, q_len, d = query.shape
    kv = key.shape[1]
    unusual = any(v is not None for k, v in kwargs.items() if k not in _HANDLED) or kwargs.get("sliding_window") is not None
    if q_len != 1 or dropout or h % kv or unusual or (attention_mask is not None and attention_mask.dtype == torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = h // kv
    scale = d**-0.5 if scaling is None else scaling
    q = query.reshape(b, kv, groups, d)  # query heads grouped by the key/value head they read
    scores = torch.matmul(q, key.transpose(-1, -2))  # [B, KV, G, L]
    scores = scores.float() * scale
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, -1:, : key.shape[2]].float()  # [B, 1, 1, L] broadcasts over KV, G
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, KV, G, D]
    return out.reshape(b, 1, h, d), None


AttentionInterface.register(ATTN_IMPLEMENTATION, grouped_decode_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)  # additive float masks (0 / dtype min)
