"""Where SFT and DPO run: in the recipe's process, in a child process, or under ``accelerate launch``.

:func:`train` is what the recipes call.  With the ``training:`` section of a run config
(:class:`~selfalign.training.config.LaunchSettings`) it either trains in-process
(:func:`~selfalign.training.sft.train_sft` / :func:`~selfalign.training.dpo.train_dpo`), or:

1. checks the records and the fingerprint here (bad data fails before any process starts; a
   finished ``out_dir`` of the same inputs is reused without starting one), and removes
   half-written checkpoints so the workers only see complete ones;
2. writes ``<out_dir>.job/`` next to the output: ``job.json`` (kind, model, data file, output,
   settings, reference model, ``report_to``) and ``data.jsonl`` (the records);
3. starts ``python -m selfalign.training.worker job.json`` (isolated, one process) or
   ``accelerate launch --num_processes N [--config_file C] [--main_process_port P] [ARGS]
   -m selfalign.training.worker job.json`` -- accelerate (torchrun, DeepSpeed, FSDP) does all
   the distribution; on a CPU the processes talk over gloo; the workers run under this process's
   ownership of the run directory (:func:`selfalign.runlock.owner_env`) and never lock it;
4. streams the children's output, line by line, to ``log`` and to ``<out_dir>.job/train.log``;
   a non-zero exit raises :class:`~selfalign.errors.TrainingError` with the last lines and the
   log's path; an interrupted parent stops the whole child process group (and a parent that
   dies takes its child with it), so a rerun resumes from the last complete checkpoint;
5. reads the result the main process saved in ``out_dir/training.json`` -- the same
   :class:`~selfalign.training.outputs.TrainResult`, path and metrics as in-process training --
   and hands the workers' own peak-memory reports (``worker_rank<R>.json``) to
   :mod:`selfalign.memory`, which records them in the stage's manifest entry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from selfalign import memory
from selfalign.data.records import atomic_write_json, atomic_write_text
from selfalign.errors import TrainingError
from selfalign.training.common import LogFn, check_report_to
from selfalign.training.config import DPOSettings, JudgePairwiseSettings, LaunchSettings, SFTSettings, TrainSettings
from selfalign.training.outputs import (
    FINISHED_MARKER,
    TrainResult,
    checkpoints_dir,
    finished_result,
    make_fingerprint,
    prepare_checkpoints,
)

TAIL_LINES = 30
TRAIN_KINDS = ("sft", "dpo", "judge_pairwise")
# a worker's own error line (worker.py prints "error (rank R): ..."; tracebacks end "SomeError: ...")
_CAUSE = re.compile(r"^(error \(rank \d+\): |[A-Za-z_][\w.]*(Error|Exception): )")
_NOT_CAUSE = ("ChildFailedError", "Connection closed by peer")  # the launcher's and gloo's echoes of it


def generation_shares_gpu(engine) -> bool:
    """True when the generation engine (an ``EngineConfig``) would run on the GPU training uses."""
    if engine is None or getattr(engine, "kind", "hf") == "openai":
        return False
    if str(getattr(engine, "device", "auto")).startswith("cpu"):
        return False
    from selfalign.training.common import cuda_available

    return cuda_available()


def needs_child(launch: LaunchSettings, engine=None) -> bool:
    """Train in a child process?  Always under accelerate; else ``isolate``, where auto =
    when generation and training share a GPU."""
    if launch.uses_accelerate():
        return True
    if launch.isolate != "auto":
        return bool(launch.isolate)
    return generation_shares_gpu(engine)


def train(
    kind: str,
    model_dir: Path,
    records: list[dict],
    out_dir: Path,
    settings: TrainSettings,
    *,
    launch: LaunchSettings | None = None,
    engine=None,
    ref_model_dir: Path | None = None,
    log: LogFn | None = None,
) -> TrainResult:
    """SFT (``kind="sft"``, chat records), DPO (``"dpo"``, preference pairs) or pairwise judge
    training (``"judge_pairwise"``, preference units) of ``model_dir`` into ``out_dir``, where
    ``launch`` says (see module doc); ``engine`` is the run's ``EngineConfig`` (for ``isolate: auto``)."""
    if kind not in TRAIN_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TRAIN_KINDS)}, got {kind!r}")
    launch = launch or LaunchSettings()
    check_report_to(launch.report_to)  # here, before a child process is started for nothing
    if not needs_child(launch, engine):
        if kind == "sft":
            from selfalign.training.sft import train_sft

            return train_sft(model_dir, records, out_dir, settings, log=log, report_to=launch.report_to)
        if kind == "judge_pairwise":
            from selfalign.training.judge_pairwise import train_judge_pairwise

            return train_judge_pairwise(model_dir, records, out_dir, settings, log=log, report_to=launch.report_to)
        from selfalign.training.dpo import train_dpo

        return train_dpo(model_dir, records, out_dir, settings, ref_model_dir=ref_model_dir, log=log, report_to=launch.report_to)
    return train_in_child(kind, model_dir, records, out_dir, settings, launch=launch, ref_model_dir=ref_model_dir, log=log)


def _fingerprint(kind: str, model_dir: Path, records: list[dict], settings: TrainSettings, ref_model_dir: Path | None) -> dict:
    if kind == "judge_pairwise":
        from selfalign.training.judge_pairwise import to_units

        if not isinstance(settings, JudgePairwiseSettings):
            raise TypeError("pairwise judge training needs JudgePairwiseSettings")
        return make_fingerprint("judge_pairwise", model_dir, to_units(records), settings)
    if kind == "sft":
        from selfalign.training.sft import to_prompt_completion

        if not isinstance(settings, SFTSettings):
            raise TypeError("SFT needs SFTSettings")
        return make_fingerprint("sft", model_dir, to_prompt_completion(records), settings)
    from selfalign.training.dpo import to_preference_records

    if not isinstance(settings, DPOSettings):
        raise TypeError("DPO needs DPOSettings")
    return make_fingerprint("dpo", model_dir, to_preference_records(records), settings, ref_model_dir=ref_model_dir)


