"""Figures for the run report (matplotlib, Agg backend, no pyplot state).

Every function takes plain Python data, draws one figure and returns it as PNG bytes, or
``None`` when there is nothing to draw.  None of them reads files: :mod:`selfalign.eval.report`
collects the data and decides which figures a run gets.  Text that comes from a run (drop
reasons, metric names, model names) goes through :func:`_t` so matplotlib never reads it as
mathtext, and long labels are shortened.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

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


def _t(text: object, limit: int = 40) -> str:
    """Run text made safe for a matplotlib label: no mathtext, at most ``limit`` characters."""
    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _figure(ncols: int = 1, height: float = 3.6, width: float = WIDTH) -> tuple[Figure, list]:
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _styled(draw):
    """Run ``draw`` under the report's rc settings (they apply when artists are created)."""

    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return draw(*args, **kwargs)

    wrapper.__name__ = draw.__name__
    wrapper.__doc__ = draw.__doc__
    return wrapper


def _finite(values) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return out


def _reason_colors(reasons: Sequence[str]) -> dict[str, str]:
    return {r: REASON_COLORS[i % len(REASON_COLORS)] for i, r in enumerate(reasons)}


def _data_top(ax) -> float:
    """The highest y value of the lines, error bars and patches drawn on ``ax`` (0 if none)."""
    top = 0.0
    for line in ax.get_lines():
        ys = _finite(list(line.get_ydata()))
        top = max([top] + ys)
    for coll in ax.collections:  # error bar segments
        for path in coll.get_paths():
            ys = _finite([float(v) for v in path.vertices[:, 1]])
            top = max([top] + ys)
    return top


def _int_y(ax) -> None:
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _pad_x(ax, n: int, slots: int = 4) -> None:
    """Categorical x positions 0..n-1 take at most 1/``slots`` of the width each, so one or two
    iterations do not become bars as wide as the figure."""
    extra = max(slots - n, 0) / 2
    ax.set_xlim(-0.5 - extra, n - 0.5 + extra)


# --------------------------------------------------------------------------- scores


