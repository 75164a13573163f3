"""Building EFT (evaluation fine-tuning) examples from human-ranked replies.

For every prompt with several human-ranked replies (an OpenAssistant group, see
:func:`selfalign.data.oasst.eft_groups`), the current model judges each reply with the rubric
template. A group's judgments become EFT examples only when the model's scores order the
replies as the humans ranked them (:func:`selfalign.data.oasst.agrees_with_human`, ties
handled as configured). Each kept example is ``{"id", "instruction", "response", "judgment",
"score", "human_rank", "prompt_id"}``, the layout ``seed_data.eft`` reads.

Groups are dropped for a reason that is counted: ``unparsable`` (some reply got no parsable
score), ``tie`` (scores tie where the humans ranked), ``disagrees`` (a strict inversion).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from selfalign.data.oasst import agrees_with_human
from selfalign.data.records import JsonlWriter, record_id
from selfalign.engines.base import Engine, GenerationRequest, SamplingParams
from selfalign.progress import generation_progress
from selfalign.prompts import judge_prompt, load_template
from selfalign.stages.parsing import parse_score


@dataclass
class EFTStats:
    groups: int = 0
    kept_groups: int = 0
    examples: int = 0
    judgments: int = 0
    parsed: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "groups": self.groups,
            "kept_groups": self.kept_groups,
            "examples": self.examples,
            "judgments": self.judgments,
            "parse_rate": round(self.parsed / self.judgments, 4) if self.judgments else None,
            "dropped": dict(sorted(self.dropped.items())),
        }


def drop_reason(scores: Sequence[float | None], ranks: Sequence[int], ties: str) -> str | None:
    if any(s is None for s in scores):
        return "unparsable"
    if agrees_with_human(scores, ranks, ties=ties):
        return None
    if agrees_with_human(scores, ranks, ties="allow"):
        return "tie"
    return "disagrees"


def build_eft(
    engine: Engine,
    groups: Sequence[dict],
    writer: JsonlWriter,
    *,
    template: str = "judge",
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    ties: str = "drop",
    seed: int = 0,
    show_progress: bool = True,
) -> EFTStats:
    """Judge every reply of every group once; write the agreeing groups' judgments as EFT examples."""
    tpl = load_template(template)
    params = SamplingParams(n=1, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    requests = []
    for g in groups:
        for r in g["replies"]:
            requests.append(
                GenerationRequest.chat(
                    f"{g['prompt_id']}\x00{r['id']}", [{"role": "user", "content": judge_prompt(tpl, g["prompt"], r["text"])}], params
                )
            )
    outputs: dict[str, str] = {}
    with generation_progress("eft judgments", len(requests), enabled=show_progress) as bar:
        for res in engine.generate(requests):
            outputs[res.request.id] = res.samples[0].text
            bar.advance(1, res.completion_tokens)
    stats = EFTStats(groups=len(groups))
    for g in groups:
        texts = [outputs[f"{g['prompt_id']}\x00{r['id']}"] for r in g["replies"]]
        scores = [parse_score(t).score for t in texts]
        stats.judgments += len(texts)
        stats.parsed += sum(s is not None for s in scores)
        reason = drop_reason(scores, [r["rank"] for r in g["replies"]], ties)
        if reason:
            stats.dropped[reason] += 1
            continue
        stats.kept_groups += 1
        for r, text, score in zip(g["replies"], texts, scores):
            writer.write(
                {
                    "id": record_id("eft", g["prompt_id"], r["id"]),
                    "kind": "example",
                    "task": "eft",
                    "prompt_id": g["prompt_id"],
                    "instruction": g["prompt"],
                    "response": r["text"],
                    "judgment": text.strip(),
                    "score": score,
                    "human_rank": r["rank"],
                }
            )
            stats.examples += 1
    writer.flush()
    return stats
