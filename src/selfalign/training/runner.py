"""The one body every in-process trainer runs: clean the records, reuse a finished ``out_dir``,
resume from the last checkpoint, train, save.

:func:`train_with` is what ``train_sft``, ``train_dpo`` and ``train_judge_pairwise`` call; each of
them supplies only what is its own: the function that validates its records (``clean``) and the
one that builds its Trainer (``build``).  The output layout, the fingerprint and the atomic save
are :mod:`selfalign.training.outputs`'.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from selfalign.training.common import (
    LogFn,
    check_report_to,
    drop_printer,
    make_log_callback,
    quiet_progress,
    stored_dtype,
)
from selfalign.training.config import TrainSettings
from selfalign.training.outputs import (
    TrainResult,
    checkpoints_dir,
    finished_result,
    make_fingerprint,
    prepare_checkpoints,
    run_and_save,
)

# build(model_dir, data, ckpt_dir, settings, *, callbacks, log, report_to) -> (trainer, tokenizer, bf16)
BuildFn = Callable[..., tuple]


def train_with(
    kind: str,
    model_dir: Path,
    records: list[dict],
    out_dir: Path,
    settings: TrainSettings,
    *,
    clean: Callable[[list[dict]], list[dict]],
    build: BuildFn,
    ref_model_dir: Path | None = None,
    context: Callable[[], AbstractContextManager] = nullcontext,
    log: LogFn | None = None,
    callbacks=(),
    report_to: str = "none",
) -> TrainResult:
    """Train ``model_dir`` on ``clean(records)`` with the Trainer ``build`` makes, into ``out_dir``.

    ``kind`` and ``ref_model_dir`` enter the fingerprint (see :mod:`selfalign.training.outputs`).
    A finished ``out_dir`` of the same inputs is returned as is (``result.reused``); otherwise
    training resumes from the last complete checkpoint, if any.  ``build`` is called as
    ``build(model_dir, data, ckpt_dir, settings, callbacks=, log=, report_to=)`` and returns
    ``(trainer, tokenizer, bf16)``; it and the training run inside ``quiet_progress()`` and
    ``context()`` (a trainer's own patch, e.g. DPO's completion-only LM head).
    """
    t0 = time.perf_counter()
    check_report_to(report_to)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    data = clean(records)
    fingerprint = make_fingerprint(kind, model_dir, data, settings, ref_model_dir=ref_model_dir)
    done = finished_result(out_dir, fingerprint)
    if done is not None:
        if log:
            log(f"{out_dir} is already trained; nothing to do")
        return done
    ckpt_dir = checkpoints_dir(out_dir)
    resume = prepare_checkpoints(ckpt_dir, fingerprint)
    with quiet_progress(), context():
        trainer, tokenizer, bf16 = build(model_dir, data, ckpt_dir, settings, callbacks=callbacks, log=log,
                                         report_to=report_to)
        drop_printer(trainer)
        trainer.add_callback(make_log_callback(log))
        return run_and_save(
            trainer,
            tokenizer=tokenizer,
            out_dir=out_dir,
            ckpt_dir=ckpt_dir,
            resume_from=resume,
            fingerprint=fingerprint,
            settings=settings,
            source_dtype=stored_dtype(model_dir),
            num_examples=len(data),
            bf16=bf16,
            log=log,
            t_start=t0,
            report_to=report_to,
        )
