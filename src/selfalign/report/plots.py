"""Figures of what each iteration produced: scores, pairs kept and dropped, parse failures, lengths.

Every function takes plain Python data, draws one figure and returns it as PNG bytes, or
``None`` when there is nothing to draw.  None of them reads files: :mod:`selfalign.report.figures`
collects the data and decides which figures a run gets.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from matplotlib.ticker import PercentFormatter

from selfalign.report.plot_style import (bucket_key, KEPT_COLOR, data_top, finite, integer_y, is_finite_number, new_figure, pad_x, reason_colors, safe_text, styled, to_png)


# --------------------------------------------------------------------------- scores


@styled
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
    all_scores = [s for scores in judgment_scores for s in finite(scores)]
    in_rubric = bool(all_scores) and all(0 <= s <= 5 for s in all_scores)
    for i in range(n):
        scores = finite(judgment_scores[i]) if i < len(judgment_scores) else []
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
    rewards = [finite(r) for r in response_rewards] + [[] for _ in range(n - len(response_rewards))]
    has_box = any(rewards)
    raw_only = bool(all_scores) and not in_rubric  # e.g. a reward model: scores on any scale
    if not (has_hist or has_box or raw_only):
        return None
    panels = (1 if (has_hist or raw_only) else 0) + (1 if has_box else 0)
    fig, axes = new_figure(panels)
    ax_iter = iter(axes)
    colors = [f"C{i % 10}" for i in range(n)]
    if raw_only:
        ax = next(ax_iter)
        lo, hi = min(all_scores), max(all_scores)
        bins = 20 if hi > lo else 1
        for i, scores in enumerate(judgment_scores):
            vals = finite(scores)
            if vals:
                ax.hist(vals, bins=bins, range=(lo, hi if hi > lo else lo + 1), histtype="step", linewidth=1.8,
                        color=colors[i], label=safe_text(labels[i]), density=True)
        ax.set_title("Judgment scores")
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.legend()
    elif has_hist:
        ax = next(ax_iter)
        keys = sorted({k for h in hists for k in h}, key=bucket_key)
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
            ax.bar(xs, shares, width=width * 0.95, color=colors[i], label=f"{safe_text(labels[i])} (n={int(total)})")
        ax.set_ylim(0, top * (1.2 + 0.07 * len(drawn)))  # headroom for the legend
        ax.set_xticks(range(len(keys)), [safe_text(k, 8) for k in keys])
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
        ax.set_xticks(range(len(idx)), [f"{safe_text(labels[i], 16)}\n(n={len(rewards[i])})" for i in idx])
        pad_x(ax, len(idx), 3)
        ax.set_title("Reward per response (mean of its judgments)")
        ax.set_ylabel("reward")
        ax.grid(axis="x", visible=False)
    return to_png(fig)


# --------------------------------------------------------------------------- pairs


def _stacked(ax, labels: Sequence[str], kept: Sequence[int | None], dropped: Sequence[dict], kept_label: str, title: str,
             notes: Sequence[str | None] = ()):
    reasons: list[str] = []
    for d in dropped:
        for r, v in (d or {}).items():
            if r not in reasons and is_finite_number(v) and v > 0:
                reasons.append(r)
    colors = reason_colors(reasons)
    x = list(range(len(labels)))
    bottom = [float(k or 0) for k in kept]
    ax.bar(x, bottom, width=0.6, color=KEPT_COLOR, label=kept_label)
    for i, k in enumerate(kept):
        if k:
            ax.text(i, k / 2, str(k), ha="center", va="center", color="white", fontsize=9, fontweight="bold")
    for r in reasons:
        vals = [float((d or {}).get(r) or 0) for d in dropped]
        ax.bar(x, vals, width=0.6, bottom=bottom, color=colors[r], label=f"dropped: {safe_text(r, 30)}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    top = max(bottom + [1])
    for i, k in enumerate(kept):
        if bottom[i] <= 0:  # an empty column says why
            note = notes[i] if i < len(notes) and notes[i] else ("0" if k is not None else "no data yet")
            ax.text(i, top * 0.02, safe_text(note, 30), ha="center", va="bottom", color="#757575", fontsize=9, style="italic")
    ax.set_xticks(x, [safe_text(lab, 16) for lab in labels])
    pad_x(ax, len(labels))
    ax.set_title(title)
    integer_y(ax)
    ax.grid(axis="x", visible=False)
    ax.set_ylim(0, max(bottom + [1]) * 1.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))


@styled
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
    fig, axes = new_figure(panels, height=3.6)
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
    return to_png(fig)


@styled
def kept_dropped(title: str, kept: int | None, dropped: dict, kept_label: str = "kept", unit: str = "examples") -> bytes | None:
    """One horizontal stacked bar: kept vs dropped by reason (e.g. a curated corpus)."""
    dropped = {k: v for k, v in (dropped or {}).items() if is_finite_number(v) and v > 0}
    if not kept and not dropped:
        return None
    fig, (ax,) = new_figure(1, height=1.9)
    colors = reason_colors(list(dropped))
    left = float(kept or 0)
    ax.barh([0], [left], color=KEPT_COLOR, label=f"{safe_text(kept_label, 30)} ({kept or 0})", height=0.5)
    for r, v in dropped.items():
        ax.barh([0], [v], left=[left], color=colors[r], label=f"dropped: {safe_text(r, 30)} ({v})", height=0.5)
        left += v
    ax.set_yticks([])
    ax.set_xlabel(unit)
    ax.set_title(safe_text(title, 80))
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return to_png(fig)


# --------------------------------------------------------------------------- parse failures


@styled
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
    fig, (ax,) = new_figure(1, height=3.3)
    colors = reason_colors(kinds)
    x = list(range(n))
    bottom = [0.0] * n
    for k in kinds:
        vals = [((by_kind[i] or {}).get(k, 0) / totals[i]) if have_counts[i] else 0.0 for i in range(n)]
        ax.bar(x, vals, bottom=bottom, width=0.6, color=colors[k], label=safe_text(k, 40))
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
    ax.set_xticks(x, [safe_text(lab, 16) for lab in labels])
    pad_x(ax, n)
    ax.set_ylim(0, 1.12)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("share of judgments")
    ax.set_title("Judgments without a parsable score")
    ax.grid(axis="x", visible=False)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return to_png(fig)


# --------------------------------------------------------------------------- lengths


@styled
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
        vals = finite(lengths[i]) if i < len(lengths) else []
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
    fig, axes = new_figure(int(has_tokens) + int(bool(extra_words)), height=3.4)
    x = list(range(n))

    def line(ax, ys, style, label, color=None):
        pts = [(i, y) for i, y in enumerate(ys) if isinstance(y, (int, float))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=safe_text(label, 40), color=color, linewidth=2, markersize=6)

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
        ax.set_ylim(0, data_top(ax) * 1.12 or 1)  # from zero, with room above the highest marker
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_xticks(x, [safe_text(lab, 16) for lab in labels])
        pad_x(ax, n)
    if extra_words:
        ax = axes[k]
        for j, (name, ys) in enumerate(extra_words.items()):
            line(ax, ys, "o-", name, f"C{j + 3}")
        ax.set_title("Length in words per iteration")
        ax.set_ylabel("words")
        ax.set_ylim(0, data_top(ax) * 1.12 or 1)  # from zero, with room above the highest marker
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_xticks(x, [safe_text(lab, 16) for lab in labels])
        pad_x(ax, n)
    return to_png(fig)
