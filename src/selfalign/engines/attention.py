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
    """``query`` [B, H, Q, D], ``key``/``value`` [B, KV, L, D], ``attention_mask`` additive [B, 1, Q, M] or None.

    ``key``/``value`` may be longer than the mask (M < L): a KV buffer handed over whole
    (:func:`selfalign.engines.kvcache.enable_full_decode`, because a contiguous buffer multiplies
    several times faster than a slice of it); its slots from M on are unused and masked out.
    Returns the attention output as [B, Q, H, D] (the layout transformers' attention functions return).
    """
    b, h, q_len, d = query.shape
    kv = key.shape[1]
    shared = getattr(key, "_selfalign_shared", None)
    if shared is not None:
        return _shared_decode_attention(query, shared, d**-0.5 if scaling is None else scaling)
    unusual = any(v is not None for k, v in kwargs.items() if k not in _HANDLED) or kwargs.get("sliding_window") is not None
    if q_len != 1 or dropout or h % kv or unusual or (attention_mask is not None and attention_mask.dtype == torch.bool):
        if attention_mask is not None and attention_mask.shape[-1] < key.shape[2]:
            key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = h // kv
    scale = d**-0.5 if scaling is None else scaling
    q = query.reshape(b, kv, groups, d) * scale  # query heads grouped by the key/value head they read
    scores = torch.matmul(q, key.transpose(-1, -2))  # [B, KV, G, L], in the model's dtype
    if attention_mask is not None:
        used = min(attention_mask.shape[-1], key.shape[2])
        scores[..., :used] += attention_mask[:, :, -1:, :used].to(scores.dtype)  # [B, 1, 1, M] broadcasts over KV, G
        scores[..., used:] = float("-inf")  # unused buffer slots
    probs = torch.softmax(scores, dim=-1)  # accumulates in fp32 for bf16 input; no fp32 copy of the scores
    out = torch.matmul(probs, value)  # [B, KV, G, D]
    return out.reshape(b, 1, h, d), None


def _shared_decode_attention(query: torch.Tensor, layer, scale: float) -> tuple[torch.Tensor, None]:
    """A decode step over a shared-prompt cache (:func:`selfalign.engines.kvcache.start_shared_decode`).

    Row r attends over ``[prefix | its prompt's suffix | its generated tokens]``: the scores of
    the three parts are computed separately -- the prefix for all rows in one matmul, each
    suffix for its prompt's rows together, the generated tokens row by row -- then joined for
    one softmax, and the output is the sum of the three probability-weighted value parts.
    """
    r, h, _, d = query.shape
    plan, gk, gv = layer.shared, layer._k, layer._v
    kv = gk.shape[1]
    g = h // kv
    q = query.reshape(r, kv, g, d)
    prompts, kmax = plan.slot.shape

    def by_prompt(x: torch.Tensor) -> torch.Tensor:  # [R, KV, G, N] -> [prompts, KV, kmax * G, N]
        n = x.shape[-1]
        x = torch.cat([x, x.new_zeros((1, kv, g, n))])[plan.slot.view(-1)]
        return x.view(prompts, kmax, kv, g, n).transpose(1, 2).reshape(prompts, kv, kmax * g, n)

    def by_row(x: torch.Tensor) -> torch.Tensor:  # the inverse of by_prompt
        n = x.shape[-1]
        return x.view(prompts, kv, kmax, g, n).transpose(1, 2).reshape(prompts * kmax, kv, g, n)[plan.rowpos]

    q = q * scale  # scaled once on the small query, not on the scores
    parts = []
    if layer.pk is not None:  # [KV, R * G, D] @ [KV, D, P]
        s_pre = torch.matmul(q.permute(1, 0, 2, 3).reshape(kv, r * g, d), layer.pk.transpose(-1, -2))
        parts.append(s_pre.view(kv, r, g, -1).permute(1, 0, 2, 3))
    n_pre = parts[0].shape[-1] if parts else 0
    s_suf = by_row(torch.matmul(by_prompt(q), layer.sk.transpose(-1, -2)))
    parts.append(s_suf.add_(plan.suffix_bias_as(s_suf.dtype)))  # -inf over the padding gap
    width = s_suf.shape[-1]
    s_gen = torch.matmul(q, gk.transpose(-1, -2))  # the whole generation buffer: contiguous
    s_gen[..., layer.generated :] = float("-inf")  # slots not written yet
    parts.append(s_gen)
    # the scores are in the model's dtype already (the matmuls' output); softmax accumulates in fp32
    probs = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
    out = torch.matmul(probs[..., n_pre + width :], gv)
    out += by_row(torch.matmul(by_prompt(probs[..., n_pre : n_pre + width]), layer.sv))
    if n_pre:
        p_pre = probs[..., :n_pre].permute(1, 0, 2, 3).reshape(kv, r * g, n_pre)
        out += torch.matmul(p_pre, layer.pv).view(kv, r, g, d).permute(1, 0, 2, 3)
    return out.reshape(r, 1, h, d), None


AttentionInterface.register(ATTN_IMPLEMENTATION, grouped_decode_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)  # additive float masks (0 / dtype min)
