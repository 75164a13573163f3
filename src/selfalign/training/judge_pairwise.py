"""Pairwise (Bradley-Terry) training of the generative judge on its own direct score.

SFT to a score token (``Score: 4`` for the preferred reply, ``Score: 1`` for the other) trains
each reply on its own and does not teach the judge to *rank*. This objective keeps the judge
exactly as it is used at inference (``judge.scoring: direct``: the judge template, the
assistant turn opened with ``Score: ``, the probability-weighted digit that follows) and
trains the ordering instead:

    s(x, y) = sum_d d * softmax(logits of the digit tokens)_d          (d = min_score..max_score)
    loss    = -log sigmoid(scale * (s(x, chosen) - s(x, rejected)))   (Bradley-Terry on the difference)

With ``length_expert`` the logit becomes ``scale * (s_c - s_r) + w * log(len_c / len_r)``
(lengths in characters; ``w`` given, or fitted to the training units by a one-parameter
logistic regression): a fixed "longer is better" expert in a product of experts, so the
gradient only rewards the judge for the part of the preference that length does not already
explain. At inference the judge's own score is used alone.

Input: preference units ``{"instruction", "chosen", "rejected"}`` (other keys ignored), e.g.
:func:`selfalign.data.preferences.units_from_trees` / ``units_from_pairwise``. Each unit
becomes two token sequences, built with the same functions the hf engine scores with
(:func:`selfalign.engines.hf_inputs.assistant_prefix_text`, ``prefix_and_candidate_ids``), so the
trained quantity and the inference score are the same number. Both replies of a unit sit in
the same batch (a batch of ``per_device_batch_size`` units is ``2 x`` that many sequences),
left-padded with explicit position ids, and only the last position's logits are computed
(``logits_to_keep=1``): memory is bounded by the batch size and ``max_length``, not by the
vocabulary times the sequence length. Units whose longer prompt exceeds ``max_length`` tokens
are dropped (the end of the prompt is the part that is scored, so it cannot be cut) and
counted in the log.

It runs on transformers' ``Trainer`` with the same arguments, checkpoints, resume, atomic
save and ``accelerate launch`` path as SFT and DPO (:mod:`selfalign.training.outputs`,
:mod:`selfalign.training.launch`, kind ``judge_pairwise``). Logged per step besides the loss:
``pair_accuracy`` (share of the step's units with ``s(chosen) > s(rejected)``) and
``score_margin`` (mean ``s(chosen) - s(rejected)``).
"""

from __future__ import annotations

from pathlib import Path

from selfalign.errors import DataError
from selfalign.training.common import (
    LogFn,
    load_model,
    load_tokenizer,
    peft_config,
    resolve_bf16,
    trainer_kwargs,
    training_dataset,
)
from selfalign.training.config import JudgePairwiseSettings
from selfalign.training.outputs import TrainResult
from selfalign.training.runner import train_with

SCORE_PREFIX = "Score: "  # what the direct judge opens its answer with (stages/judge.py)
MAX_LENGTH_WEIGHT = 20.0  # a fitted length expert is capped: when length separates every unit, w has no finite optimum


def to_units(records: list[dict]) -> list[dict]:
    """Validated ``{"instruction", "chosen", "rejected"}`` units (the fingerprinted data).

    Raises :class:`DataError` naming the unit's index (and id) and the field."""
    if not records:
        raise DataError("pairwise judge training: no preference units")
    out = []
    for i, r in enumerate(records):
        where = f"pairwise judge unit {i}" + (f" (id {r['id']})" if isinstance(r, dict) and "id" in r else "")
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected an object with instruction, chosen, rejected")
        for key in ("instruction", "chosen", "rejected"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise DataError(f"{where}: field {key!r}: expected a non-empty string")
        out.append({"instruction": r["instruction"], "chosen": r["chosen"], "rejected": r["rejected"]})
    return out


def log_length_ratio(unit: dict) -> float:
    """``log(chars of the chosen reply / chars of the rejected one)`` (stripped; at least 1 char each)."""
    import math

    return math.log(max(len(unit["chosen"].strip()), 1) / max(len(unit["rejected"].strip()), 1))


def fit_length_expert(units: list[dict], iterations: int = 50) -> float:
    """The ``w`` maximising ``sum log sigmoid(w * log_length_ratio)`` over ``units`` (Newton's
    method on a concave 1-D problem): how strongly length alone predicts the preferences.
    Positive when longer replies are preferred; 0 when length says nothing."""
    import math

    xs = [log_length_ratio(u) for u in units]
    w = 0.0
    for _ in range(iterations):
        grad = hess = 0.0
        for x in xs:
            z = max(min(w * x, 30.0), -30.0)
            p = 1 / (1 + math.exp(-z))
            grad += (1 - p) * x
            hess -= p * (1 - p) * x * x
        if hess == 0 or abs(grad) < 1e-9:
            break
        w = max(min(w - grad / hess, MAX_LENGTH_WEIGHT), -MAX_LENGTH_WEIGHT)
    return w


def encode_units(tokenizer, units: list[dict], settings: JudgePairwiseSettings) -> tuple[list[dict], int]:
    """Token ids of both judge prompts of every unit and the digit ids that follow them.

    Returns ``(examples, dropped)``: ``{"chosen_ids", "rejected_ids", "chosen_digits",
    "rejected_digits"}`` per kept unit, and how many units were too long for ``max_length``."""
    from selfalign.engines.hf_inputs import assistant_prefix_text, prefix_and_candidate_ids
    from selfalign.prompts import judge_prompt

    digits = [str(d) for d in range(settings.min_score, settings.max_score + 1)]
    out, dropped = [], 0
    for u in units:
        ex = {}
        for side in ("chosen", "rejected"):
            messages = [{"role": "user", "content": judge_prompt(settings.template, u["instruction"], u[side])}]
            ids, digit_ids = prefix_and_candidate_ids(tokenizer, assistant_prefix_text(tokenizer, messages, SCORE_PREFIX), digits)
            ex[f"{side}_ids"], ex[f"{side}_digits"] = ids, digit_ids
        if max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) > settings.max_length:
            dropped += 1
            continue
        ex["log_length_ratio"] = log_length_ratio(u)
        out.append(ex)
    return out, dropped


class PairCollator:
    """Units -> one left-padded batch: rows ``2i`` (chosen) and ``2i + 1`` (rejected)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        seqs, digits = [], []
        ratios = [float(f.get("log_length_ratio", 0.0)) for f in features]
        for f in features:
            seqs += [f["chosen_ids"], f["rejected_ids"]]
            digits += [f["chosen_digits"], f["rejected_digits"]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # as if each sequence started at position 0
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                "digit_ids": torch.tensor(digits, dtype=torch.long), "log_length_ratio": torch.tensor(ratios)}


def pair_scores(model, batch: dict, min_score: int):
    """The direct score of every row of ``batch`` (differentiable): the digit-weighted mean of
    the softmax over the digit tokens' logits at the last position."""
    import torch

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False)
    last = out.logits[:, -1, :].float()
    probs = torch.softmax(last.gather(1, batch["digit_ids"]), dim=-1)
    values = torch.arange(min_score, min_score + probs.shape[1], dtype=probs.dtype, device=probs.device)
    return (probs * values).sum(dim=-1)


def _trainer_class():
    import torch
    from transformers import Trainer

    class PairwiseJudgeTrainer(Trainer):
        """``Trainer`` whose loss is the Bradley-Terry loss on the judge's direct scores."""

        def __init__(self, *args, scale: float, min_score: int, length_weight: float = 0.0, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.scale, self.min_score, self.length_weight = scale, min_score, length_weight
            # the loss is a mean over the batch's units: let the Trainer divide by the accumulation steps
            self.model_accepts_loss_kwargs = False
            self._sums = {"pairs": 0.0, "right": 0.0, "margin": 0.0}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scores = pair_scores(model, inputs, self.min_score)
            diff = scores[0::2] - scores[1::2]
            logit = self.scale * diff
            if self.length_weight:
                logit = logit + self.length_weight * inputs["log_length_ratio"].to(logit.dtype)
            loss = -torch.nn.functional.logsigmoid(logit).mean()
            with torch.no_grad():
                self._sums["pairs"] += diff.numel()
                self._sums["right"] += float((diff > 0).sum())
                self._sums["margin"] += float(diff.sum())
            return (loss, {"scores": scores}) if return_outputs else loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs and self._sums["pairs"]:
                n = self._sums["pairs"]
                logs["pair_accuracy"] = round(self._sums["right"] / n, 4)
                logs["score_margin"] = round(self._sums["margin"] / n, 4)
                self._sums = dict.fromkeys(self._sums, 0.0)
            super().log(logs, *args, **kwargs)

    return PairwiseJudgeTrainer


def build_pairwise_trainer(model_dir: Path, units: list[dict], ckpt_dir: Path, settings: JudgePairwiseSettings, *,
                           callbacks=(), log: LogFn | None = None, report_to: str = "none"):
    """The trainer on encoded ``units``; returns ``(trainer, tokenizer, bf16)``."""
    from transformers import TrainingArguments, set_seed

    set_seed(settings.seed)
    bf16 = resolve_bf16(settings.bf16, lora=settings.lora is not None)
    kwargs = trainer_kwargs(settings, ckpt_dir, bf16, report_to)
    kwargs.pop("max_length")  # a TRL argument; here it bounds the encoded prompts (encode_units)
    kwargs["remove_unused_columns"] = False  # the collator reads the token-id columns itself
    args = TrainingArguments(**kwargs)
    tokenizer = load_tokenizer(model_dir)
    examples, dropped = encode_units(tokenizer, units, settings)
    if not examples:
        raise DataError(f"pairwise judge training: every one of the {len(units)} units is longer than max_length "
                        f"({settings.max_length} tokens); raise max_length")
    if log and dropped:
        log(f"pairwise judge training: {dropped} of {len(units)} units dropped (a judge prompt over max_length "
            f"{settings.max_length} tokens)")
    model = load_model(model_dir, dropout=settings.dropout)
    lora = peft_config(settings.lora)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    weight = fit_length_expert(units) if settings.length_expert == "fit" else float(settings.length_expert)
    if log and weight:
        log(f"pairwise judge training: length expert w = {weight:.3f} on log(chars chosen / chars rejected)"
            + (" (fitted to the training units)" if settings.length_expert == "fit" else ""))
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=training_dataset(examples, args, ckpt_dir), data_collator=PairCollator(pad),
        processing_class=tokenizer, callbacks=list(callbacks), scale=settings.scale, min_score=settings.min_score,
        length_weight=weight,
    )
    return trainer, tokenizer, bf16


def train_judge_pairwise(
    model_dir: Path,
    units: list[dict],
    out_dir: Path,
    settings: JudgePairwiseSettings,
    *,
    log: LogFn | None = None,
    callbacks=(),
    report_to: str = "none",
) -> TrainResult:
    """Train ``model_dir``'s direct judge score to rank ``units`` and save a plain model in ``out_dir``.

    Same contract as :func:`selfalign.training.sft.train_sft` (resume from the last checkpoint,
    reuse of a finished ``out_dir`` of the same inputs, ``log`` lines, ``callbacks``, ``report_to``).
    ``result.history`` holds ``loss``, ``pair_accuracy`` and ``score_margin`` per logging step.
    """
    return train_with("judge_pairwise", model_dir, units, out_dir, settings, clean=to_units, build=build_pairwise_trainer,
                      log=log, callbacks=callbacks, report_to=report_to)
