"""The ``self_instruct`` stage: the model writes new prompts for itself (Self-Rewarding, step 1).

Each request is an 8-shot prompt (by default 6 examples drawn from the seed prompts and 2 from
prompts generated earlier in this stage; seed prompts fill in while fewer than 2 exist). The
completion is parsed into one instruction, which is kept only if

1. it parses (``parse_failed``),
2. its length in words is within bounds (``too_short`` / ``too_long``),
3. it asks for nothing a text-only model cannot do: no word of :data:`UNFIT_KEYWORDS` (Self-Instruct's
   keyword filter: images, files, plots, audio...; ``keyword``; off with ``keyword_filter: False``),
4. it is not an exact duplicate of a pool prompt after normalisation (``duplicate``),
5. its ROUGE-L F against every prompt in the pool (seed + kept so far) is below the threshold
   (``too_similar``).

Every candidate is written, kept or not, with its decision and the closest pool prompt, so the
filter can be audited. Rounds are deterministic given the seed and the file's contents, so a
killed stage resumes with the next round (prompts kept before the kill stay in the pool).
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from selfalign.data.records import JsonlWriter, read_jsonl, record_id
from selfalign.engines.base import Engine, GenerationRequest, SamplingParams
from selfalign.progress import generation_progress
from selfalign.prompts import load_template, self_instruct_prompt
from selfalign.stages.parsing import parse_instruction
from selfalign.stages.rouge import RougeFilter


# Self-Instruct's keyword filter (Wang et al., 2023; used by Self-Rewarding, section 3): instructions
# that mention these ask for something a text-only model cannot see or produce.
UNFIT_KEYWORDS: tuple[str, ...] = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)


def keyword_pattern(keywords: Sequence[str]) -> re.Pattern | None:
    """A case-insensitive whole-word pattern for ``keywords`` (a phrase matches with any spacing)."""
    words = [k.strip() for k in keywords if k.strip()]
    if not words:
        return None
    alts = sorted((r"\s+".join(re.escape(w) for w in k.split()) for k in words), key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(alts) + r")\b", re.IGNORECASE)


def unfit_keyword(text: str, pattern: re.Pattern | None) -> str | None:
    """The first filtered keyword ``text`` mentions (lower-cased), or None."""
    m = pattern.search(text) if pattern is not None else None
    return re.sub(r"\s+", " ", m.group(0).lower()) if m else None


@dataclass
class SelfInstructSettings:
    num_prompts: int = 100
    seed_shots: int = 6
    generated_shots: int = 2
    rouge_threshold: float = 0.7
    min_words: int = 3
    max_words: int = 150
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 96
    batch_size: int = 32
    max_rounds: int = 20
    seed: int = 0
    template: str = "self_instruct"
    keyword_filter: bool = True
    keywords: tuple[str, ...] = UNFIT_KEYWORDS


@dataclass
class SelfInstructStats:
    candidates: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    rounds: int = 0
    seconds: float = 0.0
    tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "candidates": self.candidates,
            "kept": self.kept,
            "rejected": dict(sorted(self.rejected.items())),
            "rounds": self.rounds,
            "generation_tokens": self.tokens,
            "seconds": round(self.seconds, 2),
        }


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def decide(
    text: str | None, pool: RougeFilter, seen: set[str], s: SelfInstructSettings, keywords: re.Pattern | None = None
) -> tuple[str | None, float, int | None]:
    """``(reject_reason or None, max ROUGE-L, index of the closest pool prompt)`` for one candidate;
    ``keywords`` is :func:`keyword_pattern` of the filtered words (None: no keyword filter)."""
    if text is None:
        return "parse_failed", 0.0, None
    words = len(text.split())
    if words < s.min_words:
        return "too_short", 0.0, None
    if words > s.max_words:
        return "too_long", 0.0, None
    if unfit_keyword(text, keywords) is not None:
        return "keyword", 0.0, None
    if _norm(text) in seen:
        return "duplicate", 1.0, None
    score, idx = pool.max_score(text)
    if score >= s.rouge_threshold:
        return "too_similar", score, idx
    return None, score, idx


def run_self_instruct(
    engine: Engine,
    seed_prompts: Sequence[str],
    writer: JsonlWriter,
    settings: SelfInstructSettings,
    *,
    show_progress: bool = True,
) -> SelfInstructStats:
    if len(seed_prompts) < 1:
        raise ValueError("self_instruct needs at least one seed prompt")
    t0 = time.monotonic()
    template = load_template(settings.template)
    keywords = keyword_pattern(settings.keywords) if settings.keyword_filter else None
    pool = RougeFilter(settings.rouge_threshold, seed_prompts)
    pool_texts = list(seed_prompts)  # same order as the filter's pool (its .texts is a copy)
    seen = {_norm(p) for p in seed_prompts}
    generated: list[str] = []
    stats = SelfInstructStats()
    last_round = -1
    for rec in read_jsonl(writer.path) if writer.path.exists() else ():
        stats.candidates += 1
        last_round = max(last_round, rec["round"])
        if rec["kept"]:
            stats.kept += 1
            generated.append(rec["text"])
            pool.add(rec["text"])
            pool_texts.append(rec["text"])
            seen.add(_norm(rec["text"]))
        else:
            stats.rejected[rec["reject_reason"]] += 1
    params = SamplingParams(
        n=1, temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens, seed=settings.seed
    )
    with generation_progress("self_instruct", settings.num_prompts, enabled=show_progress) as bar:
        bar.advance(min(stats.kept, settings.num_prompts))
        rnd = last_round + 1
        while stats.kept < settings.num_prompts and rnd < settings.max_rounds:
            need = settings.num_prompts - stats.kept
            size = min(settings.batch_size, max(need * 2, 4))
            requests = []
            shots_of: dict[str, list[str]] = {}
            for i in range(size):
                rng = random.Random(f"{settings.seed}:{rnd}:{i}")
                n_gen = min(settings.generated_shots, len(generated))
                shots = rng.sample(list(seed_prompts), min(settings.seed_shots + settings.generated_shots - n_gen, len(seed_prompts)))
                shots += rng.sample(generated, n_gen)
                rng.shuffle(shots)
                rid = record_id("self_instruct", settings.seed, rnd, i)
                shots_of[rid] = shots
                prompt = self_instruct_prompt(template, shots)
                requests.append(GenerationRequest.chat(rid, [{"role": "user", "content": prompt}], params))
            # decide in request order, whatever order the engine finished in (deterministic pool)
            order = {r.id: k for k, r in enumerate(requests)}
            results = sorted(engine.generate(requests), key=lambda r: order[r.request.id])
            for res in results:
                sample = res.samples[0]
                stats.tokens += sample.completion_tokens
                text = parse_instruction(sample.text, number=len(shots_of[res.request.id]) + 1)
                reason, score, idx = decide(text, pool, seen, settings, keywords)
                if reason is None and stats.kept >= settings.num_prompts:
                    reason = "surplus"
                rec = {
                    "id": res.request.id,
                    "kind": "prompt",
                    "kept": reason is None,
                    "reject_reason": reason,
                    "text": text,
                    "messages": [{"role": "user", "content": text}] if text else [],
                    "rouge_max": round(score, 4),
                    "most_similar": pool_texts[idx] if idx is not None else None,
                    "raw": sample.text,
                    "round": rnd,
                    "index": order[res.request.id],
                    "shots": shots_of[res.request.id],
                }
                writer.write(rec)
                stats.candidates += 1
                if reason is None:
                    stats.kept += 1
                    generated.append(text)
                    pool.add(text)
                    pool_texts.append(text)
                    seen.add(_norm(text))
                    bar.advance(1, sample.completion_tokens)
                else:
                    stats.rejected[reason] += 1
                    bar.advance(0, sample.completion_tokens)
            writer.flush()
            rnd += 1
    stats.rounds = rnd
    stats.seconds = time.monotonic() - t0
    return stats


def kept_prompts(path) -> list[dict]:
    """The kept prompt records of a self_instruct output file, in file order."""
    return [r for r in read_jsonl(path) if r["kept"]]
