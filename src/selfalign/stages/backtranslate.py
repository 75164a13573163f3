"""Instruction backtranslation: the backward model's data, and self-augmentation.

The backward model M_yx learns the reverse of instruction following: given an answer, write
the request it answers. Its training examples are the seed pairs turned around
(:func:`reversed_examples`); at generation time the same template wraps each unlabeled
corpus segment and the model's completion is the segment's instruction (:func:`run_augment`).

Augmented record::

    {"id", "kind": "augmented", "segment_id", "instruction" (str | null), "output", "raw",
     "dropped" (reason | null), "finish_reason", "completion_tokens", "generator"}

A completion becomes an instruction after :func:`clean_instruction`; when nothing usable is
left the record keeps ``instruction: null`` and the reason in ``dropped`` (``empty``,
``truncated``: the model hit its token limit, ``too_short``, ``too_long``, ``echo``: it copied
the segment, ``generation_error``), so every segment is accounted for.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from selfalign.config import config_hash
from selfalign.data.records import JsonlWriter, record_id
from selfalign.engines.base import Engine, GenerationRequest, SamplingParams
from selfalign.progress import generation_progress
from selfalign.prompts import backtranslate_prompt, load_template

# labels a model may put before the request ("Instruction: ...", "**User request:** ...", "Q: ...")
_LABEL = re.compile(
    r"^\s*(?:\*\*|__)?\s*(?:(?:the\s+)?(?:user(?:'s)?\s+)?(?:instruction|request|question|prompt|query|task)|q|a)\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def reversed_examples(seed_ift: Sequence[dict], template: str) -> list[dict]:
    """Seed chat examples turned around for the backward model: the (last) assistant answer
    goes into the backtranslation prompt, the (last) user request becomes the completion."""
    tpl = load_template(template)
    out = []
    for ex in seed_ift:
        msgs = ex["messages"]
        user = [m["content"] for m in msgs if m["role"] == "user"]
        answer = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not user or not answer:
            continue
        out.append({
            "id": record_id("backward", ex["id"]),
            "messages": [
                {"role": "user", "content": backtranslate_prompt(tpl, answer[-1])},
                {"role": "assistant", "content": user[-1].strip()},
            ],
        })
    return out


def clean_instruction(completion: str) -> str | None:
    """The request in a backward-model completion: leading label and wrapping quotes removed,
    surrounding whitespace stripped. None when nothing is left."""
    text = (completion or "").strip()
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text or None


def _words(text: str) -> int:
    return len(text.split())


@dataclass
class AugmentSettings:
    template: str = "backtranslate"
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 96
    min_words: int = 3
    max_words: int = 150
    seed: int = 0


@dataclass
class AugmentStats:
    segments: int = 0
    instructions: int = 0
    tokens: int = 0
    seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "segments": self.segments,
            "instructions": self.instructions,
            "dropped": dict(sorted(self.dropped.items())),
            "tokens": self.tokens,
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
        }


def drop_reason(instruction: str | None, segment: str, finish_reason: str, s: AugmentSettings) -> str | None:
    if finish_reason == "error":
        return "generation_error"
    if instruction is None:
        return "empty"
    if finish_reason == "length":
        return "truncated"
    n = _words(instruction)
    if n < s.min_words:
        return "too_short"
    if n > s.max_words:
        return "too_long"
    if instruction.strip().lower() == segment.strip().lower() or (n >= 8 and instruction.strip() in segment):
        return "echo"
    return None


def run_augment(
    engine: Engine, segments: Sequence[dict], writer: JsonlWriter, settings: AugmentSettings, *, show_progress: bool = True
) -> AugmentStats:
    """One instruction per corpus segment (``{"id", "text"}`` records), written as they come;
    segments already in ``writer`` are skipped. Stats cover the whole output file."""
    t0 = time.monotonic()
    tpl = load_template(settings.template)
    params = SamplingParams(n=1, temperature=settings.temperature, top_p=settings.top_p,
                            max_new_tokens=settings.max_new_tokens, seed=settings.seed)
    fp = config_hash({"settings": settings.__dict__, "template": tpl.source, "generator": engine.describe()})
    ids = {seg["id"]: record_id("augmented", seg["id"], fp) for seg in segments}
    todo = [seg for seg in segments if ids[seg["id"]] not in writer]
    by_id = {seg["id"]: seg for seg in todo}
    requests = [
        GenerationRequest.chat(seg["id"], [{"role": "user", "content": backtranslate_prompt(tpl, seg["text"])}], params)
        for seg in todo
    ]
    tokens = 0
    with generation_progress("backtranslate", len(segments), enabled=show_progress) as bar:
        bar.advance(len(segments) - len(todo))
        for result in engine.generate(requests):
            seg = by_id[result.request.id]
            s = result.samples[0]
            instruction = None if s.finish_reason == "error" else clean_instruction(s.text)
            reason = drop_reason(instruction, seg["text"], s.finish_reason, settings)
            writer.write({
                "id": ids[seg["id"]],
                "kind": "augmented",
                "segment_id": seg["id"],
                "instruction": instruction if reason is None else None,
                "output": seg["text"],
                "raw": s.text,
                "dropped": reason,
                "finish_reason": s.finish_reason,
                "completion_tokens": s.completion_tokens,
                "generator": engine.describe(),
            })
            tokens += s.completion_tokens
            bar.advance(1, s.completion_tokens)
    writer.flush()
    stats = augment_stats(writer.path)
    stats.tokens, stats.seconds = tokens, time.monotonic() - t0
    return stats


def augment_stats(path) -> AugmentStats:
    from selfalign.data.records import read_jsonl

    stats = AugmentStats()
    for r in read_jsonl(path):
        stats.segments += 1
        if r["dropped"]:
            stats.dropped[r["dropped"]] += 1
        else:
            stats.instructions += 1
    return stats
