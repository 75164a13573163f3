"""Plain-text summaries of a run (the HTML report comes with the evaluation work)."""

from __future__ import annotations

from rich.table import Table


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {n}" for k, n in v.items()) or "-"
    return str(v)


# (row title, metrics key or a function of the metrics dict)
ITERATION_ROWS = [
    ("prompts kept / generated", lambda m: f"{_fmt(m.get('prompts_kept'))} / {_fmt(m.get('prompts_generated'))}"),
    ("prompts rejected", "prompts_rejected"),
    ("candidates", "candidates"),
    ("mean response tokens", "mean_response_tokens"),
    ("judgments", "judgments"),
    ("parse failure rate", "parse_failure_rate"),
    ("score histogram", "score_histogram"),
    ("responses with score text", "responses_with_score_text"),
    ("pairs", "pairs"),
    ("prompts without pair", "pairs_dropped"),
    ("mean reward gap", "mean_reward_gap"),
    ("DPO loss first / last", lambda m: f"{_fmt(m.get('dpo_loss_first'))} / {_fmt(m.get('dpo_loss_last'))}"),
    ("DPO reward margin (last)", "reward_margin_last"),
]


def iteration_table(iterations: list[dict], title: str = "Self-Rewarding iterations") -> Table:
    """One column per iteration, one row per metric (fits a narrow terminal)."""
    table = Table(title=title)
    table.add_column("metric", style="bold")
    for m in iterations:
        table.add_column(f"iter {m['iteration']}", overflow="fold")
    for name, key in ITERATION_ROWS:
        table.add_row(name, *[key(m) if callable(key) else _fmt(m.get(key)) for m in iterations])
    return table
