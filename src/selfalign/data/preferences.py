"""Judge-training (EFT) examples whose targets come from human preferences, not from the model.

The paper's EFT (``seed_data.eft_targets: agree``, :mod:`selfalign.stages.eft`) keeps the
model's own judgments where they happen to order human-ranked replies correctly. A small model
agrees with humans about as often as a coin, so what it keeps teaches the judge format but
little judgment. ``seed_data.eft_targets: ranks`` instead writes the target from the human
ordering: every training unit is a *preference* - a prompt, the reply humans preferred and one
they ranked lower - and becomes

* two pointwise examples, the judge prompt for each reply answered with one line
  ``Score: <high>`` (preferred) or ``Score: <low>`` (the other), which ``judge.scoring: direct``
  reads back as the probability-weighted digit; and optionally
* two pairwise examples (``pairwise: true``), the two replies shown in both orders with a
  one-line ``Winner: A|B`` target, for a forced pairwise verdict.

Sources: OpenAssistant trees (each first-turn prompt's best reply against its lowest-ranked
one; see :func:`units_from_trees`) and pairwise preference files ``{input, output_1,
output_2, label}`` (LLMBar and friends; :func:`units_from_pairwise`).

Length: in OpenAssistant the longer reply is the preferred one about two times in three, so a
judge trained on it can learn "longer is better" and stop there. :func:`balance_length`
keeps as many units whose preferred reply is the shorter one as units where it is the longer
one (seeded), so length alone predicts nothing in the training mix.

Held-out data: :func:`split_trees` splits OpenAssistant trees by a seeded hash of the tree id,
so no reply, prompt or follow-up of a held-out conversation is ever trained on;
:func:`heldout_records` turns the held-out trees' first turns into the EFT records that
``eval.judge`` scores (``prompt_id``, ``human_rank``).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from selfalign.data.oasst import Tree, TreeList, eft_groups, split_train_heldout
from selfalign.data.records import record_id

__all__ = [
    "PreferenceSet",
    "balance_length",
    "heldout_records",
    "pairwise_examples",
    "pointwise_records",
    "split_trees",
    "units_from_pairwise",
    "units_from_trees",
]

TARGET_LOW, TARGET_HIGH = 1, 4  # pointwise targets (0-5 rubric): the dispreferred and the preferred reply


@dataclass
class PreferenceSet:
    """Preference units ``{"id", "instruction", "chosen", "rejected", "source"}`` and the
    reasons (with counts) why candidate units were left out."""

    units: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.units)

    def extend(self, other: PreferenceSet) -> None:
        self.units.extend(other.units)
        self.dropped.update(other.dropped)

    @property
    def longer_preferred_rate(self) -> float | None:
        """The share of units (with replies of different lengths) whose preferred reply is the longer one."""
        decided = [u for u in self.units if _length_sign(u) != 0]
        return round(sum(_length_sign(u) > 0 for u in decided) / len(decided), 4) if decided else None

    def stats(self) -> dict:
        return {"units": len(self.units), "longer_preferred_rate": self.longer_preferred_rate,
                "sources": dict(sorted(Counter(u["source"] for u in self.units).items())),
                "dropped": dict(sorted(self.dropped.items()))}


def _length_sign(unit: dict) -> int:
    a, b = len(unit["chosen"].strip()), len(unit["rejected"].strip())
    return (a > b) - (a < b)


def split_trees(trees: Sequence[Tree], heldout_fraction: float, seed: int = 0) -> tuple[TreeList, TreeList]:
    """(train, held-out) trees by a seeded hash of each tree's id (the loader's ``dropped`` counts stay with train)."""
    train, held = split_train_heldout(list(trees), heldout_fraction, seed, key=lambda t: t.id)
    return TreeList(train, Counter(getattr(trees, "dropped", None) or {})), TreeList(held)


def units_from_trees(trees: Iterable[Tree], *, lang: Sequence[str] | None = ("en",), source: str = "oasst",
                     pairs: str = "extremes", first_turn_only: bool = True) -> PreferenceSet:
    """Preference units from the ranked assistant replies of each prompter turn.

    ``pairs="extremes"``: one unit per turn, its best reply (lowest rank) against its worst;
    ``pairs="all"``: one unit for every two replies of different rank (a turn with ``k``
    distinctly ranked replies gives up to ``k(k-1)/2``). ``first_turn_only=False`` also takes
    the deeper prompter turns of each conversation (the unit's instruction is that turn's text).
    Turns whose replies all share a rank are dropped as ``no_ordered_pair``."""
    if pairs not in ("extremes", "all"):
        raise ValueError(f"pairs must be 'extremes' or 'all', got {pairs!r}")
    groups = eft_groups(trees, lang=lang, first_turn_only=first_turn_only)
    out = PreferenceSet(dropped=Counter(groups.dropped))
    for g in groups:
        replies = sorted(g["replies"], key=lambda r: r["rank"])
        if replies[0]["rank"] == replies[-1]["rank"]:
            out.dropped["no_ordered_pair"] += 1
            continue
        if pairs == "extremes":
            chosen = [(replies[0], replies[-1])]
        else:
            chosen = [(a, b) for a, b in itertools.combinations(replies, 2) if a["rank"] < b["rank"]]
        for best, worse in chosen:
            out.units.append({"id": record_id("pref", g["prompt_id"], best["id"], worse["id"]), "instruction": g["prompt"],
                              "chosen": best["text"], "rejected": worse["text"], "source": source})
    return out


def units_from_pairwise(items: Iterable[dict], *, source: str) -> PreferenceSet:
    """Units from pairwise items (:func:`selfalign.eval.judge_agreement.items_from_pairwise`):
    rank 0 is the preferred reply. Pairs whose two outputs are the same text are dropped as ``identical``."""
    out = PreferenceSet()
    for it in items:
        replies = sorted(it["replies"], key=lambda r: r["rank"])
        if len(replies) != 2 or replies[0]["rank"] == replies[1]["rank"]:
            out.dropped["no_ordered_pair"] += 1
            continue
        if replies[0]["text"].strip() == replies[1]["text"].strip():
            out.dropped["identical"] += 1
            continue
        out.units.append({"id": record_id("pref", source, it["id"]), "instruction": it["instruction"],
                          "chosen": replies[0]["text"], "rejected": replies[1]["text"], "source": source})
    return out


def balance_length(prefs: PreferenceSet, seed: int = 0) -> PreferenceSet:
    """As many units whose preferred reply is longer as units where it is shorter (seeded
    choice of which to keep, input order preserved); equal-length units all stay. The units
    left out are counted as ``length_balance``."""
    longer = [i for i, u in enumerate(prefs.units) if _length_sign(u) > 0]
    shorter = [i for i, u in enumerate(prefs.units) if _length_sign(u) < 0]
    n = min(len(longer), len(shorter))
    rng = random.Random(seed)
    keep = set(i for i, u in enumerate(prefs.units) if _length_sign(u) == 0)
    keep.update(rng.sample(longer, n))
    keep.update(rng.sample(shorter, n))
    out = PreferenceSet([u for i, u in enumerate(prefs.units) if i in keep], Counter(prefs.dropped))
    if len(prefs.units) > len(keep):
        out.dropped["length_balance"] += len(prefs.units) - len(keep)
    return out


def pointwise_records(units: Iterable[dict], *, low: int = TARGET_LOW, high: int = TARGET_HIGH) -> list[dict]:
    """Two EFT records per unit (the layout ``seed_data.eft`` files use): the preferred reply
    with judgment ``Score: <high>``, the other with ``Score: <low>``. ``human_rank`` and
    ``prompt_id`` keep the pair evaluable."""
    if not low < high:
        raise ValueError(f"the low target ({low}) must be below the high one ({high})")
    out = []
    for u in units:
        for rank, (text, score) in enumerate(((u["chosen"], high), (u["rejected"], low))):
            out.append({"id": record_id("eft-rank", u["id"], rank), "kind": "example", "task": "eft", "prompt_id": u["id"],
                        "instruction": u["instruction"], "response": text, "judgment": f"Score: {score}",
                        "score": score, "human_rank": rank, "source": u["source"]})
    return out


def pairwise_examples(units: Iterable[dict], template: str = "pairwise_brief") -> list[dict]:
    """Two SFT chat examples per unit: the pairwise judge prompt with the preferred reply shown
    first (target ``Winner: A``) and shown second (``Winner: B``), so position carries no signal."""
    from selfalign.prompts import pairwise_prompt

    out = []
    for u in units:
        for order, (a, b, winner) in enumerate(((u["chosen"], u["rejected"], "A"), (u["rejected"], u["chosen"], "B"))):
            out.append({"id": record_id("eft-pair", u["id"], order), "messages": [
                {"role": "user", "content": pairwise_prompt(template, u["instruction"], a, b)},
                {"role": "assistant", "content": f"Winner: {winner}"}]})
    return out


def heldout_records(trees: Iterable[Tree], *, lang: Sequence[str] | None = ("en",)) -> list[dict]:
    """The first-turn ranked replies of ``trees`` as EFT records with ``prompt_id`` and
    ``human_rank`` (what ``eval.judge`` turns into ranked items); no judgment target."""
    out = []
    for g in eft_groups(trees, lang=lang):
        if len({r["rank"] for r in g["replies"]}) < 2:
            continue
        for r in g["replies"]:
            out.append({"id": record_id("eft-heldout", g["prompt_id"], r["id"]), "prompt_id": g["prompt_id"],
                        "instruction": g["prompt"], "response": r["text"], "judgment": "", "human_rank": r["rank"],
                        "source": "oasst"})
    return out