@_styled
def score_distribution(
    labels: Sequence[str],
    judgment_scores: Sequence[Sequence[float]],
    response_rewards: Sequence[Sequence[float]],
    histograms: Sequence[dict | None] = (),
) -> bytes | None:
    """Left: share of judgments per (rounded) score, one bar colour per iteration.  Right: the
    per-response reward (mean of its judgments) per iteration as box plots.

    ``histograms`` ({score: count}, e.g. metrics' ``score_histogram``) stand in for an
    iteration whose judgment scores are not available.
    """
    n = len(labels)
    hists: list[dict[str, float]] = []
    all_scores = [s for scores in judgment_scores for s in _finite(scores)]
    in_rubric = bool(all_scores) and all(0 <= s <= 5 for s in all_scores)
    for i in range(n):
        scores = _finite(judgment_scores[i]) if i < len(judgment_scores) else []
        if scores and in_rubric:
            counts: dict[str, float] = {}
            for s in scores:
                key = str(math.floor(s + 0.5))
                counts[key] = counts.get(key, 0) + 1
            hists.append(counts)
        elif not scores and i < len(histograms) and isinstance(histograms[i], dict):
            hists.append({str(k): float(v) for k, v in histograms[i].items() if isinstance(v, (int, float))})
        else:
            hists.append({})
    has_hist = any(sum(h.values()) > 0 for h in hists)
    rewards = [_finite(r) for r in response_rewards] + [[] for _ in range(n - len(response_rewards))]
    has_box = any(rewards)
    raw_only = bool(all_scores) and not in_rubric  # e.g. a reward model: scores on any scale
    if not (has_hist or has_box or raw_only):
        return None
    panels = (1 if (has_hist or raw_only) else 0) + (1 if has_box else 0)
    fig, axes = _figure(panels)
    ax_iter = iter(axes)
    colors = [f"C{i % 10}" for i in range(n)]
    if raw_only:
        ax = next(ax_iter)
        lo, hi = min(all_scores), max(all_scores)
        bins = 20 if hi > lo else 1
        for i, scores in enumerate(judgment_scores):
            vals = _finite(scores)
            if vals:
                ax.hist(vals, bins=bins, range=(lo, hi if hi > lo else lo + 1), histtype="step", linewidth=1.8,
                        color=colors[i], label=_t(labels[i]), density=True)
        ax.set_title("Judgment scores")
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.legend()
    elif has_hist:
        ax = next(ax_iter)
        keys = sorted({k for h in hists for k in h}, key=_num_key)
        if in_rubric or not keys:
            keys = [str(k) for k in range(6)] + [k for k in keys if k not in {str(k) for k in range(6)}]
        drawn = [(i, h) for i, h in enumerate(hists) if sum(h.values()) > 0]
        width = 0.8 / max(len(drawn), 1)
        top = 0.0
        for j, (i, h) in enumerate(drawn):
            total = sum(h.values())
            xs = [x + (j - (len(drawn) - 1) / 2) * width for x in range(len(keys))]
            shares = [h.get(k, 0) / total for k in keys]
            top = max([top] + shares)
            ax.bar(xs, shares, width=width * 0.95, color=colors[i], label=f"{_t(labels[i])} (n={int(total)})")
        ax.set_ylim(0, top * (1.2 + 0.07 * len(drawn)))  # headroom for the legend
        ax.set_xticks(range(len(keys)), [_t(k, 8) for k in keys])
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_title("Judgment scores (nearest whole score)")
        ax.set_xlabel("score")
        ax.set_ylabel("share of judgments")
        ax.legend()
    if has_box:
        ax = next(ax_iter)
        idx = [i for i in range(n) if rewards[i]]
        ax.boxplot([rewards[i] for i in idx], positions=range(len(idx)), widths=0.5, patch_artist=True,
                   medianprops={"color": "black"}, boxprops={"facecolor": "#bbdefb"}, showmeans=True,
                   meanprops={"marker": "D", "markerfacecolor": "#c62828", "markeredgecolor": "#c62828", "markersize": 5})
        ax.set_xticks(range(len(idx)), [f"{_t(labels[i], 16)}\n(n={len(rewards[i])})" for i in idx])
        _pad_x(ax, len(idx), 3)
        ax.set_title("Reward per response (mean of its judgments)")
        ax.set_ylabel("reward")
        ax.grid(axis="x", visible=False)
    return _png(fig)


def _num_key(k: str):
    try:
        return (0, float(k), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(k))


# --------------------------------------------------------------------------- pairs


def _stacked(ax, labels: Sequence[str], kept: Sequence[int | None], dropped: Sequence[dict], kept_label: str, title: str,
             notes: Sequence[str | None] = ()):
    reasons: list[str] = []
    for d in dropped:
        for r, v in (d or {}).items():
            if r not in reasons and _is_num(v) and v > 0:
                reasons.append(r)
    colors = _reason_colors(reasons)
    x = list(range(len(labels)))
    bottom = [float(k or 0) for k in kept]
    ax.bar(x, bottom, width=0.6, color=KEPT_COLOR, label=kept_label)
    for i, k in enumerate(kept):
        if k:
            ax.text(i, k / 2, str(k), ha="center", va="center", color="white", fontsize=9, fontweight="bold")
    for r in reasons:
        vals = [float((d or {}).get(r) or 0) for d in dropped]
        ax.bar(x, vals, width=0.6, bottom=bottom, color=colors[r], label=f"dropped: {_t(r, 30)}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    top = max(bottom + [1])
    for i, k in enumerate(kept):
        if bottom[i] <= 0:  # an empty column says why
            note = notes[i] if i < len(notes) and notes[i] else ("0" if k is not None else "no data yet")
            ax.text(i, top * 0.02, _t(note, 30), ha="center", va="bottom", color="#757575", fontsize=9, style="italic")
    ax.set_xticks(x, [_t(lab, 16) for lab in labels])
    _pad_x(ax, len(labels))
    ax.set_title(title)
    _int_y(ax)
    ax.grid(axis="x", visible=False)
    ax.set_ylim(0, max(bottom + [1]) * 1.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))


