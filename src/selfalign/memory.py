"""Peak memory of a piece of work: this process's resident set, CUDA allocations, child workers.

A stage of a run calls :func:`start` when it begins and :func:`stage_peak` when it ends:

* **RSS**: Linux keeps the high-water mark of the resident set (``VmHWM`` in
  ``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
  RSS, so the mark read at the end is the peak of this stage, not of the whole run (it includes
  what the process already held when the stage began, e.g. memory the allocator kept).
  Elsewhere the process-lifetime peak (``resource.getrusage``) is reported instead, flagged
  ``"rss_scope": "process"``.
* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (only when
  torch is already imported and CUDA initialised: a stage that never touched the GPU reports none).
* **Child workers** (training in a separate process or under ``accelerate launch``) measure
  themselves (:func:`own_peak`) and report back; :func:`note_workers` attaches their reports
  to the stage that is running.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_workers: list[dict] = []


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> tuple[float, str]:
    """(peak RSS in MiB, scope): ``since_reset`` from VmHWM, else the process lifetime peak."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "since_reset"
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024), "process"


def _cuda():
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def start() -> None:
    """Begin measuring: reset the RSS high-water mark and CUDA peak; forget earlier workers."""
    _workers.clear()
    _reset_rss_peak()
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()


def own_peak() -> dict:
    """This process's peak since :func:`start` (or since it began): ``peak_rss_mb``, ``peak_cuda_mb``."""
    rss, scope = _rss_peak_mb()
    cuda = _cuda()
    out = {"peak_rss_mb": round(rss, 1), "peak_cuda_mb": round(cuda.max_memory_allocated() / 2**20, 1) if cuda else None}
    if scope != "since_reset":
        out["rss_scope"] = scope
    return out


def note_workers(reports: list[dict]) -> None:
    """Attach child workers' own peak reports (one per process/rank) to the current measurement."""
    _workers.extend(reports)


def stage_peak() -> dict:
    """This process's peak since :func:`start`, plus ``workers`` (their reports) when any ran."""
    out = own_peak()
    if _workers:
        out["workers"] = list(_workers)
        _workers.clear()
    return out
