"""An engine for any OpenAI-compatible HTTP server (vLLM, llama.cpp, Ollama, ``transformers serve``, hosted APIs).

Chat requests go to ``/chat/completions``, raw-prompt requests to ``/completions``. The
official ``openai`` client does the HTTP, with its own retries off: this module retries
timeouts, 408/409/429/5xx, connection errors and malformed bodies itself, with exponential
backoff and jitter (``Retry-After`` honoured, capped at ``backoff_max_s``). 400, 401, 403,
404 and 422 fail at once.

``n`` samples: the first call asks for ``n``. Many servers ignore ``n`` and answer with one
choice; the missing samples are then fetched by follow-up calls of one choice each, sample
``i`` with ``seed + i`` so they differ on servers that honour seeds. A server that rejects
``n > 1`` outright (400/422) is remembered, and later requests ask one sample per call.

Token counts: ``prompt_tokens`` is the first successful call's ``usage.prompt_tokens`` (0
if absent; follow-ups re-send the same prompt but it is counted once). A call's
``usage.completion_tokens`` goes to its one choice, or is split evenly over its choices
(the remainder to the first ones) so the samples add up to what the server billed.

Trailing stop strings are removed from texts that end with one (``transformers serve``
keeps them, OpenAI and vLLM do not), so outputs do not depend on the server.

The API key comes from the environment variable ``api_key_env`` (placeholder ``EMPTY``
when unset) and never appears in :meth:`describe`, ``repr``, logs or error messages.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import openai

from selfalign.engines.base import Engine, GenerationRequest, RequestResult, Sample
from selfalign.errors import EngineError

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_RESULT, _ERROR, _END = "result", "error", "end"
_CANCEL_WAIT_S = 10.0


class _Malformed(Exception):
    """The server answered 2xx with a body that is not a usable completion."""


class _CallFailed(Exception):
    """One HTTP call failed for good: ``reason``, after ``attempts`` tries (``attempts - 1`` retries)."""

    def __init__(self, reason: str, attempts: int, status: int | None):
        super().__init__(reason)
        self.reason, self.attempts, self.status = reason, attempts, status


class OpenAIEngine(Engine):
    """Generate through an OpenAI-compatible server at ``base_url`` (include the ``/v1`` prefix).

    ``extra_body`` is merged into every request body, for server-specific knobs; e.g.
    ``transformers serve`` samples only with
    ``{"generation_config": json.dumps({"do_sample": True})}`` when the model's own
    generation config is greedy.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_error: Literal["raise", "record"] = "raise",
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        if not base_url:
            raise EngineError("openai engine: base_url is required (e.g. http://127.0.0.1:8000/v1)")
        if on_error not in ("raise", "record"):
            raise EngineError(f"openai engine: on_error must be 'raise' or 'record', got {on_error!r}")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise EngineError("openai engine: need max_concurrency >= 1, max_retries >= 0, timeout_s > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = float(backoff_max_s)
        self.on_error = on_error
        self.extra_body = dict(extra_body) if extra_body else None
        self._api_key = os.environ.get(api_key_env) or "EMPTY"
        self._n_rejected = False  # the server answered 400/422 to n > 1
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._http_slots: asyncio.Semaphore | None = None

    @classmethod
    def from_config(cls, model_cfg, engine_cfg) -> OpenAIEngine:
        """Build from :class:`ModelConfig` and :class:`EngineConfig` (``engine.base_url`` is required)."""
        if not engine_cfg.base_url:
            raise EngineError(
                "engine.kind is 'openai' but engine.base_url is not set; "
                "set it to the server's OpenAI API root, e.g. --set engine.base_url=http://127.0.0.1:8000/v1"
            )
        return cls(
            engine_cfg.base_url,
            engine_cfg.served_model or model_cfg.spec,
            api_key_env=engine_cfg.api_key_env,
            max_concurrency=engine_cfg.max_concurrency,
            timeout_s=engine_cfg.timeout_s,
            max_retries=engine_cfg.max_retries,
            backoff_initial_s=engine_cfg.backoff_initial_s,
            backoff_max_s=engine_cfg.backoff_max_s,
            on_error=engine_cfg.on_error,
            extra_body=engine_cfg.extra_body,
        )

    def __repr__(self) -> str:
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.model!r})"

    def describe(self) -> dict:
        return {"engine": self.name, "base_url": self.base_url, "model": self.model}

    # ----- the event loop thread -----

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        """Start (once) the background event loop that owns the HTTP client."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="selfalign-openai", daemon=True)
                thread.start()
                self._client = openai.AsyncOpenAI(
                    api_key=self._api_key, base_url=self.base_url, max_retries=0, timeout=self.timeout_s
                )
                self._http_slots = asyncio.Semaphore(self.max_concurrency)
                self._loop, self._thread = loop, thread
            return self._loop

    def close(self) -> None:
        """Close the HTTP client and stop the event loop thread (a later ``generate`` starts afresh)."""
        with self._lock:
            loop, thread, client = self._loop, self._thread, self._client
            self._loop = self._thread = self._client = self._http_slots = None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=_CANCEL_WAIT_S)
        except Exception as e:  # closing is best effort
            log.debug("openai engine: closing the client failed: %s", type(e).__name__)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_CANCEL_WAIT_S)
        if not thread.is_alive():
            loop.close()

    # ----- the sync generator -----

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[RequestResult]:
        """Yield results in completion order, up to ``max_concurrency`` requests in flight.

        Requests are pulled lazily, as slots free up. Closing the generator early cancels
        outstanding calls; an error (an :class:`EngineError` with ``on_error="raise"``, or
        one from the request iterable) is raised here after in-flight calls are cancelled.
        """
        loop = self._ensure_loop()
        out: queue.Queue = queue.Queue()
        stopped = threading.Event()
        tasks: list[asyncio.Task] = []
        it = iter(requests)

        def start() -> None:
            task = loop.create_task(self._drive(it, out))
            task.add_done_callback(lambda _t: stopped.set())
            tasks.append(task)

        loop.call_soon_threadsafe(start)
        finished = False
        try:
            while True:
                kind, value = out.get()
                if kind == _RESULT:
                    yield value
                    continue
                finished = True
                if kind == _ERROR:
                    raise value
                return
        finally:
            if not finished:  # closed early (or interrupted): cancel what is in flight
                loop.call_soon_threadsafe(lambda: tasks and tasks[0].cancel())
                if not stopped.wait(_CANCEL_WAIT_S):
                    log.warning("openai engine: outstanding requests did not stop within %ss", _CANCEL_WAIT_S)

    async def _drive(self, it: Iterator[GenerationRequest], out: queue.Queue) -> None:
        """Keep up to ``max_concurrency`` requests running; put results, then an end or error marker."""
        pending: set[asyncio.Task] = set()
        error: BaseException | None = None
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < self.max_concurrency:
                    req = next(it, None)
                    if req is None:
                        exhausted = True
                    else:
                        pending.add(asyncio.create_task(self._run_request(req)))
                if not pending:
                    break
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    out.put((_RESULT, task.result()))
        except Exception as e:
            error = e
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        out.put((_ERROR, error) if error is not None else (_END, None))

    # ----- one request: n samples over one or more calls -----

    async def _run_request(self, req: GenerationRequest) -> RequestResult:
        p = req.params
        samples: dict[int, Sample] = {}
        retries = 0
        prompt_tokens = 0
        failure: _CallFailed | None = None
        first_n = 1 if self._n_rejected else p.n
        try:
            try:
                got, prompt_tokens, r = await self._call(req, first_n, p.seed)
            except _CallFailed as f:
                if not (first_n > 1 and f.status in (400, 422)):
                    raise
                log.warning(
                    "openai engine: %s rejected n=%d (%s); asking one sample per call", self.base_url, first_n, f.reason
                )
                retries += f.attempts
                got, prompt_tokens, r = await self._call(req, 1, p.seed)
                self._n_rejected = True  # only once n=1 worked: the 400 was about n
            retries += r
            for i, s in enumerate(got[: p.n]):
                samples[i] = _with_index(s, i)
            missing = [i for i in range(p.n) if i not in samples]
            outcomes = await asyncio.gather(*(self._call(req, 1, p.seed + i) for i in missing), return_exceptions=True)
            for i, outcome in zip(missing, outcomes):
                if isinstance(outcome, _CallFailed):
                    retries += outcome.attempts - 1
                    failure = failure or outcome
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    got, _, r = outcome
                    retries += r
                    samples[i] = _with_index(got[0], i)
        except _CallFailed as f:
            retries += f.attempts - 1
            failure = f
        if failure is not None:
            message = self._redact(
                f"request {req.id!r} to {self.base_url} failed after {failure.attempts} attempt(s) "
                f"({retries} retries in all): {failure.reason}"
            )
            if self.on_error == "raise":
                raise EngineError(message)
            for i in range(p.n):
                samples.setdefault(i, Sample(i, "", "error", completion_tokens=0, error=message))
        ordered = tuple(samples[i] for i in range(p.n))
        return RequestResult(request=req, samples=ordered, prompt_tokens=prompt_tokens, retries=retries)

    async def _call(self, req: GenerationRequest, n: int, seed: int) -> tuple[list[Sample], int, int]:
        """One logical call with retries: ``(samples, prompt_tokens, retries)`` or :class:`_CallFailed`."""
        attempt = 0
        while True:
            try:
                async with self._http_slots:
                    async with asyncio.timeout(self.timeout_s):
                        response = await self._post(req, n, seed)
                samples, prompt_tokens = _parse(req, response)
                return samples, prompt_tokens, attempt
            except Exception as e:
                retryable, reason, status, hint = self._classify(e)
                if not retryable or attempt >= self.max_retries:
                    raise _CallFailed(self._redact(reason), attempt + 1, status) from None
                delay = self._delay(attempt, hint)
                log.info(
                    "openai engine: request %r: %s; retry %d/%d in %.2fs",
                    req.id, self._redact(reason), attempt + 1, self.max_retries, delay,
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def _post(self, req: GenerationRequest, n: int, seed: int) -> Any:
        p = req.params
        kwargs: dict[str, Any] = {
            "model": self.model,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_new_tokens,
            "seed": seed,
            "timeout": self.timeout_s,
        }
        if n > 1:
            kwargs["n"] = n
        if p.stop:
            kwargs["stop"] = list(p.stop)
        if self.extra_body:
            kwargs["extra_body"] = dict(self.extra_body)
        if req.messages is not None:
            messages = [m.to_dict() for m in req.messages]
            return await self._client.chat.completions.create(messages=messages, **kwargs)
        return await self._client.completions.create(prompt=req.prompt, **kwargs)

    # ----- errors and backoff -----

    def _classify(self, e: Exception) -> tuple[bool, str, int | None, float | None]:
        """``(retryable, reason, http status, Retry-After seconds)``; unknown exceptions re-raise."""
        if isinstance(e, (TimeoutError, openai.APITimeoutError)):
            return True, f"timed out after {self.timeout_s:g}s", None, None
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            body = " ".join((e.response.text or "").split())[:300]
            reason = f"HTTP {status}: {body or e.message}"
            retryable = status in _RETRYABLE_STATUS or status >= 500
            return retryable, reason, status, _retry_after(e.response.headers) if retryable else None
        if isinstance(e, openai.APIConnectionError):
            return True, f"connection error ({_cause_text(e) or e.message})", None, None
        if isinstance(e, (_Malformed, ValueError)):  # json.JSONDecodeError is a ValueError
            return True, f"malformed response ({type(e).__name__}: {str(e)[:200]})", None, None
        raise e

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry ``attempt + 1``: Retry-After if given, else jittered exponential."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max_s)
        base = min(self.backoff_initial_s * 2**attempt, self.backoff_max_s)
        return random.uniform(base / 2, base)

    def _redact(self, text: str) -> str:
        if self._api_key and self._api_key != "EMPTY":
            text = text.replace(self._api_key, "***")
        return text


def _cause_text(e: BaseException) -> str:
    """``"<type>: <message>"`` for what caused ``e``: the type of its direct cause and the first
    non-empty message down the cause chain (the HTTP stack wraps a reset socket in several
    exceptions with empty messages: ``ReadError: ConnectionResetError: [Errno 104] ...``)."""
    chain: list[BaseException] = []
    cause = e.__cause__ or e.__context__
    while cause is not None and all(cause is not c for c in chain) and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not chain:
        return ""
    head = type(chain[0]).__name__
    for c in chain:
        text = str(c).strip()
        if text:
            return f"{head}: {text}" if c is chain[0] else f"{head}: {type(c).__name__}: {text}"
    return head


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``Retry-After-Ms`` / ``Retry-After`` (seconds or HTTP date), or None."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse(req: GenerationRequest, response: Any) -> tuple[list[Sample], int]:
    """Samples (indices from 0, in the server's choice order) and prompt tokens of one response."""
    choices = getattr(response, "choices", None)
    if isinstance(response, (str, bytes)) or not isinstance(choices, list) or not choices:
        raise _Malformed(f"no choices in the response body ({type(response).__name__})")
    chat = req.messages is not None
    texts: list[tuple[str, str]] = []
    for choice in sorted(choices, key=lambda c: getattr(c, "index", 0) or 0):
        if chat:
            message = getattr(choice, "message", None)
            if message is None:
                raise _Malformed("a choice has no message")
            text = getattr(message, "content", None) or ""
        else:
            text = getattr(choice, "text", None)
            if text is None:
                raise _Malformed("a choice has no text")
        if not isinstance(text, str):
            raise _Malformed(f"a choice's text is a {type(text).__name__}")
        finish = "length" if getattr(choice, "finish_reason", None) == "length" else "stop"
        texts.append((_strip_stop(text, req.params.stop) if finish == "stop" else text, finish))
    usage = getattr(response, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    share, extra = divmod(completion, len(texts))
    samples = [
        Sample(index=i, text=t, finish_reason=f, completion_tokens=share + (1 if i < extra else 0))
        for i, (t, f) in enumerate(texts)
    ]
    return samples, prompt_tokens


def _strip_stop(text: str, stop: tuple[str, ...]) -> str:
    for s in stop:
        if s and text.endswith(s):
            return text[: -len(s)]
    return text


def _with_index(sample: Sample, index: int) -> Sample:
    return Sample(index, sample.text, sample.finish_reason, sample.completion_tokens, sample.error)