@_styled
def pairs_breakdown(
    labels: Sequence[str],
    kept: Sequence[int | None],
    dropped: Sequence[dict],
    judge_kept: Sequence[int | None] = (),
    judge_dropped: Sequence[dict] = (),
    judge_notes: Sequence[str | None] = (),
    *,
    title: str = "Preference pairs per iteration (one per prompt)",
    kept_label: str = "pair kept",
    unit: str = "prompts",
) -> bytes | None:
    """Stacked bars per iteration: preference pairs made (green) and prompts without a pair, by
    reason.  A second panel does the same for Meta-Rewarding's judge pairs when given
    (``judge_notes``: why an iteration has none, e.g. its schedule trains the actor only)."""
    has_actor = any(k for k in kept) or any(d for d in dropped)
    has_judge = any(k for k in judge_kept) or any(d for d in judge_dropped)
    if not (has_actor or has_judge):
        return None
    panels = int(has_actor) + int(has_judge)
    fig, axes = _figure(panels, height=3.6)
    i = 0
    if has_actor:
        _stacked(axes[i], labels, kept, dropped, kept_label, title)
        axes[i].set_ylabel(unit)
        i += 1
    if has_judge:
        jk = list(judge_kept) + [None] * (len(labels) - len(judge_kept))
        jd = list(judge_dropped) + [{}] * (len(labels) - len(judge_dropped))
        _stacked(axes[i], labels, jk, jd, "judge pair kept", "Judge pairs (meta-judge, one per response)", judge_notes)
        axes[i].set_ylabel("responses")
    return _png(fig)


@_styled
def kept_dropped(title: str, kept: int | None, dropped: dict, kept_label: str = "kept", unit: str = "examples") -> bytes | None:
    """One horizontal stacked bar: kept vs dropped by reason (e.g. a curated corpus)."""
    dropped = {k: v for k, v in (dropped or {}).items() if _is_num(v) and v > 0}
    if not kept and not dropped:
        return None
    fig, (ax,) = _figure(1, height=1.9)
    colors = _reason_colors(list(dropped))
    left = float(kept or 0)
    ax.barh([0], [left], color=KEPT_COLOR, label=f"{_t(kept_label, 30)} ({kept or 0})", height=0.5)
    for r, v in dropped.items():
        ax.barh([0], [v], left=[left], color=colors[r], label=f"dropped: {_t(r, 30)} ({v})", height=0.5)
        left += v
    ax.set_yticks([])
    ax.set_xlabel(unit)
    ax.set_title(_t(title, 80))
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


# --------------------------------------------------------------------------- parse failures


@_styled
def parse_failures(
    labels: Sequence[str],
    by_kind: Sequence[dict],
    totals: Sequence[int],
    rates: Sequence[float | None] = (),
    meta_rates: Sequence[float | None] = (),
) -> bytes | None:
    """Share of judgments that did not parse, per iteration, stacked by error kind.

    ``by_kind[i]`` maps an error kind to its count out of ``totals[i]`` judgments; an
    iteration without them falls back to ``rates[i]`` (one grey bar).  ``meta_rates`` adds
    the meta-judge's parse-failure rate as a line.
    """
    n = len(labels)
    kinds: list[str] = []
    for d in by_kind:
        for k in d or {}:
            if k not in kinds:
                kinds.append(k)
    have_counts = [i < len(totals) and totals[i] > 0 for i in range(n)]
    fallback = [(rates[i] if i < len(rates) else None) for i in range(n)]
    metas = [(meta_rates[i] if i < len(meta_rates) else None) for i in range(n)]
    if not any(have_counts) and all(r is None for r in fallback) and all(m is None for m in metas):
        return None
    fig, (ax,) = _figure(1, height=3.3)
    colors = _reason_colors(kinds)
    x = list(range(n))
    bottom = [0.0] * n
    for k in kinds:
        vals = [((by_kind[i] or {}).get(k, 0) / totals[i]) if have_counts[i] else 0.0 for i in range(n)]
        ax.bar(x, vals, bottom=bottom, width=0.6, color=colors[k], label=_t(k, 40))
        bottom = [b + v for b, v in zip(bottom, vals)]
    fb = [(fallback[i] if not have_counts[i] and fallback[i] is not None else 0.0) for i in range(n)]
    if any(fb):
        ax.bar(x, fb, bottom=bottom, width=0.6, color="#9e9e9e", label="parse failures (from metrics.json)")
        bottom = [b + v for b, v in zip(bottom, fb)]
    for i in range(n):
        shown = bottom[i] if (have_counts[i] or fallback[i] is not None) else None
        if shown is not None:
            ax.text(i, shown + 0.02, f"{shown:.0%}", ha="center", va="bottom", fontsize=9)
        else:
            ax.text(i, 0.02, "no judgments yet", ha="center", va="bottom", color="#757575", fontsize=9, style="italic")
    if any(m is not None for m in metas):
        mx = [i for i in range(n) if metas[i] is not None]
        ax.plot(mx, [metas[i] for i in mx], "o--", color="black", label="meta-judge parse failures")
    ax.set_xticks(x, [_t(lab, 16) for lab in labels])
    _pad_x(ax, n)
    ax.set_ylim(0, 1.12)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("share of judgments")
    ax.set_title("Judgments without a parsable score")
    ax.grid(axis="x", visible=False)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


