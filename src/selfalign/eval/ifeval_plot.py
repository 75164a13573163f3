"""The run report's IFEval figure: the four IFEval figures of each model across the iterations.

Reads the ``ifeval_*`` keys the ``eval.ifeval`` hook writes into each iteration's metrics.json
(``ifeval_start_*`` in iteration 1 for the model the run starts from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from selfalign.eval.plots import _figure, _png, _styled, _t

SERIES = (
    ("prompt_level_strict", "prompt-level strict", "#1565c0", "o", "-"),
    ("instruction_level_strict", "instruction-level strict", "#2e7d32", "s", "-"),
    ("prompt_level_loose", "prompt-level loose", "#1565c0", "o", ":"),
    ("instruction_level_loose", "instruction-level loose", "#2e7d32", "s", ":"),
)


def _point(m: Mapping, prefix: str, name: str) -> tuple[float, float, float] | None:
    v = m.get(f"{prefix}{name}")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    ci = m.get(f"{prefix}{name}_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        return float(v), float(ci[0]), float(ci[1])
    return float(v), float(v), float(v)


def series_from_metrics(labels: Sequence[str], metrics: Sequence[Mapping]) -> tuple[list[str], dict[str, list]] | None:
    """x labels (the starting model first, when measured) and ``metric -> [(value, low, high) | None]``;
    None when no iteration has IFEval figures."""
    if not any("ifeval_prompt_level_strict" in (m or {}) for m in metrics):
        return None
    xs: list[str] = []
    points: dict[str, list] = {name: [] for name, *_ in SERIES}
    start = next((m for m in metrics if m and "ifeval_start_prompt_level_strict" in m), None)
    if start is not None:
        xs.append("start")
        for name in points:
            points[name].append(_point(start, "ifeval_start_", name))
    for label, m in zip(labels, metrics):
        xs.append(str(label))
        for name in points:
            points[name].append(_point(m or {}, "ifeval_", name))
    return xs, points


@_styled
def ifeval_across_iterations(labels: Sequence[str], metrics: Sequence[Mapping]) -> bytes | None:
    """IFEval accuracy of each model (the starting model, then the one each iteration trained),
    strict (solid) and loose (dotted), with 95% bootstrap intervals over prompts."""
    from matplotlib.ticker import PercentFormatter

    data = series_from_metrics(labels, metrics)
    if data is None:
        return None
    xs, points = data
    fig, (ax,) = _figure(1, height=3.6)
    n = len(SERIES)
    for k, (name, title, color, marker, style) in enumerate(SERIES):
        px, py, lo, hi = [], [], [], []
        for i, p in enumerate(points[name]):
            if p is None:
                continue
            px.append(i + (k - (n - 1) / 2) * 0.06)  # a little apart, so intervals do not hide each other
            py.append(p[0])
            lo.append(max(p[0] - p[1], 0))
            hi.append(max(p[2] - p[0], 0))
        if px:
            ax.errorbar(px, py, yerr=[lo, hi], color=color, marker=marker, linestyle=style, capsize=3, markersize=5, label=title)
    ax.set_xticks(range(len(xs)), [_t(x, 16) for x in xs])
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("IFEval accuracy")
    ax.set_title("IFEval per model (95% intervals over prompts)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)
