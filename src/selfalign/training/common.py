"""Helpers SFT and DPO share: devices and precision, loading, trainer arguments, logging, validation.

See :mod:`selfalign.training.outputs` for the output directory, checkpoints and resume.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selfalign.errors import ConfigError, DataError, ModelError
from selfalign.models import cpu_has_native_bf16
from selfalign.training.config import REPORT_TO, LoraSettings, TrainSettings

LogFn = Callable[[str], None]


# --------------------------------------------------------------------------- devices, models


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_bf16(setting: str | bool, *, lora: bool) -> bool:
    """``auto`` -> True for LoRA on bf16-capable CUDA or CPUs with native bf16, else False.

    Full fine-tuning is kept in float32 under ``auto``; see :mod:`selfalign.training.config`.
    """
    if setting != "auto":
        return bool(setting)
    if not lora:
        return False
    if cuda_available():
        import torch

        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def load_model(model_dir: Path, dropout: float | None = None):
    """Load a causal LM from a local directory in float32 (the trainable master copy);
    ``dropout`` (not None) is set in every dropout site (:func:`set_dropout`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a model directory (no config.json)")
    try:
        # safetensors only (never unpickle a .bin file); no remote code
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    except Exception as e:
        raise ModelError(f"could not load the model in {model_dir}: {type(e).__name__}: {e}") from None
    if dropout is not None:
        set_dropout(model, dropout)
    return model


# dropout probabilities in transformers' model configs (Llama/SmolLM2: attention_dropout; GPT-2 style: *_pdrop)
DROPOUT_CONFIG_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                       "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout")


def set_dropout(model, p: float) -> int:
    """Set dropout probability ``p`` everywhere ``model`` has one: its config's dropout keys, every
    ``nn.Dropout`` and every attention module's ``attention_dropout`` (read at forward time). Returns
    how many sites were set; a model with none raises :class:`ModelError` (the setting would be a no-op)."""
    import torch

    sites = 0
    for key in DROPOUT_CONFIG_KEYS:
        if isinstance(getattr(model.config, key, None), (int, float)):
            setattr(model.config, key, p)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
            sites += 1
        elif isinstance(getattr(module, "attention_dropout", None), (int, float)) and not isinstance(module, type(model)):
            module.attention_dropout = p
            sites += 1
    if not sites:
        raise ModelError(f"training dropout: {type(model).__name__} has no dropout site to set (unset settings.dropout)")
    return sites


def load_tokenizer(model_dir: Path):
    """The tokenizer of ``model_dir``; it must have a chat template.  A missing pad token becomes EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{model_dir}: the tokenizer has no chat template; chat records cannot be formatted")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def stored_dtype(model_dir: Path) -> str:
    """The dtype name recorded in ``config.json`` (``float32`` when absent)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return d if d in ("float32", "bfloat16", "float16") else "float32"


def peft_config(lora: LoraSettings | None):
    """A ``peft.LoraConfig`` for causal-LM training, or None for full fine-tuning."""
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainer_kwargs(settings: TrainSettings, ckpt_dir: Path, bf16: bool, report_to: str = "none") -> dict[str, Any]:
    """Keyword arguments shared by ``SFTConfig`` and ``DPOConfig``; ``report_to`` is one of
    :data:`~selfalign.training.config.REPORT_TO` (see :func:`attach_report_dir`)."""
    scheduler = settings.lr_scheduler
    if scheduler == "constant" and settings.warmup_ratio > 0:
        scheduler = "constant_with_warmup"
    min_lr = getattr(settings, "min_learning_rate", None)
    extra: dict[str, Any] = {}
    if min_lr is not None:  # cosine down to min_lr (validated: cosine only)
        scheduler, extra["lr_scheduler_kwargs"] = "cosine_with_min_lr", {"min_lr": min_lr}
    return dict(
        output_dir=str(ckpt_dir),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=scheduler,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=bf16,
        fp16=False,
        **_checkpointing_kwargs(settings.gradient_checkpointing),
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,  # the newest may be half-written when killed; the one before is complete
        save_only_model=False,  # optimizer + scheduler + RNG are needed to resume
        logging_strategy="steps",
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        report_to=[] if report_to == "none" else [report_to],
        run_name=run_name(checkpoint_owner(ckpt_dir)),
        push_to_hub=False,
        use_cpu=not cuda_available(),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # under accelerate launch: every trained weight is used each step
        dataloader_pin_memory=False,
        disable_tqdm=True,
        remove_unused_columns=True,
        **extra,
    )


