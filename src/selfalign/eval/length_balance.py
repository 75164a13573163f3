"""Judge accuracy split by length direction, with bootstrap intervals over prompts.

On human preference data the preferred reply is more often the longer one (OpenAssistant:
about two pairs in three), so a judge that only learned "longer is better" already scores well
above 50% pairwise accuracy. What shows that a judge learned something *beyond* length is its
accuracy within each length direction:

* **longer-preferred pairs**: the reply humans ranked better is the longer one (characters,
  stripped); longer-wins is right on all of them;
* **shorter-preferred pairs**: the better reply is the shorter one; longer-wins is wrong on all;
* **length-balanced accuracy**: the mean of the two accuracies. Random and longer-wins both
  score 50%: anything above 50% is agreement with humans that length does not explain.
  Pairs of equal length are in neither direction (counted in ``equal_length_pairs``); they
  count in the overall accuracy.
* **agreement with longer-wins**: over scored pairs of unequal length, the share where the
  judge scores the longer reply strictly higher (a judge tie is not agreement).

Pair outcomes follow :mod:`selfalign.eval.metrics` (a tie is a miss, unscored pairs are left
out of every denominator). Every rate gets a 95% percentile-bootstrap interval that resamples
*prompts* (items) with replacement, since the pairs of one prompt are not independent; a
rate is the ratio of summed counts over the resampled prompts. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from selfalign.eval.metrics import TIE_TOL, is_missing, ordered_pairs, pair_outcome

__all__ = ["RATES", "length_balanced_metrics", "five_best", "per_item_counts"]

DEFAULT_RESAMPLES = 2000

# rate -> (numerator count, denominator count); the length-balanced accuracy is derived from two
RATES = {
    "pairwise_accuracy": ("correct", "scored"),
    "longer_preferred_accuracy": ("correct_longer", "scored_longer"),
    "shorter_preferred_accuracy": ("correct_shorter", "scored_shorter"),
    "longer_wins_agreement": ("picks_longer", "scored_unequal"),
    "tie_rate": ("ties", "scored"),
}
_COUNTS = ("correct", "scored", "correct_longer", "scored_longer", "correct_shorter", "scored_shorter",
           "picks_longer", "scored_unequal", "ties", "equal_length")


def per_item_counts(scores: Sequence[float | None], ranks: Sequence[int], lengths: Sequence[float],
                    tol: float = TIE_TOL) -> dict[str, int]:
    """The counts of one item (prompt) that every rate of this module is built from."""
    c = dict.fromkeys(_COUNTS, 0)
    for better, worse in ordered_pairs(ranks):
        outcome = pair_outcome(scores[better], scores[worse], tol)
        if outcome == "unscored":
            continue
        hit = outcome == "correct"
        c["scored"] += 1
        c["correct"] += hit
        c["ties"] += outcome == "tie"
        lb, lw = lengths[better], lengths[worse]
        if lb == lw:
            c["equal_length"] += 1
            continue
        c["scored_unequal"] += 1
        longer, shorter = (better, worse) if lb > lw else (worse, better)
        c["picks_longer"] += pair_outcome(scores[longer], scores[shorter], tol) == "correct"
        direction = "longer" if lb > lw else "shorter"
        c[f"scored_{direction}"] += 1
        c[f"correct_{direction}"] += hit
    return c


def _rates(totals) -> dict[str, float | None]:
    """Rates from summed counts; ``totals`` maps a count name to a number or a numpy array."""
    import numpy as np

    out = {}
    for name, (num, den) in RATES.items():
        n, d = np.asarray(totals[num], dtype=float), np.asarray(totals[den], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[name] = np.where(d > 0, n / np.where(d > 0, d, 1), np.nan)
    out["length_balanced_accuracy"] = (out["longer_preferred_accuracy"] + out["shorter_preferred_accuracy"]) / 2
    return out


def length_balanced_metrics(
    scores_per_item: Sequence[Sequence[float | None]],
    ranks_per_item: Sequence[Sequence[int]],
    lengths_per_item: Sequence[Sequence[float]],
    *,
    tol: float = TIE_TOL,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """The length-split rates with bootstrap intervals over items.

    Returns ``{rate: value or None, ...}`` for every key of :data:`RATES` plus
    ``length_balanced_accuracy``, the pair counts ``longer_preferred_pairs``,
    ``shorter_preferred_pairs``, ``equal_length_pairs`` (scored pairs only), and ``ci95``:
    ``{rate: [low, high] or None}`` (None when the rate is undefined on the data).
    """
    import numpy as np

    if not len(scores_per_item) == len(ranks_per_item) == len(lengths_per_item):
        raise ValueError("scores, ranks and lengths must have one entry per item")
    rows = [per_item_counts(s, r, n, tol) for s, r, n in zip(scores_per_item, ranks_per_item, lengths_per_item)]
    counts = np.array([[row[k] for k in _COUNTS] for row in rows], dtype=float).reshape(len(rows), len(_COUNTS))
    point = _rates(dict(zip(_COUNTS, counts.sum(axis=0))))
    out: dict = {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in point.items()}
    total = dict(zip(_COUNTS, counts.sum(axis=0).astype(int).tolist()))
    out.update(longer_preferred_pairs=total["scored_longer"], shorter_preferred_pairs=total["scored_shorter"],
               equal_length_pairs=total["equal_length"])
    ci: dict = dict.fromkeys(point)
    if len(rows) and resamples > 0:
        rng = np.random.default_rng(seed)
        # each resample draws len(rows) prompts with replacement: weights[b, i] = times item i was drawn
        weights = rng.multinomial(len(rows), np.full(len(rows), 1 / len(rows)), size=resamples)
        boot = _rates(dict(zip(_COUNTS, (weights @ counts).T)))
        alpha = (1 - level) / 2
        for name, values in boot.items():
            if out[name] is None:
                continue
            finite = values[np.isfinite(values)]
            if finite.size:
                lo, hi = np.quantile(finite, [alpha, 1 - alpha])
                ci[name] = [round(float(lo), 4), round(float(hi), 4)]
    out["ci95"] = ci
    return out


def five_best(scores_per_item: Sequence[Sequence[float | None]], ranks_per_item: Sequence[Sequence[int]],
              top: float = 5.0) -> dict:
    """The Self-Rewarding paper's "5-best %": the share of items whose human-best reply (rank 0,
    any of them when several share it) gets the top score of the scale from the judge.

    A reply's score is its mean over judgments, so "gets a 5" means the mean rounds (half up)
    to ``top``: with sampled scoring, most of its judgments said 5; with probability-weighted
    scoring, the expected score is at least ``top - 0.5``. Items without an ordered pair or with
    an unscored human-best reply are left out. Returns ``{"five_best", "five_best_items"}``.
    """
    hits = n = 0
    for scores, ranks in zip(scores_per_item, ranks_per_item):
        if len(set(ranks)) < 2:
            continue
        best = [s for s, r in zip(scores, ranks) if r == min(ranks)]
        if any(is_missing(s) for s in best):
            continue
        n += 1
        hits += any(int(float(s) + 0.5) >= top for s in best)
    return {"five_best": round(hits / n, 4) if n else None, "five_best_items": n}
