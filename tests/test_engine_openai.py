"""OpenAIEngine against a fault-injecting stub server and (slow) a real ``transformers serve``.

All traffic goes to 127.0.0.1. Every engine call runs under ``_bounded`` so that no test
can hang, and the engines use tiny backoffs and short timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selfalign.config import EngineConfig, ModelConfig
from selfalign.engines.base import GenerationRequest, Message, SamplingParams
from selfalign.engines.openai import OpenAIEngine
from selfalign.errors import EngineError

# ----- the stub server -----


class Stub:
    """An OpenAI-compatible server whose replies follow a script, one action per call.

    Actions: ``("ok",)``, ``("status", code, headers)``, ``("slow", seconds)``, ``("reset",)``,
    ``("truncated",)``, ``("malformed",)``, ``("delay", seconds)`` (then answer). When the
    script is empty, ``default`` is used. A chat reply's text is ``"echo:<last user message>|
    seed=<seed>"``; ``choices_per_call`` caps how many choices a reply holds (None: honour n).
    """

    def __init__(self) -> None:
        self.script: list[tuple] = []
        self.default: tuple = ("ok",)
        self.choices_per_call: int | None = None
        self.reject_n = False
        self.calls: list[dict] = []
        self.times: list[float] = []
        self.headers: list[dict] = []
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with stub.lock:
                    stub.calls.append({"path": self.path, **body})
                    stub.times.append(time.monotonic())
                    stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    action = stub.script.pop(0) if stub.script else stub.default
                    stub.active += 1
                    stub.peak = max(stub.peak, stub.active)
                try:
                    stub.act(self, action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with stub.lock:
                        stub.active -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def act(self, h: BaseHTTPRequestHandler, action: tuple, body: dict) -> None:
        kind = action[0]
        if kind == "status":
            headers = action[2] if len(action) > 2 else {}
            self.send(h, action[1], json.dumps({"error": {"message": f"injected {action[1]}"}}).encode(), headers)
        elif kind == "slow":
            time.sleep(action[1])
            self.send(h, 200, self.reply(h.path, body))
        elif kind == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
        elif kind == "truncated":
            data = self.reply(h.path, body)
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 3])
            h.wfile.flush()
            h.close_connection = True
        elif kind == "malformed":
            self.send(h, 200, b'{"id": "x", "choices": [{"index": 0, "mess')
        else:
            if kind == "delay":
                time.sleep(action[1])
            if self.reject_n and body.get("n", 1) > 1:
                self.send(h, 400, b'{"error": {"message": "n must be 1"}}')
            else:
                self.send(h, 200, self.reply(h.path, body))

    @staticmethod
    def send(h: BaseHTTPRequestHandler, code: int, data: bytes, headers: dict | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def reply(self, path: str, body: dict) -> bytes:
        n = body.get("n", 1)
        k = n if self.choices_per_call is None else min(n, self.choices_per_call)
        if path.endswith("/chat/completions"):
            text = f"echo:{body['messages'][-1]['content']}|seed={body.get('seed')}"
            choices = [
                {"index": i, "message": {"role": "assistant", "content": f"{text}|{i}"}, "finish_reason": "stop"}
                for i in range(k)
            ]
            obj = "chat.completion"
        else:
            text = f"raw:{body['prompt']}|seed={body.get('seed')}"
            choices = [{"index": i, "text": f"{text}|{i}", "finish_reason": "length"} for i in range(k)]
            obj = "text_completion"
        usage = {"prompt_tokens": 7, "completion_tokens": 10 * k + 1, "total_tokens": 7 + 10 * k + 1}
        return json.dumps({"id": "c1", "object": obj, "created": 0, "model": body.get("model"),
                           "choices": choices, "usage": usage}).encode()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stub():
    s = Stub()
    yield s
    s.stop()


def _engine(stub: Stub, **kw) -> OpenAIEngine:
    opts = dict(max_concurrency=4, timeout_s=2.0, max_retries=3, backoff_initial_s=0.01, backoff_max_s=0.05)
    opts.update(kw)
    return OpenAIEngine(stub.url, "stub-model", **opts)


def _bounded(fn, limit: float = 30.0):
    """Run ``fn()`` in a thread; fail the test (instead of hanging) if it takes over ``limit`` s."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        pytest.fail(f"engine call did not finish within {limit}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _chat(i: int | str, n: int = 1, seed: int = 0, stop: tuple[str, ...] = ()) -> GenerationRequest:
    params = SamplingParams(n=n, seed=seed, max_new_tokens=16, stop=stop)
    return GenerationRequest.chat(f"r{i}", [Message("user", f"q{i}")], params)


