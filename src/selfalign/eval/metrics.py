"""Agreement between a judge's scores and human preferences: pure functions, no I/O.

Every function takes, per *item* (one prompt), the judge's score of each reply and the
humans' rank of each reply, aligned by position::

    scores_per_item = [[4.0, 2.5, None], [3.0, 3.0]]
    ranks_per_item  = [[0, 1, 2],        [1, 0]]

A **rank** orders the replies of one item: lower is better, 0 is the best (OpenAssistant's
convention); equal ranks mean the humans did not order those two replies. A **score** is the
judge's mean over its parsable judgments of the reply: higher is better; ``None`` (or NaN)
means no judgment of that reply could be parsed. Two scores closer than ``tol`` are a tie
(so the order of float additions never breaks a tie).

Conventions (also in ``docs/evaluation.md``):

* A *human-ordered pair* is two replies of one item with different ranks. Pairwise metrics
  count every such pair once. Each pair ends up in exactly one bucket: ``correct`` (the
  better-ranked reply scores higher), ``wrong``, ``tie`` or ``unscored`` (either reply has no
  score). Unscored pairs are reported and left out of every denominator; accuracy is
  ``correct / scored pairs`` (a tie counts as a miss), the ties-excluded accuracy is
  ``correct / (correct + wrong)``, the tie rate is ``ties / scored pairs``.
* Item-level metrics (best-reply match, full-ranking match, rank correlations) leave out an
  item in which any reply has no score (counted as ``unscored_items``) and an item whose
  replies all share one rank (nothing to agree with; ``items_without_pairs``).
* Rank correlations are per item, between the scores and the *negated* ranks, so +1 means
  the judge orders the replies exactly as the humans did. An item whose scores are all equal
  has no correlation (NaN); it is counted in ``constant_score_items`` and left out of the
  average. No pooled correlation is reported: ranks only compare replies to the same prompt,
  so pooling rank 0 of one prompt with rank 0 of another compares incomparable things.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "TIE_TOL",
    "agreement_metrics",
    "exact_match_best",
    "exact_match_ranking",
    "is_missing",
    "length_scores",
    "mean_scores",
    "ordered_pairs",
    "pair_outcome",
    "pairwise_agreement",
    "parse_failure_rate",
    "random_baseline",
    "rank_correlations",
    "score_histogram",
    "unscored_judgment_rate",
]

TIE_TOL = 1e-9

Scores = Sequence[float | None]
Ranks = Sequence[int]


def is_missing(score: float | None) -> bool:
    """True for ``None`` and NaN: the judge gave this reply no usable score."""
    return score is None or (isinstance(score, float) and math.isnan(score))


def _check(scores_per_item: Sequence[Scores], ranks_per_item: Sequence[Ranks]) -> None:
    if len(scores_per_item) != len(ranks_per_item):
        raise ValueError(f"{len(scores_per_item)} score lists for {len(ranks_per_item)} rank lists")
    for i, (s, r) in enumerate(zip(scores_per_item, ranks_per_item)):
        if len(s) != len(r):
            raise ValueError(f"item {i}: {len(s)} scores for {len(r)} ranked replies")


def ordered_pairs(ranks: Ranks) -> list[tuple[int, int]]:
    """``(better, worse)`` reply indices of every pair with different human ranks."""
    out = []
    for a in range(len(ranks)):
        for b in range(a + 1, len(ranks)):
            if ranks[a] < ranks[b]:
                out.append((a, b))
            elif ranks[b] < ranks[a]:
                out.append((b, a))
    return out


def pair_outcome(better: float | None, worse: float | None, tol: float = TIE_TOL) -> str:
    """``"correct"``, ``"wrong"``, ``"tie"`` or ``"unscored"`` for one human-ordered pair."""
    if is_missing(better) or is_missing(worse):
        return "unscored"
    if abs(better - worse) <= tol:
        return "tie"
    return "correct" if better > worse else "wrong"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def pairwise_agreement(scores_per_item: Sequence[Scores], ranks_per_item: Sequence[Ranks], tol: float = TIE_TOL) -> dict:
    """Pair counts and the three pairwise rates (see the module doc for the conventions).

    Returns ``{"pairs", "correct", "wrong", "ties", "unscored_pairs", "pairwise_accuracy",
    "pairwise_accuracy_excluding_ties", "tie_rate"}``; a rate with an empty denominator is None.
    """
    _check(scores_per_item, ranks_per_item)
    counts: Counter = Counter()
    for scores, ranks in zip(scores_per_item, ranks_per_item):
        for better, worse in ordered_pairs(ranks):
            counts[pair_outcome(scores[better], scores[worse], tol)] += 1
    scored = counts["correct"] + counts["wrong"] + counts["tie"]
    return {
        "pairs": scored + counts["unscored"],
        "correct": counts["correct"],
        "wrong": counts["wrong"],
        "ties": counts["tie"],
        "unscored_pairs": counts["unscored"],
        "pairwise_accuracy": _ratio(counts["correct"], scored),
        "pairwise_accuracy_excluding_ties": _ratio(counts["correct"], counts["correct"] + counts["wrong"]),
        "tie_rate": _ratio(counts["tie"], scored),
    }


def _eligible(scores_per_item: Sequence[Scores], ranks_per_item: Sequence[Ranks]):
    """Yield (scores, ranks) of items that can be evaluated; count the ones that cannot."""
    skipped: Counter = Counter()
    kept = []
    for scores, ranks in zip(scores_per_item, ranks_per_item):
        if len(set(ranks)) < 2:
            skipped["items_without_pairs"] += 1
        elif any(is_missing(s) for s in scores):
            skipped["unscored_items"] += 1
        else:
            kept.append(([float(s) for s in scores], list(ranks)))
    return kept, skipped


def exact_match_best(scores_per_item: Sequence[Scores], ranks_per_item: Sequence[Ranks], tol: float = TIE_TOL) -> dict:
    """Share of items where the judge's single top-scored reply is a human-best reply.

    The human-best replies are those with the item's lowest rank (rank 0). A tie for the
    judge's top score is never a match. Returns ``{"exact_match_best", "items_evaluated",
    "unscored_items", "items_without_pairs"}``.
    """
    _check(scores_per_item, ranks_per_item)
    kept, skipped = _eligible(scores_per_item, ranks_per_item)
    hits = 0
    for scores, ranks in kept:
        top = max(scores)
        at_top = [i for i, s in enumerate(scores) if top - s <= tol]
        hits += len(at_top) == 1 and ranks[at_top[0]] == min(ranks)
    return {"exact_match_best": _ratio(hits, len(kept)), "items_evaluated": len(kept),
            "unscored_items": skipped["unscored_items"], "items_without_pairs": skipped["items_without_pairs"]}


def exact_match_ranking(scores_per_item: Sequence[Scores], ranks_per_item: Sequence[Ranks], tol: float = TIE_TOL) -> dict:
    """Share of items where the judge orders *every* human-ordered pair correctly (no ties).

    Replies the humans ranked equally may score anything. Same exclusions as
    :func:`exact_match_best`. Returns ``{"exact_match_ranking", "items_evaluated"}``.
    """
    _check(scores_per_item, ranks_per_item)
    kept, _ = _eligible(scores_per_item, ranks_per_item)
    hits = sum(all(pair_outcome(s[b], s[w], tol) == "correct" for b, w in ordered_pairs(r)) for s, r in kept)
    return {"exact_match_ranking": _ratio(hits, len(kept)), "items_evaluated": len(kept)}


def rank_correlations(scores_per_item: Sequence[Scores], ranks_per_item: Sequence[Ranks], tol: float = TIE_TOL) -> dict:
    """Per-item Spearman rho and Kendall tau-b (scipy) of scores vs. negated ranks, averaged.

    Items whose scores are all equal (within ``tol``) are counted in ``constant_score_items``
    and left out. Returns ``{"spearman", "kendall_tau", "correlation_items",
    "constant_score_items", "unscored_items"}``; the averages are None without any item.
    """
    from scipy.stats import kendalltau, spearmanr

    _check(scores_per_item, ranks_per_item)
    kept, skipped = _eligible(scores_per_item, ranks_per_item)
    rhos: list[float] = []
    taus: list[float] = []
    constant = 0
    for scores, ranks in kept:
        if max(scores) - min(scores) <= tol:
            constant += 1
            continue
        # snap near-equal scores together so scipy sees the same ties pair_outcome does
        snapped = _snap(scores, tol)
        neg = [-r for r in ranks]
        rhos.append(float(spearmanr(snapped, neg).statistic))
        taus.append(float(kendalltau(snapped, neg).statistic))
    return {
        "spearman": sum(rhos) / len(rhos) if rhos else None,
        "kendall_tau": sum(taus) / len(taus) if taus else None,
        "correlation_items": len(rhos),
        "constant_score_items": constant,
        "unscored_items": skipped["unscored_items"],
    }


def _snap(scores: list[float], tol: float) -> list[float]:
    """Replace each score by the smallest score within ``tol`` of a chain leading to it."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    out = list(scores)
    for prev, cur in itertools.pairwise(order):
        if scores[cur] - scores[prev] <= tol:
            out[cur] = out[prev]
    return out


