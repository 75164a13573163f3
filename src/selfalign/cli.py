"""The ``selfalign`` command line (Typer). Every command has ``--help``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from selfalign import __version__
from selfalign.errors import SelfAlignError

app = typer.Typer(
    help="selfalign: language models that improve themselves (Self-Rewarding, Meta-Rewarding, Instruction Backtranslation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List and prepare models (the embedded default, .gguf files, local dirs, hub ids).", no_args_is_help=True)
app.add_typer(models_app, name="models")
eval_app = typer.Typer(help="Evaluate judges and models: agreement with human preferences, pairwise win rates, IFEval.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

console = Console()
err_console = Console(stderr=True)

SMOKE_PROMPTS = [
    "Give me three tips for keeping a houseplant alive.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a rainy Monday morning.",
    "What is the difference between a list and a tuple in Python?",
]


def _fail(e: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code=2)


SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key, e.g. --set generation.temperature=0.5 (repeatable)."),
]


@app.command()
def version() -> None:
    """Print the selfalign version."""
    console.print(__version__)


@app.command()
def generate(
    prompts: Annotated[Path, typer.Argument(help="Prompt file: JSONL (strings, or objects with prompt/instruction/messages/turns) or a .json list.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Responses JSONL to write (resumed if it exists).")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML with model/engine/generation sections.")] = None,
    overrides: SetOption = None,
    engine: Annotated[Optional[str], typer.Option(help="Engine kind: hf, openai or vllm.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model spec: local dir, .gguf file, hub id or smollm2-135m-instruct.")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="Base URL of an OpenAI-compatible server (engine openai).")] = None,
    n: Annotated[Optional[int], typer.Option("-n", help="Samples per prompt.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (0 = greedy).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Most tokens generated per sample.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (same seed and settings, same text).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Generate responses for a prompt file with any engine; resumable (rerun to continue)."""
    from selfalign.config import GenerateConfig, load_config
    from selfalign.data.prompts import load_prompts
    from selfalign.engines import create_engine
    from selfalign.stages.generate import run_generate

    sets = list(overrides or [])
    for key, val in (
        ("engine.kind", engine),
        ("model.spec", model),
        ("engine.base_url", base_url),
        ("generation.n", n),
        ("generation.temperature", temperature),
        ("generation.top_p", top_p),
        ("generation.max_new_tokens", max_new_tokens),
        ("generation.seed", seed),
    ):
        if val is not None:
            sets.append(f"{key}={val}")
    try:
        cfg = load_config(GenerateConfig, config, sets)
        prompt_set = load_prompts(prompts, system=cfg.generation.system_prompt, limit=limit)
        with create_engine(cfg.model, cfg.engine) as eng:
            res = run_generate(eng, prompt_set, out, cfg.generation, show_progress=progress)
    except SelfAlignError as e:
        _fail(e)
        return
    if res.already_done:
        console.print(f"{out}: already complete ({res.responses} responses); nothing to do")
        return
    dup = f" ({prompt_set.duplicates} repeated prompts skipped)" if prompt_set.duplicates else ""
    console.print(
        f"wrote {res.written_now} responses ({res.skipped_existing} already there) for {res.prompts} prompts{dup} "
        f"to {out}: {res.completion_tokens} tokens in {res.seconds:.1f}s = {res.tokens_per_second:.1f} tok/s"
        + (f"; {res.errors} failed, listed with their reasons in {res.failed_path} (rerun to retry only them)" if res.errors else "")
    )