# --------------------------------------------------------------------------- lengths


@_styled
def response_lengths(
    labels: Sequence[str],
    lengths: Sequence[Sequence[float]],
    fallback_means: Sequence[float | None] = (),
    extra: dict[str, Sequence[float | None]] | None = None,
    extra_words: dict[str, Sequence[float | None]] | None = None,
) -> bytes | None:
    """Mean and median response length per iteration (tokens), the 25-75% band shaded.

    ``fallback_means`` (e.g. metrics' ``mean_response_tokens``) fill iterations without raw
    lengths; ``extra`` adds token series (e.g. mean chosen / rejected tokens of the pairs) and
    ``extra_words`` word-count series in a second panel (e.g. Humpback's instruction words).
    """
    n = len(labels)
    mean: list[float | None] = []
    median: list[float | None] = []
    q1: list[float | None] = []
    q3: list[float | None] = []
    for i in range(n):
        vals = _finite(lengths[i]) if i < len(lengths) else []
        if vals:
            mean.append(statistics.fmean(vals))
            median.append(statistics.median(vals))
            if len(vals) >= 2:
                qs = statistics.quantiles(vals, n=4)
                q1.append(qs[0])
                q3.append(qs[2])
            else:
                q1.append(vals[0])
                q3.append(vals[0])
        else:
            fb = fallback_means[i] if i < len(fallback_means) else None
            mean.append(fb if isinstance(fb, (int, float)) else None)
            median.append(None)
            q1.append(None)
            q3.append(None)
    extra = {k: v for k, v in (extra or {}).items() if any(isinstance(x, (int, float)) for x in v)}
    extra_words = {k: v for k, v in (extra_words or {}).items() if any(isinstance(x, (int, float)) for x in v)}
    has_tokens = any(m is not None for m in mean) or bool(extra)
    if not has_tokens and not extra_words:
        return None
    fig, axes = _figure(int(has_tokens) + int(bool(extra_words)), height=3.4)
    x = list(range(n))

    def line(ax, ys, style, label, color=None):
        pts = [(i, y) for i, y in enumerate(ys) if isinstance(y, (int, float))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=_t(label, 40), color=color, linewidth=2, markersize=6)

    k = 0
    if has_tokens:
        ax = axes[k]
        k += 1
        line(ax, mean, "o-", "responses, mean", "C0")
        band = [i for i in range(n) if q1[i] is not None and median[i] is not None]
        if band:
            # the median a little to the right of the mean, its whiskers the 25-75% range
            ax.errorbar([i + 0.06 for i in band], [median[i] for i in band],
                        yerr=[[median[i] - q1[i] for i in band], [q3[i] - median[i] for i in band]],
                        fmt="s--", color="C0", mfc="white", markersize=6, capsize=4, linewidth=1.2,
                        label="responses, median and 25-75%")
        for j, (name, ys) in enumerate(extra.items()):
            line(ax, ys, "^-", name, f"C{j + 1}")
        ax.set_title("Response length per iteration")
        ax.set_ylabel("tokens")
        ax.set_ylim(0, _data_top(ax) * 1.12 or 1)  # from zero, with room above the highest marker
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_xticks(x, [_t(lab, 16) for lab in labels])
        _pad_x(ax, n)
    if extra_words:
        ax = axes[k]
        for j, (name, ys) in enumerate(extra_words.items()):
            line(ax, ys, "o-", name, f"C{j + 3}")
        ax.set_title("Length in words per iteration")
        ax.set_ylabel("words")
        ax.set_ylim(0, _data_top(ax) * 1.12 or 1)  # from zero, with room above the highest marker
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_xticks(x, [_t(lab, 16) for lab in labels])
        _pad_x(ax, n)
    return _png(fig)


