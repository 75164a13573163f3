"""The ``hf`` engine: batched generation with transformers on CPU or GPU.

This module holds the engine (loading, planning, decoding, next-token scoring); the prompt side
(tokenising, cutting batches, prefilling their KV cache) is :mod:`selfalign.engines.hf_inputs`.
How a call to :meth:`HFEngine.generate` runs:

1. Every request is tokenized (chat messages through the model's chat template).
2. Requests are sorted by prompt length (longest first, so memory trouble shows at once)
   and cut into batches bounded by ``max_batch_size`` sequences and ``max_batch_tokens``
   KV-cache slots (see :meth:`HFEngine._plan`, :func:`~selfalign.engines.hf_inputs.cut_batches`).
   A request's ``n`` samples count as ``n`` sequences; a request with more samples than fit
   in one batch is split across batches.
3. Each batch is prefilled once per *prompt*: the prefix all its prompts share (the chat
   template's system turn, a judge rubric) is computed once and copied, the rest of each
   prompt is prefilled in chunks of similar length (:func:`~selfalign.engines.hf_inputs.prefill`, KV buffers
   from :mod:`selfalign.engines.kvcache`), so ``n`` samples share one prefill. On the CPU the
   decode then keeps those prompt keys/values once (the prefix once per batch, each prompt
   once for its samples) and gives each sample a buffer for its new tokens; elsewhere the
   prompt's cache rows are repeated for its samples.
4. Decoding runs token by token on the KV cache (one token written per step into
   preallocated buffers; on CPU the attention of a decode step is
   :mod:`selfalign.engines.attention`'s grouped matmuls). Each sequence samples from its own
   random stream (see :mod:`selfalign.engines.sampling`), stops at an end-of-sequence token,
   a stop string or ``max_new_tokens``, and finished sequences are dropped from the batch.
5. A request's result is yielded as soon as all its samples are done.

Same model, settings and seeds give the same text. (Sampling streams do not depend on batch
composition; the arithmetic can, slightly, in bf16, so keep batch settings fixed when you
need identical text.)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfalign.engines.base import Engine, GenerationRequest, RequestResult, Sample
from selfalign.engines.hf_inputs import (
    assistant_prefix_text,
    cut_batches,
    encode_request,
    prefill,
    prefix_and_candidate_ids,
)
from selfalign.engines.kvcache import enable_full_decode, select_rows, start_shared_decode
from selfalign.engines.sampling import make_generator, row_seed, sample_next
from selfalign.errors import EngineError

# prune finished sequences from the batch once this share of rows is done
_PRUNE_FRACTION = 0.25


@dataclass
class _Job:
    """A slice of one request's samples that runs in one batch."""

    req_pos: int
    request: GenerationRequest
    prompt_ids: list[int]
    sample_indices: list[int]


@dataclass
class _Row:
    job: _Job
    sample_index: int
    generator: torch.Generator
    stop: tuple[str, ...]
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None


def _grouped_attention() -> str:
    # imported late: importing it registers the attention function with transformers
    from selfalign.engines.attention import ATTN_IMPLEMENTATION

    return ATTN_IMPLEMENTATION


