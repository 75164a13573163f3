"""``selfalign eval judge``: a judge's agreement with human preferences, next to two baselines.

Only light imports here: the engine (torch, transformers) loads when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key, e.g. --set judge.top_p=0.95 or --set engine.threads=2 (repeatable)."),
]


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
    overrides: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """How often does the judge prefer the reply humans preferred? Writes judgments.jsonl and summary.json; resumable."""
    from rich.console import Console

    from selfalign.cli import _fail, console
    from selfalign.errors import SelfAlignError

    sets = list(overrides or [])
    for key, val in (
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
    ):
        if val is not None:
            sets.append(f"{key}={val}")
    langs = None if lang and any(x.lower() in ("any", "all") for x in lang) else tuple(lang or ("en",))
    out_dir = out or Path("runs") / f"eval_judge_{_name(data)}"
    try:
        from selfalign.config import load_config
        from selfalign.engines import create_engine
        from selfalign.eval.judge_agreement import EvalJudgeConfig, evaluate_judge, histogram_line, load_items, summary_table
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
        _fail(e)
        return
    console.print(summary_table(summary))
    console.print(histogram_line(summary), highlight=False)
    notes = []
    if summary["dropped"]:
        notes.append("items left out: " + ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()))
    if limit:
        notes.append(f"--limit {limit}: first {summary['items']} items only")
    for n in notes:
        console.print(n, highlight=False)
    console.print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'judgments.jsonl'} "
                  f"({summary['run']['seconds']:.0f}s)", highlight=False)


def _name(data: Path) -> str:
    name = data.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"
