"""``selfalign eval judge|winrate|ifeval``: a judge against human preferences, model A against model B, IFEval.

Only light imports at the top: the engines (torch, transformers), the checkers (lm-eval, NLTK)
and the measuring code load when a command runs. The tables are in :mod:`selfalign.report.eval_tables`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from selfalign.cli.shared import console, err_console, fail, set_option, slug, with_sets
from selfalign.errors import SelfAlignError
from selfalign.eval.ifeval import DEFAULT_INPUT

eval_app = typer.Typer(help="Evaluate judges and models: agreement with human preferences, pairwise win rates, IFEval.", no_args_is_help=True)

JudgeSetOption = set_option("judge.top_p=0.95 or --set engine.threads=2")
IFEvalSetOption = set_option("engine.threads=2")


@eval_app.command("judge")
def judge(
    data: Annotated[Path, typer.Argument(help="OpenAssistant trees (.jsonl, nested or flat), a pairwise file "
                                              "([{input, output_1, output_2, label}] .json or .jsonl) or EFT records.")],
    model: Annotated[Optional[str], typer.Option(help="Judge model: local dir, .gguf file, hub id or smollm2-135m-instruct.")] = None,
    engine: Annotated[Optional[str], typer.Option(help="Engine kind: hf or openai.")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="Base URL of an OpenAI-compatible server (engine openai).")] = None,
    template: Annotated[Optional[str], typer.Option(help="Judge template: built-in name (judge) or a template file.")] = None,
    k: Annotated[Optional[int], typer.Option("-k", help="Judgments per reply (a reply's score is their mean). (default 3)")] = None,
    scoring: Annotated[Optional[str], typer.Option(help="sampled (the 'Score:' line), expected (reasoning, then digit probabilities) or direct (digit probabilities with no reasoning). (default sampled)")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Judge sampling temperature. (default 0.7)")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Judge nucleus sampling mass. (default 0.9)")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Most tokens per judgment. (default 256)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed of the judge's sampling. (default 0)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N items.", min=1)] = None,
    lang: Annotated[Optional[list[str]], typer.Option(help="OpenAssistant: keep these languages (repeatable; 'any' = all). (default en)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default runs/eval_judge_<data name>).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML with model/engine/judge sections.")] = None,
    overrides: JudgeSetOption = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """How often does the judge prefer the reply humans preferred? Writes judgments.jsonl and summary.json; resumable."""
    sets = with_sets(overrides, (
        ("model.spec", model),
        ("engine.kind", engine),
        ("engine.base_url", base_url),
        ("judge.template", template),
        ("judge.k", k),
        ("judge.scoring", scoring),
        ("judge.temperature", temperature),
        ("judge.top_p", top_p),
        ("judge.max_new_tokens", max_new_tokens),
        ("judge.seed", seed),
    ))
    langs = None if lang and any(x.lower() in ("any", "all") for x in lang) else tuple(lang or ("en",))
    out_dir = out or Path("runs") / f"eval_judge_{slug(data.name)}"
    try:
        from selfalign.config import load_config
        from selfalign.engines import create_engine
        from selfalign.data.judge_items import load_items
        from selfalign.eval.judge_agreement import EvalJudgeConfig, evaluate_judge
        from selfalign.prompts import load_template

        cfg = load_config(EvalJudgeConfig, config, sets)
        load_template(cfg.judge.template)  # a bad template fails before the model loads
        items = load_items(data, lang=langs, limit=limit)
        with Console(stderr=True).status(f"loading {cfg.model.spec}"):
            eng = create_engine(cfg.model, cfg.engine)
        with eng:
            j = cfg.judge
            summary = evaluate_judge(
                eng, items, out_dir=out_dir, template=j.template, k=j.k, scoring=j.scoring, temperature=j.temperature,
                top_p=j.top_p, max_new_tokens=j.max_new_tokens, seed=j.seed, show_progress=progress,
                data=str(data), model=cfg.model.spec,
            )
    except SelfAlignError as e:
        fail(e)
    from selfalign.report.eval_tables import judge_histogram_line, judge_table

    console.print(judge_table(summary))
    console.print(judge_histogram_line(summary), highlight=False)
    notes = []
    if summary["dropped"]:
        notes.append("items left out: " + ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()))
    if limit:
        notes.append(f"--limit {limit}: first {summary['items']} items only")
    for n in notes:
        console.print(n, highlight=False)
    console.print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'judgments.jsonl'} "
                  f"({summary['run']['seconds']:.0f}s)", highlight=False)


@eval_app.command("winrate")
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
        fail(e)
    from selfalign.report.eval_tables import winrate_table

    console.print(winrate_table(s))
    console.print(
        f"{s['judged_now']} judgments asked now, {s['reused']} reused; written to {s['out_dir']}/summary.json "
        f"(wall time {time.monotonic() - t0:.0f}s)",
        highlight=False,
    )


@eval_app.command("ifeval")
def ifeval(
    responses: Annotated[Optional[Path], typer.Option(
        "--responses", "-r", help="Score this file instead of generating: JSONL of {prompt, response} (or selfalign "
                                  "generate output); a response belongs to the input prompt with the same text.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model to answer with: local dir, .gguf file, hub id or "
                                                      "smollm2-135m-instruct (the default).")] = None,
    engine: Annotated[Optional[str], typer.Option(help="Engine kind: hf, openai or vllm.")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="Base URL of an OpenAI-compatible server (engine openai).")] = None,
    input_file: Annotated[Path, typer.Option("--input", help="IFEval prompts ({key, prompt, instruction_id_list, kwargs} lines).")] = Path(DEFAULT_INPUT),
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer (greedy decoding).", min=1)] = 512,
    system_prompt: Annotated[Optional[str], typer.Option(help="System message for every prompt (default none).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only N prompts: the first N of the file (or a seeded sample with --sample).", min=1)] = None,
    sample: Annotated[bool, typer.Option("--sample/--first", help="With --limit: a seeded random N prompts instead of the first N.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --sample, the generation records and the bootstrap.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default runs/eval_ifeval_<model or responses name>).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML with model/engine sections.")] = None,
    overrides: IFEvalSetOption = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """IFEval: prompt- and instruction-level accuracy, strict and loose, with 95% intervals; writes results.jsonl and summary.json.

    Generates greedy answers (resumable: rerun to continue) unless --responses names a file to score.
    """
    if responses is not None and (model or engine or base_url or config or overrides):
        fail(ValueError("--responses scores a file; --model, --engine, --base-url, --config and --set are for generating"))
    sets = with_sets(overrides, (("model.spec", model), ("engine.kind", engine), ("engine.base_url", base_url)))
    try:
        from selfalign.eval.ifeval import evaluate_ifeval, load_items, subset_label

        items = load_items(input_file, limit=limit, sample=sample, seed=seed)
        subset = subset_label(limit, sample, seed, input_file)
        if responses is not None:
            out_dir = out or Path("runs") / f"eval_ifeval_{slug(responses.stem, default='model')}"
            summary = evaluate_ifeval(items, out_dir, responses_path=responses, seed=seed, show_progress=progress,
                                      input_path=str(input_file), subset=subset)
        else:
            from selfalign.config import GenerateConfig, load_config
            from selfalign.engines import create_engine

            cfg = load_config(GenerateConfig, config, sets)
            out_dir = out or Path("runs") / f"eval_ifeval_{slug(Path(cfg.model.spec).name, default='model')}"
            with Console(stderr=True).status(f"loading {cfg.model.spec}"):
                eng = create_engine(cfg.model, cfg.engine)
            with eng:
                summary = evaluate_ifeval(items, out_dir, engine=eng, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
                                          seed=seed, show_progress=progress, input_path=str(input_file), subset=subset,
                                          model=cfg.model.spec)
    except SelfAlignError as e:
        fail(e)
    from selfalign.report.eval_tables import ifeval_notes, ifeval_table

    console.print(ifeval_table(summary))
    for note in ifeval_notes(summary):
        console.print(note, highlight=False)
    console.print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'results.jsonl'} ({summary['seconds']:.0f}s)", highlight=False)