def _run(engine: OpenAIEngine, requests, limit: float = 30.0) -> list:
    return _bounded(lambda: list(engine.generate(requests)), limit)


# ----- faults and retries -----


def test_every_fault_is_retried_until_success(stub, caplog):
    caplog.set_level("INFO", logger="selfalign.engines.openai")
    stub.script = [
        ("status", 429, {"Retry-After": "0.01"}),
        ("status", 500),
        ("status", 503),
        ("slow", 1.5),
        ("reset",),
        ("truncated",),
        ("malformed",),
    ]
    with _engine(stub, timeout_s=0.5, max_retries=7) as eng:
        [res] = _run(eng, [_chat(1)])
    assert len(stub.calls) == 8
    assert res.retries == 7
    assert [s.text for s in res.samples] == ["echo:q1|seed=0|0"]
    assert res.samples[0].finish_reason == "stop" and res.samples[0].error is None
    assert res.prompt_tokens == 7 and res.samples[0].completion_tokens == 11
    reasons = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    expected = ["HTTP 429", "HTTP 500", "HTTP 503", "timed out", "disconnected without sending a response",
                "without sending complete message body", "malformed response"]
    assert len(reasons) == 7 and all(e in r for e, r in zip(expected, reasons)), reasons


def test_retry_after_is_honoured_and_capped(stub):
    stub.script = [("status", 429, {"Retry-After": "0.4"}), ("status", 503, {"Retry-After": "3600"})]
    with _engine(stub, backoff_initial_s=0.001, backoff_max_s=0.6) as eng:
        [res] = _run(eng, [_chat(1)])
    assert res.retries == 2 and len(stub.calls) == 3
    first_gap, second_gap = stub.times[1] - stub.times[0], stub.times[2] - stub.times[1]
    assert first_gap >= 0.35
    assert 0.5 <= second_gap < 3.0  # capped at backoff_max_s, not an hour


def test_exhausted_retries_raise_with_url_and_attempts_but_no_key(stub, monkeypatch):
    secret = "sk-test-secret-0123456789"
    monkeypatch.setenv("SELFALIGN_TEST_KEY", secret)
    stub.default = ("status", 500)
    eng = _engine(stub, api_key_env="SELFALIGN_TEST_KEY", max_retries=2)
    with eng, pytest.raises(EngineError) as info:
        _run(eng, [_chat(1)])
    message = str(info.value)
    assert stub.url in message and "3 attempt" in message and "HTTP 500" in message and "'r1'" in message
    assert secret not in message and secret not in repr(eng) and secret not in json.dumps(eng.describe())
    assert len(stub.calls) == 3
    assert stub.headers[0].get("authorization") == f"Bearer {secret}"  # the key is sent, just never shown


def test_record_mode_yields_error_samples(stub):
    stub.script = [("status", 503)] * 3
    with _engine(stub, max_concurrency=1, max_retries=2, on_error="record") as eng:
        results = _run(eng, [_chat(1, n=2), _chat(2)])
    by_id = {r.request.id: r for r in results}
    assert set(by_id) == {"r1", "r2"}
    failed, ok = by_id["r1"], by_id["r2"]
    assert failed.retries == 2 and [s.index for s in failed.samples] == [0, 1]
    for s in failed.samples:
        assert s.finish_reason == "error" and "HTTP 503" in s.error and s.text == "" and s.completion_tokens == 0
    assert ok.samples[0].finish_reason == "stop" and ok.samples[0].error is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(stub, status):
    stub.default = ("status", status)
    with _engine(stub, max_retries=5) as eng, pytest.raises(EngineError) as info:
        _run(eng, [_chat(1)])
    assert len(stub.calls) == 1
    assert f"HTTP {status}" in str(info.value) and "1 attempt" in str(info.value)


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_initial_s=0.01, timeout_s=2)
    with eng, pytest.raises(EngineError) as info:
        _run(eng, [_chat(1)])
    assert "connection error" in str(info.value) and "3 attempt" in str(info.value)


# ----- concurrency, n, completeness -----


