"""The report figures' common look: matplotlib (Agg backend, no pyplot state) settings and small helpers.

Text that comes from a run (drop reasons, metric names, model names) goes through
:func:`safe_text` so matplotlib never reads it as mathtext, and long labels are shortened.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 110
WIDTH = 10.0  # inches: 1100 px at DPI, a little less than the page's content width
KEPT_COLOR = "#2e7d32"
# reasons get colours in order of first appearance; "kept" is always green
REASON_COLORS = ["#ef6c00", "#c62828", "#6a1b9a", "#1565c0", "#8d6e63", "#f9a825", "#00838f", "#ad1457", "#546e7a", "#9e9d24"]
RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "figure.facecolor": "white",
}


def safe_text(text: object, limit: int = 40) -> str:
    """Run text made safe for a matplotlib label: no mathtext, at most ``limit`` characters."""
    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def new_figure(ncols: int = 1, height: float = 3.6, width: float = WIDTH) -> tuple[Figure, list]:
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def styled(draw):
    """Run ``draw`` under the report's rc settings (they apply when artists are created)."""

    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return draw(*args, **kwargs)

    wrapper.__name__ = draw.__name__
    wrapper.__doc__ = draw.__doc__
    return wrapper


def finite(values) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return out


def reason_colors(reasons: Sequence[str]) -> dict[str, str]:
    return {r: REASON_COLORS[i % len(REASON_COLORS)] for i, r in enumerate(reasons)}


def data_top(ax) -> float:
    """The highest y value of the lines, error bars and patches drawn on ``ax`` (0 if none)."""
    top = 0.0
    for line in ax.get_lines():
        ys = finite(list(line.get_ydata()))
        top = max([top] + ys)
    for coll in ax.collections:  # error bar segments
        for path in coll.get_paths():
            ys = finite([float(v) for v in path.vertices[:, 1]])
            top = max([top] + ys)
    return top


def integer_y(ax) -> None:
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def pad_x(ax, n: int, slots: int = 4) -> None:
    """Categorical x positions 0..n-1 take at most 1/``slots`` of the width each, so one or two
    iterations do not become bars as wide as the figure."""
    extra = max(slots - n, 0) / 2
    ax.set_xlim(-0.5 - extra, n - 0.5 + extra)


def bucket_key(k: str):
    """Sort key of histogram buckets: numeric ones in numeric order, then the others by name."""
    try:
        return (0, float(k), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(k))


def is_finite_number(v) -> bool:
    """A real number (not a bool, not NaN or infinite)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