def job_dir(out_dir: Path) -> Path:
    """``<out_dir>.job``: the job file, its data, the workers' log and memory reports."""
    out_dir = Path(out_dir)
    return out_dir.parent / (out_dir.name + ".job")


def train_in_child(
    kind: str,
    model_dir: Path,
    records: list[dict],
    out_dir: Path,
    settings: TrainSettings,
    *,
    launch: LaunchSettings,
    ref_model_dir: Path | None = None,
    log: LogFn | None = None,
) -> TrainResult:
    """Steps 1-5 of the module doc."""
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    if ref_model_dir is not None and Path(ref_model_dir).resolve() == model_dir:
        ref_model_dir = None
    fingerprint = _fingerprint(kind, model_dir, records, settings, ref_model_dir)
    done = finished_result(out_dir, fingerprint)
    if done is not None:
        if log:
            log(f"{out_dir} is already trained; nothing to do")
        return done
    prepare_checkpoints(checkpoints_dir(out_dir), fingerprint)

    jd = job_dir(out_dir)
    jd.mkdir(parents=True, exist_ok=True)
    for stale in jd.glob("worker_rank*.json"):
        stale.unlink()
    data_file = jd / "data.jsonl"
    atomic_write_text(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    job_file = jd / "job.json"
    atomic_write_json(job_file, {
        "kind": kind,
        "model_dir": str(model_dir),
        "data_file": str(data_file),
        "out_dir": str(out_dir),
        "settings": settings.model_dump(mode="json"),
        "ref_model_dir": str(Path(ref_model_dir).resolve()) if ref_model_dir is not None else None,
        "report_to": launch.report_to,
    })
    cmd = launch_command(job_file, launch)
    if log:
        how = f"{launch.num_processes} processes" if launch.uses_accelerate() else "a child process"
        log(f"{kind.upper()} in {how}: {' '.join(cmd[1:])}")
    run_child(cmd, jd / "train.log", log)

    marker = out_dir / FINISHED_MARKER
    if not marker.is_file():
        raise TrainingError(f"{kind} training exited cleanly but wrote no {marker}; see {jd / 'train.log'}")
    result = TrainResult.from_json(json.loads(marker.read_text(encoding="utf-8"))["result"])
    result.out_dir = out_dir
    result.seconds = time.perf_counter() - t0  # process start-up and loading included
    reports = worker_reports(jd)
    memory.note_workers(reports)
    if log and reports:
        kinds = sorted({str(r.get("distributed")) for r in reports})
        log(f"{kind.upper()} ran in {len(reports)} process(es) as accelerate {'/'.join(kinds)}")
    return result


def worker_reports(jd: Path) -> list[dict]:
    """The workers' own reports (rank, world size, pid, peak memory), by rank."""
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in jd.glob("worker_rank*.json")]
    return sorted(reports, key=lambda r: r.get("rank", 0))


def launch_command(job_file: Path, launch: LaunchSettings) -> list[str]:
    """The command line that runs the worker on ``job_file`` (see module doc)."""
    worker = ["-m", "selfalign.training.worker", str(job_file)]
    if not launch.uses_accelerate():
        return [sys.executable, *worker]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes)]
    config = launch.config_file()
    if config is not None:
        cmd += ["--config_file", str(config)]
    else:
        # torchrun's launcher; without CUDA the processes run on the CPU and talk over gloo
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if launch.main_process_port is not None:
        cmd += ["--main_process_port", str(launch.main_process_port)]
    elif config is None:
        cmd += ["--main_process_port", "0"]  # a free port: several runs may share a machine
    return cmd + list(launch.accelerate_args) + worker


def child_env() -> dict[str, str]:
    from selfalign.runlock import owner_env

    env = dict(os.environ)
    env.update(owner_env())  # the workers write under this process's ownership of the run (selfalign.runlock)
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the parent dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; not available off Linux
        pass


def run_child(cmd: list[str], log_file: Path, log: LogFn | None) -> None:
    """Run ``cmd`` in its own process group, streaming its output; raise TrainingError on failure.

    Any exception here (KeyboardInterrupt included) stops the whole group before it propagates.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    cause: str | None = None  # the first worker error: with several processes it scrolls out of the tail
    with Path(log_file).open("w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=child_env(), start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                fh.write(line + "\n")
                fh.flush()
                tail.append(line)
                if cause is None and _CAUSE.match(line) and not any(x in line for x in _NOT_CAUSE):
                    cause = line
                if log:
                    log(line)
            rc = proc.wait()
        except BaseException:
            stop_group(proc)
            raise
    if rc != 0:
        shown = "\n".join(f"  {line}" for line in tail)
        hint = ""
        if rc == -signal.SIGKILL or any("SIGKILL" in line for line in tail):
            hint = ("\na training process was killed with SIGKILL, usually by the out-of-memory killer: lower "
                    "per_device_batch_size or max_length (raising gradient_accumulation_steps), or use fewer processes")
        first = f"\nfirst error: {cause}" if cause and cause not in tail else ""
        raise TrainingError(
            f"training process failed (exit status {rc}); its last lines:\n{shown}{first}\nfull log: {log_file}{hint}"
        )


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the child's process group, wait up to ``grace_s`` for the child, then SIGKILL
    whatever is left of the group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
