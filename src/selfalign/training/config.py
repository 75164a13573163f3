"""Settings of the two trainers (pydantic v2, unknown keys refused like every selfalign config).

:class:`SFTSettings` and :class:`DPOSettings` share :class:`TrainSettings`; only the defaults
that the papers fix differ (DPO: learning rate 1e-6 and beta 0.1, as in Self-Rewarding LMs).

Precision: weights are always trained in float32 (the optimizer's master copy); ``bf16``
only turns on bfloat16 *autocast* for the forward/backward matmuls (about 1.5-2x faster on a
CPU with AVX-512 BF16).  ``"auto"`` enables it only for LoRA, and only on hardware that
computes bf16 natively (CUDA with bf16 support; CPUs with AVX-512 BF16 or AMX, see
:func:`selfalign.models.cpu_has_native_bf16`).  Full fine-tuning stays in float32 under
``"auto"`` because autocast re-rounds the weights to bf16 at every forward: an Adam step moves
a weight by about the learning rate (1e-6 for DPO, 1e-5 for SFT), far below bf16's spacing near
typical weights (~1e-4), so the forward pass barely sees the updates.  Measured on
SmolLM2-135M (stored in bf16, so every weight starts exactly on the bf16 grid), 12-16 steps:
SFT at lr 1e-5 took the loss 3.32 -> 0.95 in fp32 but only to 2.48 with autocast; DPO at lr
1e-6 raised the reward margin to 0.87 in fp32 and to ~0.07 with autocast.  LoRA adapters start
at zero and are small, so bf16 resolves their updates (LoRA SFT at lr 1e-4: 1.86 fp32 vs 2.04
bf16 after 12 steps).  ``bf16: true`` forces autocast anyway.

``save_dtype`` is the dtype of the final checkpoint written to ``out_dir``.  The default,
``float32``, keeps every update; ``"source"`` reuses the dtype the input model was stored in
(half the disk for a bf16 model, at the cost of rounding the update, see above).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from selfalign.config import StrictModel


class LoraSettings(StrictModel):
    """A LoRA adapter instead of full fine-tuning; it is merged into the base before saving."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or 'all-linear' (every linear layer but the LM head)"
    )


class TrainSettings(StrictModel):
    """Knobs common to SFT and DPO.  Steps are optimizer steps (after gradient accumulation)."""

    learning_rate: float = Field(1e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=8, description="tokens of prompt + response; longer sequences are cut at the end")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of the steps spent warming up the learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant"] = "linear"
    min_learning_rate: float | None = Field(
        None, ge=0.0,
        description="cosine only: decay to this learning rate instead of 0 (Self-Rewarding: SFT 5.5e-6 -> 1.1e-6, DPO 1e-6 -> 1e-7)",
    )
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="train with this dropout probability in every dropout site of the model (attention_dropout, "
        "hidden/residual dropout...; Self-Rewarding: 0.1); null keeps the model's own (SmolLM2 and Llama: 0), "
        "and DPO then turns dropout off as TRL does by default",
    )
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    bf16: Literal["auto"] | bool = Field("auto", description="bfloat16 autocast; auto = for LoRA on bf16 hardware")
    gradient_checkpointing: bool = False
    save_steps: int = Field(50, ge=1, description="write a resumable checkpoint every N optimizer steps")
    logging_steps: int = Field(1, ge=1)
    save_dtype: Literal["float32", "bfloat16", "float16", "source"] = "float32"
    lora: LoraSettings | None = None

    @model_validator(mode="after")
    def _min_lr(self) -> TrainSettings:
        if self.min_learning_rate is not None:
            if self.lr_scheduler != "cosine":
                raise ValueError("min_learning_rate needs lr_scheduler: cosine (transformers' cosine_with_min_lr)")
            if self.min_learning_rate >= self.learning_rate:
                raise ValueError("min_learning_rate must be below learning_rate")
        return self


class SFTSettings(TrainSettings):
    """Supervised fine-tuning on chat records; the loss covers the final assistant turn only."""

    learning_rate: float = Field(1e-5, gt=0)


class DPOSettings(TrainSettings):
    """Direct Preference Optimization on (prompt, chosen, rejected) pairs.

    ``precompute_ref_log_probs`` scores every pair under the reference model once, before the
    first step, so the reference model is not kept in memory nor run at every step.
    """

    learning_rate: float = Field(1e-6, gt=0)
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    precompute_ref_log_probs: bool = True

    @model_validator(mode="after")
    def _smoothing_needs_robust(self) -> DPOSettings:
        if self.label_smoothing and self.loss_type not in ("robust",):
            raise ValueError("label_smoothing is only used by loss_type 'robust'")
        return self