def training_dataset(data: list[dict], args, ckpt_dir: Path):
    """``data`` as a ``datasets.Dataset`` for a trainer built with ``args``.

    In one process it stays in memory.  Under ``accelerate launch`` the main process saves it
    to ``ckpt_dir/dataset`` and every process opens those files: TRL caches the precomputed
    reference log-probs next to the dataset's files, and an in-memory dataset's cache lives in
    a per-process temporary directory that the other processes cannot see.
    """
    import shutil

    from datasets import Dataset, load_from_disk

    ds = Dataset.from_list(data)
    if args.world_size <= 1:
        return ds
    path = Path(ckpt_dir) / "dataset"
    with args.main_process_first(local=False, desc="training dataset"):
        if args.distributed_state.is_main_process:
            tmp = path.with_name("dataset.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            ds.save_to_disk(str(tmp))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    return load_from_disk(str(path))


def _checkpointing_kwargs(on: bool) -> dict[str, bool]:
    """Activation checkpointing on/off under whichever name this transformers version uses.

    TRL's configs default ``gradient_checkpointing`` to True, so it is always set explicitly;
    transformers >= 5.2x renamed it ``activation_checkpointing`` (the old name still works but warns).
    """
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in names:
        return {"activation_checkpointing": on, "gradient_checkpointing": on}
    return {"gradient_checkpointing": on}


@contextmanager
def quiet_progress():
    """Silence datasets' and transformers' progress bars (map, shard writing) and the v6
    renaming FutureWarnings that TRL triggers inside transformers, while training."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    tqdm_env = os.environ.get("TQDM_DISABLE")  # TRL's reference log-prob pass reads it
    os.environ["TQDM_DISABLE"] = "1"
    ds_was = datasets.is_progress_bar_enabled()
    hf_was = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
            yield
    finally:
        if ds_was:
            datasets.enable_progress_bars()
        if hf_was:
            hf_logging.enable_progress_bar()
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env


def drop_printer(trainer) -> None:
    """Remove the Trainer's stdout printer of raw log dicts (``log`` gets formatted lines instead)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def check_prompt_lengths(tokenizer, data: list[dict], kind: str, max_length: int, log: LogFn | None) -> None:
    """TRL drops examples whose prompt alone fills ``max_length``: say how many, refuse if all would go.

    Checked before the trainer is built (DPO's reference pass would fail on an empty set).
    """
    def prompt_tokens(messages: list[dict]) -> int:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return len(enc["input_ids"])

    too_long = sum(prompt_tokens(d["prompt"]) >= max_length for d in data)
    if too_long == len(data):
        raise DataError(f"{kind}: every prompt is at least max_length={max_length} tokens long; raise max_length")
    if too_long and log:
        log(f"{too_long} of {len(data)} examples dropped: the prompt alone reaches max_length={max_length} tokens")


# --------------------------------------------------------------------------- logging

# where training.report_to's files go: <checkpoints>/logs while training, then <out_dir>/logs
LOGS_DIR = "logs"
_REPORTER_PACKAGES = {
    # report_to -> (importable modules, any of which will do; how to install one)
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'selfalign[tensorboard]' (or: pip install tensorboard)"),
    "wandb": (("wandb",), "pip install wandb"),
}


def check_report_to(report_to: str) -> None:
    """Refuse a ``training.report_to`` that cannot work here, before anything is trained.

    transformers would only fail once the trainer is built (after generation, in a recipe);
    this names the config key and the install command instead.
    """
    import importlib.util

    if report_to not in REPORT_TO:
        raise ConfigError(f"training.report_to: expected one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none":
        return
    modules, how = _REPORTER_PACKAGES[report_to]
    if not any(importlib.util.find_spec(m) is not None for m in modules):
        raise ConfigError(
            f"training.report_to: {report_to} needs the {modules[0]} package, which is not installed in this "
            f"environment ({sys.prefix}); install it with `{how}` "
            "or set training.report_to=none"
        )


def checkpoint_owner(ckpt_dir: Path) -> Path:
    """``out_dir`` for ``out_dir.checkpoints`` (the inverse of ``outputs.checkpoints_dir``)."""
    ckpt_dir = Path(ckpt_dir)
    name = ckpt_dir.name
    return ckpt_dir.with_name(name[: -len(".checkpoints")]) if name.endswith(".checkpoints") else ckpt_dir


def run_name(out_dir: Path) -> str:
    """The name a tracker shows for the training into ``out_dir``: its last three path parts,
    e.g. ``self_rewarding_demo/iter_1/model`` for ``runs/self_rewarding_demo/iter_1/model``."""
    return "/".join(Path(out_dir).resolve().parts[-3:])


@contextmanager
def reporting(trainer, report_to: str, logs_dir: Path):
    """Point the trainer's ``report_to`` integration at ``logs_dir`` while training.

    - ``tensorboard``: transformers' ``TensorBoardCallback`` writes its event files straight
      into ``logs_dir`` (instead of ``<output_dir>/runs/<date>_<host>``);
    - ``wandb``: ``WANDB_DIR`` is ``logs_dir`` unless the environment already sets it, so
      wandb's local files (all of them with ``WANDB_MODE=offline``) go there too; the wandb
      run is finished on the way out, so its files are complete before they are moved.
    """
    logs_dir = Path(logs_dir)
    if report_to == "none":
        yield
        return
    logs_dir.mkdir(parents=True, exist_ok=True)
    if report_to == "tensorboard":
        from transformers.integrations import TensorBoardCallback

        found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)]
        if not found:  # pragma: no cover - transformers adds it for report_to=["tensorboard"]
            raise RuntimeError("report_to tensorboard: the trainer has no TensorBoardCallback")
        for cb in found:
            cb.logging_dir = str(logs_dir)
        yield
        return
    had = os.environ.get("WANDB_DIR")
    if had is None:
        os.environ["WANDB_DIR"] = str(logs_dir)
    try:
        yield
    finally:
        if had is None:
            os.environ.pop("WANDB_DIR", None)
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()



def make_log_callback(log: LogFn | None):
    """A TrainerCallback that turns each trainer log entry into one line for ``log``."""
    from transformers import TrainerCallback

    keys = ("loss", "rewards/margins", "rewards/accuracies", "pair_accuracy", "score_margin", "grad_norm", "learning_rate")

    class _LogLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if log is None or not logs:
                return
            if "train_runtime" in logs:
                log(f"training done in {logs['train_runtime']:.1f}s")
                return
            parts = [f"step {state.global_step}/{state.max_steps}"]
            for k in keys:
                if k in logs:
                    parts.append(f"{k} {logs[k]:.4g}")
            log("  ".join(parts))

    return _LogLines()


# --------------------------------------------------------------------------- validation


def check_messages(messages: Any, where: str) -> list[dict]:
    """Validate a chat message list: non-empty, each ``{"role": str, "content": str}``; returns clean copies."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{i}]: expected {{'role': str, 'content': str}}, got {str(m)[:80]}")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}[{i}]: unknown role {m['role']!r}")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean
