"""The training worker: runs one SFT, DPO or pairwise judge job described by a job file, in its own process.

    python -m selfalign.training.worker JOB.json                        # one process
    accelerate launch --num_processes N -m selfalign.training.worker JOB.json

:mod:`selfalign.training.launch` writes the job file and starts this; it can also be run by
hand (e.g. on every node of a cluster).  Job file (JSON)::

    {"kind": "sft" | "dpo" | "judge_pairwise", "model_dir": ..., "data_file": ... (JSONL records),
     "out_dir": ..., "settings": {... SFTSettings / DPOSettings ...}, "ref_model_dir": null | ...,
     "report_to": "none" | "tensorboard" | "wandb"}     (optional; default "none")

Every process trains (accelerate and TRL split the batches and synchronise the gradients);
only the main process logs the step lines and writes the final model and ``training.json``
(see :mod:`selfalign.training.outputs`).  Each process writes its own peak memory to
``worker_rank<R>.json`` next to the job file.  Errors are printed and give exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from selfalign.errors import SelfAlignError

JOB_KINDS = ("sft", "dpo", "judge_pairwise")


def load_job(path: Path) -> dict:
    """The job file, checked: known kind, existing model and data file."""
    try:
        job = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SelfAlignError(f"{path}: cannot read the training job ({e})") from None
    for key in ("kind", "model_dir", "data_file", "out_dir", "settings"):
        if key not in job:
            raise SelfAlignError(f"{path}: field {key!r}: missing")
    if job["kind"] not in JOB_KINDS:
        raise SelfAlignError(f"{path}: field 'kind': expected one of {', '.join(JOB_KINDS)}, got {job['kind']!r}")
    return job


def read_records(path: Path) -> list[dict]:
    from selfalign.data.records import read_jsonl

    return list(read_jsonl(path, unique_ids=False))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_job(job_file: Path) -> None:
    from selfalign import memory
    from selfalign.data.records import atomic_write_json
    from selfalign.training.config import DPOSettings, JudgePairwiseSettings, SFTSettings

    job = load_job(job_file)
    rank = _rank()
    log = (lambda line: print(line, flush=True)) if rank == 0 else None
    records = read_records(Path(job["data_file"]))
    report_to = job.get("report_to") or "none"
    if job["kind"] == "sft":
        from selfalign.training.sft import train_sft

        result = train_sft(
            Path(job["model_dir"]), records, Path(job["out_dir"]), SFTSettings.model_validate(job["settings"]),
            log=log, report_to=report_to,
        )
    elif job["kind"] == "judge_pairwise":
        from selfalign.training.judge_pairwise import train_judge_pairwise

        result = train_judge_pairwise(
            Path(job["model_dir"]), records, Path(job["out_dir"]), JudgePairwiseSettings.model_validate(job["settings"]),
            log=log, report_to=report_to,
        )
    else:
        from selfalign.training.dpo import train_dpo

        ref = Path(job["ref_model_dir"]) if job.get("ref_model_dir") else None
        result = train_dpo(
            Path(job["model_dir"]), records, Path(job["out_dir"]), DPOSettings.model_validate(job["settings"]),
            ref_model_dir=ref, log=log, report_to=report_to,
        )
    report = {"rank": rank, "world_size": result.world_size, "pid": os.getpid(), "distributed": _distributed_type(), **memory.own_peak()}
    atomic_write_json(Path(job_file).parent / f"worker_rank{rank}.json", report)


def _distributed_type() -> str:
    """accelerate's name for how the processes were combined (NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED)."""
    from accelerate.state import PartialState

    state = PartialState._shared_state
    return str(getattr(state.get("distributed_type"), "value", state.get("distributed_type", "NO")))


def _close_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - shutting down; the result is already written
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m selfalign.training.worker JOB.json", file=sys.stderr)
        return 2
    try:
        run_job(Path(argv[0]))
    except SelfAlignError as e:
        print(f"error (rank {_rank()}): {e}", file=sys.stderr, flush=True)
        return 1
    except Exception:  # noqa: BLE001 - the parent shows the tail of this output
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    finally:
        _close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
