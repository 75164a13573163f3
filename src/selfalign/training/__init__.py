"""Training: SFT and DPO on local models with TRL (and pairwise judge training on transformers'
Trainer), resumable, saving plain merged models.

``train_sft`` (chat records, loss on the final assistant turn), ``train_dpo`` (conversational
preference pairs) and ``train_judge_pairwise`` (preference units, a Bradley-Terry loss on the
judge's direct score) all return a :class:`TrainResult` and write the finished model atomically to
``out_dir``; see :mod:`selfalign.training.outputs` for the directory layout and resume contract.
Heavy libraries (torch, transformers, trl) are imported only when training starts.
"""

from selfalign.training.outputs import TrainResult
from selfalign.training.config import DPOSettings, JudgePairwiseSettings, LoraSettings, SFTSettings, TrainSettings

__all__ = ["DPOSettings", "JudgePairwiseSettings", "LoraSettings", "SFTSettings", "TrainResult", "TrainSettings",
           "train_dpo", "train_judge_pairwise", "train_sft"]


def __getattr__(name: str):
    if name == "train_sft":
        from selfalign.training.sft import train_sft

        return train_sft
    if name == "train_dpo":
        from selfalign.training.dpo import train_dpo

        return train_dpo
    if name == "train_judge_pairwise":
        from selfalign.training.judge_pairwise import train_judge_pairwise

        return train_judge_pairwise
    raise AttributeError(name)
