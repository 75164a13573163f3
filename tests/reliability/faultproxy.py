"""A fault-injecting proxy for OpenAI-compatible servers, and a canned backend to put behind it.

Both are stdlib HTTP servers on 127.0.0.1 (an ephemeral port each), run in daemon threads.

:class:`FaultProxy` forwards ``POST /v1/...`` to an upstream server, except when its schedule
says otherwise. Each request is mapped to a key (by default the content of its last chat
message, or its raw prompt) and the proxy counts attempts per key: attempt ``i`` of key ``k``
gets ``schedule[k][i]``, and ``"ok"`` (forward) once the key's list is used up. A key's list
may be longer than the client's retries: the client then gives up and reports the failure.
Every attempt, whatever its action, is logged with its key before the action starts, so a test
can compare what the proxy did with what the client recorded.

Actions (:data:`FAULTS` plus ``"ok"``):

- ``timeout``: hold the connection without answering until the client hangs up (or ``hold_s``
  passes, or the proxy stops), then close it;
- ``429``: ``429 Too Many Requests`` with ``Retry-After: <retry_after_s>``;
- ``500``, ``503``: that status with a JSON error body;
- ``reset``: send the status line and part of the headers, then reset the TCP connection (RST);
- ``truncated``: forward, then send the real headers (full ``Content-Length``) and only the first
  third of the real body, then close;
- ``malformed``: ``200`` with a complete body (correct ``Content-Length``) that is not valid JSON.

Every error body and text names the fault (``injected <kind> by faultproxy``), so a reason
recorded by the client can be traced back to the injection.

:class:`CannedBackend` answers chat and text completions at once with valid bodies whose text
is :func:`canned_text` of the prompt, seed and choice index, so a test can check that the right
answer reached the right record.
"""

from __future__ import annotations

import http.client
import json
import random
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("timeout", "429", "500", "503", "reset", "truncated", "malformed")
OK = "ok"


def request_key(body: dict) -> str:
    """The default key of a request body: its last chat message's content, or its raw prompt."""
    if isinstance(body.get("messages"), list) and body["messages"]:
        return str(body["messages"][-1].get("content"))
    return str(body.get("prompt"))


def request_key_with_seed(body: dict) -> str:
    """:func:`request_key` plus the request's seed: tells apart the calls for the samples of one
    prompt when a server answers one choice per call (sample ``i`` is asked with ``seed + i``)."""
    return f"{request_key(body)}|seed={body.get('seed')}"


def canned_text(prompt: str, seed, index: int) -> str:
    return f"canned answer to <{prompt}> seed={seed} choice={index}"


@dataclass(frozen=True)
class Attempt:
    key: str
    number: int  # 0 for a key's first attempt
    action: str  # "ok" or one of FAULTS
    path: str
    at: float  # time.monotonic() when the request arrived


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Base:
    """An HTTP server in a daemon thread; ``stop()`` shuts it down (idempotent)."""

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = _Server(("127.0.0.1", 0), handler)
        self.port = self._server.server_address[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)
    h.wfile.flush()


class CannedBackend(_Base):
    """An OpenAI-compatible server that answers every completion at once: ``n`` choices, or at
    most ``choices_per_call`` (1 behaves like servers that ignore ``n``, e.g. ``transformers serve``)."""

    def __init__(self, choices_per_call: int | None = None) -> None:
        self.choices_per_call = choices_per_call
        self.calls = 0
        self._lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with backend._lock:
                    backend.calls += 1
                _send(self, 200, backend.reply(self.path, body))

        self._serve(Handler)

    def reply(self, path: str, body: dict) -> bytes:
        n = int(body.get("n") or 1)
        if self.choices_per_call is not None:
            n = min(n, self.choices_per_call)
        prompt = request_key(body)
        if path.endswith("/chat/completions"):
            choices = [
                {"index": i, "message": {"role": "assistant", "content": canned_text(prompt, body.get("seed"), i)},
                 "finish_reason": "stop"}
                for i in range(n)
            ]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": canned_text(prompt, body.get("seed"), i), "finish_reason": "stop"}
                       for i in range(n)]
            obj = "text_completion"
        completion = 9 * n
        usage = {"prompt_tokens": 5, "completion_tokens": completion, "total_tokens": 5 + completion}
        return json.dumps({"id": "canned", "object": obj, "created": 0, "model": body.get("model"),
                           "choices": choices, "usage": usage}).encode()