def _judgment_counts(judgments: Iterable[Mapping]) -> tuple[int, int, int]:
    total = parse_errors = unscored = 0
    for j in judgments:
        total += 1
        parse_errors += bool(j.get("parse_error"))
        unscored += is_missing(j.get("score"))
    return total, parse_errors, unscored


def parse_failure_rate(judgments: Iterable[Mapping]) -> float | None:
    """Share of judgments whose text had no parsable score line (``parse_error`` set).

    With sampled scoring these are exactly the judgments without a score. With expected
    scoring the score comes from the digit probabilities and exists anyway, so this rate says
    how often the judge's own text failed the format (see :func:`unscored_judgment_rate`).
    """
    total, errors, _ = _judgment_counts(judgments)
    return _ratio(errors, total)


def unscored_judgment_rate(judgments: Iterable[Mapping]) -> float | None:
    """Share of judgments that carry no usable score (``score`` None/NaN)."""
    total, _, unscored = _judgment_counts(judgments)
    return _ratio(unscored, total)


def score_histogram(scores: Iterable[float | None], lo: int | None = None, hi: int | None = None) -> dict[str, int]:
    """Counts of scores rounded half-up to whole numbers, keys as strings in numeric order.

    Missing scores are not counted. With ``lo``/``hi`` every whole score in between gets a
    key, zero if unused (scores outside the range still get their own key).
    """
    counts: Counter = Counter()
    for s in scores:
        if not is_missing(s):
            counts[math.floor(float(s) + 0.5)] += 1
    if lo is not None and hi is not None:
        for v in range(lo, hi + 1):
            counts.setdefault(v, 0)
    return {str(k): counts[k] for k in sorted(counts)}


