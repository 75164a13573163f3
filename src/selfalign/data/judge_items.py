"""Evaluation items: prompts with two or more replies that humans (or labels) ordered.

An item is::

    {"id": str, "instruction": str, "source": "oasst" | "pairwise" | "eft",
     "replies": [{"id": str, "text": str, "rank": int}, ...]}   # rank 0 = best

Three inputs become items (:func:`load_items` picks by content, not by file name):

* OpenAssistant trees (nested export or flat Hugging Face layout, via
  :func:`selfalign.data.oasst.load_oasst`): every first-turn prompt with at least two ranked
  sibling replies whose ranks differ (:func:`items_from_oasst`).
* Pairwise preference files, a JSON list or JSONL of ``{input, output_1, output_2, label}``
  with ``label`` 1 or 2 naming the preferred output (LLMBar and friends;
  :func:`items_from_pairwise`).
* EFT records ``{instruction, response, judgment, score?, human_rank?, prompt_id?}``, e.g. a
  recipe's held-out EFT split (:func:`items_from_eft`).

Judge evaluation (:mod:`selfalign.eval.judge_agreement`) and the seed-data split
(:mod:`selfalign.data.seeding`) read them from here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from selfalign.data.records import read_json_list, read_jsonl, record_id
from selfalign.errors import DataError


class ItemList(list):
    """Evaluation items plus ``kind`` (their source format) and ``dropped`` (reason -> count)."""

    kind: str
    dropped: Counter

    def __init__(self, items: Iterable[dict] = (), kind: str = "items", dropped: Counter | None = None) -> None:
        super().__init__(items)
        self.kind = kind
        self.dropped = dropped if dropped is not None else Counter()

    @property
    def ranked(self) -> bool:
        """Whether item-level metrics mean anything: some item has more than two replies, or the
        source ranks whole reply sets (OASST, EFT) rather than single pairs."""
        return self.kind != "pairwise" or any(len(it["replies"]) > 2 for it in self)

    def head(self, limit: int | None) -> ItemList:
        """The first ``limit`` items (all of them for None)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        return ItemList(self[:limit], self.kind, Counter(self.dropped))


class _PairRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str = Field(strict=True)
    output_1: str = Field(strict=True)
    output_2: str = Field(strict=True)
    label: int = Field(strict=True, description="1 or 2: the preferred output")

    @field_validator("label")
    @classmethod
    def _one_or_two(cls, v: int) -> int:
        if v not in (1, 2):
            raise ValueError("must be 1 or 2 (the preferred output)")
        return v


class _EftRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = Field(None, strict=True)
    instruction: str = Field(strict=True)
    response: str = Field(strict=True)
    judgment: str | None = None
    score: float | None = Field(None, strict=True)
    human_rank: int | None = Field(None, ge=0, strict=True)
    prompt_id: str | None = Field(None, strict=True)


def _problem(err: ValidationError) -> str:
    from selfalign.data.records import _format_validation_error

    return _format_validation_error(err)


def _validate(records: Iterable[dict], schema: type[BaseModel], where: str, unit: str) -> list[dict]:
    """Validate in-memory records; errors name ``where``, the record's position and the field."""
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: {unit} {i}: expected a JSON object, got {type(rec).__name__}")
        try:
            out.append(schema.model_validate(rec).model_dump())
        except ValidationError as e:
            raise DataError(f"{where}: {unit} {i}: {_problem(e)}") from None
    return out


def _unique(item_id: str, seen: Counter) -> str:
    seen[item_id] += 1
    return item_id if seen[item_id] == 1 else f"{item_id}-{seen[item_id]}"


def items_from_pairwise(records: Sequence[dict], where: str = "pairwise records") -> ItemList:
    """``{input, output_1, output_2, label}`` records -> one two-reply item each.

    The preferred output gets rank 0, the other rank 1. Item ids hash the content (repeats get
    a ``-2``, ``-3`` suffix), so a judgments file stays valid when the file is reordered.
    Records are validated here; a problem raises :class:`DataError` naming ``where``, the
    record's 0-based position (``item 3``) and the field.
    """
    return _pairwise_items(_validate(records, _PairRecord, where, "item"))


def _pairwise_items(records: Iterable[dict]) -> ItemList:
    """Validated pairwise records -> items."""
    seen: Counter = Counter()
    items = ItemList(kind="pairwise")
    for r in records:
        iid = _unique(record_id("pairwise-item", r["input"], r["output_1"], r["output_2"]), seen)
        items.append({
            "id": iid,
            "instruction": r["input"],
            "source": "pairwise",
            "replies": [
                {"id": "output_1", "text": r["output_1"], "rank": 0 if r["label"] == 1 else 1},
                {"id": "output_2", "text": r["output_2"], "rank": 0 if r["label"] == 2 else 1},
            ],
        })
    return items


