"""Win-rate arithmetic: combining the two orders of an item, rates, the bootstrap interval, position bias.

Per item (:func:`combine_orders`):

* both orders parsed and name the **same underlying model** -> a win (or loss) for A;
* both parsed but they disagree (the judge followed the position, not the content) -> a tie;
* either order has no verdict (a parse failure) -> a tie, counted in ``unparsed``.

Win rate (:func:`win_rate`) = ``(wins + 0.5 * ties) / n``; the strict rate is ``wins / n``.
The 95% interval (:func:`bootstrap_ci`) resamples items with replacement (percentile
bootstrap, numpy, seeded). Position bias (:func:`first_position_share`): among single
judgments with a verdict, the share that picked the response shown first (0.5 = no bias);
:func:`order_disagreement`: among items with both verdicts, the share whose two orders
disagree.  Pure functions: no files, no engines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

ORDERS = ("a_first", "b_first")  # A shown first, B shown first
CONVENTION = "win_rate = (wins + 0.5 * ties) / n; strict_win_rate = wins / n; unparsed items count as ties"


class ItemResult(NamedTuple):
    """An item's outcome for model A (``"win" | "tie" | "loss"``) and why
    (``"agree" | "disagree" | "unparsed"``)."""

    outcome: str
    status: str


def position_to_model(position: str | None, order: str) -> str | None:
    """The model (``"a"``/``"b"``) behind a shown label (``"A"`` = first shown) in ``order``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if position is None:
        return None
    if position not in ("A", "B"):
        raise ValueError(f"position must be 'A', 'B' or None, got {position!r}")
    first, second = ("a", "b") if order == "a_first" else ("b", "a")
    return first if position == "A" else second


def combine_orders(a_first: str | None, b_first: str | None) -> ItemResult:
    """Combine the winners (``"a"``, ``"b"`` or None for no verdict) of the two orders.

    A win or loss only when both orders name the same model; otherwise a tie, marked
    ``"disagree"`` (both parsed) or ``"unparsed"`` (either missing).
    """
    for w in (a_first, b_first):
        if w not in ("a", "b", None):
            raise ValueError(f"winner must be 'a', 'b' or None, got {w!r}")
    if a_first is None or b_first is None:
        return ItemResult("tie", "unparsed")
    if a_first != b_first:
        return ItemResult("tie", "disagree")
    return ItemResult("win" if a_first == "a" else "loss", "agree")


_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def item_scores(outcomes: Iterable[str | ItemResult]) -> np.ndarray:
    """1 / 0.5 / 0 per win / tie / loss."""
    out = []
    for o in outcomes:
        key = o.outcome if isinstance(o, ItemResult) else o
        if key not in _SCORE:
            raise ValueError(f"outcome must be win, tie or loss, got {key!r}")
        out.append(_SCORE[key])
    return np.asarray(out, dtype=float)


def win_rate(outcomes: Iterable[str | ItemResult]) -> float | None:
    """``(wins + 0.5 * ties) / n``; None when there are no items."""
    s = item_scores(outcomes)
    return float(s.mean()) if s.size else None


def strict_win_rate(outcomes: Iterable[str | ItemResult]) -> float | None:
    """``wins / n``; None when there are no items."""
    s = item_scores(outcomes)
    return float((s == 1.0).mean()) if s.size else None


def bootstrap_ci(
    scores: Sequence[float] | np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``scores`` (items resampled with
    replacement, ``resamples`` times, ``numpy.random.default_rng(seed)``). None without items."""
    if resamples < 1 or not 0 < level < 1:
        raise ValueError("need resamples >= 1 and 0 < level < 1")
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // x.size)  # bound memory for large item counts
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        means[start : start + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def first_position_share(positions: Iterable[str | None]) -> float | None:
    """Share of the verdicts (``"A"`` = first shown, ``"B"``; None skipped) that picked the
    first-shown response. 0.5 means no position preference; None without verdicts."""
    c = Counter(p for p in positions if p is not None)
    bad = set(c) - {"A", "B"}
    if bad:
        raise ValueError(f"positions must be 'A', 'B' or None, got {sorted(bad)}")
    total = c["A"] + c["B"]
    return c["A"] / total if total else None


def order_disagreement(results: Iterable[ItemResult]) -> float | None:
    """Among items whose two orders both have a verdict, the share where they disagree."""
    st = Counter(r.status for r in results)
    parsed = st["agree"] + st["disagree"]
    return st["disagree"] / parsed if parsed else None
