"""The ``generate`` stage: prompts in, one response record per sample out.

Resumable: each response has a stable id (prompt id, sample index, seed and the generation
settings), the output is appended in fsync'ed batches, and a rerun asks the engine only for
prompts whose samples are not all on disk yet. The output is complete when its ``.done``
marker is written.

Response record::

    {"id", "kind": "response", "prompt_id", "messages", "response", "sample_index", "seed",
     "finish_reason", "prompt_tokens", "completion_tokens", "error"?, "generator"}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from selfalign.config import GenerationConfig, config_hash
from selfalign.data.prompts import Prompt
from selfalign.data.records import JsonlWriter, is_done, read_done
from selfalign.engines.base import Engine, GenerationRequest, SamplingParams
from selfalign.progress import generation_progress


@dataclass
class GenerateResult:
    path: Path
    prompts: int
    responses: int
    written_now: int
    skipped_existing: int
    completion_tokens: int
    errors: int
    seconds: float
    already_done: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def sampling_params(gen: GenerationConfig) -> SamplingParams:
    return SamplingParams(
        n=gen.n,
        temperature=gen.temperature,
        top_p=gen.top_p,
        max_new_tokens=gen.max_new_tokens,
        stop=tuple(gen.stop),
        seed=gen.seed,
    )


def settings_fingerprint(gen: GenerationConfig, engine: Engine) -> dict:
    """What makes two runs' responses interchangeable: sampling settings and the generator."""
    return {"generation": gen.model_dump(mode="json"), "generator": engine.describe()}


def response_id(prompt_id: str, sample_index: int, seed: int, settings_hash: str) -> str:
    from selfalign.data.records import record_id

    return record_id("response", prompt_id, sample_index, seed, settings_hash)


def run_generate(
    engine: Engine,
    prompts: Sequence[Prompt],
    out_path: str | Path,
    gen: GenerationConfig,
    *,
    show_progress: bool = True,
    batch_size: int = 16,
) -> GenerateResult:
    import time

    out_path = Path(out_path)
    fingerprint = settings_fingerprint(gen, engine)
    shash = config_hash(fingerprint)
    params = sampling_params(gen)
    total = len(prompts) * gen.n
    t0 = time.monotonic()
    phash = config_hash([p.id for p in prompts])
    if is_done(out_path):
        done = read_done(out_path) or {}
        if done.get("settings_hash") == shash and done.get("prompts_hash") == phash:
            return GenerateResult(out_path, len(prompts), done.get("records", total), 0, done.get("records", total), 0, 0, 0.0, True)

    with JsonlWriter(out_path, batch_size=batch_size, fingerprint=fingerprint) as writer:
        todo: list[GenerationRequest] = []
        existing = 0
        for p in prompts:
            ids = [response_id(p.id, i, gen.seed, shash) for i in range(gen.n)]
            have = sum(1 for rid in ids if rid in writer)
            existing += have
            if have < gen.n:
                todo.append(GenerationRequest.chat(p.id, p.messages, params))
        by_id = {p.id: p for p in prompts}
        written = tokens = errors = 0
        with generation_progress("generate", total, enabled=show_progress) as bar:
            bar.advance(existing)
            for result in engine.generate(todo):
                p = by_id[result.request.id]
                new = 0
                for s in result.samples:
                    record = {
                        "id": response_id(p.id, s.index, gen.seed, shash),
                        "kind": "response",
                        "prompt_id": p.id,
                        "messages": list(p.messages),
                        "response": s.text,
                        "sample_index": s.index,
                        "seed": gen.seed,
                        "finish_reason": s.finish_reason,
                        "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": s.completion_tokens,
                        "generator": fingerprint["generator"],
                    }
                    if s.error:
                        record["error"] = s.error
                        errors += 1
                    if writer.write(record):
                        new += 1
                        tokens += s.completion_tokens
                written += new
                bar.advance(new, sum(s.completion_tokens for s in result.samples))
        seconds = time.monotonic() - t0
        count = sum(1 for p in prompts for i in range(gen.n) if response_id(p.id, i, gen.seed, shash) in writer)
        if count != total:  # cannot happen unless the engine dropped a request; never mark it done
            raise RuntimeError(f"{out_path}: expected {total} responses, found {count}; rerun to complete")
        writer.mark_done({"settings_hash": shash, "prompts_hash": phash, "prompts": len(prompts), "errors_this_pass": errors})
    return GenerateResult(out_path, len(prompts), count, written, existing, tokens, errors, seconds)