@app.command()
def smoke(
    model: Annotated[str, typer.Option(help="Model spec.")] = "smollm2-135m-instruct",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 96,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Generation smoke run: a few prompts through the (embedded) model, answers printed."""
    import time

    from selfalign.config import EngineConfig, ModelConfig
    from selfalign.engines import GenerationRequest, SamplingParams, create_engine

    params = SamplingParams(n=1, temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens, seed=seed)
    reqs = [GenerationRequest.chat(f"smoke-{i}", [{"role": "user", "content": p}], params) for i, p in enumerate(SMOKE_PROMPTS)]
    try:
        with console.status(f"loading {model} (the first run converts the embedded GGUF once)"):
            eng = create_engine(ModelConfig(spec=model), EngineConfig())
        t0 = time.monotonic()
        results = sorted(eng.generate(reqs), key=lambda r: r.request.id)
        dt = time.monotonic() - t0
    except SelfAlignError as e:
        _fail(e)
        return
    tokens = 0
    for r in results:
        s = r.samples[0]
        tokens += s.completion_tokens
        console.rule(f"[bold]{r.request.messages[-1].content}")
        console.print(s.text.strip(), highlight=False, markup=False)
    console.rule()
    console.print(f"{len(results)} answers, {tokens} tokens in {dt:.1f}s ({tokens / dt:.0f} tok/s) with {eng.describe()}")


def _default_recipe_config() -> Path:
    from importlib import resources

    return Path(str(resources.files("selfalign").joinpath("configs/self_rewarding_demo.yaml")))


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="Run config YAML (default: the packaged self_rewarding_demo.yaml).")] = None,
    overrides: SetOption = None,
    restart_from: Annotated[Optional[str], typer.Option(help="Redo this stage (e.g. iter_2/judge) and every later one.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars and logs.")] = True,
) -> None:
    """Run (or resume) a recipe from its config; prints the per-iteration table at the end.

    One process owns a run directory at a time: a second run on it stops at once (exit code 2), naming the owner.
    """
    import time

    from selfalign.config import load_config, recipe_name
    from selfalign.report import iteration_table

    path = config or _default_recipe_config()
    t0 = time.monotonic()
    try:
        recipe = recipe_name(path, list(overrides or []))
        if recipe == "meta_rewarding":
            from selfalign.recipes.config import MetaRewardingConfig as Config
            from selfalign.recipes.meta_rewarding import run_meta_rewarding as runner
        elif recipe == "humpback":
            from selfalign.recipes.humpback import run_humpback as runner
            from selfalign.recipes.humpback_config import HumpbackConfig as Config
        else:
            from selfalign.recipes.config import SelfRewardingConfig as Config
            from selfalign.recipes.self_rewarding import run_self_rewarding as runner
        cfg = load_config(Config, path, list(overrides or []))
        from selfalign.training.common import check_report_to

        check_report_to(cfg.training.report_to)  # a missing tensorboard/wandb fails now, not after generation
        from selfalign.runlock import run_lock

        # one owner per run directory: a second writer stops here, before any model is touched
        with run_lock(Path(cfg.runs_dir) / cfg.name):
            result = runner(cfg, restart_from=restart_from, show_progress=progress)
    except SelfAlignError as e:
        _fail(e)
        return
    titles = {"meta_rewarding": "Meta-Rewarding iterations", "humpback": "Instruction Backtranslation rounds"}
    console.print(iteration_table(result.iterations, title=titles.get(recipe, "Self-Rewarding iterations"), recipe=recipe,
                                  start=result.start))
    console.print(f"run: {result.run_dir}  final model: {result.final_model}  wall time: {time.monotonic() - t0:.0f}s")


@models_app.command("list")
def models_list() -> None:
    """Show the embedded models, where their files are, and what is converted in the cache."""
    from selfalign.models import cache_root, list_models

    table = Table("name", "description", "source", "cached conversions")
    for row in list_models():
        table.add_row(row["name"], row["description"], row["source"], ", ".join(row["cached"]) or "-")
    console.print(table)
    console.print(f"cache: {cache_root()}  (set SELFALIGN_CACHE to move it)")


@models_app.command("prepare")
def models_prepare(
    spec: Annotated[str, typer.Argument(help="Model spec: smollm2-135m-instruct, a .gguf file, a local dir or a hub id.")] = "smollm2-135m-instruct",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
) -> None:
    """Resolve a model spec to a local safetensors directory now (converting GGUF once) and print its path."""
    from selfalign.models import resolve_model

    try:
        path = resolve_model(spec, dtype=dtype)
    except SelfAlignError as e:
        _fail(e)
        return
    console.print(str(path))


from selfalign.eval.winrate_cli import winrate as _eval_winrate  # noqa: E402

eval_app.command("winrate")(_eval_winrate)

from selfalign.eval.judge_cli import judge as _eval_judge  # noqa: E402

eval_app.command("judge")(_eval_judge)

from selfalign.eval.ifeval_cli import ifeval as _eval_ifeval  # noqa: E402

eval_app.command("ifeval")(_eval_ifeval)


from selfalign.eval.report_cli import report as _report  # noqa: E402  (imports nothing heavy)

app.command("report")(_report)


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
