"""Shared helpers for the benchmarks in this folder.

Every benchmark compares rows measured in the same run, prints a table with ratios against a
baseline row, and writes a JSON file of results under ``benchmarks/results/<name>.json`` (the
latest run's file is meant to be committed: docs/performance.md quotes it).

    from common import machine_info, measure_bf16_roofline_flops, write_results, print_table

Stable API (other benchmarks import it):

- :func:`machine_info` -> dict: CPU, cores, memory, load average, torch/transformers versions,
  torch threads, git commit, time.
- :func:`measure_bf16_roofline_flops` -> float: FLOP/s of a large bf16 matmul on this machine
  (the practical compute roofline), measured now.
- :func:`roofline_fraction` -> float: share of that roofline a tokens/s figure uses at
  ``2 x parameters`` FLOP per token.
- :func:`write_results` (name, dict) -> Path of the JSON file written.
- :func:`print_table` (rows, columns): a rich table (plain text when rich is missing).
- :func:`load_average`, :func:`cpu_seconds`, :func:`Stopwatch`, :func:`ratio`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------- machine


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (``uptime``), or None where the OS has none."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process and its waited-for children.

    On a shared machine, wall time depends on what else runs; the CPU time a row used does
    much less, so benchmarks report both (a row's ``cpu_s`` is the difference of two calls).
    """
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the figures of a run came from: hardware, load, software versions, commit, time."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_bf16": sorted(f for f in _cpu_flags() if "bf16" in f or f == "amx_tile"),
        "mem_total_gib": _mem_total_gib(),
        "load_average": load_average(),
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "packages": {d: _version(d) for d in ("torch", "transformers", "trl", "peft", "accelerate", "vllm", "llama_cpp_python", "self-rewarding-lm-pytorch")},
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- roofline


def measure_bf16_roofline_flops(size: int = 2048, min_seconds: float = 2.0, dtype: str = "bfloat16", device: str | None = None) -> float:
    """FLOP/s of a ``size x size @ size x size`` matmul in ``dtype``, best of timed repeats.

    A square matmul this large is the best case for the hardware's matrix units, so its rate is
    the practical ceiling ("roofline") for any dense-model workload in that dtype. It runs for at
    least ``min_seconds`` after a warm-up; the best repeat is reported, which on a shared machine
    is the least disturbed one.
    """
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dev, dt)
    b = torch.randn(size, size, generator=gen).to(dev, dt)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    flop = 2.0 * size**3
    best = math.inf
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start >= min_seconds:
            break
    return flop / best


def roofline_fraction(tokens_per_s: float, n_params: int, roofline_flops: float) -> float:
    """Share of the roofline used by ``tokens_per_s`` at 2 x parameters FLOP per token."""
    return tokens_per_s * 2.0 * n_params / roofline_flops if roofline_flops > 0 else float("nan")


# --------------------------------------------------------------------------- results


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (wall time, perf_counter)."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0 or (isinstance(value, float) and math.isnan(value)):
        return None
    return value / baseline


def _portable(text: str) -> str:
    """Machine paths as the project writes them: ``../shared/...`` for the shared data, paths
    inside the checkout relative to it, the home folder as ``~`` (results files are committed)."""
    for prefix, repl in ((str(ROOT.parent / "shared") + "/", "../shared/"), (str(ROOT) + "/", ""), (str(Path.home()) + "/", "~/")):
        text = text.replace(prefix, repl)
    return text


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, str):
        return _portable(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return _portable(str(obj))
    if isinstance(obj, (int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_results(name: str, results: Mapping[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``results`` to ``<out_dir>/<name>.json`` (default benchmarks/results/) and return the path.

    Non-finite floats become null; paths and other objects become strings, machine paths
    portable (see :func:`_portable`). The file is written
    whole to a temporary name and renamed, so a killed run never leaves half a file.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"write_results: name must be a plain file stem, got {name!r}")
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- tables


def _fmt(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if fmt:
        try:
            return format(value, fmt)
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Iterable[str | tuple[str, str] | tuple[str, str, str]], title: str | None = None) -> str:
    """Print rows (dicts) as a table and return its plain-text form.

    ``columns`` lists keys, or ``(key, header)``, or ``(key, header, format_spec)`` tuples, e.g.
    ``("tokens_per_s", "tok/s", ".1f")``. Missing values print as ``-``.
    """
    cols: list[tuple[str, str, str | None]] = []
    for c in columns:
        if isinstance(c, str):
            cols.append((c, c, None))
        elif len(c) == 2:
            cols.append((c[0], c[1], None))
        else:
            cols.append((c[0], c[1], c[2]))
    cells = [[_fmt(r.get(k), f) for k, _, f in cols] for r in rows]
    headers = [h for _, h, _ in cols]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    text = "\n".join(lines)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in cells:
            table.add_row(*row)
        Console(width=max(100, sum(widths) + 3 * len(widths) + 4)).print(table)
    except ImportError:
        print(text)
    return text


def main() -> None:
    """``python benchmarks/common.py``: print the machine info and its measured bf16 roofline."""
    info = machine_info()
    flops = measure_bf16_roofline_flops()
    print(json.dumps(info, indent=2))
    print(f"bf16 matmul roofline: {flops / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
