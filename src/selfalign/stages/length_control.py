"""Actor preference pairs with length control (Meta-Rewarding, actor side).

Plain pair selection (:func:`selfalign.stages.pairs.select_pair`) takes the highest- and the
lowest-scored candidate of a prompt. Judges tend to reward longer answers, so training on such
pairs makes responses grow iteration after iteration. Length control trades a little score
for length: among the candidates that score *nearly* best, pick the shortest as chosen; among
those that score *nearly* worst, pick the longest as rejected.

Contract
--------
Inputs are :class:`~selfalign.stages.pairs.Scored` candidates (``reward`` = mean judge score,
``None`` when no judgment parsed) and ``lengths``: a mapping ``response_id -> length in
tokens`` (any consistent unit works; tokens of the policy's tokenizer are the intended one).
Every *scored* candidate must have a length, otherwise :class:`ValueError` names it.

Per prompt, :func:`select_length_controlled`

1. drops candidates without a score;
2. removes exact duplicate response texts among the rest, keeping the lowest sample index
   (counted in ``duplicates_removed``);
3. with ``S_max``/``S_min`` the top/bottom remaining scores and ``rho`` in ``[0, 1]``:

   * top tier    = scores ``>= (1 - rho) * S_max + rho * S_min``; chosen = its SHORTEST member;
   * bottom tier = scores ``<= (1 - rho) * S_min + rho * S_max``; rejected = its LONGEST member.

No pair (the reason is returned / counted): fewer than 2 scored candidates after step 2
(``too_few_scored``), ``S_max == S_min`` exactly (``tie``), or chosen and rejected are the same
candidate (``same_candidate``; possible once ``rho >= 0.5`` makes the tiers overlap).
For ``rho > 0.5`` the chosen response may score *below* the rejected one - that is what the
formula says (``rho = 1`` is pure "shortest vs longest"); use small ``rho`` in practice.

Tie-breaking (deterministic): chosen = min by ``(length, -score, sample_index)`` - among equally
short top-tier candidates the better-scored one, then the lower sample index; rejected =
max length, then lower score, then lower sample index.

Float tolerance: tier boundaries are computed in floating point, so a candidate counts as in a
tier when it is within ``EPS * max(1, |S_max|, |S_min|)`` (``EPS = 1e-9``) of the boundary.

``rho = 0`` means *no* length control: the tiers are exactly the top/bottom scores (no
tolerance) and ties inside them are broken by the lowest sample index only, so the result is
exactly ``select_pair`` applied to the deduplicated candidates.

:func:`make_actor_pairs` writes one record per prompt in ``pairs.pair_record``'s layout (TRL
conversational ``prompt``/``chosen``/``rejected``) plus ``chosen_tokens``, ``rejected_tokens``
and ``rho``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from selfalign.stages.pairs import Scored, pair_record

__all__ = ["EPS", "LengthPairStats", "dedupe", "make_actor_pairs", "select_length_controlled"]

EPS = 1e-9


@dataclass
class LengthPairStats:
    """Counts over one call of :func:`make_actor_pairs`."""

    prompts: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)  # tie / too_few_scored / same_candidate
    duplicates_removed: int = 0
    chosen_tokens: int = 0  # sums, for the means in as_dict
    rejected_tokens: int = 0
    shorter_than_top: int = 0  # pairs whose chosen is not the plain top-score choice

    def as_dict(self) -> dict:
        n = self.pairs
        return {
            "prompts": self.prompts,
            "pairs": self.pairs,
            "dropped": dict(sorted(self.dropped.items())),
            "duplicates_removed": self.duplicates_removed,
            "mean_chosen_tokens": round(self.chosen_tokens / n, 2) if n else None,
            "mean_rejected_tokens": round(self.rejected_tokens / n, 2) if n else None,
            "length_controlled_choices": self.shorter_than_top,
        }


def dedupe(candidates: Iterable[Scored]) -> tuple[list[Scored], int]:
    """Scored candidates with exact-duplicate texts removed (lowest sample index kept), and the
    number removed. Unscored candidates are dropped first and not counted as duplicates."""
    kept: dict[str, Scored] = {}
    removed = 0
    for c in sorted((c for c in candidates if c.reward is not None), key=lambda c: c.sample_index):
        if c.response in kept:
            removed += 1
        else:
            kept[c.response] = c
    return list(kept.values()), removed


def _length(c: Scored, lengths: Mapping[str, int]) -> int:
    try:
        return int(lengths[c.response_id])
    except KeyError:
        raise ValueError(f"no length given for scored candidate {c.response_id!r}") from None


def select_length_controlled(
    candidates: Iterable[Scored], lengths: Mapping[str, int], rho: float
) -> tuple[Scored, Scored] | str:
    """``(chosen, rejected)`` for one prompt, or the reason there is none (module docstring).

    ``candidates`` should be deduplicated already (:func:`dedupe`); they are used as given
    except that unscored ones are ignored.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    scored = sorted((c for c in candidates if c.reward is not None), key=lambda c: c.sample_index)
    if len(scored) < 2:
        return "too_few_scored"
    for c in scored:
        _length(c, lengths)
    s_max = max(c.reward for c in scored)
    s_min = min(c.reward for c in scored)
    if s_max == s_min:
        return "tie"
    if rho == 0:
        # no length control: exact extremes, first sample index (select_pair's rule)
        chosen = next(c for c in scored if c.reward == s_max)
        rejected = next(c for c in scored if c.reward == s_min)
    else:
        tol = EPS * max(1.0, abs(s_max), abs(s_min))
        top_bar = (1 - rho) * s_max + rho * s_min
        bottom_bar = (1 - rho) * s_min + rho * s_max
        top = [c for c in scored if c.reward >= top_bar - tol]
        bottom = [c for c in scored if c.reward <= bottom_bar + tol]
        chosen = min(top, key=lambda c: (_length(c, lengths), -c.reward, c.sample_index))
        rejected = min(bottom, key=lambda c: (-_length(c, lengths), c.reward, c.sample_index))
    if chosen.response_id == rejected.response_id:
        return "same_candidate"
    return chosen, rejected


def make_actor_pairs(
    candidates: Iterable[Scored], lengths: Mapping[str, int], rho: float, iteration: int | None = None
) -> tuple[list[dict], LengthPairStats]:
    """One length-controlled pair per prompt; returns ``(pair records, stats)``.

    Candidates are grouped by ``prompt_id``; output order follows each prompt's first
    appearance. Records are ``pairs.pair_record`` plus ``chosen_tokens``, ``rejected_tokens``
    and ``rho``.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    groups: dict[str, list[Scored]] = defaultdict(list)
    for c in candidates:
        groups[c.prompt_id].append(c)
    stats = LengthPairStats(prompts=len(groups))
    pairs: list[dict] = []
    for group in groups.values():
        unique, removed = dedupe(group)
        stats.duplicates_removed += removed
        picked = select_length_controlled(unique, lengths, rho)
        if isinstance(picked, str):
            stats.dropped[picked] += 1
            continue
        chosen, rejected = picked
        rec = pair_record(chosen, rejected, iteration=iteration)
        rec["chosen_tokens"] = _length(chosen, lengths)
        rec["rejected_tokens"] = _length(rejected, lengths)
        rec["rho"] = rho
        pairs.append(rec)
        stats.pairs += 1
        stats.chosen_tokens += rec["chosen_tokens"]
        stats.rejected_tokens += rec["rejected_tokens"]
        if chosen.reward != max(c.reward for c in unique):
            stats.shorter_than_top += 1
    return pairs, stats
