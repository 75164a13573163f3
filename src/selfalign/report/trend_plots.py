"""Figures across iterations and evaluations: training curves, judge agreement, win rates, IFEval, metric trends.

Like :mod:`selfalign.report.plots`: plain data in, PNG bytes (or ``None``) out, no file reading.
The IFEval figure reads the ``ifeval_*`` keys the ``eval.ifeval`` hook writes into each
iteration's metrics.json (``ifeval_start_*`` in iteration 1 for the model the run starts from).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from selfalign.report.plot_style import (bucket_key, is_finite_number, KEPT_COLOR, RC, REASON_COLORS, WIDTH, new_figure, safe_text, styled, to_png)


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


@styled
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
    fig, axes = new_figure(panels, height=3.4)
    k = 0
    color_of = {lab: f"C{i % 10}" for i, (lab, _) in enumerate(runs)}

    def draw(ax, items, key, title, ylabel, legend=True):
        for lab, h in items:
            xs, ys = _series(h, key)
            ax.plot(xs, ys, "-", marker="o" if len(xs) <= 12 else None, markersize=4,
                    color=color_of[lab], label=safe_text(lab, 24), linewidth=1.8)
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
    return to_png(fig)


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


@styled
def judge_agreement(evals: Sequence[tuple[str, dict]]) -> bytes | None:
    """Per evaluation file (``(label, eval_judge dict)``) one panel: the judge's agreement
    metrics next to each baseline's (grouped bars, value printed above each bar)."""
    panels = []
    for label, ev in evals:
        metrics = ev.get("metrics") if isinstance(ev, dict) else None
        if not isinstance(metrics, dict):
            continue
        keys = [(k, name) for k, name in AGREEMENT_METRICS if is_finite_number(metrics.get(k))]
        if keys:
            baselines = ev.get("baselines") if isinstance(ev.get("baselines"), dict) else {}
            panels.append((label, metrics, {b: v for b, v in baselines.items() if isinstance(v, dict)}, keys))
    if not panels:
        return None
    fig, axes = new_figure(len(panels), height=3.6, width=max(WIDTH, 5.0 * len(panels)))
    for ax, (label, metrics, baselines, keys) in zip(axes, panels):
        series = [("judge", metrics, "#1565c0")] + [
            (f"baseline: {b}", v, REASON_COLORS[(j + 1) % len(REASON_COLORS)] if j else "#9e9e9e")
            for j, (b, v) in enumerate(baselines.items())
        ]
        width = 0.8 / len(series)
        for j, (name, vals, color) in enumerate(series):
            xs = [x + (j - (len(series) - 1) / 2) * width for x in range(len(keys))]
            ys = [float(vals[k]) if is_finite_number(vals.get(k)) else math.nan for k, _ in keys]
            bars = ax.bar(xs, ys, width=width * 0.95, color=color, label=safe_text(name, 30))
            cis = vals.get("ci95") if isinstance(vals.get("ci95"), dict) else {}
            for x, y, (k, _) in zip(xs, ys, keys):
                ci = cis.get(k)
                if math.isfinite(y) and isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_finite_number(c) for c in ci):
                    ax.errorbar([x], [y], yerr=[[max(y - ci[0], 0)], [max(ci[1] - y, 0)]], fmt="none", ecolor="black",
                                capsize=2, linewidth=0.8)
            for b, y in zip(bars, ys):
                if math.isfinite(y):
                    ax.text(b.get_x() + b.get_width() / 2, y + (0.01 if y >= 0 else -0.01), f"{y:.2f}",
                            ha="center", va="bottom" if y >= 0 else "top", fontsize=7)
        ax.set_xticks(range(len(keys)), [name for _, name in keys], rotation=20, ha="right")
        lo = min([0.0] + [float(v.get(k)) for _, v, _ in series for k, _ in keys if is_finite_number(v.get(k))])
        ax.set_ylim(min(lo * 1.15, 0), 1.1)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(safe_text(f"Judge agreement: {label}", 60))
        ax.grid(axis="x", visible=False)
        ax.legend(loc="upper right")
    return to_png(fig)