def test_max_concurrency_is_respected(stub):
    stub.default = ("delay", 0.15)
    with _engine(stub, max_concurrency=3) as eng:
        results = _run(eng, [_chat(i) for i in range(12)])
    assert len(results) == 12
    assert stub.peak == 3


def test_n_is_made_up_by_follow_ups_when_the_server_returns_one_choice(stub):
    stub.choices_per_call = 1
    with _engine(stub) as eng:
        [res] = _run(eng, [_chat(1, n=4, seed=100)])
    assert len(stub.calls) == 4
    assert stub.calls[0]["n"] == 4 and all("n" not in c for c in stub.calls[1:])
    assert [s.index for s in res.samples] == [0, 1, 2, 3]
    assert [s.text for s in res.samples] == [f"echo:q1|seed={100 + i}|0" for i in range(4)]
    assert [s.completion_tokens for s in res.samples] == [11, 11, 11, 11]
    assert res.prompt_tokens == 7 and res.retries == 0


def test_n_in_one_call_splits_usage_evenly(stub):
    with _engine(stub) as eng:
        [res] = _run(eng, [_chat(1, n=4)])
    assert len(stub.calls) == 1
    assert [s.text for s in res.samples] == [f"echo:q1|seed=0|{i}" for i in range(4)]
    assert [s.completion_tokens for s in res.samples] == [11, 10, 10, 10]  # 41 tokens billed


def test_server_rejecting_n_falls_back_to_one_sample_per_call(stub):
    stub.reject_n = True
    with _engine(stub) as eng:
        first, second = _run(eng, [_chat(1, n=3)]), _run(eng, [_chat(2, n=2)])
    assert [s.text for s in first[0].samples] == [f"echo:q1|seed={i}|0" for i in range(3)]
    assert len(second[0].samples) == 2
    assert sum(1 for c in stub.calls if c.get("n", 1) > 1) == 1  # learned after the first 400


def test_many_requests_none_lost_or_duplicated(stub):
    stub.script = [("delay", 0.002 * (i % 7)) for i in range(60)] + [("status", 500)] * 5
    reqs = [_chat(i) for i in range(40)]
    reqs += [GenerationRequest(id=f"p{i}", prompt=f"text {i}", params=SamplingParams(seed=i)) for i in range(20)]
    with _engine(stub, max_concurrency=8, max_retries=6) as eng:
        results = _run(eng, iter(reqs))
    ids = [r.request.id for r in results]
    assert len(ids) == 60 and set(ids) == {r.id for r in reqs}
    raw = [r for r in results if r.request.prompt is not None]
    assert all(r.samples[0].text.startswith(f"raw:{r.request.prompt}|") for r in raw)
    assert all(r.samples[0].finish_reason == "length" for r in raw)
    assert sum(1 for c in stub.calls if c["path"].endswith("/v1/completions")) >= 20


