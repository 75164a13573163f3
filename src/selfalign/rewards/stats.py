"""Bootstrap statistics over prompts: a mean with its interval, and a paired difference.

Samples of one prompt are not independent (the prompt decides much of the length and the
reward), so values are first averaged per prompt (:func:`per_prompt_means`) and the bootstrap
resamples prompts. A paired difference compares two models on the same prompts: the per-prompt
differences are resampled together, which removes the between-prompt variance that an
unpaired comparison would carry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class Estimate:
    """A mean and its percentile-bootstrap interval over ``n`` units (prompts)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self, digits: int = 4) -> dict:
        return {
            "mean": round(self.mean, digits),
            "ci_low": round(self.low, digits),
            "ci_high": round(self.high, digits),
            "n": self.n,
            "level": self.level,
        }

    def fmt(self, digits: int = 3, signed: bool = False) -> str:
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{f.format(self.mean)} [{f.format(self.low)}, {f.format(self.high)}]"


def per_prompt_means(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """``(prompt_id, value)`` pairs -> ``prompt_id -> mean value``, in first-seen order."""
    sums: dict[str, list[float]] = {}
    for pid, v in pairs:
        sums.setdefault(pid, []).append(float(v))
    return {pid: sum(vs) / len(vs) for pid, vs in sums.items()}


def bootstrap_mean(
    values: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES, level: float = 0.95, seed: int = 0
) -> Estimate:
    """The mean of ``values`` with a percentile bootstrap interval (seeded, reproducible)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_mean needs a non-empty 1-d sequence of values")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_mean: values must be finite")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size), level)


def paired_difference(
    a: Mapping[str, float],
    b: Mapping[str, float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean of ``a[p] - b[p]`` over the prompts both have, with a bootstrap interval over prompts.

    Raises ``ValueError`` when the two share no prompt or cover different prompts (a paired
    comparison on a silently smaller set would mislead).
    """
    if set(a) != set(b):
        only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
        raise ValueError(f"paired_difference: the prompts differ ({only_a} only in the first, {only_b} only in the second)")
    keys = list(a)
    return bootstrap_mean([a[k] - b[k] for k in keys], resamples=resamples, level=level, seed=seed)
