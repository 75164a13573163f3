"""Seed data for a recipe: IFT chat examples and EFT (judge) examples, from the demo set or files.

- IFT: ``demo`` (shipped), ``oasst:<file>`` (first turns + rank-0 replies of OpenAssistant trees,
  either layout), or a JSONL of ``{"id"?, "messages": [...user..., assistant]}``.
- EFT: ``demo`` (shipped), ``none``, ``oasst:<file>`` (split into train and held-out prompts first,
  then the train prompts' replies are judged by the IFT-only SFT model or the base model and kept
  where the scores agree with the human ranks: :mod:`selfalign.recipes.seed_eft`), or a JSONL of
  ``{"id"?, "instruction", "response", "judgment", "score"?, "human_rank"?, "prompt_id"?}`` where the
  judgment ends with its ``Score:`` line (``score`` defaults to it).

Held-out EFT prompts leave the IFT set (counted as ``eft_heldout_prompt``).

EFT examples become SFT chat examples whose user turn is the judge prompt (rendered with the
run's judge template) and whose assistant turn is the judgment, so SFT teaches the judge format.
EFT is split into train and held-out *by instruction*, so the replies to one question never sit
on both sides of the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from selfalign.data.prompt_sets import ChatMessage
from selfalign.data.oasst import build_ift, load_oasst, split_train_heldout
from selfalign.data.records import load_jsonl, record_id
from selfalign.data.seed import load_seed_eft, load_seed_ift
from selfalign.errors import DataError
from selfalign.prompts import judge_prompt


class IFTRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    messages: list[ChatMessage] = Field(min_length=2)


class EFTRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    instruction: str
    response: str
    judgment: str


@dataclass
class SeedData:
    ift: list[dict]
    eft_train: list[dict]  # raw EFT records
    eft_heldout: list[dict]
    dropped: dict = field(default_factory=dict)
    judge_chat: list[dict] = field(default_factory=list)  # extra judge SFT chat examples (pairwise verdicts)
    eft_stats: dict = field(default_factory=dict)
    eft_units: list[dict] = field(default_factory=list)  # eft_targets ranks: the preference units (instruction, chosen, rejected)

    @property
    def prompts(self) -> list[str]:
        """The IFT user prompts (the self-instruct stage's seed pool)."""
        return [next(m["content"] for m in e["messages"] if m["role"] == "user") for e in self.ift]


def load_ift(source: str, *, lang: list[str], max_examples: int | None, seed: int) -> tuple[list[dict], dict]:
    if source == "demo":
        ift, dropped = load_seed_ift(), {}
    elif source.startswith("oasst:"):
        res = build_ift(load_oasst(source.removeprefix("oasst:")), lang=tuple(lang), seed=seed)
        ift, dropped = res.examples, dict(res.dropped)
    else:
        ift = []
        for rec in load_jsonl(source, IFTRecord):
            msgs = [m.model_dump() for m in rec.messages]
            if msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs):
                raise DataError(f"{source}: example {rec.id or msgs[0]['content'][:40]!r}: needs a user turn and a final assistant turn")
            ift.append({"id": rec.id or record_id("ift", msgs), "messages": msgs})
        dropped = {}
    if max_examples is not None:
        ift = ift[:max_examples]
    return ift, dropped


def load_eft(source: str) -> list[dict]:
    if source == "none" or source.startswith("oasst:"):
        return []  # oasst: EFT is built by the recipe's seed_eft stage with the model itself
    if source == "demo":
        return load_seed_eft()
    return [_eft_file_record(r) for r in load_jsonl(source, EFTRecord)]


def _eft_file_record(r: EFTRecord) -> dict:
    """An EFT file line as a record; ``score`` (else the judgment's own ``Score:`` line),
    ``human_rank`` and ``prompt_id`` are kept, so ``eval.judge`` can rank a held-out split of it."""
    from selfalign.stages.parsing import parse_score

    extra = r.model_extra or {}
    score = extra.get("score")
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        score = parse_score(r.judgment).score
    rec = {"id": r.id or record_id("eft", r.instruction, r.response), "instruction": r.instruction, "response": r.response,
           "judgment": r.judgment, "score": score}
    if isinstance(extra.get("human_rank"), int) and not isinstance(extra.get("human_rank"), bool) and extra["human_rank"] >= 0:
        rec["human_rank"] = extra["human_rank"]
    if isinstance(extra.get("prompt_id"), str):
        rec["prompt_id"] = extra["prompt_id"]
    return rec


