"""What every command shares: the consoles, the error exit, the ``--set`` option and option-to-key folding.

Nothing here imports a command module, and no module outside :mod:`selfalign.cli` imports this one.
"""

from __future__ import annotations

from typing import Annotated, Iterable, NoReturn, Optional

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(e: Exception) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with code 2 (bad input, refused run, missing file)."""
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code=2)


def set_option(example: str):
    """The repeatable ``--set KEY=VALUE`` option, its help showing ``example``."""
    return Annotated[Optional[list[str]], typer.Option("--set", help=f"Override a config key, e.g. --set {example} (repeatable).")]


SetOption = set_option("generation.temperature=0.5")


def with_sets(overrides: list[str] | None, options: Iterable[tuple[str, object]]) -> list[str]:
    """The ``--set`` overrides followed by ``key=value`` for every command-line option that was given."""
    sets = list(overrides or [])
    sets.extend(f"{key}={val}" for key, val in options if val is not None)
    return sets


def slug(name: str, suffixes: tuple[str, ...] = (".gz", ".gguf", ".jsonl", ".json"), default: str = "data") -> str:
    """A file-name-safe label for an output folder: known suffixes dropped, other characters replaced."""
    for suffix in suffixes:
        name = name.removesuffix(suffix)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or default
