"""The prompt side of the ``hf`` engine: prompts to token ids, batches that fit, a prefilled KV cache.

* Tokenisation (:func:`encode_request`, :func:`assistant_prefix_text`,
  :func:`prefix_and_candidate_ids`): also used by the ``vllm`` engine, which tokenizes in the
  parent process the same way, and by pairwise judge training, so that the trained score and
  the scored one are the same number.
* Batching (:func:`cut_batches`): ranges of prompts (longest first) that fit one batch of at
  most ``max_rows`` sequences and ``max_slots`` KV-cache slots.
* Prefill (:func:`prefill`): a batch of prompts run once through the model, the prefix they
  all share computed once, the rest in chunks of similar length (KV buffers from
  :mod:`selfalign.engines.kvcache`); returns the cache and the next-token logits that the
  engine's decode (or its next-token scoring) starts from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfalign.engines.base import GenerationRequest
from selfalign.engines.kvcache import buffer_cache, common_prefix, compute_prefix_apart, copy_prefix, set_window
from selfalign.errors import EngineError

_SHARED_PREFIX_MIN = 8  # share a common prompt prefix across a batch when at least this long
_PREFILL_CHUNK_TOKENS = 16384  # at most this many (padded) tokens per prefill forward: bounds its activations
_BUCKET_RATIO = 0.7  # a prefill chunk ends where a suffix is shorter than this share of the chunk's longest


# ---------------------------------------------------------------------- tokenisation


def encode_request(tokenizer, request: GenerationRequest, model_dir: str | Path) -> list[int]:
    """Prompt token ids of a request: chat messages through the chat template, raw prompts as is."""
    if request.messages is not None:
        if not tokenizer.chat_template:
            raise EngineError(
                f"request {request.id!r} has chat messages but {model_dir} has no chat template; "
                "send raw prompts instead or use a model with a chat template"
            )
        ids = tokenizer.apply_chat_template(
            [m.to_dict() for m in request.messages], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding on some versions
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(request.prompt, add_special_tokens=False)["input_ids"]


def assistant_prefix_text(tokenizer, messages, prefix: str) -> str:
    """The chat template applied to ``messages`` with the assistant's turn opened, then ``prefix``."""
    msgs = [m.to_dict() if hasattr(m, "to_dict") else dict(m) for m in messages]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + prefix


