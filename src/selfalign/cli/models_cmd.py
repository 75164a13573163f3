"""``selfalign models list|prepare``: the embedded models, the conversion cache, and resolving a spec to a local directory."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from selfalign.cli.shared import console, fail
from selfalign.errors import SelfAlignError

models_app = typer.Typer(help="List and prepare models (the embedded default, .gguf files, local dirs, hub ids).", no_args_is_help=True)


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
        fail(e)
    console.print(str(path))
