"""Self-curation (instruction backtranslation): the current model rates each augmented
(instruction, output) pair on the 1-5 quality scale and the pairs rated at least ``k`` are kept.

Rating is judging with another rubric: the same :class:`selfalign.stages.judge.LLMJudge`
(sampled ``Score:`` line, or the expected score over the digits 1-5 after a forced
``Score:``), with the ``curate`` template and ``min_score=1``. A pair's rating is the mean of
its parsable ratings; a pair with none is a parse failure, counted and never kept. An
expected (fractional) rating passes threshold ``k`` when it rounds to ``k`` or more
(half up), the same buckets the score histogram uses, so "score >= 5" keeps what the model
rates a 5.

Also here: the system-prompt tags that tell seed examples from augmented ones in training
(:func:`tag`).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from selfalign.data.records import read_jsonl
from selfalign.stages.judge import aggregate, has_score_text

SCALE = range(1, 6)


def as_responses(augmented: Sequence[dict]) -> list[dict]:
    """Augmented records with an instruction, in the response layout the judge reads."""
    return [
        {
            "id": a["id"],
            "prompt_id": a["segment_id"],
            "messages": [{"role": "user", "content": a["instruction"]}],
            "response": a["output"],
        }
        for a in augmented
        if a.get("instruction")
    ]


def rounded(score: float) -> int:
    """Nearest whole rating, halves rounded up (4.5 -> 5)."""
    return int(math.floor(float(score) + 0.5))


def passes(score: float | None, k: int) -> bool:
    return score is not None and rounded(score) >= k


def ratings(judgments_path: str | Path) -> dict[str, float]:
    """augmented id -> mean parsable rating (pairs without one are absent)."""
    return aggregate(judgments_path)


def curated_examples(augmented: Sequence[dict], rated: dict[str, float], k: int) -> list[dict]:
    """The pairs rated ``k`` or more, as chat examples (user instruction -> assistant output)."""
    out = []
    for a in augmented:
        score = rated.get(a["id"])
        if a.get("instruction") and passes(score, k):
            out.append({
                "id": a["id"],
                "segment_id": a["segment_id"],
                "score": round(score, 4),
                "messages": [
                    {"role": "user", "content": a["instruction"]},
                    {"role": "assistant", "content": a["output"]},
                ],
            })
    return out


def curation_metrics(augmented: Sequence[dict], judgments_path: str | Path, k: int) -> dict:
    """Rating histogram, parse failures, the curated-set size for every threshold 1-5, and how
    many outputs (rated / kept) contain score-like text."""
    rated = ratings(judgments_path)
    judgments = parsed = 0
    for j in read_jsonl(judgments_path):
        judgments += 1
        parsed += j.get("parse_error") is None and j.get("score") is not None
    candidates = [a for a in augmented if a.get("instruction")]
    scores = [rated[a["id"]] for a in candidates if a["id"] in rated]
    hist = Counter(str(rounded(s)) for s in scores)
    kept = [a for a in candidates if passes(rated.get(a["id"]), k)]
    return {
        "pairs_rated": len(candidates),
        "ratings": judgments,
        "rating_parse_failure_rate": round(1 - parsed / judgments, 4) if judgments else None,
        "unrated_pairs": len(candidates) - len(scores),
        "curation_score_histogram": {str(s): hist.get(str(s), 0) for s in SCALE},
        "mean_rating": round(statistics.fmean(scores), 3) if scores else None,
        "curated_by_k": {f">={t}": sum(passes(s, t) for s in scores) for t in SCALE},
        "curation_threshold": k,
        "curated": len(kept),
        # outputs that carry judge-like "Score: N" text (counted, never trusted: only the rater's
        # own completion is parsed); how many of them were kept shows whether such text pays off
        "responses_with_score_text": sum(has_score_text(a["output"]) for a in candidates),
        "curated_with_score_text": sum(has_score_text(a["output"]) for a in kept),
        "mean_instruction_words": _mean_words(a["instruction"] for a in kept),
        "mean_output_words": _mean_words(a["output"] for a in kept),
        "all_mean_instruction_words": _mean_words(a["instruction"] for a in candidates),
        "all_mean_output_words": _mean_words(a["output"] for a in candidates),
    }


def _mean_words(texts) -> float | None:
    counts = [len(t.split()) for t in texts]
    return round(statistics.fmean(counts), 1) if counts else None


def tag(example: dict, system: str | None) -> dict:
    """``example`` with ``system`` as its system prompt (replacing one it had); unchanged when
    ``system`` is None or empty."""
    if not system:
        return example
    msgs = [m for m in example["messages"] if m["role"] != "system"]
    return {**example, "messages": [{"role": "system", "content": system}, *msgs]}
