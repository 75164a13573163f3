"""Supervised fine-tuning on chat records, loss on the final assistant turn only (TRL ``SFTTrainer``).

Input: records ``{"messages": [{"role": "system"?}, {"role": "user"}, ..., {"role": "assistant"}]}``
(other keys such as ``id`` are ignored).  The last message must be the assistant's.

Each record becomes a TRL *prompt-completion* example: ``prompt`` = every message before the
last, ``completion`` = ``[last assistant message]``.  TRL tokenizes ``prompt`` with the
generation prompt appended and ``prompt + completion`` in full, and with
``completion_only_loss=True`` sets the labels of the prompt tokens to -100.  So only the
assistant's answer and its end-of-turn token (for SmolLM2's ChatML template:
``<content><|im_end|>\\n``) are trained; the system prompt, the user turns, earlier assistant
turns and the ``<|im_start|>assistant\\n`` header are not.  TRL's alternative,
``assistant_only_loss``, needs ``{% generation %}`` markers in the chat template, which
SmolLM2's template lacks, so it is not used.

See :mod:`selfalign.training.outputs` for the output layout, resume and the atomic save.
"""

from __future__ import annotations

from pathlib import Path

from selfalign.errors import DataError
from selfalign.training.common import (
    LogFn,
    check_messages,
    check_prompt_lengths,
    load_model,
    load_tokenizer,
    peft_config,
    resolve_bf16,
    trainer_kwargs,
)
from selfalign.training.config import SFTSettings
from selfalign.training.outputs import TrainResult
from selfalign.training.runner import train_with


def to_prompt_completion(examples: list[dict]) -> list[dict]:
    """Validate chat records and split each into ``{"prompt": [...], "completion": [assistant]}``.

    Raises :class:`DataError` naming the record index for a malformed record, a record whose
    last message is not the assistant's, or one without a user turn.
    """
    if not examples:
        raise DataError("SFT: no training examples")
    out = []
    for i, ex in enumerate(examples):
        where = f"SFT example {i}" + (f" (id {ex['id']})" if isinstance(ex, dict) and "id" in ex else "")
        if not isinstance(ex, dict) or "messages" not in ex:
            raise DataError(f"{where}: expected a record with a 'messages' list")
        msgs = check_messages(ex["messages"], f"{where}: messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (it is the one trained on)")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise DataError(f"{where}: no user message before the assistant's")
        out.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return out


def build_sft_trainer(
    model_dir: Path,
    data: list[dict],
    ckpt_dir: Path,
    settings: SFTSettings,
    *,
    callbacks=(),
    log: LogFn | None = None,
    report_to: str = "none",
):
    """An ``SFTTrainer`` on prompt-completion ``data`` (see :func:`to_prompt_completion`).

    Exposed so tests and tools can inspect the prepared dataset and collated batches.
    Returns ``(trainer, tokenizer, bf16)``.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from transformers import set_seed

    set_seed(settings.seed)  # before TRL wraps the model: LoRA's initial weights are random
    bf16 = resolve_bf16(settings.bf16, lora=settings.lora is not None)
    args = SFTConfig(
        **trainer_kwargs(settings, ckpt_dir, bf16, report_to),
        completion_only_loss=True,
        assistant_only_loss=False,
        packing=False,
        dataset_num_proc=None,
    )
    tokenizer = load_tokenizer(model_dir)
    check_prompt_lengths(tokenizer, data, "SFT", settings.max_length, log)
    trainer = SFTTrainer(
        model=load_model(model_dir, dropout=settings.dropout),
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
        peft_config=peft_config(settings.lora),
        callbacks=list(callbacks),
    )
    return trainer, tokenizer, bf16


def train_sft(
    model_dir: Path,
    examples: list[dict],
    out_dir: Path,
    settings: SFTSettings,
    *,
    log: LogFn | None = None,
    callbacks=(),
    report_to: str = "none",
) -> TrainResult:
    """Fine-tune ``model_dir`` on ``examples`` and save the result as a plain model in ``out_dir``.

    ``log`` receives one human-readable line per logging step (and on resume/save);
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects; ``report_to``
    (``none``, ``tensorboard``, ``wandb``: ``training.report_to``) also sends the logged
    metrics to that integration, with its files in ``out_dir/logs/``.  An interrupted call
    resumes from its last checkpoint when called again with the same arguments; a finished
    ``out_dir`` of the same inputs is returned as is (``result.reused``).
    """
    return train_with("sft", model_dir, examples, out_dir, settings, clean=to_prompt_completion, build=build_sft_trainer,
                      log=log, callbacks=callbacks, report_to=report_to)
