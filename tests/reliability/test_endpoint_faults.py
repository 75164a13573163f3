"""Endpoint faults through a whole `selfalign generate` run (issue 8, part 3).

A fault-injecting proxy (:mod:`faultproxy`) sits on 127.0.0.1 in front of a canned
OpenAI-compatible backend (or, in the slow test, a real ``transformers serve``). It injects,
per prompt and on a seeded schedule: timeouts, 429 with Retry-After, 500, 503, connection
resets, truncated bodies and malformed JSON, then answers (or never does). The real CLI runs
in a subprocess over the proxy, and the tests check, prompt by prompt, against the proxy's own
log: every prompt ends answered or listed as failed with a reason that names its last fault;
none is lost or duplicated; each record's ``retries`` equals the faults the proxy injected for
it; a rerun asks again for exactly the failed ones.

Bounded: every CLI run has a deadline (``subprocess.run(timeout=...)`` kills it), the proxy
holds a "timeout" connection only until the client hangs up (at most ``HOLD_S``), and the
client's own timeout and retry limits are small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_engine_openai import transformers_server  # noqa: F401  (its module-scoped server fixture)

from selfalign.data.records import is_done, read_done
from selfalign.stages.generate import failed_path

from .faultproxy import (
    FAULTS,
    CannedBackend,
    FaultProxy,
    canned_text,
    plan_faults,
    request_key_with_seed,
)

MAX_RETRIES = 3
TIMEOUT_S = 2.0  # the client's per-call timeout; a canned reply over loopback takes milliseconds
HOLD_S = 20.0  # the longest the proxy holds a "timeout" connection if the client never hangs up
RUN_LIMIT_S = 150.0  # deadline of one CLI run
N_PROMPTS = 48

# what a failed record's error says for the fault its request saw last
REASON = {
    "timeout": f"timed out after {TIMEOUT_S:g}s",
    "429": "HTTP 429: {\"error\": {\"message\": \"injected 429 by faultproxy\"",
    "500": "HTTP 500: {\"error\": {\"message\": \"injected 500 by faultproxy\"",
    "503": "HTTP 503: {\"error\": {\"message\": \"injected 503 by faultproxy\"",
    "reset": "connection error (ReadError: ConnectionResetError",
    "truncated": "connection error (RemoteProtocolError: peer closed connection without sending complete message body",
    "malformed": "malformed response (JSONDecodeError",
}


# ----- helpers


@pytest.fixture()
def endpoint():
    with CannedBackend() as backend, FaultProxy(backend.root, hold_s=HOLD_S) as proxy:
        yield backend, proxy


def _write_prompts(path: Path, k: int) -> dict[str, str]:
    """``k`` prompts with ids ``q00``...; returns id -> prompt text (the proxy's key)."""
    subjects = ["tides", "yeast", "lichens", "sundials", "glaciers", "bridges", "violins", "comets"]
    prompts = {f"q{i:02d}": f"Question {i}: explain how {subjects[i % len(subjects)]} work, briefly." for i in range(k)}
    path.write_text("".join(json.dumps({"id": pid, "prompt": text}) + "\n" for pid, text in prompts.items()))
    return prompts


def _write_config(path: Path, base_url: str, n: int = 1, **engine) -> Path:
    opts = {"kind": "openai", "base_url": base_url, "max_concurrency": 8, "timeout_s": TIMEOUT_S,
            "max_retries": MAX_RETRIES, "backoff_initial_s": 0.02, "backoff_max_s": 0.1, **engine}
    lines = ["model:", "  spec: canned-model", "engine:"] + [f"  {k}: {json.dumps(v)}" for k, v in opts.items()]
    lines += ["generation:", f"  n: {n}", "  max_new_tokens: 16", "  seed: 0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _generate(prompts: Path, out: Path, config: Path, limit: float = RUN_LIMIT_S) -> subprocess.CompletedProcess:
    """`selfalign generate` in a subprocess, killed (and the test failed) if it does not stop by itself."""
    cmd = [sys.executable, "-c", "from selfalign.cli import app; app()", "generate", str(prompts), "-o", str(out),
           "-c", str(config), "--no-progress"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False,
                              env={**os.environ, "COLUMNS": "250"})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"selfalign generate did not stop by itself within {limit:.0f}s; output so far:\n{e.stdout}\n{e.stderr}")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _fault_table(log: dict[str, list[str]], records: dict[str, dict], prompts: dict[str, str]) -> dict[str, dict]:
    """Per fault kind, from the proxy's log: attempts it answered with that fault, how many of
    them the client retried (another attempt of the same prompt followed), and how the prompts
    whose last fault it was ended (answered, or in the failure file). The records' own
    ``retries`` must add up to the retried faults (checked here, prompt by prompt in the tests)."""
    table = {k: {"injected": 0, "retried": 0, "answered": 0, "failed": 0} for k in FAULTS}
    for pid, text in prompts.items():
        actions = log.get(text, [])
        for i, a in enumerate(actions):
            if a in table:
                table[a]["injected"] += 1
                table[a]["retried"] += i + 1 < len(actions)
        faults = [a for a in actions if a in table]
        if faults:
            table[faults[-1]]["failed" if "error" in records[pid] else "answered"] += 1
    assert sum(r["retries"] for r in records.values()) == sum(row["retried"] for row in table.values())
    return table


def _print_table(title: str, table: dict[str, dict]) -> None:
    print(f"\n{title}\nfault | injected | retried (= retries recorded) | last fault of: answered / failed")
    for k, row in table.items():
        print(f"{k} | {row['injected']} | {row['retried']} | {row['answered']} / {row['failed']}")
    print("total | " + " | ".join(str(sum(row[c] for row in table.values())) for c in ("injected", "retried"))
          + f" | {sum(row['answered'] for row in table.values())} / {sum(row['failed'] for row in table.values())}")


# ----- the canned backend


def test_every_request_is_answered_or_failed_with_its_reason_and_a_rerun_retries_only_the_failed(tmp_path, endpoint):
    _, proxy = endpoint
    prompts = _write_prompts(tmp_path / "prompts.jsonl", N_PROMPTS)
    schedule = plan_faults(prompts.values(), seed=8, max_retries=MAX_RETRIES)
    proxy.set_schedule(schedule)
    out = tmp_path / "responses.jsonl"
    cfg = _write_config(tmp_path / "cfg.yaml", proxy.url, on_error="record")

    r = _generate(tmp_path / "prompts.jsonl", out, cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    answered, failed = _read(out), _read(failed_path(out))
    log = proxy.by_key()

    # none lost, none duplicated: every prompt is in exactly one of the two files, under one id
    ids = [x["id"] for x in answered + failed]
    assert len(ids) == len(set(ids)) == N_PROMPTS
    assert sorted(x["prompt_id"] for x in answered + failed) == sorted(prompts)
    assert set(log) == set(prompts.values())  # and every prompt reached the server

    permanent = {pid for pid, text in prompts.items() if len(schedule[text]) > MAX_RETRIES}
    assert {x["prompt_id"] for x in failed} == permanent
    for rec in answered:
        text = prompts[rec["prompt_id"]]
        # retried through exactly the planned faults, then answered once; retries match the proxy's log
        assert log[text] == schedule[text] + ["ok"], rec["prompt_id"]
        assert rec["retries"] == len(log[text]) - 1
        assert rec["response"] == canned_text(text, 0, 0) and rec["finish_reason"] == "stop"
        assert "error" not in rec
    for rec in failed:
        text = prompts[rec["prompt_id"]]
        assert log[text] == schedule[text][: MAX_RETRIES + 1], rec["prompt_id"]  # gave up after max_retries
        assert rec["kind"] == "failed_response" and rec["retries"] == MAX_RETRIES
        last = log[text][-1]
        assert REASON[last] in rec["error"], (last, rec["error"])
        assert f"request '{rec['prompt_id']}'" in rec["error"] and f"{MAX_RETRIES + 1} attempt(s)" in rec["error"]

    # the run reports the failures: in the .done marker and in what the command prints
    marker = read_done(out)
    assert is_done(out) and marker["records"] == len(answered) and marker["failed"] == len(failed)
    assert f"{len(failed)} failed" in " ".join(r.stdout.split())

    table = _fault_table(log, {x["prompt_id"]: x for x in answered + failed}, prompts)
    _print_table(f"{N_PROMPTS} prompts, max_retries={MAX_RETRIES}, seed 8", table)
    print("the command said:", " ".join(r.stdout.split()))
    for rec in sorted(failed, key=lambda x: x["prompt_id"]):
        print(f"failed {rec['prompt_id']} (last fault {log[prompts[rec['prompt_id']]][-1]}): {rec['error']}")
    assert all(row["injected"] >= 5 for row in table.values()), table  # every kind really exercised
    assert {log[prompts[x["prompt_id"]]][-1] for x in failed} == set(FAULTS)  # every kind ends some request

    # rerun with a healthy endpoint: exactly the failed prompts are asked again, once each
    before = out.read_bytes()
    proxy.set_schedule({})
    proxy.clear_log()
    r2 = _generate(tmp_path / "prompts.jsonl", out, cfg)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert proxy.by_key() == {prompts[x["prompt_id"]]: ["ok"] for x in failed}
    assert out.read_bytes().startswith(before)  # the answered records are untouched
    after = _read(out)
    assert sorted(x["id"] for x in after) == sorted(ids)  # the retried ones keep their ids
    assert all(x["retries"] == 0 and "error" not in x for x in after[len(answered):])
    assert not failed_path(out).exists() and is_done(out) and read_done(out)["failed"] == 0

    # and a third run has nothing to do
    proxy.clear_log()
    r3 = _generate(tmp_path / "prompts.jsonl", out, cfg)
    assert r3.returncode == 0 and "already complete" in r3.stdout
    assert proxy.log == []


def test_a_failure_that_stops_the_run_loses_nothing_and_a_rerun_completes_it(tmp_path, endpoint):
    """Default ``on_error: raise``: the first request past its retries stops the command with
    its reason; what was answered before is on disk, and a rerun asks only for the rest."""
    _, proxy = endpoint
    prompts = _write_prompts(tmp_path / "prompts.jsonl", 24)
    texts = list(prompts.values())
    schedule = {texts[i]: [FAULTS[i % len(FAULTS)]] * (i % 3) for i in range(len(texts))}
    schedule[texts[9]] = ["503"] * (MAX_RETRIES + 5)  # never answered
    proxy.set_schedule(schedule)
    out = tmp_path / "responses.jsonl"
    cfg = _write_config(tmp_path / "cfg.yaml", proxy.url, max_concurrency=4)

    r = _generate(tmp_path / "prompts.jsonl", out, cfg)
    assert r.returncode == 2, r.stdout + r.stderr
    message = " ".join(r.stderr.split())
    assert "request 'q09'" in message and f"{MAX_RETRIES + 1} attempt(s)" in message
    assert "HTTP 503" in message and "injected 503 by faultproxy" in message
    assert not is_done(out) and not failed_path(out).exists()
    first = _read(out)
    log = proxy.by_key()
    assert len({x["id"] for x in first}) == len(first) and "q09" not in {x["prompt_id"] for x in first}
    for rec in first:
        text = prompts[rec["prompt_id"]]
        assert log[text] == schedule[text] + ["ok"] and rec["retries"] == len(schedule[text])

    before = out.read_bytes()
    proxy.set_schedule({})
    proxy.clear_log()
    r2 = _generate(tmp_path / "prompts.jsonl", out, cfg)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    missing = set(prompts) - {x["prompt_id"] for x in first}
    assert proxy.by_key() == {prompts[pid]: ["ok"] for pid in missing}
    assert out.read_bytes().startswith(before)
    recs = _read(out)
    assert sorted(x["prompt_id"] for x in recs) == sorted(prompts) and len({x["id"] for x in recs}) == len(prompts)
    assert is_done(out) and read_done(out)["failed"] == 0


def test_with_n_samples_a_rerun_keeps_answered_samples_and_fills_only_the_failed(tmp_path):
    """n = 2 from a server that answers one choice per call: sample 1 is a follow-up call with
    seed + 1. A sample can fail while its sibling is answered; the rerun asks for the whole
    prompt again (the engine's unit), keeps the answered sample on disk and writes the other."""
    with CannedBackend(choices_per_call=1) as backend, \
            FaultProxy(backend.root, key=request_key_with_seed, hold_s=HOLD_S) as proxy:
        prompts = _write_prompts(tmp_path / "prompts.jsonl", 6)
        t = list(prompts.values())
        schedule = {
            f"{t[1]}|seed=1": ["500"] * (MAX_RETRIES + 1),  # q01: sample 1 fails for good, sample 0 answered
            f"{t[2]}|seed=0": ["429", "reset"],  # q02: answered after 2 retries
            f"{t[3]}|seed=0": ["malformed"] * (MAX_RETRIES + 1),  # q03: the first call fails, so both samples do
        }
        proxy.set_schedule(schedule)
        out = tmp_path / "responses.jsonl"
        cfg = _write_config(tmp_path / "cfg.yaml", proxy.url, n=2, on_error="record")

        r = _generate(tmp_path / "prompts.jsonl", out, cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        answered, failed = _read(out), _read(failed_path(out))
        got = {(x["prompt_id"], x["sample_index"]): x for x in answered}
        assert sorted(got) == sorted((pid, i) for pid in prompts for i in (0, 1) if (pid, i) not in {("q01", 1), ("q03", 0), ("q03", 1)})
        assert sorted((x["prompt_id"], x["sample_index"]) for x in failed) == [("q01", 1), ("q03", 0), ("q03", 1)]
        assert len({x["id"] for x in answered + failed}) == 12
        for (pid, i), rec in got.items():
            assert rec["response"] == canned_text(prompts[pid], i, 0)  # sample i was asked with seed 0 + i
        # retries count per request (all its calls): q01's answered sample shares its sibling's retries
        assert got[("q01", 0)]["retries"] == MAX_RETRIES and got[("q02", 0)]["retries"] == got[("q02", 1)]["retries"] == 2
        assert all(x["retries"] == 0 for (pid, _), x in got.items() if pid not in ("q01", "q02"))
        errors = {(x["prompt_id"], x["sample_index"]): x["error"] for x in failed}
        assert REASON["500"] in errors[("q01", 1)] and all(REASON["malformed"] in errors[("q03", i)] for i in (0, 1))
        assert all(x["retries"] == MAX_RETRIES for x in failed)
        log = proxy.by_key()
        assert log[f"{t[1]}|seed=0"] == ["ok"] and log[f"{t[1]}|seed=1"] == ["500"] * (MAX_RETRIES + 1)
        assert log[f"{t[2]}|seed=0"] == ["429", "reset", "ok"] and f"{t[3]}|seed=1" not in log

        before = out.read_bytes()
        proxy.set_schedule({})
        proxy.clear_log()
        r2 = _generate(tmp_path / "prompts.jsonl", out, cfg)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert sorted(proxy.by_key()) == sorted(f"{t[k]}|seed={i}" for k in (1, 3) for i in (0, 1))
        assert out.read_bytes().startswith(before)
        after = _read(out)
        assert len(after) == 12 and len({x["id"] for x in after}) == 12
        new = {(x["prompt_id"], x["sample_index"]): x for x in after[len(answered):]}
        assert sorted(new) == [("q01", 1), ("q03", 0), ("q03", 1)]
        assert all(x["response"] == canned_text(prompts[pid], i, 0) and x["retries"] == 0 for (pid, i), x in new.items())
        assert not failed_path(out).exists() and is_done(out)


# ----- a real server: transformers serve behind the proxy


@pytest.mark.slow
def test_faults_in_front_of_transformers_serve(tmp_path, transformers_server):  # noqa: F811
    """The real server behind the proxy: real bodies are truncated, real answers follow faults."""
    base_url, model = transformers_server
    with FaultProxy(base_url.removesuffix("/v1"), hold_s=HOLD_S) as proxy:
        prompts = _write_prompts(tmp_path / "prompts.jsonl", 8)
        texts = list(prompts.values())
        kinds = ["429", "500", "503", "reset", "truncated", "malformed"]
        schedule = {texts[i]: [kinds[i % len(kinds)], kinds[(i + 2) % len(kinds)]] for i in range(6)}
        schedule[texts[6]] = []
        schedule[texts[7]] = ["truncated"] * (MAX_RETRIES + 1)  # fails for good on real, truncated bodies
        proxy.set_schedule(schedule)
        out = tmp_path / "responses.jsonl"
        cfg = _write_config(tmp_path / "cfg.yaml", proxy.url, on_error="record", timeout_s=60.0, max_concurrency=2)
        cfg.write_text(cfg.read_text().replace("spec: canned-model", f"spec: {json.dumps(model)}")
                       .replace("max_new_tokens: 16", "max_new_tokens: 8"))

        r = _generate(tmp_path / "prompts.jsonl", out, cfg, limit=300)
        assert r.returncode == 0, r.stdout + r.stderr
        answered, failed = _read(out), _read(failed_path(out))
        log = proxy.by_key()
        assert sorted(x["prompt_id"] for x in answered) == [f"q{i:02d}" for i in range(7)]
        assert [x["prompt_id"] for x in failed] == ["q07"] and failed[0]["retries"] == MAX_RETRIES
        assert REASON["truncated"] in failed[0]["error"]
        for rec in answered:
            text = prompts[rec["prompt_id"]]
            assert log[text] == schedule[text] + ["ok"] and rec["retries"] == len(schedule[text])
            assert rec["response"].strip() and 0 < rec["completion_tokens"] <= 8
        table = _fault_table(log, {x["prompt_id"]: x for x in answered + failed}, prompts)
        _print_table("transformers serve, 8 prompts", table)

        proxy.set_schedule({})
        proxy.clear_log()
        r2 = _generate(tmp_path / "prompts.jsonl", out, cfg, limit=300)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert proxy.by_key() == {texts[7]: ["ok"]}
        assert len(_read(out)) == 8 and not failed_path(out).exists() and is_done(out)