def _norm_prompt(text: str) -> str:
    return " ".join(text.split()).lower()


def drop_heldout_prompts(ift: list[dict], heldout: list[dict]) -> tuple[list[dict], int]:
    """IFT examples whose (first) user prompt is a held-out EFT instruction removed, so the judge is
    evaluated on prompts the model never trained on (Self-Rewarding: no prompt shared with IFT)."""
    held = {_norm_prompt(e["instruction"]) for e in heldout}
    if not held:
        return ift, 0
    kept = [e for e in ift if _norm_prompt(next(m["content"] for m in e["messages"] if m["role"] == "user")) not in held]
    return kept, len(ift) - len(kept)


def split_groups(groups: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """OpenAssistant EFT groups (:func:`selfalign.data.oasst.eft_groups`) split into (train, held out)
    by their prompt text, *before* any judging: the held-out side is every ranked group, not only
    those a model happened to rank right."""
    by_prompt: dict[str, list[dict]] = {}
    for g in groups:
        by_prompt.setdefault(record_id("eft-question", _norm_prompt(g["prompt"])), []).append(g)
    keys = [{"id": k} for k in by_prompt]
    if not keys or heldout_fraction == 0:
        return list(groups), []
    _train, held = split_train_heldout(keys, heldout_fraction, seed)
    held_ids = {k["id"] for k in held}
    train = [g for k, gs in by_prompt.items() if k not in held_ids for g in gs]
    heldout = [g for k, gs in by_prompt.items() if k in held_ids for g in gs]
    return train, heldout


def heldout_group_records(groups: list[dict]) -> list[dict]:
    """Held-out groups as the ranked records ``eval.judge`` scores (no judgment: nothing judged them)."""
    return [
        {"id": record_id("eft-heldout", g["prompt_id"], r["id"]), "prompt_id": g["prompt_id"], "instruction": g["prompt"],
         "response": r["text"], "human_rank": r["rank"]}
        for g in groups for r in g["replies"]
    ]


def downsample_score(eft: list[dict], score: int | None, seed: int) -> tuple[list[dict], int]:
    """Examples whose (rounded) score is ``score`` cut, at random (seeded), to the count of the most
    frequent other score (Self-Rewarding down-samples its over-represented score 4); returns the
    kept examples in their order and how many were removed. ``score`` None keeps everything."""
    import random
    from collections import Counter

    if score is None:
        return eft, 0
    counts = Counter(round(e["score"]) for e in eft if e.get("score") is not None)
    target = counts.pop(score, 0)
    cap = max(counts.values(), default=0)
    if target <= cap:
        return eft, 0
    idx = [i for i, e in enumerate(eft) if e.get("score") is not None and round(e["score"]) == score]
    drop = set(random.Random(f"eft-downsample:{seed}").sample(idx, target - cap))
    return [e for i, e in enumerate(eft) if i not in drop], len(drop)


def split_eft(eft: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    groups: dict[str, list[dict]] = {}
    for e in eft:
        groups.setdefault(e["instruction"], []).append(e)
    keys = [{"id": record_id("eft-question", q)} for q in groups]
    if not keys or heldout_fraction == 0:
        return list(eft), []
    _train, held = split_train_heldout(keys, heldout_fraction, seed)
    held_ids = {k["id"] for k in held}
    train = [e for q, es in groups.items() if record_id("eft-question", q) not in held_ids for e in es]
    heldout = [e for q, es in groups.items() if record_id("eft-question", q) in held_ids for e in es]
    return train, heldout


def load_seed_data(cfg) -> SeedData:
    """``cfg`` is a :class:`selfalign.recipes.config.SeedDataConfig`."""
    ift, dropped = load_ift(cfg.ift, lang=cfg.oasst_lang, max_examples=cfg.max_ift, seed=cfg.seed)
    if not ift:
        raise DataError(f"seed_data.ift={cfg.ift!r} gave no IFT examples")
    if cfg.eft.startswith("oasst:") and getattr(cfg, "eft_targets", "agree") == "ranks":
        return _ranked_seed_data(cfg, ift, dropped)
    eft = load_eft(cfg.eft)
    train, held = split_eft(eft, cfg.eft_heldout_fraction, cfg.seed)
    if cfg.max_eft is not None:
        train = train[: cfg.max_eft]
    ift, removed = drop_heldout_prompts(ift, held)
    if removed:
        dropped = {**dropped, "eft_heldout_prompt": removed}
    return SeedData(ift, train, held, dropped)


def _ranked_seed_data(cfg, ift: list[dict], dropped: dict) -> SeedData:
    """``eft_targets: ranks``: EFT targets from human preferences (:mod:`selfalign.data.preferences`).

    The OpenAssistant trees are split by tree (``eft_heldout_fraction``); held-out trees give the
    ranked records ``eval.judge`` scores, and their rank-0 replies are removed from the IFT set
    when it comes from the same file (counted as ``eft_heldout_tree``). Train trees (the turns and
    reply pairs ``eft_oasst_turns`` / ``eft_oasst_pairs`` pick) and the ``eft_pairwise`` files give
    preference units, length-balanced unless ``eft_length_balance`` is off, seeded-shuffled and
    capped at ``max_eft`` pointwise records (two per unit)."""
    import random

    from selfalign.data.preferences import (
        PreferenceSet, balance_length, heldout_records, pairwise_examples, pointwise_records, split_trees, units_from_pairwise, units_from_trees,
    )
    from selfalign.data.judge_items import load_items

    path = cfg.eft.removeprefix("oasst:")
    if not Path(path).is_file():
        raise DataError(f"seed_data.eft: {path}: file not found (the OpenAssistant trees the judge trains on and is "
                        f"evaluated on; ../shared/data/SOURCES.md says where they come from; paths are relative to "
                        f"the directory the run starts in; seed_data.eft: demo trains on the shipped seed set instead)")
    lang = tuple(cfg.oasst_lang)
    train_trees, held_trees = split_trees(load_oasst(path), cfg.eft_heldout_fraction, cfg.seed)
    held_ids = {t.id for t in held_trees}
    if cfg.ift == cfg.eft and held_ids:
        kept = [e for e in ift if e.get("source", "").removeprefix("oasst:") not in held_ids]
        if len(kept) < len(ift):
            dropped = {**dropped, "eft_heldout_tree": len(ift) - len(kept)}
        ift = kept
    pool = units_from_trees(train_trees, lang=lang, pairs=cfg.eft_oasst_pairs, first_turn_only=cfg.eft_oasst_turns == "first")
    for f in cfg.eft_pairwise:
        pool.extend(units_from_pairwise(load_items(f), source=f))
    before = pool.stats()
    if cfg.eft_length_balance:
        pool = balance_length(pool, seed=cfg.seed)
    units = list(pool.units)
    random.Random(cfg.seed).shuffle(units)
    if cfg.max_eft is not None:
        units = units[: max(1, cfg.max_eft // 2)]
    if not units:
        raise DataError(f"seed_data.eft={cfg.eft!r} (eft_targets: ranks) gave no preference units; dropped {dict(pool.dropped)}")
    chat = pairwise_examples(units) if cfg.eft_pairwise_examples else []
    trained = PreferenceSet(units, pool.dropped).stats()
    stats = {"pool": before, "trained": trained, "heldout_trees": len(held_trees)}
    return SeedData(ift, pointwise_records(units), heldout_records(held_trees, lang=lang), dropped, chat, stats, units)


def eft_to_chat(eft: list[dict], template: str) -> list[dict]:
    """EFT records -> SFT chat examples (judge prompt -> judgment)."""
    return [
        {
            "id": e["id"],
            "messages": [
                {"role": "user", "content": judge_prompt(template, e["instruction"], e["response"])},
                {"role": "assistant", "content": e["judgment"].strip()},
            ],
        }
        for e in eft
    ]
