"""JSONL records: ids, validating reader, crash-safe writer, completion markers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from selfalign.data.records import (
    JsonlWriter,
    atomic_write_json,
    atomic_write_text,
    is_done,
    load_jsonl,
    mark_done,
    read_done,
    read_jsonl,
    record_id,
)
from selfalign.errors import DataError, RunError

SRC = Path(__file__).resolve().parents[1] / "src"


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Prompt(BaseModel):
    id: str
    prompt: str
    n: int = 1
    messages: list[Message] = []


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def file_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- record_id


def test_record_id_is_stable_and_sensitive_to_every_part():
    base = record_id("p1", 0, 42, {"temperature": 0.7, "top_p": 0.9})
    assert base == record_id("p1", 0, 42, {"top_p": 0.9, "temperature": 0.7})  # key order irrelevant
    assert len(base) == 16 and all(c in "0123456789abcdef" for c in base)
    variants = [
        record_id("p2", 0, 42, {"temperature": 0.7, "top_p": 0.9}),
        record_id("p1", 1, 42, {"temperature": 0.7, "top_p": 0.9}),
        record_id("p1", 0, 43, {"temperature": 0.7, "top_p": 0.9}),
        record_id("p1", 0, 42, {"temperature": 0.8, "top_p": 0.9}),
        record_id("p1", 0, 42),
    ]
    assert len({base, *variants}) == 6
    # fixed value: the id must not change between releases or Python versions
    assert record_id("x", 1) == hashlib.sha256(b'["x",1]').hexdigest()[:16] == "59402b0471b497c0"
    assert record_id("é") == record_id("é")


# --------------------------------------------------------------------------- reading


def test_read_jsonl_streams_dicts_and_models(tmp_path):
    p = write_lines(tmp_path / "p.jsonl", '{"id": "a", "prompt": "hi"}', "", '{"id": "b", "prompt": "yo", "n": 2}')
    assert [r["id"] for r in read_jsonl(p)] == ["a", "b"]
    models = list(read_jsonl(p, Prompt))
    assert [type(m) for m in models] == [Prompt, Prompt] and models[1].n == 2


def test_invalid_json_names_file_and_line(tmp_path):
    p = write_lines(tmp_path / "prompts.jsonl", '{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": ')
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: invalid JSON"):
        load_jsonl(p)


def test_non_object_line_is_an_error(tmp_path):
    p = write_lines(tmp_path / "p.jsonl", '{"id": "a", "prompt": "x"}', "[1, 2]")
    with pytest.raises(DataError, match=r"p\.jsonl:2: expected a JSON object, got list"):
        load_jsonl(p, Prompt)


def test_schema_errors_name_the_field(tmp_path):
    missing = write_lines(tmp_path / "m.jsonl", '{"id": "a"}')
    with pytest.raises(DataError) as e:
        load_jsonl(missing, Prompt)
    assert "m.jsonl:1: field 'prompt': missing" in str(e.value)

    wrong = write_lines(tmp_path / "w.jsonl", '{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "x", "n": "abc"}')
    with pytest.raises(DataError) as e:
        load_jsonl(wrong, Prompt)
    assert "w.jsonl:2: field 'n': Input should be a valid integer (got 'abc')" in str(e.value)

    role = write_lines(
        tmp_path / "prompts.jsonl",
        *[json.dumps({"id": str(i), "prompt": "x"}) for i in range(6)],
        json.dumps({"id": "z", "prompt": "x", "messages": [{"role": "bot", "content": "hi"}]}),
    )
    with pytest.raises(DataError) as e:
        load_jsonl(role, Prompt)
    assert "prompts.jsonl:7: field 'messages.0.role': Input should be 'system', 'user' or 'assistant'" in str(e.value)


def test_empty_missing_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert list(read_jsonl(empty)) == []  # streaming an empty file is fine
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(the file is empty\)"):
        load_jsonl(empty)
    write_lines(empty, "", "  ")
    with pytest.raises(DataError, match="no records"):
        load_jsonl(empty)
    assert load_jsonl(empty, min_records=0) == []

    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_jsonl(tmp_path / "nope.jsonl")

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8"):
        load_jsonl(latin)

    few = write_lines(tmp_path / "few.jsonl", '{"id": "a", "prompt": "x"}')
    with pytest.raises(DataError, match="only 1 records, at least 3 needed"):
        load_jsonl(few, min_records=3)


def test_duplicate_ids(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", '{"id": "x", "prompt": "1"}', '{"id": "y", "prompt": "2"}', '{"id": "x", "prompt": "3"}')
    with pytest.raises(DataError, match=r"d\.jsonl:3: duplicate id 'x' \(first seen on line 1\)"):
        load_jsonl(p)
    assert len(list(read_jsonl(p, unique_ids=False))) == 3


def test_allow_torn_tail_when_reading(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te', encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl:3: invalid JSON"):
        list(read_jsonl(p))
    assert [r["id"] for r in read_jsonl(p, allow_torn_tail=True)] == ["a", "b"]


# --------------------------------------------------------------------------- writer


def test_writer_batches_and_counts(tmp_path):
    p = tmp_path / "sub" / "out.jsonl"
    with JsonlWriter(p, batch_size=3) as w:
        for i in range(2):
            assert w.write({"id": f"r{i}", "text": "ü"})
        assert p.read_bytes() == b""  # still buffered
        w.write({"id": "r2", "text": "ü"})
        assert len(p.read_bytes().splitlines()) == 3  # batch flushed
        w.write({"id": "r3"})
        assert w.count == 4 and "r3" in w and w.existing_ids() == {"r0", "r1", "r2", "r3"}
    lines = p.read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"id":"r0","text":"ü"}'  # compact, non-ASCII kept
    assert len(lines) == 4
    with pytest.raises(ValueError, match="str 'id'"):
        JsonlWriter(p).write({"text": "no id"})


def test_rerun_skips_existing_ids(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlWriter(p, batch_size=4) as w:
        for i in range(10):
            w.write({"id": str(i), "v": i})
    with JsonlWriter(p, batch_size=4) as w:
        assert w.existing_ids() == {str(i) for i in range(10)} and w.count == 10
        added = [w.write({"id": str(i), "v": i}) for i in range(20)]
        assert added == [False] * 10 + [True] * 10
        assert not w.write({"id": "15", "v": "again"})  # duplicates within the session too
    ids = file_ids(p)
    assert ids == [str(i) for i in range(20)]


def test_torn_tail_is_repaired(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlWriter(p) as w:
        for i in range(5):
            w.write({"id": str(i)})
    good = p.read_bytes()
    with p.open("ab") as f:
        f.write(b'{"id": "5", "text": "half a li')
    with JsonlWriter(p) as w:
        assert p.read_bytes() == good  # torn part gone, earlier bytes identical
        assert w.count == 5
        w.write({"id": "5"})
    assert p.read_bytes().startswith(good)
    assert file_ids(p) == [str(i) for i in range(6)]

    # a complete but invalid last line (e.g. zero-filled after a power cut) is cut as well
    with p.open("ab") as f:
        f.write(b"\x00\x00\x00\n")
    JsonlWriter(p).close()
    assert file_ids(p) == [str(i) for i in range(6)]

    # damage *before* valid records is not a tail: refuse instead of truncating records
    p.write_bytes(b'{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(DataError, match=r"out\.jsonl:2"):
        JsonlWriter(p)
    assert p.read_bytes() == b'{"id": "a"}\n{"id": \n{"id": "c"}\n'


def test_fingerprint_mismatch_is_refused(tmp_path):
    p = tmp_path / "gen.jsonl"
    fp = {"generation": {"temperature": 0.7, "n": 2}, "model": "m"}
    with JsonlWriter(p, fingerprint=fp) as w:
        w.write({"id": "a"})
    assert json.loads((tmp_path / "gen.jsonl.meta.json").read_text())["fingerprint"] == fp
    JsonlWriter(p, fingerprint=dict(fp)).close()  # same settings: fine
    JsonlWriter(p).close()  # no fingerprint: no check
    before = p.read_bytes()
    with pytest.raises(RunError) as e:
        JsonlWriter(p, fingerprint={"generation": {"temperature": 0.9, "n": 2}, "model": "m"})
    msg = str(e.value)
    assert "different settings" in msg and "generation.temperature" in msg and "delete" in msg
    assert "generation.n" not in msg
    assert p.read_bytes() == before
    # once the output is gone, new settings are accepted
    p.unlink()
    JsonlWriter(p, fingerprint={"model": "other"}).close()
    assert json.loads((tmp_path / "gen.jsonl.meta.json").read_text())["fingerprint"] == {"model": "other"}


def test_second_writer_on_same_file_is_refused(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlWriter(p):
        with pytest.raises(RunError, match="another writer"):
            JsonlWriter(p)


_KILL_SCRIPT = """
import sys
from selfalign.data.records import JsonlWriter
path, n = sys.argv[1], int(sys.argv[2])
with JsonlWriter(path, batch_size=3) as w:
    for i in range(n):
        w.write({"id": f"r{i:05d}", "payload": "x" * (2000 + 37 * (i % 50)), "i": i})