def test_sampling_params_are_sent(stub):
    params = SamplingParams(n=1, temperature=0.3, top_p=0.8, max_new_tokens=5, stop=("|seed",), seed=9)
    req = GenerationRequest.chat("a", [Message("system", "s"), Message("user", "u")], params)
    with _engine(stub, extra_body={"custom": 1}) as eng:
        [res] = _run(eng, [req])
        [plain] = _run(eng, [_chat(2)])
    body = stub.calls[0]
    assert body["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.3, 0.8, 5, 9)
    assert body["stop"] == ["|seed"] and body["custom"] == 1 and "n" not in body
    assert "stop" not in stub.calls[1]
    assert res.samples[0].text == "echo:u|seed=9|0"  # no trailing stop string: unchanged
    assert plain.samples[0].text == "echo:q2|seed=0|0"


def test_trailing_stop_string_is_removed(stub):
    with _engine(stub) as eng:
        [res] = _run(eng, [_chat(1, stop=("|0",))])
    assert res.samples[0].text == "echo:q1|seed=0"


# ----- the generator: early close, errors, laziness -----


def test_closing_early_cancels_outstanding_work(stub):
    stub.script = [("ok",)] + [("delay", 5.0)] * 20
    pulled: list[int] = []

    def requests():
        for i in range(1000):
            pulled.append(i)
            yield _chat(i)

    eng = _engine(stub, max_concurrency=3, timeout_s=20)

    def consume_one():
        gen = eng.generate(requests())
        first = next(gen)
        t0 = time.monotonic()
        gen.close()
        return first, time.monotonic() - t0

    first, close_s = _bounded(consume_one, 15)
    assert first.samples[0].text.startswith("echo:q")
    assert close_s < 3.0
    assert len(pulled) <= 3 + 2  # pulled lazily, not materialised
    stub.script.clear()
    [again] = _run(eng, [_chat("x")], limit=10)  # the engine is still usable
    assert again.request.id == "rx"
    eng.close()


def test_errors_from_the_request_iterable_propagate(stub):
    def requests():
        yield _chat(1)
        raise ValueError("bad input line 2")

    with _engine(stub) as eng, pytest.raises(ValueError, match="bad input line 2"):
        _run(eng, requests())


def test_from_config_and_describe(monkeypatch):
    with pytest.raises(EngineError, match="base_url"):
        OpenAIEngine.from_config(ModelConfig(), EngineConfig(kind="openai"))
    cfg = EngineConfig(kind="openai", base_url="http://127.0.0.1:9/v1/", max_concurrency=2, max_retries=1)
    eng = OpenAIEngine.from_config(ModelConfig(spec="local/model"), cfg)
    assert eng.describe() == {"engine": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "local/model"}
    assert eng.max_concurrency == 2 and eng.max_retries == 1
    cfg2 = cfg.model_copy(update={"served_model": "served-name"})
    assert OpenAIEngine.from_config(ModelConfig(spec="local/model"), cfg2).model == "served-name"
    eng.close()  # never started: a no-op


# ----- a real server: transformers serve -----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_server(embedded_model_dir, tmp_path_factory):
    """``transformers serve <model dir>`` on 127.0.0.1, ready (``/health``) within 180 s; killed at the end."""
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        pytest.skip("the transformers CLI is not installed (pip install 'transformers[serving]')")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("tserve") / "server.log"
    # one torch thread unless the caller says otherwise: on a small, shared CPU more threads spin
    # at barriers (8 new tokens took 10-17 s a request with the default, ~1 s with one thread)
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(exe), "serve", str(embedded_model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 180:
                pytest.fail(f"transformers serve not ready after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        print(f"transformers serve ready after {time.monotonic() - t0:.1f}s")
        yield f"http://127.0.0.1:{port}/v1", str(embedded_model_dir)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)
        log_file.close()


@pytest.mark.slow
def test_transformers_serve_end_to_end(transformers_server, oasst_prompts_file):
    base_url, model = transformers_server
    lines = oasst_prompts_file.read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line) for line in lines[:3]]
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=24, seed=1)
    reqs = [GenerationRequest.chat(f"p{i}", [Message("user", p)], params) for i, p in enumerate(prompts)]
    # transformers serve samples only when asked through its generation_config extension
    extra = {"generation_config": json.dumps({"do_sample": True})}
    with OpenAIEngine(base_url, model, max_concurrency=2, timeout_s=60, max_retries=2, extra_body=extra) as eng:
        results = _run(eng, reqs, limit=120)
    assert sorted(r.request.id for r in results) == ["p0", "p1", "p2"]
    for r in results:
        assert [s.index for s in r.samples] == [0, 1]
        assert all(s.text.strip() and s.finish_reason in ("stop", "length") and s.error is None for s in r.samples)
        assert all(0 < s.completion_tokens <= 24 for s in r.samples) and r.prompt_tokens > 0
    assert any(r.samples[0].text != r.samples[1].text for r in results)  # really sampled, with different seeds


@pytest.mark.slow
def test_cli_generate_through_the_openai_engine(transformers_server, oasst_prompts_file, tmp_path):
    """`selfalign generate --engine openai --base-url ...` on a slice of the OASST prompt lottery."""
    from typer.testing import CliRunner

    from selfalign.cli import app

    base_url, model = transformers_server
    cfg = tmp_path / "serve.yaml"
    cfg.write_text('engine:\n  extra_body:\n    generation_config: \'{"do_sample": true}\'\n  max_concurrency: 2\n')
    out = tmp_path / "responses.jsonl"
    args = ["generate", str(oasst_prompts_file), "-o", str(out), "-c", str(cfg), "--engine", "openai",
            "--base-url", base_url, "--model", model, "--limit", "4", "-n", "2", "--max-new-tokens", "20", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 8 and len({x["id"] for x in recs}) == 8
    assert all(x["response"].strip() and x["generator"]["engine"] == "openai" for x in recs)
    assert all(x["generator"]["base_url"] == base_url for x in recs)
    # a second invocation finds the output complete and does not call the server again
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "already complete" in again.output
