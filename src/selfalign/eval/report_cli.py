"""``selfalign report RUN_DIR``: the command (registered in :mod:`selfalign.cli`).

Kept apart from :mod:`selfalign.eval.report` so that importing the CLI loads neither
matplotlib nor jinja2; they are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/self_rewarding_demo (finished or not).", show_default=False)],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", metavar="DIR", help="Directory for index.html and the PNGs (default: RUN_DIR/report).")
    ] = None,
    evals: Annotated[
        list[Path] | None,
        typer.Option("--eval", metavar="PATH", help="An evaluation kept outside the run: the summary.json of selfalign eval judge|winrate, "
                                    "or its folder (repeatable). Those inside RUN_DIR are found by themselves."),
    ] = None,
) -> None:
    """Write an HTML report of a run: stages, metrics per iteration, and plots (one offline file)."""
    from selfalign.cli import _fail, console
    from selfalign.errors import SelfAlignError
    from selfalign.eval.report import write_report

    try:
        index = write_report(run_dir, out_dir=out, evals=evals or ())
    except SelfAlignError as e:
        _fail(e)
        return
    console.print(f"report: {index}", highlight=False, soft_wrap=True)