def prefix_and_candidate_ids(tokenizer, text: str, candidates) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and of each candidate as the single token that follows it.

    BPE tokenizers often fold a space into the next word (``" A"`` is one token while ``" 4"``
    is two), so when ``text`` ends with whitespace that does not stand alone, the whitespace
    is moved into the candidates (``"Winner: " + "A"`` is scored as ``"Winner:" + " A"``).
    """
    variants = [(text, list(candidates))]
    stripped = text.rstrip(" ")
    if stripped != text:
        space = text[len(stripped) :]
        variants.append((stripped, [space + c for c in candidates]))
    for prefix, cands in variants:
        encoded = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = []
        for c in cands:
            full = tokenizer(prefix + c, add_special_tokens=False)["input_ids"]
            if len(full) != len(encoded) + 1 or full[: len(encoded)] != encoded:
                break
            ids.append(full[-1])
        else:
            return encoded, ids
    raise EngineError(f"candidates {list(candidates)!r} are not single next tokens after the given text for this tokenizer")


# ---------------------------------------------------------------------- batching


def cut_batches(items: list[tuple[list[int], int, int]], *, max_rows: int, max_slots: int, shares: bool) -> list[tuple[int, int]]:
    """Ranges of ``items`` (prompt ids, rows, new tokens; longest prompt first) that fit one batch each.

    A batch holds at most ``max_rows`` rows and ``max_slots`` KV slots, the most its cache
    holds at once: when decoding ``shares`` prompts (keeps their keys/values once per prompt)
    the common prefix once, each prompt's suffix (padded to the longest) once and the new
    tokens per row; otherwise every row holds its padded prompt and its new tokens.
    """
    cuts: list[tuple[int, int]] = []
    first = rows = lcp = max_new = 0
    for i, (ids, k, new) in enumerate(items):
        if i > first:
            width = len(items[first][0])
            new_with = max(max_new, new)
            prompts, lcp_with = i - first + 1, lcp
            if shares:  # the prefix once, each prompt's padded suffix once, new tokens per row
                lcp_with = min(lcp, common_prefix([items[first][0], ids]))
                s = lcp_with if lcp_with >= _SHARED_PREFIX_MIN else 0
                slots = s + prompts * (width - s) + (rows + k) * new_with
            else:
                slots = (rows + k) * (width + new_with)
            if rows + k <= max_rows and slots <= max_slots:
                rows, lcp, max_new = rows + k, lcp_with, new_with
                continue
            cuts.append((first, i))
            first = i
        rows, lcp, max_new = k, len(ids), new
    if items:
        cuts.append((first, len(items)))
    return cuts


# ---------------------------------------------------------------------- prefill


def prefill(
    model,
    ids: list[list[int]],
    max_new: int,
    *,
    device: str,
    pad_id: int,
    cache_kwarg: str,
    max_batch_tokens: int,
    prefix_apart: bool = False,
):
    """Run prompts ``ids`` (longest first); return (cache, last-token logits, 2D attention mask, next positions, layout).

    ``max_new`` is the room left in each cache row for generated tokens (0 when a shared
    decode gives the samples buffers of their own, or when only the next token is wanted).
    ``prefix_apart``: keep the common prefix once instead of in every row
    (:func:`~selfalign.engines.kvcache.compute_prefix_apart`; for a shared decode or logits only).
    ``cache_kwarg`` is the model's keyword for the cache; ``pad_id`` fills the padding;
    a prefill forward holds at most ``min(max_batch_tokens, 16384)`` padded tokens.

    With a buffer cache (:func:`~selfalign.engines.kvcache.buffer_cache`): the prefix all prompts share (the chat
    template's system turn, a judge rubric, ...) is computed once for one row and copied to
    the others; the rest of each prompt (its suffix) is prefilled in chunks of similar length,
    right-aligned after a masked gap so that every row's next token lands in the same column.
    Row layout: ``[shared prefix | gap | suffix]``, and ``layout`` = (prefix length, suffix
    width). Otherwise one left-padded prefill and ``layout`` None.
    """
    dev = device
    shared = common_prefix(ids) if len(ids) > 1 else 0
    shared = min(shared, min(len(x) for x in ids) - 1)  # every row keeps a token to predict from
    if shared < _SHARED_PREFIX_MIN:
        shared = 0
    width = max(len(x) for x in ids) - shared  # longest suffix
    apart = prefix_apart and shared > 0
    cache = buffer_cache(model.config, len(ids), (0 if apart else shared) + width + max_new)
    if cache is None:
        return prefill_padded(model, ids, device=device, pad_id=pad_id, cache_kwarg=cache_kwarg)
    mask = torch.zeros((len(ids), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    if shared:
        set_window(cache, slice(0, 1), 0)
        if apart:
            compute_prefix_apart(cache)
        model(input_ids=torch.tensor([ids[0][:shared]], device=dev), position_ids=torch.arange(shared, device=dev).unsqueeze(0),
              attention_mask=torch.ones((1, shared), dtype=torch.long, device=dev), **{cache_kwarg: cache}, use_cache=True, logits_to_keep=1)
        if not apart:
            copy_prefix(cache, shared)
    logits = []
    for a, b in suffix_chunks([len(x) - shared for x in ids], min(max_batch_tokens, _PREFILL_CHUNK_TOKENS)):
        w = len(ids[a]) - shared  # sorted longest first: the chunk's widest suffix
        chunk = torch.full((b - a, w), pad_id, dtype=torch.long)
        for r in range(a, b):
            suffix = ids[r][shared:]
            chunk[r - a, w - len(suffix) :] = torch.tensor(suffix)
            mask[r, shared + width - len(suffix) :] = 1
        pos = shared + (mask[a:b, shared + width - w :].cumsum(-1) - 1).clamp(min=0)
        set_window(cache, slice(a, b), shared + width - w)
        out = model(input_ids=chunk.to(dev), attention_mask=mask[a:b].to(dev), position_ids=pos.to(dev),
                    **{cache_kwarg: cache}, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1, :])
    set_window(cache, slice(None), shared + width)
    next_pos = torch.tensor([len(x) for x in ids], device=dev)
    return cache, torch.cat(logits), mask.to(dev), next_pos, (shared, width)


def suffix_chunks(lengths: list[int], limit: int) -> list[tuple[int, int]]:
    """Split rows (sorted longest first) into ranges whose suffixes pad little and hold at most
    ``limit`` padded tokens (one prefill forward)."""
    chunks, a = [], 0
    for r in range(1, len(lengths) + 1):
        if r == len(lengths) or lengths[r] < _BUCKET_RATIO * lengths[a] or (r + 1 - a) * lengths[a] > limit:
            chunks.append((a, r))
            a = r
    return chunks


def prefill_padded(model, ids: list[list[int]], *, device: str, pad_id: int, cache_kwarg: str):
    """One left-padded prefill into a ``DynamicCache`` (a model without buffer caches); ``layout`` None."""
    from transformers import DynamicCache

    dev = device
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x) :] = torch.tensor(x)
        mask[i, width - len(x) :] = 1
    input_ids, mask = input_ids.to(dev), mask.to(dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **{cache_kwarg: cache}, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1, :], mask, positions[:, -1] + 1, None