def cache_keyword(model) -> str:
    """The keyword of ``model``'s forward that takes the KV cache.

    transformers 5.x renamed ``past_key_values`` to ``cache``; the old name still works there but
    raises a ``FutureWarning`` on every forward call (so on every generation). Models whose forward
    has no ``cache`` parameter (older transformers, remote code) get ``past_key_values``.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class HFEngine(Engine):
    name = "hf"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_batch_size: int = 256,
        max_batch_tokens: int = 65536,
        threads: int | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        shared_decode: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from selfalign.models import resolve_dtype

        hf_logging.disable_progress_bar()  # our own bars report progress; no per-load weight bars

        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        # CPU decode keeps prompt keys/values once per prompt, not once per sample (kvcache.start_shared_decode)
        self.shared_decode = shared_decode
        if self.device == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        # weights from safetensors only: never unpickle a .bin file
        load = {"dtype": getattr(torch, self.dtype), "trust_remote_code": trust_remote_code, "use_safetensors": True}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
            self.model = self._load_model(AutoModelForCausalLM, load, attn_implementation)
        except OSError as e:
            raise EngineError(f"could not load model from {self.model_dir}: {e}") from None
        self.model.eval()
        self.cache_kwarg = cache_keyword(self.model)
        self.pad_id = self._pad_id()
        self.eos_ids = self._eos_ids()
        self.context_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None

    def _load_model(self, auto_cls, load: dict, attn_implementation: str | None):
        """Load the model; on CPU with the grouped decode attention unless ``attn_implementation`` names another.

        The grouped decode attention (:mod:`selfalign.engines.attention`) makes a CPU decode step
        several times faster than transformers' ``sdpa``; a model class that does not go through
        transformers' attention interface is loaded with its default attention instead.
        """
        if attn_implementation is None and self.device == "cpu":
            from selfalign.engines.attention import ATTN_IMPLEMENTATION

            try:
                return auto_cls.from_pretrained(self.model_dir, attn_implementation=ATTN_IMPLEMENTATION, **load).to(self.device)
            except (ValueError, KeyError, NotImplementedError):
                pass  # this architecture does not take registered attention functions
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return auto_cls.from_pretrained(self.model_dir, **extra, **load).to(self.device)

    @classmethod
    def from_config(cls, model_cfg, engine_cfg) -> HFEngine:
        from selfalign.models import resolve_model

        device = pick_device(engine_cfg.device)
        model_dir = resolve_model(model_cfg.spec, dtype=model_cfg.dtype, device=device)
        return cls(
            model_dir,
            dtype=model_cfg.dtype,
            device=device,
            max_batch_size=engine_cfg.max_batch_size,
            max_batch_tokens=engine_cfg.max_batch_tokens,
            threads=engine_cfg.threads,
            trust_remote_code=model_cfg.trust_remote_code,
        )

    def describe(self) -> dict:
        return {"engine": "hf", "model": str(self.model_dir), "dtype": self.dtype, "device": self.device}

    @property
    def attn_implementation(self) -> str | None:
        return getattr(self.model.config, "_attn_implementation", None) if self.model is not None else None

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ tokens
    def _pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for v in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return ids

    def encode(self, request: GenerationRequest) -> list[int]:
        return encode_request(self.tokenizer, request, self.model_dir)

    # ------------------------------------------------------------------ batching
    def _grouped_decode(self) -> bool:
        """Whether decode steps go through :mod:`selfalign.engines.attention` (CPU, a model that takes it)."""
        return self.device == "cpu" and self.attn_implementation == _grouped_attention()

    def _shares_prompts(self) -> bool:
        """Whether decoding keeps prompt keys/values once per prompt (:func:`kvcache.start_shared_decode`)."""
        return self.shared_decode and self._grouped_decode()

    def _plan(self, encoded: list[tuple[int, GenerationRequest, list[int]]]) -> list[list[_Job]]:
        """Cut the requests into batches of at most ``max_batch_size`` rows and ``max_batch_tokens`` KV slots.

        A batch's KV slots are the most its cache holds at once: with shared decoding the common
        prefix once, each prompt's suffix (padded to the longest) once and ``max_new_tokens``
        slots per sample row; otherwise every row holds its padded prompt and its new tokens.
        """
        jobs: list[_Job] = []
        for pos, req, ids in encoded:
            samples = list(range(req.params.n))
            for start in range(0, len(samples), self.max_batch_size):
                jobs.append(_Job(pos, req, ids, samples[start : start + self.max_batch_size]))
        jobs.sort(key=lambda j: -len(j.prompt_ids))
        cuts = self._cut([(j.prompt_ids, len(j.sample_indices), j.request.params.max_new_tokens) for j in jobs])
        return [jobs[x:y] for x, y in cuts]

    def _cut(self, items: list[tuple[list[int], int, int]]) -> list[tuple[int, int]]:
        """Ranges of ``items`` (prompt ids, rows, new tokens; longest prompt first) that fit one batch each
        (:func:`~selfalign.engines.hf_inputs.cut_batches` with this engine's limits)."""
        return cut_batches(items, max_rows=self.max_batch_size, max_slots=self.max_batch_tokens, shares=self._shares_prompts())

    # ------------------------------------------------------------------ generate
    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[RequestResult]:
        if self.model is None:
            raise EngineError("engine is closed")
        encoded = []
        for pos, req in enumerate(requests):
            ids = self.encode(req)
            if self.context_len and len(ids) + req.params.max_new_tokens > self.context_len:
                msg = (
                    f"prompt has {len(ids)} tokens; with max_new_tokens={req.params.max_new_tokens} it exceeds "
                    f"the model's context of {self.context_len} tokens"
                )
                samples = tuple(Sample(i, "", "error", 0, error=msg) for i in range(req.params.n))
                yield RequestResult(req, samples, prompt_tokens=len(ids))
                continue
            encoded.append((pos, req, ids))
        pending: dict[int, dict[int, Sample]] = {}
        for batch in self._plan(encoded):
            for job, rows in self._run_batch(batch):
                got = pending.setdefault(job.req_pos, {})
                for r in rows:
                    got[r.sample_index] = Sample(r.sample_index, r.text or "", r.finish_reason or "length", len(r.tokens))
                if len(got) == job.request.params.n:
                    del pending[job.req_pos]
                    samples = tuple(got[i] for i in range(job.request.params.n))
                    yield RequestResult(job.request, samples, prompt_tokens=len(job.prompt_ids))

    def _prefill(self, ids: list[list[int]], max_new: int, *, prefix_apart: bool = False):
        """Run prompts ``ids`` (longest first); return (cache, last-token logits, 2D attention mask, next positions, layout).

        See :func:`selfalign.engines.hf_inputs.prefill` (the shared prefix computed once, the
        suffixes in chunks of similar length, ``layout`` = (prefix length, suffix width) or None).
        """
        return prefill(self.model, ids, max_new, device=self.device, pad_id=self.pad_id, cache_kwarg=self.cache_kwarg,
                       max_batch_tokens=self.max_batch_tokens, prefix_apart=prefix_apart)

    @torch.inference_mode()
    def _run_batch(self, jobs: list[_Job]) -> Iterator[tuple[_Job, list[_Row]]]:
        dev = self.device
        shares = self._shares_prompts()
        max_new = max(j.request.params.max_new_tokens for j in jobs)
        # with a shared decode the samples' new tokens go to buffers of their own, not the prompt rows
        cache, first_logits, mask, next_pos, layout = self._prefill([j.prompt_ids for j in jobs], 0 if shares else max_new, prefix_apart=shares)
        # one row per sample: repeat each prompt's cache row for its samples
        rows: list[_Row] = []
        src: list[int] = []
        for i, j in enumerate(jobs):
            p = j.request.params
            for s in j.sample_indices:
                rows.append(_Row(j, s, make_generator(row_seed(p.seed, j.request.id, s)), p.stop, p.max_new_tokens))
                src.append(i)
        src_t = torch.tensor(src, device=dev)
        if layout is not None and shares:
            # the prompts' keys/values stay one copy per prompt; samples get generation buffers
            shared, width = layout
            start_shared_decode(cache, shared, width, src_t, max_new, mask[:, shared:].bool())
        else:
            cache.batch_select_indices(src_t)
            if self._grouped_decode():
                enable_full_decode(cache)  # contiguous buffers: no KV copy inside every decode matmul
        logits = first_logits.index_select(0, src_t)
        mask = mask.index_select(0, src_t)
        next_pos = next_pos.index_select(0, src_t)
        temperature = torch.tensor([r.job.request.params.temperature for r in rows], dtype=torch.float32)
        top_p = torch.tensor([r.job.request.params.top_p for r in rows], dtype=torch.float32)
        slots = list(range(len(rows)))  # cache row -> row number (finished rows linger until pruned)
        remaining = {id(j): len(j.sample_indices) for j in jobs}

        while True:
            tok = sample_next(logits, temperature, top_p, [rows[a].generator for a in slots]).tolist()
            newly: list[int] = []
            for s, a in enumerate(slots):
                r = rows[a]
                if r.finish_reason is not None:
                    continue
                t = tok[s]
                if t in self.eos_ids:
                    r.finish_reason = "stop"
                else:
                    r.tokens.append(t)
                    if r.stop and self._hit_stop(r):
                        r.finish_reason = "stop"
                    elif len(r.tokens) >= r.max_new_tokens:
                        r.finish_reason = "length"
                if r.finish_reason is not None:
                    newly.append(s)
            for s in newly:
                r = rows[slots[s]]
                self._finalize_text(r)
                remaining[id(r.job)] -= 1
                if remaining[id(r.job)] == 0:
                    yield r.job, [x for x in rows if x.job is r.job]
            live = [s for s, a in enumerate(slots) if rows[a].finish_reason is None]
            if not live:
                return
            step = torch.tensor(tok, device=dev)
            if newly:
                # finished rows ride along greedily (no random draws) until the next prune
                temperature = temperature.clone()
                temperature[torch.tensor(newly)] = 0.0
            if len(slots) - len(live) >= _PRUNE_FRACTION * len(slots):
                keep = torch.tensor(live, device=dev)
                select_rows(cache, keep)
                mask, next_pos, step = mask.index_select(0, keep), next_pos.index_select(0, keep), step.index_select(0, keep)
                keep_cpu = keep.cpu()
                temperature, top_p = temperature.index_select(0, keep_cpu), top_p.index_select(0, keep_cpu)
                slots = [slots[s] for s in live]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = self.model(
                input_ids=step.unsqueeze(1),
                attention_mask=mask,
                position_ids=next_pos.unsqueeze(1),
                **{self.cache_kwarg: cache},
                use_cache=True,
            )
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1

    @torch.inference_mode()
    def next_token_probs(self, prompts, candidates) -> list[list[float]]:
        texts = [assistant_prefix_text(self.tokenizer, messages, prefix) for messages, prefix in prompts]
        encoded, cand_ids = [], []
        for t in texts:
            enc, ids = self._prefix_and_candidates(t, candidates)
            encoded.append(enc)
            cand_ids.append(ids)
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        out: list[list[float]] = [[] for _ in texts]
        shares = self._shares_prompts()
        for x, y in self._cut([(encoded[i], 1, 0) for i in order]):
            chunk = order[x:y]
            # the prefix the texts share (a judge rubric) is computed once, the rest in length-sorted chunks
            _cache, logits, *_ = self._prefill([encoded[i] for i in chunk], 0, prefix_apart=shares)
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(chunk):
                out[i] = [float(probs[row, c]) for c in cand_ids[i]]
        return out

    def _prefix_and_candidates(self, text: str, candidates) -> tuple[list[int], list[int]]:
        return prefix_and_candidate_ids(self.tokenizer, text, candidates)

    def _hit_stop(self, r: _Row) -> bool:
        longest = max(len(s) for s in r.stop)
        tail = self.tokenizer.decode(r.tokens[-(longest + 2) :], skip_special_tokens=False)
        return any(s in tail for s in r.stop)

    def _finalize_text(self, r: _Row) -> None:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        if r.stop:
            cut = min((i for i in (text.find(s) for s in r.stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                r.finish_reason = "stop"
        r.text = text
