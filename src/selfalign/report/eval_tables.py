"""Terminal tables of the three evaluations (``selfalign eval judge|winrate|ifeval``): summary dict in, rich table out.

The numbers come from :mod:`selfalign.eval`; nothing here computes a metric.
"""

from __future__ import annotations

from rich.table import Table


JUDGE_ROWS = [
    ("pairwise_accuracy", "pairwise accuracy (ties = miss)"),
    ("longer_preferred_accuracy", "  on pairs where the longer reply is preferred"),
    ("shorter_preferred_accuracy", "  on pairs where the shorter reply is preferred"),
    ("length_balanced_accuracy", "length-balanced accuracy (50% = length only)"),
    ("longer_wins_agreement", "agrees with longer-wins"),
    ("pairwise_accuracy_excluding_ties", "pairwise accuracy, ties excluded"),
    ("tie_rate", "tie rate"),
    ("unscored_pairs", "unscored pairs (excluded)"),
    ("exact_match_best", "best reply matches human best"),
    ("exact_match_ranking", "whole ranking matches (paper: exact match)"),
    ("five_best", "human-best reply scored 5 (paper: 5-best)"),
    ("spearman", "Spearman (per item, mean)"),
    ("kendall_tau", "Kendall tau (per item, mean)"),
    ("constant_score_items", "items with constant scores"),
    ("parse_failure_rate", "parse failure rate"),
    ("unscored_judgment_rate", "judgments without a score"),
]


def judge_table(summary: dict) -> Table:
    """``selfalign eval judge``'s summary: the judge's metrics next to both baselines."""
    def fmt(v, ci=None) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        return str(v)

    j = summary.get("judge", {})
    title = (f"Judge agreement: {summary.get('data') or summary.get('source')} - {summary['items']} items, "
             f"{summary['pairs']} pairs; k={j.get('k')}, scoring={j.get('scoring')}")
    table = Table("metric", "judge", "random", "longer wins", title=title)
    base = summary["baselines"]
    for key, label in JUDGE_ROWS:
        vals = [summary["metrics"].get(key), base["random"].get(key), base["longer_wins"].get(key)]
        if all(v is None for v in vals):
            continue
        if key in ("parse_failure_rate", "unscored_judgment_rate"):
            vals[1] = vals[2] = None
        cis = [(d.get("ci95") or {}).get(key) for d in (summary["metrics"], base["random"], base["longer_wins"])]
        table.add_row(label, *(fmt(v, ci) for v, ci in zip(vals, cis)))
    m = summary["metrics"]
    if m.get("longer_preferred_pairs") is not None:
        table.caption = (f"[..] = 95% bootstrap interval over prompts. Scored pairs: {m['longer_preferred_pairs']} longer "
                         f"preferred, {m['shorter_preferred_pairs']} shorter preferred, {m['equal_length_pairs']} equal length")
    return table


def judge_histogram_line(summary: dict) -> str:
    """The judge's score histogram (judgments, rounded) as one line."""
    hist = summary["metrics"].get("score_histogram") or {}
    return "score histogram (judgments, rounded): " + ("  ".join(f"{k}: {v}" for k, v in hist.items()) or "-")


# --------------------------------------------------------------------------- win rate


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else (f"{x:.1f}" if isinstance(x, float) else str(x))


def winrate_table(s: dict) -> Table:
    """``selfalign eval winrate``'s summary (A's point of view)."""
    t = Table(title=f"win rate: A = {s['a']}  vs  B = {s['b']}", show_header=True, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    ci = s.get("ci95")
    rows = [
        ("prompts (n)", f"{s['n']}  ({s.get('prompts') or '-'})"),
        ("A wins / ties / losses", f"{s['wins']} / {s['ties']} / {s['losses']}"),
        ("  ties from order disagreement", str(s.get("disagreements", "-"))),
        ("  ties from unparsed verdicts", str(s["unparsed"])),
        ("win rate of A ((wins + ties/2) / n)", _fmt(s["win_rate"], True)),
        ("  bootstrap 95% interval", f"{_fmt(ci[0], True)} .. {_fmt(ci[1], True)}" if ci else "-"),
        ("strict win rate (wins / n)", _fmt(s["strict_win_rate"], True)),
        (f"win rate over parsed items (n={s.get('n_parsed', '-')})", _fmt(s.get("win_rate_parsed"), True)),
        ("mean words A / B", f"{_fmt(s['mean_words_a'])} / {_fmt(s['mean_words_b'])}"),
        ("mean tokens A / B", f"{_fmt(s.get('mean_tokens_a'))} / {_fmt(s.get('mean_tokens_b'))}"),
        ("judge picked the first-shown response", _fmt(s["first_position_share"], True) + "  (50% = no position bias)"),
        ("items whose two orders disagree", _fmt(s["order_disagreement"], True)),
        ("judge", f"{s['judge']['model']}  template {s['judge']['template']}, {s['judge']['verdict']} verdict"
                  + (" (auto)" if s["judge"].get("verdict_requested") == "auto" else "")),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


# --------------------------------------------------------------------------- IFEval


def ifeval_table(summary: dict) -> Table:
    """``selfalign eval ifeval``'s summary: the four accuracies with their 95% intervals."""
    from selfalign.eval.ifeval import METRIC_LABELS, METRICS

    t = Table(title=f"IFEval: {summary['scored']} of {summary['prompts']} prompts scored ({summary['subset']})",
              title_justify="left")
    t.add_column("metric")
    t.add_column("accuracy", justify="right")
    t.add_column("95% interval", justify="right")
    t.add_column("n", justify="right")
    for name in METRICS:
        m = summary["metrics"].get(name)
        if m:
            t.add_row(METRIC_LABELS[name], f"{m['value']:.2%}", f"{m['ci95'][0]:.2%} .. {m['ci95'][1]:.2%}",
                      f"{m['n']} {'prompts' if name.startswith('prompt') else 'instructions'}")
    return t


def ifeval_notes(summary: dict) -> list[str]:
    """What the IFEval figures leave out or stop short of, one line each."""
    notes = []
    if summary.get("missing"):
        keys = summary["missing"]
        notes.append(f"{len(keys)} prompt(s) without a response with the same text, left out of every figure: keys "
                      f"{', '.join(map(str, keys[:10]))}{' ...' if len(keys) > 10 else ''}")
    if summary.get("unmatched_responses"):
        notes.append(f"{summary['unmatched_responses']} response(s) to prompts not in the input set: ignored")
    if summary.get("truncated"):
        notes.append(f"{summary['truncated']} answer(s) stopped at --max-new-tokens {summary.get('max_new_tokens')}")
    if summary.get("empty_responses"):
        notes.append(f"{summary['empty_responses']} empty response(s): they follow no instruction")
    return notes