# --------------------------------------------------------------------------- training


def _series(history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for j, h in enumerate(history or []):
        if not isinstance(h, dict):
            continue
        v = h.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            step = h.get("step")
            xs.append(float(step) if isinstance(step, (int, float)) else float(j + 1))
            ys.append(float(v))
    return xs, ys


@_styled
def training_curves(runs: Sequence[tuple[str, Sequence[dict]]]) -> bytes | None:
    """Training loss per logged step for every trained model (``(label, history)``), and for
    DPO runs (histories with ``rewards/margins``) the reward margin and accuracy.

    Panels: loss of the models trained with SFT, loss of the DPO models, DPO reward margin
    (solid) with the share of pairs whose chosen reward is higher (dotted, right axis).
    """
    sft = [(lab, h) for lab, h in runs if _series(h, "loss")[0] and not _series(h, "rewards/margins")[0]]
    dpo = [(lab, h) for lab, h in runs if _series(h, "rewards/margins")[0]]
    dpo_loss = [(lab, h) for lab, h in dpo if _series(h, "loss")[0]]
    panels = int(bool(sft)) + int(bool(dpo_loss)) + int(bool(dpo))
    if not panels:
        return None
    fig, axes = _figure(panels, height=3.4)
    k = 0
    color_of = {lab: f"C{i % 10}" for i, (lab, _) in enumerate(runs)}

    def draw(ax, items, key, title, ylabel, legend=True):
        for lab, h in items:
            xs, ys = _series(h, key)
            ax.plot(xs, ys, "-", marker="o" if len(xs) <= 12 else None, markersize=4,
                    color=color_of[lab], label=_t(lab, 24), linewidth=1.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        steps = [x for _, h in items for x in _series(h, key)[0]]
        if steps and max(steps) - min(steps) < 2:  # one or two logged steps: keep whole-number ticks
            ax.set_xlim(min(steps) - 1, max(steps) + 1)
        if legend:
            ax.legend()

    if sft:
        draw(axes[k], sft, "loss", "SFT loss", "loss")
        k += 1
    if dpo_loss:
        ax = axes[k]
        draw(ax, dpo_loss, "loss", "DPO loss", "loss", legend=False)
        ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1)
        ax.annotate("ln 2", (1.0, math.log(2)), xycoords=("axes fraction", "data"), xytext=(2, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=8, color="grey")
        k += 1
    if dpo:
        ax = axes[k]
        draw(ax, dpo, "rewards/margins", "DPO reward margin", "margin", legend=False)
        ax.axhline(0, color="grey", linestyle=":", linewidth=1)
        if any(_series(h, "rewards/accuracies")[0] for _, h in dpo):
            ax2 = ax.twinx()
            for lab, h in dpo:
                xs, ys = _series(h, "rewards/accuracies")
                if xs:
                    ax2.plot(xs, ys, ":", marker="." if len(xs) <= 12 else None, color=color_of[lab], linewidth=1.2)
            ax2.set_ylim(-0.05, 1.05)
            ax2.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax2.set_ylabel("reward accuracy (dotted)")
            ax2.grid(False)
            ax2.spines["right"].set_visible(True)
        # one legend for the DPO panels, under the figure: it covers no curve
        handles, names = ax.get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 8), title="DPO of", frameon=False)
    return _png(fig)


# --------------------------------------------------------------------------- evaluations

