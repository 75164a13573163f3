"""The ``pairs`` stage: preference pairs from scored candidates (Self-Rewarding, step 4).

For every prompt, the candidate with the highest reward is *chosen* and the one with the
lowest is *rejected*; the prompt yields no pair when the two rewards tie (all candidates
scored alike) or fewer than two candidates have a reward at all. Ties among the top (or
bottom) candidates are broken by the lowest sample index, so the choice is deterministic.

Pairs are written in the conversational layout TRL's DPOTrainer reads (``prompt`` as chat
messages, ``chosen``/``rejected`` as one assistant message each) plus scores and provenance.
Optionally, candidates with the maximum possible reward are exported as SFT examples.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from selfalign.data.records import record_id


@dataclass(frozen=True)
class Scored:
    """One candidate response with its reward (``None`` when no judgment could be parsed)."""

    response_id: str
    prompt_id: str
    messages: tuple[dict, ...]
    response: str
    sample_index: int
    reward: float | None


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "pairs": self.pairs, "dropped": dict(sorted(self.dropped.items()))}


def select_pair(candidates: list[Scored]) -> tuple[Scored, Scored] | str:
    """Return ``(chosen, rejected)`` or the reason no pair is made (``too_few_scored``, ``tie``)."""
    scored = [c for c in candidates if c.reward is not None]
    if len(scored) < 2:
        return "too_few_scored"
    by_index = sorted(scored, key=lambda c: c.sample_index)
    best = max(by_index, key=lambda c: c.reward)  # first of the top rewards
    worst = min(by_index, key=lambda c: c.reward)  # first of the bottom rewards
    if best.reward == worst.reward:
        return "tie"
    return best, worst


def pair_record(chosen: Scored, rejected: Scored, *, iteration: int | None = None) -> dict:
    return {
        "id": record_id("pair", chosen.response_id, rejected.response_id),
        "kind": "pair",
        "prompt_id": chosen.prompt_id,
        "prompt": list(chosen.messages),
        "chosen": [{"role": "assistant", "content": chosen.response}],
        "rejected": [{"role": "assistant", "content": rejected.response}],
        "chosen_score": chosen.reward,
        "rejected_score": rejected.reward,
        "chosen_id": chosen.response_id,
        "rejected_id": rejected.response_id,
        "iteration": iteration,
    }


def make_pairs(
    candidates: Iterable[Scored], *, iteration: int | None = None, perfect_score: float | None = None
) -> tuple[list[dict], list[dict], PairStats]:
    """Group candidates by prompt and select one pair per prompt.

    Returns ``(pairs, perfect_examples, stats)``. ``perfect_examples`` (SFT records) holds every
    candidate whose reward equals ``perfect_score`` when that is given, else it is empty.
    Output order follows the first appearance of each prompt, so it is deterministic.
    """
    groups: dict[str, list[Scored]] = defaultdict(list)
    for c in candidates:
        groups[c.prompt_id].append(c)
    stats = PairStats(prompts=len(groups))
    pairs: list[dict] = []
    perfect: list[dict] = []
    for prompt_id, group in groups.items():
        picked = select_pair(group)
        if isinstance(picked, str):
            stats.dropped[picked] += 1
        else:
            pairs.append(pair_record(*picked, iteration=iteration))
            stats.pairs += 1
        if perfect_score is not None:
            for c in sorted(group, key=lambda c: c.sample_index):
                if c.reward is not None and c.reward >= perfect_score:
                    perfect.append(
                        {
                            "id": record_id("example", c.response_id),
                            "kind": "example",
                            "task": "ift",
                            "messages": [*c.messages, {"role": "assistant", "content": c.response}],
                            "source": f"response:{c.response_id}",
                            "reward": c.reward,
                        }
                    )
    return pairs, perfect, stats
