"""The outer loop the two self-rewarding recipes share: seed model, M1's judge, T iterations, report.

    lock runs/<name>; check every input; open (or resume) the run directory
    M1 = seed model (SFT of M0 on the seed data; the judge_pairwise stage when configured)
    evaluate M1's judge on the held-out EFT split (eval.judge)
    for t = 1 .. T:  M_{t+1}, metrics_t = iteration(M_t)     # the recipe's own iteration
    write the HTML report

:func:`selfalign.recipes.self_rewarding.iteration` and
:func:`selfalign.recipes.meta_rewarding.iteration` are the per-paper parts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from selfalign.recipes.evals import run_seed_judge_eval
from selfalign.recipes.preflight import check_inputs
from selfalign.recipes.roles import RoleEngines
from selfalign.recipes.steps import SEED_KEYS, Log, RecipeResult, final_report, seed_model
from selfalign.run import Run
from selfalign.runlock import run_lock

# (run, cfg, t, M_t, its parent, seed data, log, show_progress, role engines) -> (M_{t+1}, metrics)
Iteration = Callable[..., tuple[Path, dict]]


def run_iterations(cfg, iteration: Iteration, *, restart_from: str | None = None, show_progress: bool = True) -> RecipeResult:
    """Run (or resume) ``cfg.iterations`` iterations of ``iteration`` from the seed model M1."""
    with run_lock(Path(cfg.runs_dir) / cfg.name):  # one owner per run directory, before anything is read
        log = Log(quiet=not show_progress)
        check_inputs(cfg)  # bad input fails here, before the run directory is touched
        run = Run.open(Path(cfg.runs_dir) / cfg.name, cfg.model_dump(mode="json"), restart_from=restart_from)
        log(f"run directory: {run.root}")
        seed, model, parent = seed_model(run, cfg, log, show_progress)  # M1
        start = run_seed_judge_eval(run, cfg, SEED_KEYS + ["judge"], model, parent, seed.eft_heldout, log, show_progress)
        iterations = []
        roles = RoleEngines(cfg, log)  # fixed role models: loaded once, never trained
        try:
            for t in range(1, cfg.iterations + 1):
                next_model, metrics = iteration(run, cfg, t, model, parent, seed, log, show_progress, roles)
                model, parent = next_model, model
                iterations.append(metrics)
        finally:
            roles.close()
        final_report(run, log)
        return RecipeResult(run.root, model, iterations, start)
