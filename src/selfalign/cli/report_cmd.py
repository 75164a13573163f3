"""``selfalign report RUN_DIR``: the HTML report of a run (:mod:`selfalign.report.html`).

Importing the command loads neither matplotlib nor jinja2; they are imported when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfalign.cli.shared import console, fail
from selfalign.errors import SelfAlignError


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
    from selfalign.report.html import write_report

    try:
        index = write_report(run_dir, out_dir=out, evals=evals or ())
    except SelfAlignError as e:
        fail(e)
    console.print(f"report: {index}", highlight=False, soft_wrap=True)
