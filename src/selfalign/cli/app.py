"""The ``selfalign`` command line (Typer): the app and its commands, one module per command group.

    selfalign version | generate | smoke      selfalign.cli.generate_cmd
    selfalign run                             selfalign.cli.run_cmd
    selfalign models list | prepare           selfalign.cli.models_cmd
    selfalign eval judge | winrate | ifeval   selfalign.cli.eval_cmd
    selfalign report                          selfalign.cli.report_cmd

Every command has ``--help``; the heavy imports (torch, transformers, matplotlib) happen when a
command runs, not when the app is built.
"""

from __future__ import annotations

import typer

from selfalign import __version__
from selfalign.cli.shared import console
from selfalign.cli.eval_cmd import eval_app
from selfalign.cli.generate_cmd import generate, smoke
from selfalign.cli.models_cmd import models_app
from selfalign.cli.report_cmd import report
from selfalign.cli.run_cmd import run

app = typer.Typer(
    help="selfalign: language models that improve themselves (Self-Rewarding, Meta-Rewarding, Instruction Backtranslation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the selfalign version."""
    console.print(__version__)


app.command()(generate)
app.command()(smoke)
app.command()(run)
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")
app.command("report")(report)


def main() -> None:  # pragma: no cover - console entry point alias
    app()
