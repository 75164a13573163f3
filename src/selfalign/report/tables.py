"""Plain-text summaries of a run: the per-iteration table `selfalign run` prints at the end."""

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

# Meta-Rewarding adds these (shown when present)
META_ROWS = [
    ("schedule", "schedule"),
    ("duplicates removed", "duplicates_removed"),
    ("chosen / rejected tokens", lambda m: f"{_fmt(m.get('mean_chosen_tokens'))} / {_fmt(m.get('mean_rejected_tokens'))}"),
    ("meta comparisons", "meta_comparisons"),
    ("meta parse failures", "meta_parse_failures"),
    ("first-position win share", "first_position_win_share"),
    ("Elo spread", "elo_spread"),
    ("mean judgment chars", "mean_judgment_chars"),
    ("judge pairs", "judge_pairs"),
    ("judge pairs dropped", "judge_pairs_dropped"),
]


# the evaluations a run config asks for after each iteration (shown when present)
EVAL_ROWS = [
    ("held-out judge accuracy [95% CI]", lambda m: f"{_fmt(m.get('heldout_judge_accuracy'))} {_fmt_ci(m.get('heldout_judge_accuracy_ci95'))}"),
    ("  length-balanced [95% CI]", lambda m: f"{_fmt(m.get('heldout_length_balanced_accuracy'))} {_fmt_ci(m.get('heldout_length_balanced_ci95'))}"),
    ("  longer / shorter preferred", lambda m: f"{_fmt(m.get('heldout_longer_preferred_accuracy'))} / {_fmt(m.get('heldout_shorter_preferred_accuracy'))}"),
    ("  agrees with longer-wins; ties", lambda m: f"{_fmt(m.get('heldout_longer_wins_agreement'))}; {_fmt(m.get('heldout_judge_tie_rate'))}"),
    ("  baselines: random / longer wins", lambda m: f"{_fmt(m.get('heldout_random_accuracy'))} / {_fmt(m.get('heldout_longer_wins_accuracy'))}"),
    ("win rate vs previous [95% CI]", lambda m: f"{_fmt(m.get('win_rate_vs_previous'))} {_fmt_ci(m.get('win_rate_ci95'))}"),
    ("wins / ties / losses vs previous", "win_tie_loss_vs_previous"),
]


def _fmt_ci(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "-"


def _ifeval(m: dict, key: str) -> str:
    return f"{_fmt(m.get(key))} {_fmt_ci(m.get(key + '_ci95'))}" if m.get(key) is not None else "-"


# eval.ifeval: (row title, function of the metrics dict, the key whose presence shows the row)
IFEVAL_ROWS = [
    ("IFEval prompt-level strict [95% CI]", lambda m: _ifeval(m, "ifeval_prompt_level_strict"), "ifeval_prompt_level_strict"),
    ("IFEval instruction-level strict [95% CI]", lambda m: _ifeval(m, "ifeval_instruction_level_strict"), "ifeval_prompt_level_strict"),
    ("IFEval loose: prompt / instruction", lambda m: f"{_fmt(m.get('ifeval_prompt_level_loose'))} / {_fmt(m.get('ifeval_instruction_level_loose'))}",
     "ifeval_prompt_level_strict"),
    ("IFEval of the starting model: prompt / instr. strict",
     lambda m: f"{_fmt(m.get('ifeval_start_prompt_level_strict'))} / {_fmt(m.get('ifeval_start_instruction_level_strict'))}"
     if "ifeval_start_prompt_level_strict" in m else "-", "ifeval_start_prompt_level_strict"),
]


# Instruction Backtranslation: one column per curation round
HUMPBACK_ROWS = [
    ("corpus segments kept / documents", lambda m: f"{_fmt(m.get('corpus_segments_kept'))} / {_fmt(m.get('corpus_documents'))}"),
    ("corpus segments dropped", "corpus_dropped"),
    ("instructions generated", "instructions_generated"),
    ("instructions dropped", "instructions_dropped"),
    ("pairs rated", "pairs_rated"),
    ("rating parse failure rate", "rating_parse_failure_rate"),
    ("rating histogram (1-5)", "curation_score_histogram"),
    ("mean rating", "mean_rating"),
    ("curated set size by k", "curated_by_k"),
    ("curated (k = threshold)", lambda m: f"{_fmt(m.get('curated'))} (k = {_fmt(m.get('curation_threshold'))})"),
    ("outputs with score text: rated / kept", lambda m: f"{_fmt(m.get('responses_with_score_text'))} / {_fmt(m.get('curated_with_score_text'))}"),
    ("instruction / output words (curated)", lambda m: f"{_fmt(m.get('mean_instruction_words'))} / {_fmt(m.get('mean_output_words'))}"),
    ("instruction / output words (all)", lambda m: f"{_fmt(m.get('all_mean_instruction_words'))} / {_fmt(m.get('all_mean_output_words'))}"),
    ("SFT examples", "sft_examples"),
    ("SFT loss first / last", lambda m: f"{_fmt(m.get('sft_loss_first'))} / {_fmt(m.get('sft_loss_last'))}"),
]


def iteration_table(iterations: list[dict], title: str = "Self-Rewarding iterations", recipe: str | None = None,
                    start: dict | None = None) -> Table:
    """One column per iteration, one row per metric (fits a narrow terminal). ``start``: the
    evaluations of the model the first iteration starts from (M1), shown as a first column;
    an iteration's evaluation rows are of the model that iteration trained."""
    table = Table(title=title)
    table.add_column("metric", style="bold")
    start = dict(start or {})
    if iterations and recipe != "humpback":  # eval.ifeval records the starting model in iteration 1's metrics
        start.update({"ifeval_" + k.removeprefix("ifeval_start_"): v for k, v in iterations[0].items()
                      if k.startswith("ifeval_start_")})
    if start:
        iterations = [start, *iterations]
        table.add_column("start (M1)", overflow="fold")
    for m in iterations[1 if start else 0:]:
        table.add_column(f"{'round' if recipe == 'humpback' else 'iter'} {m['iteration']}", overflow="fold")
    if recipe == "humpback":
        rows = HUMPBACK_ROWS
    else:
        rows = ITERATION_ROWS + (META_ROWS if any("judge_pairs" in m for m in iterations) else [])
        rows += [r for r, key in zip(EVAL_ROWS, ("heldout_judge_accuracy",) * 5 + ("win_rate_vs_previous", "win_tie_loss_vs_previous"))
                 if any(key in m for m in iterations)]
        rows += [(name, fn) for name, fn, key in IFEVAL_ROWS if any(key in m for m in iterations)
                 and not (start and key.startswith("ifeval_start_"))]  # with a start column, it is shown there
    for name, key in rows:
        table.add_row(name, *[key(m) if callable(key) else _fmt(m.get(key)) for m in iterations])
    return table
