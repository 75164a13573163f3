"""Direct Preference Optimization on the model's own preference pairs (TRL ``DPOTrainer``).

Input: pairs in TRL's conversational preference layout::

    {"prompt":   [{"role": "system"?...}, {"role": "user", "content": ...}],
     "chosen":   [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}],
     ...}                                   # other keys (id, scores, ...) are dropped

``chosen``/``rejected`` may also be given as plain strings (taken as the assistant's reply).
TRL formats ``prompt`` with the chat template and generation prompt, and ``prompt + chosen``
/ ``prompt + rejected`` in full; the log-probabilities summed over the reply tokens
(including the end-of-turn token) enter the DPO loss.

Reference model (the model that generated the pairs, as in Self-Rewarding LMs):

* ``ref_model_dir=None`` (default): the starting weights of ``model_dir`` itself.  With
  ``precompute_ref_log_probs`` (default) TRL scores every pair with the policy before its
  first update, so no second copy is loaded.  Without it TRL loads ``model_dir`` again.
  With LoRA the reference is the base model with the adapter disabled.
* ``ref_model_dir`` given (and different from ``model_dir``): loaded separately.

With precomputed reference log-probs a resumed run recomputes them from the freshly loaded
``model_dir`` before the checkpoint's weights are restored, so they stay those of the reference.

Speed (measured by benchmarks/dpo.py; results do not change, only how much work is done):

* Batches of similar length: each batch is padded to its longest sequence, and a random
  batch of self-generated pairs is mostly padding (on the demo's pairs, random batches of 4
  computed 1.9x the real tokens).  Pairs are sorted by length before the reference pass, and
  training batches are drawn by :class:`LengthGroupedPairs`: every epoch shuffles the pairs,
  sorts each window of ``8 x batch`` pairs by length, cuts it into batches and shuffles the
  batches, so a batch holds pairs of similar length but the order stays random.
* The LM head scores completion tokens only: TRL's fused log-prob head skips the prompt and
  padding positions on CUDA but scores every position elsewhere (a fixed shape for compilers
  on Neuron).  On the CPU :func:`completion_only_lm_head` makes it skip them too (on the demo's
  pairs ~70% of the positions are prompt or padding); the log-probabilities are the same.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
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
    training_dataset,
)
from selfalign.training.config import DPOSettings
from selfalign.training.outputs import TrainResult
from selfalign.training.runner import train_with


def _reply(value, where: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    msgs = check_messages(value, where)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: expected exactly one assistant message")
    return msgs


def to_preference_records(pairs: list[dict]) -> list[dict]:
    """Validate pairs and keep only ``prompt``/``chosen``/``rejected`` (see module doc).

    Raises :class:`DataError` naming the pair index for a malformed pair or a prompt that
    does not end with a user message.
    """
    if not pairs:
        raise DataError("DPO: no preference pairs")
    out = []
    for i, p in enumerate(pairs):
        where = f"DPO pair {i}" + (f" (id {p['id']})" if isinstance(p, dict) and "id" in p else "")
        if not isinstance(p, dict) or not all(k in p for k in ("prompt", "chosen", "rejected")):
            raise DataError(f"{where}: expected a record with 'prompt', 'chosen' and 'rejected'")
        prompt = check_messages(p["prompt"], f"{where}: prompt")
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt must end with a user message")
        chosen = _reply(p["chosen"], f"{where}: chosen")
        rejected = _reply(p["rejected"], f"{where}: rejected")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


SORT_WINDOW_BATCHES = 8  # batches per window that LengthGroupedPairs sorts by length


class LengthGroupedPairs:
    """A training sampler whose batches hold pairs of similar length, in random order.

    Each epoch (seeded by ``seed`` and the epoch the Trainer sets): shuffle the pair indices,
    sort each window of ``window_batches x batch_size`` by ``lengths``, cut it into batches
    of ``batch_size``, shuffle the full batches and put a short last batch, if any, at the
    end (the DataLoader cuts the index stream every ``batch_size``).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window_batches: int = SORT_WINDOW_BATCHES):
        self.lengths = list(lengths)
        self.batch_size = max(1, int(batch_size))
        self.window = self.batch_size * max(1, int(window_batches))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for w in range(0, len(order), self.window):
            chunk = sorted(order[w : w + self.window], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        return full + short

    def __iter__(self) -> Iterator[int]:
        for b in self.batches():
            yield from b


def pair_length(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int], max_length: int | None) -> int:
    """Tokens of the longer of a pair's two rows (the width a batch pads it to)."""
    n = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
    return min(n, max_length) if max_length else n


