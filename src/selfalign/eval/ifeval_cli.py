"""``selfalign eval ifeval``: IFEval accuracy of a model (generated here) or of a responses file.

Only light imports here; the checkers (lm-eval, NLTK) and the engine load when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from selfalign.eval.ifeval import DEFAULT_INPUT

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key, e.g. --set engine.threads=2 (repeatable)."),
]


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
    overrides: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """IFEval: prompt- and instruction-level accuracy, strict and loose, with 95% intervals; writes results.jsonl and summary.json.

    Generates greedy answers (resumable: rerun to continue) unless --responses names a file to score.
    """
    from rich.console import Console

    from selfalign.cli import _fail, console
    from selfalign.errors import SelfAlignError

    if responses is not None and (model or engine or base_url or config or overrides):
        _fail(ValueError("--responses scores a file; --model, --engine, --base-url, --config and --set are for generating"))
        return
    sets = list(overrides or [])
    for key, val in (("model.spec", model), ("engine.kind", engine), ("engine.base_url", base_url)):
        if val is not None:
            sets.append(f"{key}={val}")
    try:
        from selfalign.eval.ifeval import evaluate_ifeval, load_items, subset_label

        items = load_items(input_file, limit=limit, sample=sample, seed=seed)
        subset = subset_label(limit, sample, seed, input_file)
        if responses is not None:
            out_dir = out or Path("runs") / f"eval_ifeval_{_slug(responses.stem)}"
            summary = evaluate_ifeval(items, out_dir, responses_path=responses, seed=seed, show_progress=progress,
                                      input_path=str(input_file), subset=subset)
        else:
            from selfalign.config import GenerateConfig, load_config
            from selfalign.engines import create_engine

            cfg = load_config(GenerateConfig, config, sets)
            out_dir = out or Path("runs") / f"eval_ifeval_{_slug(Path(cfg.model.spec).name)}"
            with Console(stderr=True).status(f"loading {cfg.model.spec}"):
                eng = create_engine(cfg.model, cfg.engine)
            with eng:
                summary = evaluate_ifeval(items, out_dir, engine=eng, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
                                          seed=seed, show_progress=progress, input_path=str(input_file), subset=subset,
                                          model=cfg.model.spec)
    except SelfAlignError as e:
        _fail(e)
        return
    print_summary(summary, console)
    console.print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'results.jsonl'} ({summary['seconds']:.0f}s)", highlight=False)


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

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
    console.print(t)
    if summary.get("missing"):
        keys = summary["missing"]
        console.print(f"{len(keys)} prompt(s) without a response with the same text, left out of every figure: keys "
                      f"{', '.join(map(str, keys[:10]))}{' ...' if len(keys) > 10 else ''}", highlight=False)
    if summary.get("unmatched_responses"):
        console.print(f"{summary['unmatched_responses']} response(s) to prompts not in the input set: ignored", highlight=False)
    if summary.get("truncated"):
        console.print(f"{summary['truncated']} answer(s) stopped at --max-new-tokens {summary.get('max_new_tokens')}",
                      highlight=False)
    if summary.get("empty_responses"):
        console.print(f"{summary['empty_responses']} empty response(s): they follow no instruction", highlight=False)


def _slug(name: str) -> str:
    for suffix in (".gguf", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"
