"""The ``generate`` stage: prompts in, one response record per sample out.

Resumable: each response has a stable id (prompt id, sample index, seed and the generation
settings), the output is appended in fsync'ed batches, and a rerun asks the engine only for
prompts whose samples are not all on disk yet. The output is complete when its ``.done``
marker is written.

Failed samples (the engine gave up on a request: an endpoint that kept failing past its
retries with ``engine.on_error: record``, a prompt too long for the model's context) are
not written to the output, so no later stage mistakes them for answers. They go to
``<out>.failed.jsonl``, one record each with the reason, and the ``.done`` marker counts
them (``failed``). A rerun asks the engine again for exactly the samples missing from the
output, i.e. the failed ones, even when the output is marked done; successes are never
redone. The failure file always describes the latest pass: it is removed when a pass
starts and written as failures arrive, and it is absent when nothing failed.

Response record::

    {"id", "kind": "response", "prompt_id", "messages", "response", "sample_index", "seed",
     "finish_reason", "prompt_tokens", "completion_tokens", "retries", "generator"}

Failure record (``<out>.failed.jsonl``)::

    {"id", "kind": "failed_response", "prompt_id", "messages", "sample_index", "seed",
     "error", "retries", "generator"}

``retries`` counts the engine's retries for the whole request the sample came from (all
its HTTP calls, for the ``openai`` engine; always 0 for local engines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from selfalign.config import GenerationConfig, config_hash
from selfalign.data.prompt_sets import Prompt
from selfalign.data.records import JsonlWriter, done_marker_path, is_done, read_done
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
    failed_path: Path | None = None  # where the ``errors`` failed samples of this pass are listed

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


def failed_path(out_path: str | Path) -> Path:
    """``<out>.failed.jsonl``: the samples of the latest pass that the engine could not produce."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".failed.jsonl")


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
    fpath = failed_path(out_path)
    fingerprint = settings_fingerprint(gen, engine)
    shash = config_hash(fingerprint)
    params = sampling_params(gen)
    total = len(prompts) * gen.n
    t0 = time.monotonic()
    phash = config_hash([p.id for p in prompts])
    if is_done(out_path):
        done = read_done(out_path) or {}
        if done.get("settings_hash") == shash and done.get("prompts_hash") == phash:
            if not done.get("failed"):
                return GenerateResult(out_path, len(prompts), done.get("records", total), 0, done.get("records", total), 0, 0, 0.0, True)
            # done, but with failed samples: retry them; until this pass ends the output is not complete
            done_marker_path(out_path).unlink(missing_ok=True)

    with JsonlWriter(out_path, batch_size=batch_size, fingerprint=fingerprint) as writer:
        todo: list[GenerationRequest] = []
        existing = 0
        for p in prompts:
            ids = [response_id(p.id, i, gen.seed, shash) for i in range(gen.n)]
            have = sum(1 for rid in ids if rid in writer)
            existing += have
            if have < gen.n:
                todo.append(GenerationRequest.chat(p.id, p.messages, params))
        fpath.unlink(missing_ok=True)  # the previous pass's failures are retried now
        failures: JsonlWriter | None = None
        failed_ids: set[str] = set()
        by_id = {p.id: p for p in prompts}
        written = tokens = 0
        try:
            with generation_progress("generate", total, enabled=show_progress) as bar:
                bar.advance(existing)
                for result in engine.generate(todo):
                    p = by_id[result.request.id]
                    new = settled = 0
                    for s in result.samples:
                        rid = response_id(p.id, s.index, gen.seed, shash)
                        if rid in writer:  # a request re-asked for its missing samples: keep what is on disk
                            continue
                        if s.finish_reason == "error" or s.error:
                            failures = failures or JsonlWriter(fpath, batch_size=1)
                            failures.write({
                                "id": rid,
                                "kind": "failed_response",
                                "prompt_id": p.id,
                                "messages": list(p.messages),
                                "sample_index": s.index,
                                "seed": gen.seed,
                                "error": s.error or "the engine returned no text and no reason",
                                "retries": result.retries,
                                "generator": fingerprint["generator"],
                            })
                            failed_ids.add(rid)
                            settled += 1
                            continue
                        writer.write({
                            "id": rid,
                            "kind": "response",
                            "prompt_id": p.id,
                            "messages": list(p.messages),
                            "response": s.text,
                            "sample_index": s.index,
                            "seed": gen.seed,
                            "finish_reason": s.finish_reason,
                            "prompt_tokens": result.prompt_tokens,
                            "completion_tokens": s.completion_tokens,
                            "retries": result.retries,
                            "generator": fingerprint["generator"],
                        })
                        new += 1
                        tokens += s.completion_tokens
                    written += new
                    bar.advance(new + settled, sum(s.completion_tokens for s in result.samples))
        finally:
            if failures is not None:
                failures.close()
        seconds = time.monotonic() - t0
        count = sum(1 for p in prompts for i in range(gen.n) if response_id(p.id, i, gen.seed, shash) in writer)
        if count + len(failed_ids) != total:  # cannot happen unless the engine dropped a request; never mark it done
            raise RuntimeError(
                f"{out_path}: expected {total} responses, found {count} (and {len(failed_ids)} failed); rerun to complete"
            )
        writer.mark_done({"settings_hash": shash, "prompts_hash": phash, "prompts": len(prompts), "failed": len(failed_ids)})
    return GenerateResult(
        out_path, len(prompts), count, written, existing, tokens, len(failed_ids), seconds,
        failed_path=fpath if failed_ids else None,
    )