def sort_by_length(tokenizer, data: list[dict]) -> list[dict]:
    """``data`` ordered by :func:`pair_length` (stable), so the reference pass's fixed-order
    batches hold pairs of similar length."""
    def ids(messages: list[dict], gen: bool) -> list[int]:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]

    widths = [max(len(ids(d["prompt"] + d["chosen"], False)), len(ids(d["prompt"] + d["rejected"], False))) for d in data]
    return [data[i] for i in sorted(range(len(data)), key=widths.__getitem__)]


@contextmanager
def completion_only_lm_head():
    """While active, TRL's fused LM head scores only the positions with a label (completion
    tokens) on the CPU too, as it does on CUDA.

    TRL decides per call with ``trl.trainer.utils._use_triton(device)`` whether to gather the
    labelled positions first ("compact") or score all of them; the gathered and the full
    computations give the same log-probabilities.  Where this TRL has no such hook, nothing
    changes (training is just slower).
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        yield
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _dpo_trainer_class():
    from trl import DPOTrainer

    class _DPOTrainer(DPOTrainer):
        """TRL's DPOTrainer with :class:`LengthGroupedPairs` as its training sampler."""

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            cols = getattr(ds, "column_names", None) or []
            if not all(c in cols for c in ("prompt_ids", "chosen_ids", "rejected_ids")):
                return super()._get_train_sampler(train_dataset)
            lengths = [
                pair_length(p, c, r, self.args.max_length)
                for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
            ]
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedPairs(lengths, self.args.per_device_train_batch_size, seed)

    return _DPOTrainer


def build_dpo_trainer(
    model_dir: Path,
    data: list[dict],
    ckpt_dir: Path,
    settings: DPOSettings,
    *,
    ref_model_dir: Path | None = None,
    callbacks=(),
    log: LogFn | None = None,
    report_to: str = "none",
):
    """A ``DPOTrainer`` on cleaned preference ``data``; returns ``(trainer, tokenizer, bf16)``.

    With precomputed reference log-probs the reference model is dropped after precomputing.
    """
    from trl import DPOConfig

    from transformers import set_seed

    set_seed(settings.seed)  # before TRL wraps the model: LoRA's initial weights are random
    bf16 = resolve_bf16(settings.bf16, lora=settings.lora is not None)
    args = DPOConfig(
        **trainer_kwargs(settings, ckpt_dir, bf16, report_to),
        beta=settings.beta,
        loss_type=[settings.loss_type],
        label_smoothing=settings.label_smoothing,
        precompute_ref_log_probs=settings.precompute_ref_log_probs,
        precompute_ref_batch_size=max(settings.per_device_batch_size, 8),
        disable_dropout=settings.dropout is None,  # training.dropout set: keep it on (TRL turns it off by default)
    )
    tokenizer = load_tokenizer(model_dir)
    check_prompt_lengths(tokenizer, data, "DPO", settings.max_length, log)
    data = sort_by_length(tokenizer, data)
    ref_model = None
    if ref_model_dir is not None and Path(ref_model_dir).resolve() != Path(model_dir).resolve():
        ref_model = load_model(Path(ref_model_dir))
    trainer = _dpo_trainer_class()(
        model=load_model(model_dir, dropout=settings.dropout),
        ref_model=ref_model,
        args=args,
        train_dataset=training_dataset(data, args, ckpt_dir),
        processing_class=tokenizer,
        peft_config=peft_config(settings.lora),
        callbacks=list(callbacks),
    )
    if settings.precompute_ref_log_probs:
        trainer.ref_model = None  # its log-probs are in the dataset now; free the memory
    return trainer, tokenizer, bf16


def train_dpo(
    model_dir: Path,
    pairs: list[dict],
    out_dir: Path,
    settings: DPOSettings,
    *,
    ref_model_dir: Path | None = None,
    log: LogFn | None = None,
    callbacks=(),
    report_to: str = "none",
) -> TrainResult:
    """DPO-train ``model_dir`` on ``pairs`` and save the result as a plain model in ``out_dir``.

    Same contract as :func:`selfalign.training.sft.train_sft` (resume, reuse of a finished
    ``out_dir``, ``log`` lines, extra ``callbacks``, ``report_to``).  ``result.history`` holds TRL's
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` and
    ``logps/chosen``/``logps/rejected`` per logging step.
    """
    if ref_model_dir is not None and Path(ref_model_dir).resolve() == Path(model_dir).resolve():
        ref_model_dir = None  # the policy's own starting weights: no separate reference
    return train_with(
        "dpo", model_dir, pairs, out_dir, settings, clean=to_preference_records,
        build=partial(build_dpo_trainer, ref_model_dir=ref_model_dir), ref_model_dir=ref_model_dir,
        context=completion_only_lm_head, log=log, callbacks=callbacks, report_to=report_to,
    )