AGREEMENT_METRICS = [
    ("pairwise_accuracy", "pairwise accuracy"),
    ("longer_preferred_accuracy", "longer preferred"),
    ("shorter_preferred_accuracy", "shorter preferred"),
    ("length_balanced_accuracy", "length-balanced"),
    ("exact_match_best", "exact match (best)"),
    ("spearman", "Spearman"),
    ("kendall_tau", "Kendall tau"),
    ("tie_rate", "tie rate"),
    ("parse_failure_rate", "parse failures"),
]


@_styled
def judge_agreement(evals: Sequence[tuple[str, dict]]) -> bytes | None:
    """Per evaluation file (``(label, eval_judge dict)``) one panel: the judge's agreement
    metrics next to each baseline's (grouped bars, value printed above each bar)."""
    panels = []
    for label, ev in evals:
        metrics = ev.get("metrics") if isinstance(ev, dict) else None
        if not isinstance(metrics, dict):
            continue
        keys = [(k, name) for k, name in AGREEMENT_METRICS if _is_num(metrics.get(k))]
        if keys:
            baselines = ev.get("baselines") if isinstance(ev.get("baselines"), dict) else {}
            panels.append((label, metrics, {b: v for b, v in baselines.items() if isinstance(v, dict)}, keys))
    if not panels:
        return None
    fig, axes = _figure(len(panels), height=3.6, width=max(WIDTH, 5.0 * len(panels)))
    for ax, (label, metrics, baselines, keys) in zip(axes, panels):
        series = [("judge", metrics, "#1565c0")] + [
            (f"baseline: {b}", v, REASON_COLORS[(j + 1) % len(REASON_COLORS)] if j else "#9e9e9e")
            for j, (b, v) in enumerate(baselines.items())
        ]
        width = 0.8 / len(series)
        for j, (name, vals, color) in enumerate(series):
            xs = [x + (j - (len(series) - 1) / 2) * width for x in range(len(keys))]
            ys = [float(vals[k]) if _is_num(vals.get(k)) else math.nan for k, _ in keys]
            bars = ax.bar(xs, ys, width=width * 0.95, color=color, label=_t(name, 30))
            cis = vals.get("ci95") if isinstance(vals.get("ci95"), dict) else {}
            for x, y, (k, _) in zip(xs, ys, keys):
                ci = cis.get(k)
                if math.isfinite(y) and isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_num(c) for c in ci):
                    ax.errorbar([x], [y], yerr=[[max(y - ci[0], 0)], [max(ci[1] - y, 0)]], fmt="none", ecolor="black",
                                capsize=2, linewidth=0.8)
            for b, y in zip(bars, ys):
                if math.isfinite(y):
                    ax.text(b.get_x() + b.get_width() / 2, y + (0.01 if y >= 0 else -0.01), f"{y:.2f}",
                            ha="center", va="bottom" if y >= 0 else "top", fontsize=7)
        ax.set_xticks(range(len(keys)), [name for _, name in keys], rotation=20, ha="right")
        lo = min([0.0] + [float(v.get(k)) for _, v, _ in series for k, _ in keys if _is_num(v.get(k))])
        ax.set_ylim(min(lo * 1.15, 0), 1.1)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(_t(f"Judge agreement: {label}", 60))
        ax.grid(axis="x", visible=False)
        ax.legend(loc="upper right")
    return _png(fig)


