"""Training outputs: the finished model directory, resumable checkpoints, the atomic final save.

Directory layout for a training output ``out_dir``::

    out_dir/                      the finished model, only ever present complete:
      model.safetensors, config.json, generation_config.json, tokenizer files, chat template
      train_log.jsonl             one line per trainer log entry (loss, lr, DPO rewards, ...)
      logs/                       with training.report_to: the tensorboard event files / wandb's files
      training.json               written last: fingerprint + summary; marks out_dir as finished
    out_dir.checkpoints/          while training: checkpoint-N/ (model, optimizer, scheduler, RNG,
      fingerprint.json            trainer state) every ``save_steps``; removed after the final save
      logs/                       report_to's files while training (a resumed run adds its own
                                  event files next to the first run's); copied into out_dir/logs

Contracts:

* The final model is written into a temporary sibling directory and renamed onto ``out_dir``
  only when complete, so an interrupted save never leaves a half model.  With LoRA the adapter
  is merged into the base first, so ``out_dir`` always holds a plain transformers model.
* Calling a trainer again with the same inputs after an interruption resumes from the latest
  complete checkpoint (one with ``trainer_state.json``, which the Trainer writes last) and
  finishes the run.  Calling it when ``out_dir`` is already finished with the same inputs
  returns the stored result without training.  Checkpoints or a finished ``out_dir`` made from
  other inputs are refused with :class:`~selfalign.errors.RunError` naming the changed keys.
* "Same inputs" is the fingerprint: the starting (and reference) model's content digest (not
  its path, so a run directory may be moved), the training records' sha256, and every setting
  except ``save_steps``/``logging_steps``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selfalign.config import changed_keys
from selfalign.data.records import atomic_write_json, utc_now
from selfalign.errors import RunError
from selfalign.training.common import LOGS_DIR, LogFn, reporting
from selfalign.training.config import TrainSettings

FINISHED_MARKER = "training.json"
TRAIN_LOG = "train_log.jsonl"
_CKPT_FINGERPRINT = "fingerprint.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# settings that change how often we log or save, not what is trained
_NOT_FINGERPRINTED = {"save_steps", "logging_steps"}


@dataclass
class TrainResult:
    """Outcome of one training run (also stored in ``out_dir/training.json``).

    ``steps`` is the optimizer step the finished run ended at (counting steps done before a
    resume); ``seconds`` (wall time, loading and saving included) and ``examples_per_second``
    (examples, or pairs, per second of training: optimizer steps x batch x accumulation, so the
    short last batch of an epoch counts as full) cover this call only; ``history`` is the
    trainer's ``log_history`` (per logging step: ``loss``, ``learning_rate``, ``grad_norm``,
    for DPO ``rewards/chosen|rejected|margins|accuracies`` and ``logps/chosen|rejected``, and
    a last summary entry with ``train_runtime``).  ``reused`` is True when ``out_dir`` was
    already finished and nothing was trained.  ``world_size`` is the number of training
    processes (``accelerate launch --num_processes``); the batch of one step is then
    ``per_device_batch_size x gradient_accumulation_steps x world_size``.
    """

    out_dir: Path
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    final_loss: float | None = None
    examples_per_second: float = 0.0
    num_examples: int = 0
    resumed_from_step: int | None = None
    bf16: bool = False
    reused: bool = False
    world_size: int = 1

    def to_json(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainResult:
        d = dict(d)
        d["out_dir"] = Path(d["out_dir"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def metric(self, key: str) -> list[float]:
        """The values of one logged metric, in step order (e.g. ``metric("rewards/margins")``)."""
        return [h[key] for h in self.history if key in h]


# --------------------------------------------------------------------------- fingerprints, resume


def data_digest(records: list[dict]) -> str:
    """sha256 of the canonical JSON of the (cleaned) training records."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def model_digest(model_dir: Path) -> str:
    """Content identity of a model directory, cheap for large files.

    sha256 over ``config.json`` and, per ``*.safetensors`` file, its size and 16 evenly spaced
    64 KiB samples (which fall inside the layers' weights, so a retrained or merged model differs).
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    cfg = model_dir / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"")
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            for k in range(16):
                fh.seek(size * k // 16)
                h.update(fh.read(1 << 16))
    return h.hexdigest()


def make_fingerprint(
    kind: str, model_dir: Path, records: list[dict], settings: TrainSettings, *, ref_model_dir: Path | None = None
) -> dict:
    """What makes two training calls the same run (see module doc)."""
    return {
        "kind": kind,
        "model": model_digest(model_dir),
        "ref_model": model_digest(ref_model_dir) if ref_model_dir is not None else None,
        "settings": settings.model_dump(mode="json", exclude=_NOT_FINGERPRINTED),
        "num_examples": len(records),
        "data_sha256": data_digest(records),
    }


def checkpoints_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / (out_dir.name + ".checkpoints")


def finished_result(out_dir: Path, fingerprint: dict) -> TrainResult | None:
    """The stored result if ``out_dir`` is a finished run of the same inputs; None if absent.

    Raises RunError if ``out_dir`` is finished with other inputs, or exists and is not ours.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return None
    marker = out_dir / FINISHED_MARKER
    if not marker.is_file():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            return None
        raise RunError(f"{out_dir} exists but is not a finished selfalign training output; move it away or delete it")
    stored = json.loads(marker.read_text(encoding="utf-8"))
    if stored.get("fingerprint") != fingerprint:
        keys = changed_keys(stored.get("fingerprint") or {}, fingerprint)
        raise RunError(
            f"{out_dir} holds a model trained with other inputs (changed: {', '.join(keys)}); "
            "delete it or choose another output directory"
        )
    result = TrainResult.from_json(stored["result"])
    result.out_dir, result.reused, result.seconds = out_dir, True, 0.0
    return result


