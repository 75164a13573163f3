"""Token sampling with one random stream per sequence.

Each row of a batch carries its own ``torch.Generator`` seeded from the request's seed
and the sample index, so what a sequence samples does not depend on which other
sequences share its batch, or on how many batches came before it (resuming a stage
after a crash draws the same random numbers for the remaining rows).

Top-p is exact: the nucleus is searched among the ``TOPK_FAST`` most likely tokens,
and only rows whose nucleus does not fit there fall back to a full sort.
"""

from __future__ import annotations

import hashlib

import torch

TOPK_FAST = 256


def row_seed(seed: int, request_id: str, sample_index: int) -> int:
    """A 63-bit seed for one sequence, mixed from the request seed, its id and sample index."""
    blob = f"{seed}\x00{request_id}\x00{sample_index}".encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Pick one token per row.

    ``logits`` [B, V] (any float dtype), ``temperature`` and ``top_p`` [B] float32.
    Rows with temperature 0 are greedy. Returns token ids [B] (int64, on ``logits.device``).
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampled_rows = (temperature > 0).nonzero().flatten().tolist()
    if not sampled_rows:
        return greedy
    idx = torch.tensor(sampled_rows, device=logits.device)
    lg = logits.index_select(0, idx) / temperature.index_select(0, idx).unsqueeze(1).to(logits.device)
    probs = torch.softmax(lg, dim=-1)
    p = top_p.index_select(0, idx).to(logits.device)

    k = min(TOPK_FAST, probs.shape[-1])
    top_probs, top_ids = probs.topk(k, dim=-1)  # sorted descending
    cum = top_probs.cumsum(dim=-1)
    needs_full = cum[:, -1] < p
    if bool(needs_full.any()):
        full_probs, full_ids = probs.sort(dim=-1, descending=True)
    # uniforms from each row's own generator (CPU), in the row's order
    u = torch.stack([torch.rand((), generator=generators[r]) for r in sampled_rows]).to(logits.device)

    chosen = torch.empty(len(sampled_rows), dtype=torch.long, device=logits.device)
    for sel, (cand_probs, cand_ids) in (
        (~needs_full, (top_probs, top_ids)),
        (needs_full, (full_probs, full_ids) if bool(needs_full.any()) else (None, None)),
    ):
        if not bool(sel.any()):
            continue
        cp, ci, pp, uu = cand_probs[sel], cand_ids[sel], p[sel], u[sel]
        c = cp.cumsum(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing the line is kept)
        keep = (c - cp) < pp.unsqueeze(1)
        kept = cp * keep
        kept_cum = kept.cumsum(dim=-1)
        total = kept_cum[:, -1:]
        pos = torch.searchsorted(kept_cum, uu.unsqueeze(1) * total, right=True).clamp(max=cp.shape[-1] - 1)
        # guard: never land on a masked-out token because of float rounding at the edge
        last_kept = keep.sum(dim=-1, keepdim=True) - 1
        pos = torch.minimum(pos, last_kept)
        chosen[sel] = ci.gather(1, pos).squeeze(1)
    out = greedy.clone()
    out[idx] = chosen
    return out
