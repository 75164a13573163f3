"""Token sampling with one random stream per sequence.

Each row of a batch carries its own ``torch.Generator`` seeded from the request's seed
and the sample index, so what a sequence samples does not depend on which other
sequences share its batch, or on how many batches came before it (resuming a stage
after a crash draws the same random numbers for the remaining rows).

Top-p is exact: the nucleus is searched among the tokens of probability at least
``CANDIDATE_MIN_PROB`` (sorted together, one sort for the batch), and only rows whose
candidates hold less than ``top_p`` of the mass fall back to a full sort of the vocabulary.
"""

from __future__ import annotations

import hashlib

import torch

# tokens at least this likely are the nucleus candidates; rows whose candidates hold less than
# top_p of the mass (very flat distributions) fall back to a full sort
CANDIDATE_MIN_PROB = 1e-4


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
    sampled_rows = (temperature > 0).nonzero().flatten().tolist()
    out = logits.argmax(dim=-1) if len(sampled_rows) < logits.shape[0] else torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if not sampled_rows:
        return out
    idx = torch.tensor(sampled_rows, device=logits.device)
    lg = logits.index_select(0, idx) / temperature.index_select(0, idx).unsqueeze(1).to(logits.device)
    probs = torch.softmax(lg, dim=-1)
    p = top_p.index_select(0, idx).to(logits.device)
    # uniforms from each row's own generator (CPU), in the row's order
    u = torch.stack([torch.rand((), generator=generators[r]) for r in sampled_rows]).to(logits.device)

    chosen = torch.empty(len(sampled_rows), dtype=torch.long, device=logits.device)
    r, col = (probs >= CANDIDATE_MIN_PROB).nonzero(as_tuple=True)
    vals = probs[r, col]
    # rows whose candidates surely hold top_p of the mass (the margin covers summation rounding)
    fast = torch.bincount(r, weights=vals.double(), minlength=probs.shape[0]) >= p.double() + 1e-5
    if bool(fast.any()):
        rows = fast.nonzero().flatten()
        if len(rows) < probs.shape[0]:
            keep = fast[r]
            r, col, vals = (torch.cumsum(fast, 0) - 1)[r[keep]], col[keep], vals[keep]
        chosen[rows] = _pick_in_nucleus(*_sorted_candidates(r, col, vals, len(rows)), p[rows], u[rows])
    whole = ~fast & (p >= 1.0)  # top_p 1: the whole distribution, no sort needed
    if bool(whole.any()):
        rows = whole.nonzero().flatten()
        cum = probs.index_select(0, rows).cumsum(dim=-1)
        pos = torch.searchsorted(cum, u[rows].unsqueeze(1) * cum[:, -1:], right=True).clamp(max=probs.shape[-1] - 1)
        chosen[rows] = pos.squeeze(1)
    rest = ~fast & ~whole
    if bool(rest.any()):
        rows = rest.nonzero().flatten()
        full_probs, full_ids = probs.index_select(0, rows).sort(dim=-1, descending=True)
        chosen[rows] = _pick_in_nucleus(full_probs, full_ids, p[rows], u[rows])
    out[idx] = chosen
    return out


def _sorted_candidates(r: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates given as (row, token id, probability) triples, as [n_rows, K] probabilities and
    ids, most likely first in each row (zero-padded): one sort for the whole batch instead of a
    top-k over the vocabulary per row."""
    order = torch.sort(r.double() * 2.0 - vals.double()).indices  # rows apart, likeliest first within a row
    r, col, vals = r[order], col[order], vals[order]
    counts = torch.bincount(r, minlength=n_rows)
    slot = torch.arange(r.numel(), device=r.device) - (counts.cumsum(0) - counts)[r]
    k = int(counts.max())
    cand_probs = vals.new_zeros((n_rows, k))
    cand_ids = torch.zeros((n_rows, k), dtype=torch.long, device=r.device)
    cand_probs[r, slot] = vals
    cand_ids[r, slot] = col
    return cand_probs, cand_ids


def _pick_in_nucleus(cp: torch.Tensor, ci: torch.Tensor, pp: torch.Tensor, uu: torch.Tensor) -> torch.Tensor:
    """Sample from sorted candidates ``cp``/``ci`` [R, K] within each row's top-``pp`` nucleus, with uniforms ``uu``."""
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
    return ci.gather(1, pos).squeeze(1)