class FaultProxy(_Base):
    """Forward to ``upstream`` (a server root such as ``http://127.0.0.1:8000``), injecting faults
    per key as ``schedule`` says (see the module docstring). ``url`` is the proxy's ``/v1`` root."""

    def __init__(
        self,
        upstream: str,
        schedule: Mapping[str, Sequence[str]] | None = None,
        *,
        key: Callable[[dict], str] = request_key,
        hold_s: float = 30.0,
        retry_after_s: float = 0.05,
        upstream_timeout_s: float = 120.0,
    ) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._key = key
        self.hold_s = hold_s
        self.retry_after_s = retry_after_s
        self.upstream_timeout_s = upstream_timeout_s
        self._schedule: dict[str, list[str]] = {}
        self._counts: Counter = Counter()
        self.log: list[Attempt] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.set_schedule(schedule or {})
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {}
                action = proxy._next_action(proxy._key(body), self.path)
                try:
                    proxy._act(self, action, raw)
                except OSError:  # the client hung up first (e.g. after its own timeout)
                    self.close_connection = True

        self._serve(Handler)

    # ----- schedule and log

    def set_schedule(self, schedule: Mapping[str, Sequence[str]]) -> None:
        """Replace the schedule and start counting attempts afresh (the log is kept; see :meth:`clear_log`)."""
        for k, actions in schedule.items():
            bad = [a for a in actions if a != OK and a not in FAULTS]
            if bad:
                raise ValueError(f"schedule for {k!r}: unknown actions {bad}; known: {', '.join((OK, *FAULTS))}")
        with self._lock:
            self._schedule = {k: list(v) for k, v in schedule.items()}
            self._counts = Counter()

    def clear_log(self) -> None:
        with self._lock:
            self.log = []

    def _next_action(self, key: str, path: str) -> str:
        with self._lock:
            number = self._counts[key]
            self._counts[key] += 1
            planned = self._schedule.get(key, ())
            action = planned[number] if number < len(planned) else OK
            self.log.append(Attempt(key, number, action, path, time.monotonic()))
        return action

    def actions(self, key: str) -> list[str]:
        """The actions taken for ``key``'s attempts, in order."""
        with self._lock:
            return [a.action for a in self.log if a.key == key]

    def by_key(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self._lock:
            for a in self.log:
                out.setdefault(a.key, []).append(a.action)
        return out

    # ----- actions

    def _forward(self, h: BaseHTTPRequestHandler, raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self._upstream, timeout=self.upstream_timeout_s)
        try:
            headers = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
            auth = h.headers.get("Authorization")
            if auth:
                headers["Authorization"] = auth
            conn.request("POST", h.path, body=raw, headers=headers)
            r = conn.getresponse()
            data = r.read()
            kept = [(k, v) for k, v in r.getheaders()
                    if k.lower() not in ("content-type", "content-length", "transfer-encoding", "connection", "date", "server")]
            return r.status, kept, data
        finally:
            conn.close()

    def _act(self, h: BaseHTTPRequestHandler, action: str, raw: bytes) -> None:
        note = f"injected {action} by faultproxy"
        if action == OK:
            status, headers, data = self._forward(h, raw)
            _send(h, status, data, dict(headers))
        elif action == "timeout":
            self._hold(h.connection)
            h.close_connection = True
        elif action in ("429", "500", "503"):
            headers = {"Retry-After": f"{self.retry_after_s:g}"} if action == "429" else {}
            _send(h, int(action), json.dumps({"error": {"message": note, "type": "faultproxy"}}).encode(), headers)
        elif action == "reset":
            h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Fault: reset\r\n")
            h.wfile.flush()
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()  # linger 0: the kernel sends RST
            h.close_connection = True
        elif action == "truncated":
            status, headers, data = self._forward(h, raw)
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            for k, v in headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 3])
            h.wfile.flush()
            h.close_connection = True
        elif action == "malformed":
            body = b'{"id": "' + note.encode() + b'", "object": "chat.completion", "choices": [{"index": 0, "mess'
            _send(h, 200, body)
        else:  # pragma: no cover - set_schedule validates actions
            raise ValueError(action)

    def _hold(self, conn: socket.socket) -> None:
        """Wait until the client closes ``conn`` (EOF), ``hold_s`` passes or the proxy stops."""
        deadline = time.monotonic() + self.hold_s
        while not self._closing.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([conn], [], [], 0.05)
            if readable:
                try:
                    if not conn.recv(65536):
                        return  # the client hung up
                except OSError:
                    return

    def stop(self) -> None:
        self._closing.set()
        super().stop()


# ----- a seeded fault plan


def plan_faults(
    keys: Iterable[str],
    seed: int,
    max_retries: int,
    *,
    clean_share: float = 0.15,
    permanent_share: float = 0.2,
    kinds: Sequence[str] = FAULTS,
) -> dict[str, list[str]]:
    """A seeded schedule over ``keys``: some clean, most answered after 1..``max_retries`` faults,
    some failing for good (``max_retries + 2`` faults, more than the client will try).

    Fault kinds are drawn from a shuffled cycle over ``kinds``, so every kind occurs about equally
    often; the permanent failures' last faults go round ``kinds`` in turn, so each kind is the
    reason of at least one permanent failure when there are at least ``len(kinds)`` of them.
    """
    rng = random.Random(seed)
    keys = list(keys)
    order = keys[:]
    rng.shuffle(order)
    n_clean = round(len(keys) * clean_share)
    n_perm = max(1, round(len(keys) * permanent_share))
    clean, permanent, answered = order[:n_clean], order[n_clean:n_clean + n_perm], order[n_clean + n_perm:]
    pool: list[str] = []

    def draw() -> str:
        if not pool:
            pool.extend(kinds)
            rng.shuffle(pool)
        return pool.pop()

    schedule: dict[str, list[str]] = {k: [] for k in clean}
    for k in answered:
        schedule[k] = [draw() for _ in range(rng.randint(1, max_retries))]
    for i, k in enumerate(permanent):
        faults = [draw() for _ in range(max_retries + 2)]
        faults[max_retries] = kinds[i % len(kinds)]  # the fault the client sees last
        schedule[k] = faults
    return {k: schedule[k] for k in keys}
