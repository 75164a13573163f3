"""The generate stage and `selfalign generate`: records, resume, kill -9, reproducibility, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfalign.cli import app
from selfalign.config import GenerationConfig
from selfalign.data.prompt_sets import load_prompts
from selfalign.data.records import is_done
from selfalign.engines.hf import HFEngine
from selfalign.errors import RunError
from selfalign.stages.generate import run_generate

runner = CliRunner()


def _write_prompts(path: Path, k: int) -> Path:
    topics = ["rivers", "bread", "chess", "rain", "stars", "music", "glass", "trains", "bees", "salt"]
    with path.open("w") as f:
        for i in range(k):
            f.write(json.dumps(f"Tell me something about {topics[i % len(topics)]} (question {i}).") + "\n")
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return HFEngine(tiny_model_dir, dtype="float32", max_batch_size=8)


def test_stage_writes_one_record_per_sample_and_marks_done(tiny, tmp_path):
    prompts = load_prompts(_write_prompts(tmp_path / "p.jsonl", 5))
    gen = GenerationConfig(n=3, max_new_tokens=6, temperature=0.9, seed=3)
    out = tmp_path / "out.jsonl"
    res = run_generate(tiny, prompts, out, gen, show_progress=False)
    recs = _records(out)
    assert res.responses == len(recs) == 15 and res.written_now == 15
    assert len({r["id"] for r in recs}) == 15
    assert {(r["prompt_id"], r["sample_index"]) for r in recs} == {(p.id, i) for p in prompts for i in range(3)}
    assert all(r["kind"] == "response" and r["messages"][-1]["role"] == "user" for r in recs)
    assert is_done(out)
    before = out.read_bytes()
    again = run_generate(tiny, prompts, out, gen, show_progress=False)
    assert again.already_done and out.read_bytes() == before


def test_a_finished_file_is_extended_when_asked_for_more_prompts(tiny, tmp_path):
    path = _write_prompts(tmp_path / "p.jsonl", 4)
    gen = GenerationConfig(n=1, max_new_tokens=4, seed=1)
    out = tmp_path / "out.jsonl"
    run_generate(tiny, load_prompts(path, limit=2), out, gen, show_progress=False)
    before = out.read_bytes()
    more = run_generate(tiny, load_prompts(path), out, gen, show_progress=False)
    assert not more.already_done and more.written_now == 2 and more.skipped_existing == 2
    assert out.read_bytes().startswith(before) and len(_records(out)) == 4 and is_done(out)
    # asking for fewer prompts than the file holds: they are all there, nothing to generate
    fewer = run_generate(tiny, load_prompts(path, limit=3), out, gen, show_progress=False)
    assert fewer.written_now == 0 and fewer.responses == 3


def test_rerun_fills_only_the_missing_records(tiny, tmp_path):
    prompts = load_prompts(_write_prompts(tmp_path / "p.jsonl", 6))
    gen = GenerationConfig(n=2, max_new_tokens=5, seed=1)
    out = tmp_path / "out.jsonl"
    run_generate(tiny, prompts, out, gen, show_progress=False)
    full = _records(out)
    # simulate an interrupted run: the last 4 records and the .done marker are gone
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-4]))
    Path(str(out) + ".done").unlink()
    res = run_generate(tiny, prompts, out, gen, show_progress=False)
    assert res.written_now == 4 and res.skipped_existing == 8
    after = _records(out)
    assert after[:8] == full[:8]
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in full)


def test_changed_settings_on_the_same_output_are_refused(tiny, tmp_path):
    prompts = load_prompts(_write_prompts(tmp_path / "p.jsonl", 2))
    out = tmp_path / "out.jsonl"
    run_generate(tiny, prompts, out, GenerationConfig(max_new_tokens=4), show_progress=False)
    Path(str(out) + ".done").unlink()
    with pytest.raises(RunError, match="temperature"):
        run_generate(tiny, prompts, out, GenerationConfig(max_new_tokens=4, temperature=0.1), show_progress=False)


def test_same_config_and_seed_give_byte_identical_output(tiny_model_dir, tmp_path):
    p = _write_prompts(tmp_path / "p.jsonl", 4)
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}.jsonl"
        r = runner.invoke(
            app,
            ["generate", str(p), "-o", str(out), "--model", str(tiny_model_dir), "-n", "2", "--max-new-tokens", "8",
             "--seed", "11", "--temperature", "1.0", "--no-progress"],
        )
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_bad_prompt_file_names_file_line_and_field_and_writes_nothing(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('"fine prompt"\n{"messages": [{"role": "robot", "content": "hi"}]}\n')
    out = tmp_path / "never.jsonl"
    r = runner.invoke(app, ["generate", str(p), "-o", str(out), "--no-progress"])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert f"{p}:2" in text and "messages.0.role" in text
    assert not out.exists() and not Path(str(out) + ".meta.json").exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "no prompts"),
        ('{"prompt": "a"}\n{"prompt": \n', ":2: invalid JSON"),
        ('{"text": "no prompt field"}\n', "needs one of"),
        ('{"prompt": 5}\n', "field 'prompt'"),
        ('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', "duplicate prompt id"),
    ],
)
def test_prompt_file_errors(tmp_path, content, expected):
    from selfalign.errors import DataError

    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=expected.replace("(", r"\(")):
        load_prompts(p)


def test_prompt_layouts(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([
        {"instruction": "Alpaca style", "output": "ignored"},
        {"question_id": 81, "turns": ["first turn", "second turn"]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "chat"}]},
    ]))
    ps = load_prompts(p, system="default system")
    assert [x.text for x in ps] == ["Alpaca style", "first turn", "chat"]
    assert ps[1].id == "81"
    assert ps[0].messages[0] == {"role": "system", "content": "default system"}
    assert ps[2].messages[0]["content"] == "be brief"


def test_config_file_and_set_overrides_reach_the_stage(tiny_model_dir, tmp_path):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model:\n  spec: {tiny_model_dir}\n  dtype: float32\ngeneration:\n  n: 1\n  max_new_tokens: 3\n")
    p = _write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "o.jsonl"
    r = runner.invoke(app, ["generate", str(p), "-o", str(out), "-c", str(cfg), "--set", "generation.n=2", "--no-progress"])
    assert r.exit_code == 0, r.output
    recs = _records(out)
    assert len(recs) == 4 and all(x["completion_tokens"] <= 3 for x in recs)
    bad = runner.invoke(app, ["generate", str(p), "-o", str(out), "-c", str(cfg), "--set", "generation.nn=2"])
    assert bad.exit_code == 2 and "generation.nn" in bad.output and "unknown key" in bad.output


def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(tiny_model_dir, tmp_path):
    p = _write_prompts(tmp_path / "p.jsonl", 48)
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable, "-m", "selfalign.cli", "generate", str(p), "-o", str(out), "--model", str(tiny_model_dir),
        "-n", "2", "--max-new-tokens", "48", "--temperature", "1.0", "--set", "model.dtype=float32",
        "--set", "engine.max_batch_size=4", "--set", "engine.threads=1", "--no-progress",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 12:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    snapshot = out.read_bytes()
    complete = snapshot[: snapshot.rfind(b"\n") + 1]
    n_before = complete.count(b"\n")
    assert 12 <= n_before < 96
    assert not Path(str(out) + ".done").exists()

    rerun = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    final = out.read_bytes()
    assert final.startswith(complete)  # every record written before the kill is unchanged
    recs = _records(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == 96 == len(set(ids))  # none lost, none duplicated
    assert is_done(out)


@pytest.mark.slow
def test_generate_with_the_embedded_model_on_oasst_prompts(oasst_prompts_file, tmp_path):
    out = tmp_path / "oasst.jsonl"
    r = runner.invoke(
        app,
        ["generate", str(oasst_prompts_file), "-o", str(out), "--limit", "6", "-n", "2", "--max-new-tokens", "24", "--no-progress"],
    )
    assert r.exit_code == 0, r.output
    recs = _records(out)
    assert len(recs) == 12
    assert sum(1 for x in recs if x["response"].strip()) >= 11
    assert all(x["generator"]["engine"] == "hf" for x in recs)
