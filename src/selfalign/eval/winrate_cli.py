"""``selfalign eval winrate``: model A against model B on a prompt set, judged in both orders.

Only light imports here; the work (torch, numpy, engines) is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else (f"{x:.1f}" if isinstance(x, float) else str(x))


def summary_table(s: dict) -> Table:
    """The summary of a win-rate evaluation as a rich table (A's point of view)."""
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


def winrate(
    a: Annotated[str, typer.Option("--a", help="Model A: model spec (local dir, .gguf, hub id, smollm2-135m-instruct), a run iteration RUN:iter_N / RUN:sft, or a JSON/JSONL of precomputed outputs.")],
    b: Annotated[str, typer.Option("--b", help="Model B, same forms as --a.")],
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="Prompt file: JSONL (strings or objects with prompt/instruction/messages/turns), a .json list (e.g. AlpacaEval), or MT-Bench question.jsonl (first turns).")],
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
    judge_model: Annotated[str, typer.Option(help="Judge model spec (or the model name an OpenAI-compatible server serves).")] = "smollm2-135m-instruct",
    judge_engine: Annotated[str, typer.Option(help="Judge engine: hf or openai.")] = "hf",
    judge_base_url: Annotated[str | None, typer.Option(help="Base URL of the judge's OpenAI-compatible server.")] = None,
    template: Annotated[str, typer.Option(help="Pairwise judge template: built-in name (pairwise) or a .jinja path using instruction, response_a, response_b.")] = "pairwise",
    verdict: Annotated[str, typer.Option(help="auto: forced where the judge engine reports token probabilities (hf), else sampled (openai), with a note; sampled: read the judge's last 'Winner: A|B' line; forced: after its reasoning force 'Winner: ' and take the likelier of A/B (hf judge only). A warning is printed when over half the verdicts are unparsed.")] = "auto",
    engine: Annotated[str, typer.Option(help="Engine generating for model sides: hf or openai.")] = "hf",
    base_url: Annotated[str | None, typer.Option(help="Base URL of the OpenAI-compatible server generating for model sides.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32 (hf engines).")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per generated response.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of generated responses (0 = greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus mass of generated responses.")] = 0.9,
    judge_max_new_tokens: Annotated[int, typer.Option(help="Most tokens of judge reasoning (0 = none, forced verdict only).")] = 256,
    judge_temperature: Annotated[float, typer.Option(help="Judge sampling temperature (0 = greedy).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for generation, judging and the bootstrap.")] = 0,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% interval.")] = 2000,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output dir (default runs/eval_winrate_<a>_vs_<b>); rerun to resume.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Pairwise win rate of model A over model B, every pair judged in both orders; resumable."""
    import time

    from selfalign.errors import SelfAlignError

    t0 = time.monotonic()

    def say(m: str) -> None:
        err_console.print(m, highlight=False, markup=False, soft_wrap=True)

    # progress messages only with progress bars; the verdict note and warnings always
    log = say if progress else (lambda m: say(m) if m.startswith(("note:", "warning:")) else None)
    try:
        from selfalign.eval.winrate import run_winrate

        s = run_winrate(
            a, b, prompts, judge_model=judge_model, judge_engine=judge_engine, judge_base_url=judge_base_url,
            engine=engine, base_url=base_url, dtype=dtype, template=template, verdict=verdict, limit=limit,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            judge_max_new_tokens=judge_max_new_tokens, judge_temperature=judge_temperature, seed=seed,
            resamples=resamples, out_dir=out, show_progress=progress,
            log=log,
        )
    except SelfAlignError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(code=2) from None
    console.print(summary_table(s))
    console.print(
        f"{s['judged_now']} judgments asked now, {s['reused']} reused; written to {s['out_dir']}/summary.json "
        f"(wall time {time.monotonic() - t0:.0f}s)",
        highlight=False,
    )