def mean_scores(values: Iterable[float | None]) -> float | None:
    """Mean of the usable scores of one reply's judgments, or None if there is none."""
    usable = [float(v) for v in values if not is_missing(v)]
    return sum(usable) / len(usable) if usable else None


def length_scores(texts: Sequence[str]) -> list[float]:
    """The ``longer_wins`` baseline's scores: each reply's length in characters (stripped)."""
    return [float(len(t.strip())) for t in texts]


def agreement_metrics(
    scores_per_item: Sequence[Scores], ranks_per_item: Sequence[Ranks], *, ranked: bool = True, tol: float = TIE_TOL
) -> dict:
    """All score-based metrics in the layout of ``summary.json``'s ``metrics``.

    ``ranked=False`` (data that only ever has one pair per item, such as pairwise preference
    files) sets the item-level metrics to None: with two replies they only restate the pair.
    """
    out = pairwise_agreement(scores_per_item, ranks_per_item, tol)
    item_keys = {"exact_match_best": None, "exact_match_ranking": None, "spearman": None, "kendall_tau": None,
                 "constant_score_items": None, "unscored_items": None}
    if ranked:
        best = exact_match_best(scores_per_item, ranks_per_item, tol)
        corr = rank_correlations(scores_per_item, ranks_per_item, tol)
        item_keys = {
            "exact_match_best": best["exact_match_best"],
            "exact_match_ranking": exact_match_ranking(scores_per_item, ranks_per_item, tol)["exact_match_ranking"],
            "spearman": corr["spearman"],
            "kendall_tau": corr["kendall_tau"],
            "constant_score_items": corr["constant_score_items"],
            "unscored_items": best["unscored_items"],
        }
    out.update(item_keys)
    return out


def random_baseline(ranks_per_item: Sequence[Ranks], *, ranked: bool = True) -> dict:
    """Exact expected metrics of a judge that gives every reply an independent random score.

    Such a judge never ties and never fails, so each pair is right with probability 1/2; the
    single top reply is a human-best one with probability ``b/n`` (``b`` best of ``n``
    replies); the whole ranking is right with probability ``prod(g!)/n!`` over groups ``g``
    of equally ranked replies; expected Spearman and Kendall correlations are 0 by symmetry.
    Computed exactly (no sampling), over every item and pair of the data.
    """
    pairs = sum(len(ordered_pairs(r)) for r in ranks_per_item)
    usable = [list(r) for r in ranks_per_item if len(set(r)) >= 2]
    half = 0.5 if pairs else None
    out = {
        "pairs": pairs, "correct": pairs / 2, "wrong": pairs / 2, "ties": 0, "unscored_pairs": 0,
        "pairwise_accuracy": half, "pairwise_accuracy_excluding_ties": half, "tie_rate": 0.0 if pairs else None,
        "exact_match_best": None, "exact_match_ranking": None, "spearman": None, "kendall_tau": None,
        "constant_score_items": None, "unscored_items": None,
    }
    if ranked:
        best = [r.count(min(r)) / len(r) for r in usable]
        whole = [math.prod(math.factorial(c) for c in Counter(r).values()) / math.factorial(len(r)) for r in usable]
        out.update(
            exact_match_best=_ratio(sum(best), len(best)),
            exact_match_ranking=_ratio(sum(whole), len(whole)),
            spearman=0.0 if usable else None,
            kendall_tau=0.0 if usable else None,
            constant_score_items=0,
            unscored_items=0,
        )
    return out
