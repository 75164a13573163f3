"""Progress bars for long work: records done, tokens per second, elapsed time and ETA."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class TokensPerSecond(ProgressColumn):
    """Throughput in generated tokens per second since the task started."""

    def render(self, task) -> Text:
        tokens = task.fields.get("tokens", 0)
        started = task.fields.get("t0")
        if not started or tokens == 0:
            return Text("-- tok/s", style="progress.data.speed")
        return Text(f"{tokens / max(time.monotonic() - started, 1e-9):,.0f} tok/s", style="progress.data.speed")


class GenerationProgress:
    """``advance(records, tokens)`` as results arrive; shows M/N, tok/s, elapsed and ETA."""

    def __init__(self, progress: Progress | None, task) -> None:
        self._p, self._task = progress, task
        self.tokens = 0

    def advance(self, records: int = 1, tokens: int = 0) -> None:
        self.tokens += tokens
        if self._p is not None:
            self._p.update(self._task, advance=records, tokens=self.tokens)


@contextmanager
def generation_progress(description: str, total: int, *, enabled: bool = True, console: Console | None = None):
    if not enabled:
        yield GenerationProgress(None, None)
        return
    console = console or Console(file=sys.stderr)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TokensPerSecond(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, tokens=0, t0=time.monotonic())
        yield GenerationProgress(progress, task)
