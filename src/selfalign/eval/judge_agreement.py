"""How well does a judge agree with human preferences? Datasets, the judging run, the summary.

An evaluation **item** is one prompt with two or more replies that humans ordered::

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

:func:`evaluate_judge` has the model judge every reply ``k`` times with the rubric template
(:class:`selfalign.stages.judge.LLMJudge`, resumable through ``judgments.jsonl``), takes each
reply's mean parsable score, and writes ``summary.json``: the agreement metrics of
:mod:`selfalign.eval.metrics`, the length-split accuracies of :mod:`selfalign.eval.length_balance`
(with 95% bootstrap intervals over prompts) and the paper's "5-best %", for the judge and for
two baselines on the same items (``random``: exact expectations of a coin-flip judge;
``longer_wins``: the longer reply wins).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from selfalign.config import EngineConfig, ModelConfig, StrictModel
from selfalign.data.records import (
    read_json_list,
    JsonlWriter,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    record_id,
)
from selfalign.errors import DataError
from selfalign.eval import metrics as M
from selfalign.eval.length_balance import five_best, length_balanced_metrics

__all__ = [
    "EvalJudgeConfig",
    "ItemList",
    "JudgeSettings",
    "evaluate_judge",
    "evaluate_reward",
    "items_from_eft",
    "items_from_oasst",
    "items_from_pairwise",
    "load_items",
    "responses_for",
    "summarize",
    "summary_table",
]

SUMMARY_KIND = "judge_agreement"


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


# --------------------------------------------------------------------------- settings


class JudgeSettings(StrictModel):
    """How the judge is run (the LLM-as-a-Judge rubric, ``k`` judgments per reply)."""

    template: str = Field("judge", description="built-in template name or a template file path")
    k: int = Field(3, ge=1, description="judgments per reply; a reply's score is the mean of the parsable ones")
    scoring: Literal["sampled", "expected", "direct"] = "sampled"
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 0


class EvalJudgeConfig(StrictModel):
    """What ``selfalign eval judge`` runs (YAML via ``--config``, keys via ``--set``)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)


# --------------------------------------------------------------------------- loading


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


# --------------------------------------------------------------------------- judging


def _response_id(instruction: str, text: str) -> str:
    # content-keyed: the same reply to the same instruction is judged once, whatever the file
    return record_id("eval-judge-response", instruction, text)


def responses_for(items: Sequence[dict]) -> list[dict]:
    """The response records the judge sees, one per distinct (instruction, reply text)."""
    out: dict[str, dict] = {}
    for it in items:
        for r in it["replies"]:
            rid = _response_id(it["instruction"], r["text"])
            if rid not in out:
                out[rid] = {"id": rid, "kind": "response", "prompt_id": it["id"],
                            "messages": [{"role": "user", "content": it["instruction"]}], "response": r["text"]}
    return list(out.values())


def evaluate_judge(
    engine,
    items: Sequence[dict],
    *,
    out_dir: str | Path,
    template: str = "judge",
    k: int = 3,
    scoring: str = "sampled",
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 256,
    seed: int = 0,
    show_progress: bool = True,
    data: str | None = None,
    model: str | None = None,
) -> dict:
    """Judge every reply of ``items`` ``k`` times with ``engine`` and the rubric ``template``.

    Writes ``out_dir/judgments.jsonl`` (resumable: rerun with the same settings to continue;
    other settings raise :class:`selfalign.errors.RunError`), ``out_dir/items.jsonl`` (each
    reply's rank, mean score and length) and ``out_dir/summary.json``, and returns the
    summary (see :func:`summarize`). ``items`` come from :func:`load_items`,
    :func:`items_from_eft`, :func:`items_from_oasst` or :func:`items_from_pairwise`;
    ``data`` and ``model`` only label the summary.
    """
    from selfalign.stages.judge import LLMJudge

    reward = LLMJudge(engine, template=template, k=k, temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens, seed=seed, scoring=scoring)
    described = engine.describe() if hasattr(engine, "describe") else {}
    info = {
        "model": model or described.get("model") or described.get("engine"),
        "template": template, "k": k, "scoring": scoring, "temperature": temperature, "top_p": top_p,
        "max_new_tokens": max_new_tokens, "seed": seed, "engine": described,
    }
    if scoring == "direct":
        info.update(k=1, temperature=None, top_p=None, max_new_tokens=0, seed=None)  # nothing is sampled
    return evaluate_reward(reward, items, out_dir=out_dir, expected=reward.judgments_per_response, judge_info=info, data=data,
                           score_range=(reward.min_score, reward.max_score), show_progress=show_progress)