"""


def test_sigkill_mid_write_then_resume(tmp_path):
    p = tmp_path / "killed.jsonl"
    n = 20000
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(p), str(n)], env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if p.exists() and p.stat().st_size > 200_000:
                break
            if proc.poll() is not None:
                pytest.fail(f"writer exited early with {proc.returncode}")
            time.sleep(0.005)
        else:
            pytest.fail("writer produced no output in time")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    raw = p.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    before = [json.loads(line) for line in complete.splitlines()]  # every complete line is valid
    assert 0 < len(before) < n

    with JsonlWriter(p, batch_size=64) as w:
        assert p.read_bytes() == complete  # only the torn tail (if any) was removed
        assert w.count == len(before)
        for i in range(n):
            w.write({"id": f"r{i:05d}", "payload": "y", "i": i})
    ids = file_ids(p)
    assert len(ids) == n and len(set(ids)) == n
    assert p.read_bytes().startswith(complete)


# --------------------------------------------------------------------------- done markers


def test_done_marker_verifies_and_invalidates(tmp_path):
    p = tmp_path / "out.jsonl"
    assert not is_done(p) and read_done(p) is None
    w = JsonlWriter(p)
    for i in range(3):
        w.write({"id": str(i)})
    marker = w.mark_done({"stage": "generate"})
    assert marker["records"] == 3 and marker["bytes"] == p.stat().st_size and marker["stage"] == "generate"
    assert is_done(p) and read_done(p)["sha256"] == marker["sha256"]
    assert "finished_at" in marker

    # reopening a finished output is a no-op resume ...
    with JsonlWriter(p) as w:
        assert not w.write({"id": "1"})
    assert is_done(p)
    # ... but a new record removes the stale marker
    with JsonlWriter(p) as w:
        w.write({"id": "new"})
        assert read_done(p) is None
    assert not is_done(p)
    mark_done(p)
    assert is_done(p)

    # a file changed after completion is not done (same size, different content too)
    data = p.read_bytes()
    p.write_bytes(data.replace(b'"0"', b'"9"'))
    assert not is_done(p)
    p.write_bytes(data + b'{"id": "extra"}\n')
    assert not is_done(p)
    p.write_bytes(data)
    assert is_done(p)

    with pytest.raises(ValueError, match="reserved"):
        mark_done(p, {"records": 1})


def test_atomic_writes(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_write_json(tmp_path / "c.json", {"k": "é"})
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == {"k": "é"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.txt"]  # no temp files left
