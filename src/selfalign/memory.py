"""Peak memory of a piece of work: this process's resident set, CUDA allocations, child workers.

A stage of a run calls :func:`start` when it begins and :func:`stage_peak` when it ends:

* **RSS**: Linux keeps the high-water mark of the resident set (``VmHWM`` in
  ``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
  RSS, so the mark read at the end is the peak of this stage, not of the whole run (it includes
  what the process already held when the stage began, e.g. memory the allocator kept).
  Where the reset is refused or has no effect (a read-only ``/proc``, some sandboxed kernels:
  checked by reading the mark back), or elsewhere than Linux, the process-lifetime peak
  (``resource.getrusage``) is reported instead, flagged ``"rss_scope": "process"``.
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
_reset_works: bool | None = None  # None: no reset tried yet in this process


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS; True only when the mark read back shows it took effect
    (within 8 MiB of the resident set: pages may be touched between the two reads)."""
    global _reset_works
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        _reset_works = False
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    _reset_works = hwm is not None and rss is not None and hwm <= rss + 8 * 1024
    return _reset_works


def rss_reset_supported() -> bool:
    """Whether the last :func:`start` reset the RSS high-water mark (peaks are then per stage)."""
    return bool(_reset_works)


def _rss_peak_mb() -> tuple[float, str]:
    """(peak RSS in MiB, scope): ``since_reset`` from VmHWM after a reset that took effect,
    else the process lifetime peak (``process``)."""
    hwm = _status_kib("VmHWM") if _reset_works else None
    if hwm is not None:
        return hwm / 1024, "since_reset"
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
