"""``selfalign run``: run or resume a recipe (Self-Rewarding, Meta-Rewarding, Humpback) from its config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from selfalign.cli.shared import SetOption, console, fail
from selfalign.errors import SelfAlignError


def default_recipe_config() -> Path:
    from importlib import resources

    return Path(str(resources.files("selfalign").joinpath("configs/self_rewarding_demo.yaml")))


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
    from selfalign.report.tables import iteration_table

    path = config or default_recipe_config()
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
        fail(e)
    titles = {"meta_rewarding": "Meta-Rewarding iterations", "humpback": "Instruction Backtranslation rounds"}
    console.print(iteration_table(result.iterations, title=titles.get(recipe, "Self-Rewarding iterations"), recipe=recipe,
                                  start=result.start))
    console.print(f"run: {result.run_dir}  final model: {result.final_model}  wall time: {time.monotonic() - t0:.0f}s")