def items_from_oasst(trees, *, lang: str | Sequence[str] | None = ("en",)) -> ItemList:
    """OpenAssistant trees -> one item per first-turn prompt with >= 2 differently ranked replies.

    Uses :func:`selfalign.data.oasst.eft_groups` (its filters: language, no synthetic or
    deleted messages); a group whose remaining replies all share one rank is dropped as
    ``no_ordered_pair``. ``dropped`` also carries the reasons eft_groups counted.
    """
    from selfalign.data.oasst import eft_groups

    groups = eft_groups(trees, lang=lang)
    items = ItemList(kind="oasst", dropped=Counter(groups.dropped))
    for g in groups:
        if len({r["rank"] for r in g["replies"]}) < 2:
            items.dropped["no_ordered_pair"] += 1
            continue
        items.append({
            "id": g["prompt_id"],
            "instruction": g["prompt"],
            "source": "oasst",
            "replies": [{"id": r["id"], "text": r["text"], "rank": r["rank"]} for r in g["replies"]],
        })
    return items


def items_from_eft(records: Sequence[dict], where: str = "EFT records") -> ItemList:
    """EFT records (e.g. a recipe's held-out split) -> one ranked item per prompt.

    Records are grouped by ``prompt_id``, or by ``instruction`` where a record has none. A
    group's ranks are the records' ``human_rank`` when every record has one; otherwise, when
    every record has a ``score`` (the demo seed set: a reference judgment's score), the ranks
    are dense ranks of those scores (highest score = rank 0, equal scores = equal rank).
    Groups are dropped, counted in ``dropped``, when they have no ranks (``no_ranks``) or
    fewer than two distinct ranks (``no_ordered_pair``). A malformed record raises
    :class:`DataError` naming ``where``, the record's 0-based position and the field.
    """
    recs = _validate(records, _EftRecord, where, "record")
    groups: dict[str, list[tuple[int, dict]]] = {}
    for i, r in enumerate(recs):
        key = r["prompt_id"] if r["prompt_id"] is not None else "instruction:" + record_id("eft-question", r["instruction"])
        groups.setdefault(key, []).append((i, r))
    items = ItemList(kind="eft")
    for key, members in groups.items():
        if all(r["human_rank"] is not None for _, r in members):
            ranks = [r["human_rank"] for _, r in members]
        elif all(r["score"] is not None for _, r in members):
            distinct = sorted({r["score"] for _, r in members}, reverse=True)
            ranks = [distinct.index(r["score"]) for _, r in members]
        else:
            items.dropped["no_ranks"] += 1
            continue
        if len(set(ranks)) < 2:
            items.dropped["no_ordered_pair"] += 1
            continue
        first = members[0][1]
        items.append({
            "id": first["prompt_id"] or record_id("eft-item", first["instruction"]),
            "instruction": first["instruction"],
            "source": "eft",
            "replies": [
                {"id": r["id"] or f"record-{i}", "text": r["response"], "rank": rank}
                for (i, r), rank in zip(members, ranks)
            ],
        })
    return items


def _first_record(path: Path) -> tuple[int, dict | None]:
    """(line number, the first JSON object of a JSONL file); None if that line is not one."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    value = json.loads(raw.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return lineno, None  # the full reader reports it with its reason
                return lineno, value if isinstance(value, dict) else None
    return 0, None


def load_items(path: str | Path, *, lang: str | Sequence[str] | None = ("en",), limit: int | None = None) -> ItemList:
    """Read an evaluation data file into items (the format is recognised from its content).

    * ``.json``: a list of pairwise records (``output_1`` present) or of EFT records;
    * JSONL whose first record has ``output_1``: pairwise; ``instruction`` and ``response``:
      EFT; anything else (and ``.gz``): OpenAssistant trees, nested or flat.

    ``limit`` keeps the first N items. Every problem raises :class:`DataError` naming the file,
    the item (``.json``: 0-based position) or line (JSONL: 1-based) and the field.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a data file")
    if p.suffix == ".json":
        data = read_json_list(p, "evaluation records")
        if not data:
            raise DataError(f"{p}: no records (the list is empty)")
        first = data[0] if isinstance(data[0], dict) else {}
        if "instruction" in first and "response" in first and "output_1" not in first:
            items = items_from_eft(data, where=str(p))
        else:
            items = items_from_pairwise(data, where=str(p))
    elif p.suffix == ".gz":
        items = _load_oasst(p, lang)
    else:
        lineno, first = _first_record(p)
        if first is not None and "output_1" in first:
            items = _pairwise_items(rec.model_dump() for rec in read_jsonl(p, _PairRecord, unique_ids=False))
        elif first is not None and "instruction" in first and "response" in first:
            records = [rec.model_dump() for rec in read_jsonl(p, _EftRecord)]
            items = items_from_eft(records, where=str(p))
        elif first is not None and not {"prompt", "message_id"} & set(first):
            raise DataError(
                f"{p}:{lineno}: unrecognised record (fields: {', '.join(sorted(first)) or 'none'}); expected a pairwise "
                "record (input, output_1, output_2, label), an EFT record (instruction, response, ...) or an "
                "OpenAssistant tree (prompt) or message (message_id)"
            )
        else:
            items = _load_oasst(p, lang)
    if not items:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(items.dropped.items())) or "no records"
        raise DataError(f"{p}: no item with two or more differently ranked replies ({why})")
    return items.head(limit)


def _load_oasst(p: Path, lang) -> ItemList:
    from selfalign.data.oasst import load_oasst

    return items_from_oasst(load_oasst(p), lang=lang)