@_styled
def winrates(evals: Sequence[tuple[str, dict]]) -> bytes | None:
    """One horizontal bar per win-rate file: wins / ties / losses of A against B as shares of
    the comparisons, with the win rate and its 95% interval drawn on top."""
    rows = []
    for label, ev in evals:
        if not isinstance(ev, dict):
            continue
        w, t, l = (ev.get(k) for k in ("wins", "ties", "losses"))
        if not all(_is_num(v) for v in (w, t, l)) or (w + t + l) <= 0:
            continue
        rows.append((label, ev, float(w), float(t), float(l)))
    if not rows:
        return None
    fig, (ax,) = _figure(1, height=1.2 + 0.95 * len(rows))
    ylabels = []
    for y, (label, ev, w, t, l) in enumerate(rows):
        total = w + t + l
        left = 0.0
        for val, color, name in ((w, KEPT_COLOR, "A wins"), (t, "#bdbdbd", "tie"), (l, "#c62828", "B wins")):
            share = val / total
            ax.barh([y], [share], left=[left], color=color, height=0.5, label=name if y == 0 else None)
            if share >= 0.06:
                ax.text(left + share / 2, y, f"{int(val)}", ha="center", va="center", color="white" if color != "#bdbdbd" else "black",
                        fontsize=9, fontweight="bold")
            left += share
        wr = ev.get("win_rate")
        ci = ev.get("ci95")
        if _is_num(wr):
            err = None
            if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_num(c) for c in ci):
                err = [[max(wr - ci[0], 0)], [max(ci[1] - wr, 0)]]
            # under the bar, so it hides none of the counts
            ax.errorbar([wr], [y + 0.42], xerr=err, fmt="D", color="black", capsize=4, markersize=5,
                        label="win rate (ties = 1/2), 95% CI" if y == 0 else None)
            ax.text(wr, y + 0.42, f"  {wr:.1%}", ha="left", va="center", fontsize=8)
        a, b = ev.get("a", "A"), ev.get("b", "B")
        ylabels.append(f"{_t(a, 24)} vs {_t(b, 24)}\n{_t(label, 30)} (n={int(total)})")
    ax.axvline(0.5, color="black", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(rows)), ylabels)
    ax.set_ylim(len(rows) - 0.3, -0.5)  # top to bottom, room for the last win-rate marker
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_title("Pairwise win rate (A against B)")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- generic metrics


@_styled
def histograms(title: str, labels: Sequence[str], hists: Sequence[dict | None]) -> bytes | None:
    """Grouped bars of a ``{bucket: count}`` metric (e.g. ``curation_score_histogram``), one
    colour per iteration, as shares of each iteration's total."""
    clean = []
    for h in hists:
        h = h if isinstance(h, dict) else {}
        clean.append({str(k): float(v) for k, v in h.items() if _is_num(v)})
    drawn = [(i, h) for i, h in enumerate(clean) if sum(h.values()) > 0]
    if not drawn:
        return None
    keys = sorted({k for _, h in drawn for k in h}, key=_num_key)
    fig, (ax,) = _figure(1, height=3.2)
    width = 0.8 / len(drawn)
    top = 0.0
    for j, (i, h) in enumerate(drawn):
        total = sum(h.values())
        xs = [x + (j - (len(drawn) - 1) / 2) * width for x in range(len(keys))]
        shares = [h.get(k, 0) / total for k in keys]
        top = max([top] + shares)
        ax.bar(xs, shares, width=width * 0.95, color=f"C{i % 10}", label=f"{_t(labels[i], 16)} (n={int(total)})")
    ax.set_ylim(0, top * 1.12)
    ax.set_xticks(range(len(keys)), [_t(k, 12) for k in keys])
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_title(_t(title, 70))
    ax.set_ylabel("share")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


@_styled
def trends(labels: Sequence[str], series: dict[str, Sequence[float | None]], cols: int = 4) -> bytes | None:
    """Small multiples: one panel per numeric metric, its value per iteration."""
    series = {k: v for k, v in series.items() if sum(_is_num(x) for x in v) >= 1}
    if not series:
        return None
    names = list(series)
    cols = min(cols, len(names))
    rows = math.ceil(len(names) / cols)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(WIDTH, 1.9 * rows + 0.3), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = list(range(len(labels)))
    short = [_t(lab.replace("iter ", ""), 6) for lab in labels]
    for ax, name in zip(axes, names):
        ys = series[name]
        pts = [(i, float(y)) for i, y in enumerate(ys) if _is_num(y)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C0", markersize=4, linewidth=1.5)
        ax.set_title(_t(name, 34), fontsize=9, fontweight="normal")
        ax.set_xticks(x, short, fontsize=8)
        ax.set_xlim(-0.4, len(labels) - 0.6)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(y=0.25)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.supxlabel("iteration", fontsize=9)
    return _png(fig)