@styled
def winrates(evals: Sequence[tuple[str, dict]]) -> bytes | None:
    """One horizontal bar per win-rate file: wins / ties / losses of A against B as shares of
    the comparisons, with the win rate and its 95% interval drawn on top."""
    rows = []
    for label, ev in evals:
        if not isinstance(ev, dict):
            continue
        w, t, l = (ev.get(k) for k in ("wins", "ties", "losses"))
        if not all(is_finite_number(v) for v in (w, t, l)) or (w + t + l) <= 0:
            continue
        rows.append((label, ev, float(w), float(t), float(l)))
    if not rows:
        return None
    fig, (ax,) = new_figure(1, height=1.2 + 0.95 * len(rows))
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
        if is_finite_number(wr):
            err = None
            if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_finite_number(c) for c in ci):
                err = [[max(wr - ci[0], 0)], [max(ci[1] - wr, 0)]]
            # under the bar, so it hides none of the counts
            ax.errorbar([wr], [y + 0.42], xerr=err, fmt="D", color="black", capsize=4, markersize=5,
                        label="win rate (ties = 1/2), 95% CI" if y == 0 else None)
            ax.text(wr, y + 0.42, f"  {wr:.1%}", ha="left", va="center", fontsize=8)
        a, b = ev.get("a", "A"), ev.get("b", "B")
        ylabels.append(f"{safe_text(a, 24)} vs {safe_text(b, 24)}\n{safe_text(label, 30)} (n={int(total)})")
    ax.axvline(0.5, color="black", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(rows)), ylabels)
    ax.set_ylim(len(rows) - 0.3, -0.5)  # top to bottom, room for the last win-rate marker
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_title("Pairwise win rate (A against B)")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return to_png(fig)


# --------------------------------------------------------------------------- generic metrics


@styled
def histograms(title: str, labels: Sequence[str], hists: Sequence[dict | None]) -> bytes | None:
    """Grouped bars of a ``{bucket: count}`` metric (e.g. ``curation_score_histogram``), one
    colour per iteration, as shares of each iteration's total."""
    clean = []
    for h in hists:
        h = h if isinstance(h, dict) else {}
        clean.append({str(k): float(v) for k, v in h.items() if is_finite_number(v)})
    drawn = [(i, h) for i, h in enumerate(clean) if sum(h.values()) > 0]
    if not drawn:
        return None
    keys = sorted({k for _, h in drawn for k in h}, key=bucket_key)
    fig, (ax,) = new_figure(1, height=3.2)
    width = 0.8 / len(drawn)
    top = 0.0
    for j, (i, h) in enumerate(drawn):
        total = sum(h.values())
        xs = [x + (j - (len(drawn) - 1) / 2) * width for x in range(len(keys))]
        shares = [h.get(k, 0) / total for k in keys]
        top = max([top] + shares)
        ax.bar(xs, shares, width=width * 0.95, color=f"C{i % 10}", label=f"{safe_text(labels[i], 16)} (n={int(total)})")
    ax.set_ylim(0, top * 1.12)
    ax.set_xticks(range(len(keys)), [safe_text(k, 12) for k in keys])
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_title(safe_text(title, 70))
    ax.set_ylabel("share")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return to_png(fig)


@styled
def trends(labels: Sequence[str], series: dict[str, Sequence[float | None]], cols: int = 4) -> bytes | None:
    """Small multiples: one panel per numeric metric, its value per iteration."""
    series = {k: v for k, v in series.items() if sum(is_finite_number(x) for x in v) >= 1}
    if not series:
        return None
    names = list(series)
    cols = min(cols, len(names))
    rows = math.ceil(len(names) / cols)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(WIDTH, 1.9 * rows + 0.3), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = list(range(len(labels)))
    short = [safe_text(lab.replace("iter ", ""), 6) for lab in labels]
    for ax, name in zip(axes, names):
        ys = series[name]
        pts = [(i, float(y)) for i, y in enumerate(ys) if is_finite_number(y)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C0", markersize=4, linewidth=1.5)
        ax.set_title(safe_text(name, 34), fontsize=9, fontweight="normal")
        ax.set_xticks(x, short, fontsize=8)
        ax.set_xlim(-0.4, len(labels) - 0.6)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(y=0.25)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.supxlabel("iteration", fontsize=9)
    return to_png(fig)


# --------------------------------------------------------------------------- IFEval

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


@styled
def ifeval_across_iterations(labels: Sequence[str], metrics: Sequence[Mapping]) -> bytes | None:
    """IFEval accuracy of each model (the starting model, then the one each iteration trained),
    strict (solid) and loose (dotted), with 95% bootstrap intervals over prompts."""
    data = series_from_metrics(labels, metrics)
    if data is None:
        return None
    xs, points = data
    fig, (ax,) = new_figure(1, height=3.6)
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
    ax.set_xticks(range(len(xs)), [safe_text(x, 16) for x in xs])
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("IFEval accuracy")
    ax.set_title("IFEval per model (95% intervals over prompts)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return to_png(fig)
