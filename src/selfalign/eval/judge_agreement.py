"""How well does a judge agree with human preferences? The judging run and its summary.

The items come from :mod:`selfalign.data.judge_items` (OpenAssistant trees, pairwise files, EFT
records). :func:`evaluate_judge` has the model judge every reply ``k`` times with the rubric
template (:class:`selfalign.stages.judge.LLMJudge`, resumable through ``judgments.jsonl``), takes
each reply's mean parsable score, and writes ``summary.json``: the agreement metrics of
:mod:`selfalign.eval.metrics`, the length-split accuracies of :mod:`selfalign.eval.length_balance`
(with 95% bootstrap intervals over prompts) and the paper's "5-best %", for the judge and for
two baselines on the same items (``random``: exact expectations of a coin-flip judge;
``longer_wins``: the longer reply wins). :func:`selfalign.report.tables.judge_table` prints it.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from selfalign.config import EngineConfig, ModelConfig, StrictModel
from selfalign.data.records import JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl, record_id
from selfalign.data.judge_items import ItemList
from selfalign.errors import DataError
from selfalign.eval import metrics as M
from selfalign.eval.length_balance import five_best, length_balanced_metrics

SUMMARY_KIND = "judge_agreement"


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