def evaluate_reward(
    reward,
    items: Sequence[dict],
    *,
    out_dir: str | Path,
    expected: int = 1,
    judge_info: dict | None = None,
    data: str | None = None,
    score_range: tuple[int, int] | None = None,
    show_progress: bool = True,
) -> dict:
    """:func:`evaluate_judge` for any :class:`selfalign.stages.judge.Reward` (``expected``
    judgments per reply: ``k`` for an LLM judge, 1 for a function or classifier reward)."""
    from selfalign.stages.judge import run_judge

    if not items:
        raise DataError(f"{data or 'items'}: nothing to evaluate (no items)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    responses = responses_for(items)
    t0 = time.monotonic()
    with JsonlWriter(out / "judgments.jsonl", fingerprint=reward.fingerprint()) as w:
        stats = run_judge(reward, responses, w, expected=expected, show_progress=show_progress)
    wanted = {r["id"] for r in responses}
    judgments = [j for j in read_jsonl(out / "judgments.jsonl") if j["response_id"] in wanted]
    summary = summarize(items, judgments, data=data, judge=judge_info or reward.fingerprint(), score_range=score_range)
    summary["run"] = {"seconds": round(time.monotonic() - t0, 1), "judge_tokens_this_run": stats.tokens,
                      "responses": len(responses), "judgments": len(judgments)}
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                    for r in _item_rows(items, judgments)))
    atomic_write_json(out / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- summary


def _reply_scores(items: Sequence[dict], judgments: Iterable[dict]) -> list[list[float | None]]:
    by_response: dict[str, list] = defaultdict(list)
    for j in judgments:
        by_response[j["response_id"]].append(j.get("score"))
    return [[M.mean_scores(by_response.get(_response_id(it["instruction"], r["text"]), [])) for r in it["replies"]]
            for it in items]


def _item_rows(items: Sequence[dict], judgments: Sequence[dict]) -> Iterator[dict]:
    counts = Counter(j["response_id"] for j in judgments if not M.is_missing(j.get("score")))
    for it, scores in zip(items, _reply_scores(items, judgments)):
        yield {"id": it["id"], "source": it.get("source"), "instruction": it["instruction"][:200], "replies": [
            {"id": r["id"], "rank": r["rank"], "score": s, "scored_judgments": counts[_response_id(it["instruction"], r["text"])],
             "length": len(r["text"].strip())}
            for r, s in zip(it["replies"], scores)
        ]}


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def summarize(
    items: Sequence[dict],
    judgments: Sequence[dict],
    *,
    data: str | None = None,
    judge: dict | None = None,
    score_range: tuple[int, int] | None = None,
    ranked: bool | None = None,
) -> dict:
    """The ``summary.json`` document from items and their judgment records.

    A reply's score is the mean of its judgments' usable scores. ``ranked`` (default: the
    items' own :attr:`ItemList.ranked`, or True for a plain list) says whether item-level
    metrics are reported; pairwise data leaves them None.
    """
    if ranked is None:
        ranked = items.ranked if isinstance(items, ItemList) else any(
            len(it["replies"]) > 2 or it.get("source") != "pairwise" for it in items)
    ranks = [[r["rank"] for r in it["replies"]] for it in items]
    scores = _reply_scores(items, judgments)
    lengths = [M.length_scores([r["text"] for r in it["replies"]]) for it in items]
    judge_metrics = M.agreement_metrics(scores, ranks, ranked=ranked)
    lo, hi = score_range if score_range else (None, None)
    judge_metrics.update(_length_split(scores, ranks, lengths))
    judge_metrics.update(five_best(scores, ranks, top=hi) if hi is not None else {"five_best": None, "five_best_items": None})
    judge_metrics.update(
        parse_failure_rate=M.parse_failure_rate(judgments),
        unscored_judgment_rate=M.unscored_judgment_rate(judgments),
        judgments=len(judgments),
        score_histogram=M.score_histogram((j.get("score") for j in judgments), lo, hi),
    )
    summary = {
        "kind": SUMMARY_KIND,
        "data": data,
        "source": items.kind if isinstance(items, ItemList) else None,
        "judge": judge or {},
        "items": len(items),
        "pairs": judge_metrics["pairs"],
        "replies": sum(len(it["replies"]) for it in items),
        "dropped": dict(sorted(items.dropped.items())) if isinstance(items, ItemList) else {},
        "metrics": _rounded(judge_metrics),
        "baselines": {
            "random": _rounded({**M.random_baseline(ranks, ranked=ranked), **_random_length_split(ranks, lengths)}),
            "longer_wins": _rounded({**M.agreement_metrics(lengths, ranks, ranked=ranked), **_length_split(lengths, ranks, lengths)}),
        },
    }
    return summary


def _length_split(scores, ranks, lengths) -> dict:
    """Length-split rates (and their intervals, under ``ci95``) without the two keys
    :func:`selfalign.eval.metrics.agreement_metrics` already has (their intervals are kept)."""
    out = length_balanced_metrics(scores, ranks, lengths)
    return {k: v for k, v in out.items() if k not in ("pairwise_accuracy", "tie_rate")}


def _random_length_split(ranks, lengths) -> dict:
    """What a coin-flip judge scores on the length split: exactly 1/2 on every direction (it never ties)."""
    counts = length_balanced_metrics(lengths, ranks, lengths, resamples=0)
    half = lambda n: 0.5 if n else None  # noqa: E731
    return {
        "longer_preferred_accuracy": half(counts["longer_preferred_pairs"]),
        "shorter_preferred_accuracy": half(counts["shorter_preferred_pairs"]),
        "length_balanced_accuracy": half(counts["longer_preferred_pairs"] and counts["shorter_preferred_pairs"]),
        "longer_wins_agreement": half(counts["longer_preferred_pairs"] + counts["shorter_preferred_pairs"]),
        "longer_preferred_pairs": counts["longer_preferred_pairs"], "shorter_preferred_pairs": counts["shorter_preferred_pairs"],
        "equal_length_pairs": counts["equal_length_pairs"], "five_best": None, "five_best_items": None, "ci95": {},
    }


TABLE_ROWS = [
    ("pairwise_accuracy", "pairwise accuracy (ties = miss)"),
    ("longer_preferred_accuracy", "  on pairs where the longer reply is preferred"),
    ("shorter_preferred_accuracy", "  on pairs where the shorter reply is preferred"),
    ("length_balanced_accuracy", "length-balanced accuracy (50% = length only)"),
    ("longer_wins_agreement", "agrees with longer-wins"),
    ("pairwise_accuracy_excluding_ties", "pairwise accuracy, ties excluded"),
    ("tie_rate", "tie rate"),
    ("unscored_pairs", "unscored pairs (excluded)"),
    ("exact_match_best", "best reply matches human best"),
    ("exact_match_ranking", "whole ranking matches (paper: exact match)"),
    ("five_best", "human-best reply scored 5 (paper: 5-best)"),
    ("spearman", "Spearman (per item, mean)"),
    ("kendall_tau", "Kendall tau (per item, mean)"),
    ("constant_score_items", "items with constant scores"),
    ("parse_failure_rate", "parse failure rate"),
    ("unscored_judgment_rate", "judgments without a score"),
]


def summary_table(summary: dict):
    """A rich table: the judge's metrics next to both baselines."""
    from rich.table import Table

    def fmt(v, ci=None) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        return str(v)

    j = summary.get("judge", {})
    title = (f"Judge agreement: {summary.get('data') or summary.get('source')} - {summary['items']} items, "
             f"{summary['pairs']} pairs; k={j.get('k')}, scoring={j.get('scoring')}")
    table = Table("metric", "judge", "random", "longer wins", title=title)
    base = summary["baselines"]
    for key, label in TABLE_ROWS:
        vals = [summary["metrics"].get(key), base["random"].get(key), base["longer_wins"].get(key)]
        if all(v is None for v in vals):
            continue
        if key in ("parse_failure_rate", "unscored_judgment_rate"):
            vals[1] = vals[2] = None
        cis = [(d.get("ci95") or {}).get(key) for d in (summary["metrics"], base["random"], base["longer_wins"])]
        table.add_row(label, *(fmt(v, ci) for v, ci in zip(vals, cis)))
    m = summary["metrics"]
    if m.get("longer_preferred_pairs") is not None:
        table.caption = (f"[..] = 95% bootstrap interval over prompts. Scored pairs: {m['longer_preferred_pairs']} longer "
                         f"preferred, {m['shorter_preferred_pairs']} shorter preferred, {m['equal_length_pairs']} equal length")
    return table


def histogram_line(summary: dict) -> str:
    hist = summary["metrics"].get("score_histogram") or {}
    return "score histogram (judgments, rounded): " + ("  ".join(f"{k}: {v}" for k, v in hist.items()) or "-")