def prepare_checkpoints(ckpt_dir: Path, fingerprint: dict) -> str | None:
    """Make ``ckpt_dir`` ready; return the checkpoint to resume from, or None to start afresh.

    Incomplete checkpoints (no ``trainer_state.json``) are deleted.  Checkpoints made with
    another fingerprint are refused (RunError) rather than silently mixed in.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fp_file = ckpt_dir / _CKPT_FINGERPRINT
    complete: list[tuple[int, Path]] = []
    for p in ckpt_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if not (m and p.is_dir()):
            continue
        if (p / "trainer_state.json").is_file():
            complete.append((int(m.group(1)), p))
        else:
            shutil.rmtree(p, ignore_errors=True)
    if fp_file.is_file():
        old = json.loads(fp_file.read_text(encoding="utf-8"))
        if old != fingerprint and complete:
            raise RunError(
                f"{ckpt_dir} holds checkpoints of a run with other inputs "
                f"(changed: {', '.join(changed_keys(old, fingerprint))}); delete that directory to start over"
            )
    atomic_write_json(fp_file, fingerprint)
    if not complete:
        return None
    return str(max(complete)[1])


# --------------------------------------------------------------------------- running + saving


class _NothingLeftToTrain(Exception):
    """Raised by :func:`_past_max_steps_guard` before a step beyond ``max_steps`` starts."""


def _past_max_steps_guard():
    """A callback that stops a step from starting once ``max_steps`` steps are done.

    The Trainer checks ``max_steps`` only after a step, so a run resumed from a checkpoint
    saved at its last step (``max_steps`` not a whole number of epochs) would train one step
    past the end, on data beyond it, and report ``max_steps + 1`` steps.
    """
    from transformers import TrainerCallback

    class _Guard(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise _NothingLeftToTrain(f"step {state.global_step} of {state.max_steps} is done")

    return _Guard()


def run_and_save(
    trainer,
    *,
    tokenizer,
    out_dir: Path,
    ckpt_dir: Path,
    resume_from: str | None,
    fingerprint: dict,
    settings: TrainSettings,
    source_dtype: str,
    num_examples: int,
    bf16: bool,
    log: LogFn | None,
    t_start: float,
    report_to: str = "none",
) -> TrainResult:
    """Train (resuming if asked), then merge/cast/save atomically into ``out_dir``; return the result.

    Under ``accelerate launch`` every process calls this; only the main process (rank 0)
    writes the final model, ``train_log.jsonl`` and ``training.json`` and removes the
    checkpoints, after gathering sharded weights (FSDP, ZeRO-3) with every process.
    """
    start_step = 0
    if resume_from:
        start_step = int(_CKPT_RE.match(Path(resume_from).name).group(1))
        if log:
            log(f"resuming from {resume_from} (step {start_step})")
    t_train = time.perf_counter()
    guard = _past_max_steps_guard()
    trainer.add_callback(guard)
    try:
        with reporting(trainer, report_to, Path(ckpt_dir) / LOGS_DIR):
            trainer.train(resume_from_checkpoint=resume_from)
    except _NothingLeftToTrain:
        # resumed from a checkpoint taken at the last step (a process killed during the final
        # save): train() restored its weights and state, and that is the trained model
        pass
    finally:
        trainer.remove_callback(guard)
    train_seconds = time.perf_counter() - t_train

    state = trainer.state
    history = [dict(h) for h in state.log_history]
    losses = [h["loss"] for h in history if "loss" in h]
    done_steps = max(state.global_step - start_step, 0)
    accelerator = trainer.accelerator
    per_step = settings.per_device_batch_size * settings.gradient_accumulation_steps * accelerator.num_processes
    samples = done_steps * per_step
    result = TrainResult(
        out_dir=Path(out_dir),
        steps=state.global_step,
        seconds=0.0,
        history=history,
        final_loss=losses[-1] if losses else None,
        examples_per_second=samples / train_seconds if train_seconds > 0 else 0.0,
        num_examples=num_examples,
        resumed_from_step=start_step if resume_from else None,
        bf16=bf16,
        world_size=accelerator.num_processes,
    )
    save_dtype = source_dtype if settings.save_dtype == "source" else settings.save_dtype
    model = _plain_model(trainer)  # collective when the weights are sharded: every rank takes part
    if accelerator.is_main_process:
        _save_final(model, tokenizer, Path(out_dir), save_dtype, result, fingerprint, t_start, Path(ckpt_dir) / LOGS_DIR)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if log:
            log(f"saved the model to {out_dir}")
    accelerator.wait_for_everyone()
    return result


def _is_sharded(accelerator) -> bool:
    """True when no process holds the full weights (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def _plain_model(trainer):
    """The trained model, unwrapped, with a LoRA adapter merged in (no peft left).

    With sharded weights the full state dict is gathered (every process must call this) and
    loaded on the main process into a fresh CPU copy of the same architecture (with the same
    LoRA adapter layout), which is then merged; other processes get None.
    """
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    if _is_sharded(accelerator):
        full = accelerator.get_state_dict(trainer.model)
        if not accelerator.is_main_process:
            return None
        model = _fresh_copy(model, full)
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()  # type: ignore[assignment]
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model


def _fresh_copy(model, state_dict: dict):
    """A CPU float32 model of ``model``'s architecture (and LoRA adapter layout) holding ``state_dict``."""
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    is_peft = isinstance(model, PeftModel)
    source = model.get_base_model() if is_peft else model
    base = AutoModelForCausalLM.from_config(source.config, dtype=torch.float32)
    if getattr(source, "generation_config", None) is not None:
        base.generation_config = source.generation_config
    fresh = get_peft_model(base, model.peft_config["default"]) if is_peft else base
    missing, unexpected = fresh.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=False)
    tied = set(getattr(base, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    base.tie_weights()
    return fresh


def _save_final(
    model, tokenizer, out_dir: Path, dtype: str, result: TrainResult, fingerprint: dict, t_start: float, logs: Path | None = None
):
    """Write the model, ``train_log.jsonl``, a copy of the ``logs`` directory and ``training.json``
    into a temporary sibling, then rename it onto ``out_dir``."""
    import torch

    model = model.to(getattr(torch, dtype))
    model.config.use_cache = True  # activation checkpointing turns it off
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        with (tmp / TRAIN_LOG).open("w", encoding="utf-8") as f:
            for h in result.history:
                f.write(json.dumps(h, ensure_ascii=False) + "\n")
        if logs is not None and logs.is_dir():
            shutil.copytree(logs, tmp / LOGS_DIR)  # copied: a failed save keeps them in the checkpoints
        _fsync_files(tmp)
        result.seconds = time.perf_counter() - t_start
        atomic_write_json(
            tmp / FINISHED_MARKER,
            {"fingerprint": fingerprint, "finished_at": utc_now(), "dtype": dtype, "result": result.to_json()},
        )
        if out_dir.exists():  # an empty directory (checked by finished_result)
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_files(directory: Path) -> None:
    """Flush every file under ``directory`` to disk, so the rename publishes durable content."""
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