class JudgePairwiseSettings(TrainSettings):
    """Pairwise (Bradley-Terry) training of the judge's direct score on preference units
    (:mod:`selfalign.training.judge_pairwise`): ``-log sigmoid(scale * (s_chosen - s_rejected))``,
    ``s`` the probability-weighted score digit after ``Score: `` in ``template``. ``max_length``
    bounds the judge prompts (longer units are dropped, never cut)."""

    learning_rate: float = Field(1e-5, gt=0)
    scale: float = Field(2.0, gt=0, description="Bradley-Terry scale on the score difference (points on the 0-5 scale)")
    template: str = Field("judge_brief", description="judge template whose direct score is trained (use the one judge.template names)")
    min_score: int = Field(0, ge=0, le=9)
    max_score: int = Field(5, ge=1, le=9)
    length_expert: float | Literal["fit"] = Field(
        0.0,
        description="a fixed length-only expert added to the Bradley-Terry logit: w * log(chars chosen / chars rejected). "
        "The judge is then trained on what length does not explain (its own score is used alone at inference). "
        "0 = off; 'fit' = the w that best explains the training units by length alone (1-D logistic regression)",
    )

    @model_validator(mode="after")
    def _range(self) -> JudgePairwiseSettings:
        if self.min_score >= self.max_score:
            raise ValueError(f"min_score ({self.min_score}) must be below max_score ({self.max_score})")
        return self


# training.report_to: transformers' own logging integrations that selfalign can switch on
REPORT_TO = ("none", "tensorboard", "wandb")

# accelerate configs shipped in selfalign/accelerate_configs/<name>.yaml
SHIPPED_LAUNCHER_CONFIGS = ("deepspeed_zero3", "deepspeed_zero2", "fsdp")


def shipped_launcher_config(name: str) -> Path:
    """The path of a shipped accelerate config (see :data:`SHIPPED_LAUNCHER_CONFIGS`)."""
    from importlib import resources

    return Path(str(resources.files("selfalign").joinpath(f"accelerate_configs/{name}.yaml")))


class LaunchSettings(StrictModel):
    """How SFT and DPO run: in this process, in a child process, or under ``accelerate launch``;
    and where their logged metrics go besides ``train_log.jsonl``.

    ``isolate: auto`` trains in a child process when it must (several processes or a launcher
    config) or when generation and training share a GPU, so that neither keeps memory the other
    needs; on a CPU with one process training stays in the recipe's own process.

    ``report_to`` switches on one of transformers' logging integrations for every SFT and DPO
    of the run; its files go to ``<model>/logs/`` (e.g. ``runs/<name>/iter_1/model/logs/``,
    ``<model>.checkpoints/logs/`` while training).  It does not change what is trained, so it
    may be changed when a run is resumed.
    """

    num_processes: int = Field(1, ge=1, description="training processes (e.g. GPUs); > 1 launches `accelerate launch`")
    launcher_config: str | None = Field(
        None,
        description="an accelerate config: a shipped one (" + ", ".join(SHIPPED_LAUNCHER_CONFIGS) + ") or a path to "
        "your own accelerate YAML; naming one launches `accelerate launch --config_file`",
    )
    isolate: Literal["auto"] | bool = Field(
        "auto", description="train in a child process; auto = when generation shares the GPU, or when launched with accelerate"
    )
    main_process_port: int | None = Field(
        None, ge=0, le=65535, description="rendezvous port of the training processes; default: a free port (or the config's)"
    )
    accelerate_args: list[str] = Field(
        default_factory=list, description="extra `accelerate launch` arguments, e.g. ['--num_machines', '2', '--machine_rank', '0']"
    )
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none",
        description="also log SFT/DPO metrics to tensorboard (event files in <model>/logs/; needs the tensorboard "
        "package: selfalign[tensorboard]) or wandb (needs the wandb package; its local files in <model>/logs/wandb)",
    )

    @field_validator("launcher_config")
    @classmethod
    def _config_exists(cls, v: str | None) -> str | None:
        if v is None or v in SHIPPED_LAUNCHER_CONFIGS:
            return v
        if not Path(v).expanduser().is_file():
            raise ValueError(
                f"no accelerate config {v!r}: name a shipped one ({', '.join(SHIPPED_LAUNCHER_CONFIGS)}) or an existing YAML file"
            )
        return v

    @field_validator("accelerate_args")
    @classmethod
    def _no_owned_flags(cls, v: list[str]) -> list[str]:
        owned = {"--num_processes", "--config_file", "--main_process_port", "-m", "--module"}
        bad = [a for a in v if a.split("=", 1)[0] in owned]
        if bad:
            raise ValueError(f"{bad[0]} is set by training.num_processes / launcher_config / main_process_port, not accelerate_args")
        return v

    @model_validator(mode="after")
    def _isolation(self) -> LaunchSettings:
        if self.isolate is False and self.uses_accelerate():
            raise ValueError("isolate: false cannot be combined with num_processes > 1 or a launcher_config "
                             "(accelerate launch always trains in child processes)")
        return self

    def uses_accelerate(self) -> bool:
        """True when training goes through ``accelerate launch``."""
        return self.num_processes > 1 or self.launcher_config is not None

    def config_file(self) -> Path | None:
        """The accelerate config file to pass, resolved (None without one)."""
        if self.launcher_config is None:
            return None
        if self.launcher_config in SHIPPED_LAUNCHER_CONFIGS:
            return shipped_launcher_config(self.launcher_config)
        return Path(self.launcher_config).expanduser().resolve()
