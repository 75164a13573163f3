"""Bad input: one clear error naming the file, line and field (or config key), a non-zero exit
code, and nothing written to the run.

Every case runs the real command line (``selfalign run CONFIG`` / ``selfalign generate``) with
typer's CliRunner (a few also as a real subprocess) and compares the run directory byte for
byte before and after. The recipes validate their inputs before they create or touch the run
directory (``selfalign.recipes.preflight``), so none of these cases loads a model: the model
spec is a directory that only has to look like one (a ``config.json``) to pass the model
check, and no case gets past input validation.

Run with ``-rP`` to see the table of kinds and messages (``| kind | message | exit code |``).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfalign.cli import app
from selfalign.data import records
from selfalign.errors import RunError
from selfalign.run import Run

runner = CliRunner()

TESTS = Path(__file__).resolve().parents[1]  # tests/: the shared helpers scripted.py, test_engine_openai.py
if str(TESTS) not in sys.path:  # with or without tests/reliability/__init__.py
    sys.path.insert(0, str(TESTS))

IFT_OK = {"id": "a", "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}


def _jsonl(path: Path, *lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, bytes] | None:
    """Every file under ``root`` (relative path -> bytes); None when ``root`` does not exist."""
    if not root.exists():
        return None
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Case:
    kind: str
    args: list[str]  # CLI arguments
    expect: list[str]  # fragments of the one error message
    watch: Path  # the run directory (or output file's folder) that must not change


def _base_yaml(d: Path, recipe: str = "self_rewarding", extra: str = "") -> str:
    # lines 1-5 are always these, so a key added by ``extra`` starts at line 6
    return f"recipe: {recipe}\nname: bad\nruns_dir: {d / 'runs'}\nmodel:\n  spec: {d / 'model'}\n{extra}"


def _run_case(d: Path, kind: str, expect: list[str], *, recipe: str = "self_rewarding", extra: str = "", sets=()) -> Case:
    """``selfalign run <its own config file>``; ``{cfg}`` in ``expect`` is that file."""
    cfg = d / f"cfg_{sum(1 for _ in d.glob('cfg_*.yaml'))}.yaml"
    cfg.write_text(_base_yaml(d, recipe, extra), encoding="utf-8")
    args = ["run", str(cfg), "--no-progress", *[f"--set={s}" for s in sets]]
    return Case(kind, args, [e.replace("{cfg}", str(cfg)) for e in expect], d / "runs")


def _oasst_flat(*rows) -> list[dict]:
    return [{"message_id": m, "parent_id": p, "role": r, "text": f"text of {m}", "lang": "en", "rank": None} for m, p, r in rows]


def make_cases(d: Path) -> list[Case]:
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{}")  # passes the model check; never loaded by these cases
    ift = d / "ift.jsonl"
    oasst = d / "oasst.jsonl"
    cases = []

    _jsonl(ift, IFT_OK, '{"id": "b", "messages": [{"role": "user", "content": "Hi"}')
    cases.append(_run_case(d, "malformed JSON line", [f"{ift}:2: invalid JSON"], sets=[f"seed_data.ift={ift}"]))

    ift2 = _jsonl(d / "ift_missing.jsonl", IFT_OK, {"id": "b"})
    cases.append(_run_case(d, "missing field", [f"{ift2}:2: field 'messages': missing"], sets=[f"seed_data.ift={ift2}"]))

    ift3 = _jsonl(d / "ift_type.jsonl", IFT_OK, {"id": "b", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 5}]})
    cases.append(_run_case(d, "wrong type", [f"{ift3}:2: field 'messages.1.content': Input should be a valid string (got 5)"],
                           sets=[f"seed_data.ift={ift3}"]))

    empty = d / "empty.jsonl"
    empty.write_bytes(b"")
    cases.append(_run_case(d, "empty file", [f"{empty}: no records (the file is empty)"], sets=[f"seed_data.ift={empty}"]))

    ift4 = _jsonl(d / "ift_role.jsonl", {"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]})
    cases.append(_run_case(d, "unknown role (chat)", [f"{ift4}:1: field 'messages.1.role'", "(got 'bot')"],
                           sets=[f"seed_data.ift={ift4}"]))

    o1 = _jsonl(d / "oasst_role.jsonl", *_oasst_flat(("r", None, "prompter"), ("a", "r", "moderator")))
    cases.append(_run_case(d, "unknown role (OASST)", [f"{o1}:2: field 'role': unknown role 'moderator'"],
                           sets=[f"seed_data.ift=oasst:{o1}"]))

    o2 = _jsonl(oasst, *_oasst_flat(("r", None, "prompter"), ("a", "b", "assistant"), ("b", "a", "prompter")))
    cases.append(_run_case(d, "OASST tree with a cycle", [f"{oasst}:", "field 'parent_id': the parent links form a cycle (a -> b -> a)"],
                           sets=[f"seed_data.ift=oasst:{o2}"]))

    # replies whose parent is not in the file are dropped as orphans (a language-filtered export), not an error;
    # a file of nothing but orphans gives no IFT examples
    o3 = _jsonl(d / "oasst_orphan.jsonl", *_oasst_flat(("c", "zz", "prompter"), ("a", "c", "assistant")))
    cases.append(_run_case(d, "OASST file of orphans only", [f"seed_data.ift='oasst:{o3}' gave no IFT examples"],
                           sets=[f"seed_data.ift=oasst:{o3}"]))

    o4 = _jsonl(d / "oasst_eft.jsonl", *_oasst_flat(("r", None, "prompter"), ("a", "r", "assistant"), ("a", "r", "assistant")))
    cases.append(_run_case(d, "duplicate ids (OASST EFT source)", [f"{o4}:3: field 'message_id': duplicate message id 'a' (first seen at {o4}:2)"],
                           sets=[f"seed_data.eft=oasst:{o4}"]))

    ift5 = _jsonl(d / "ift_dup.jsonl", IFT_OK, {**IFT_OK, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    cases.append(_run_case(d, "duplicate ids (IFT)", [f"{ift5}:2: duplicate id 'a' (first seen on line 1)"], sets=[f"seed_data.ift={ift5}"]))

    prompts = _jsonl(d / "prompts.jsonl", {"id": "p1", "prompt": "one"}, {"id": "p1", "prompt": "two"})
    out = d / "gen" / "out.jsonl"
    cases.append(Case("duplicate ids (prompt file)", ["generate", str(prompts), "--out", str(out), "--engine", "openai",
                                                      "--base-url", "http://127.0.0.1:9/v1", "--no-progress"],
                      [f"{prompts}:2: duplicate prompt id 'p1' (first at {prompts}:1)"], d / "gen"))

    cfg = "{cfg}"
    cases.append(_run_case(d, "YAML config: unknown key", [f"{cfg}:7: respond.temprature: unknown key"],
                           extra="respond:\n  temprature: 0.5\n"))
    cases.append(_run_case(d, "YAML config: wrong value type", [f"{cfg}:7: respond.n: Input should be a valid integer", "(got 'four')"],
                           extra="respond:\n  n: four\n"))
    cases.append(_run_case(d, "out of range: temperature < 0", [f"{cfg}:7: respond.temperature: Input should be greater than or equal to 0 (got -0.5)"],
                           extra="respond:\n  temperature: -0.5\n"))
    cases.append(_run_case(d, "out of range: rho outside [0, 1]", [f"{cfg}:7: length_control.rho: Input should be less than or equal to 1 (got 1.5)"],
                           recipe="meta_rewarding", extra="length_control:\n  rho: 1.5\n"))
    # k as the curation threshold lives on the 1-5 rating scale; judge.k counts judgments (>= 1, no upper bound)
    cases.append(_run_case(d, "out of range: curate.k outside 1-5", [f"{cfg}:7: curate.k: Input should be less than or equal to 5 (got 6)"],
                           recipe="humpback", extra="curate:\n  k: 6\n"))
    cases.append(_run_case(d, "out of range: judge.k < 1", ["judge.k: Input should be greater than or equal to 1 (got 0) (from --set)"],
                           sets=["judge.k=0"]))

    missing_model = d / "no" / "such" / "model"
    cases.append(_run_case(d, "model path does not exist", [f"model.spec: model path does not exist: {missing_model}"],
                           sets=[f"model.spec={missing_model}"]))

    tpl = d / "judge_typo.jinja"
    tpl.write_text("Grade the answer.\n<question>{{ instruction }}</question>\n<response>{{ response }}</response>\nUse {{ rubrik }}.\n")
    cases.append(_run_case(d, "template with an undefined variable",
                           [f"prompt template {tpl}: uses unknown variable(s) rubrik (line 4)"], sets=[f"judge.template={tpl}"]))

    binary = d / "corpus.txt"
    binary.write_bytes(b"A normal first line.\n" + bytes(range(256)) * 4)
    cases.append(_run_case(d, "corpus file that is not text", [f"{binary}: not a text file (a NUL byte at byte 21, line 2)"],
                           recipe="humpback", sets=[f"corpus.source={binary}"]))
    return cases


def _table_row(case: Case, output: str, code: int) -> str:
    msg = " ".join(output.strip().removeprefix("error:").split())
    return f"| {case.kind} | {msg} | {code} |"


def test_each_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path):
    cases = make_cases(tmp_path)
    assert len({c.kind for c in cases}) >= 15
    rows = []
    for case in cases:
        before = snapshot(case.watch)
        res = runner.invoke(app, case.args)
        out = res.output
        assert res.exit_code == 2, f"{case.kind}: exit {res.exit_code}\n{out}"
        assert res.exception is None or isinstance(res.exception, SystemExit), f"{case.kind}: {res.exception!r}"
        assert out.count("error:") == 1 and "Traceback" not in out, f"{case.kind}: {out}"
        for fragment in case.expect:
            assert fragment in out, f"{case.kind}: {fragment!r} not in\n{out}"
        assert snapshot(case.watch) == before, f"{case.kind}: {case.watch} changed"
        rows.append(_table_row(case, out, res.exit_code))
    print("\n| kind | message | exit code |\n|---|---|---|\n" + "\n".join(rows))


@pytest.mark.parametrize("kind", ["malformed JSON line", "YAML config: unknown key", "corpus file that is not text"])
def test_real_subprocess_exit_code_and_stderr(tmp_path, kind):
    """The installed entry point: the message on stderr, nothing on stdout, exit code 2."""
    case = next(c for c in make_cases(tmp_path) if c.kind == kind)
    exe = Path(sys.executable).with_name("selfalign")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "selfalign.cli"]
    proc = subprocess.run([*cmd, *case.args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    for fragment in case.expect:
        assert fragment in proc.stderr, proc.stderr
    assert not case.watch.exists()


def test_bad_input_on_resume_leaves_the_run_unchanged(tmp_path):
    """A run that exists: fixing one input and breaking another must not rewrite config.yaml."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(_base_yaml(tmp_path))
    from selfalign.config import load_config
    from selfalign.recipes.config import SelfRewardingConfig

    run_dir = tmp_path / "runs" / "bad"
    Run.open(run_dir, load_config(SelfRewardingConfig, cfg).model_dump(mode="json"))  # as the recipe opens it
    before = snapshot(run_dir)
    assert set(before) == {"config.yaml", "manifest.json"}
    bad = _jsonl(tmp_path / "ift.jsonl", IFT_OK, "not json")
    res = runner.invoke(app, ["run", str(cfg), f"--set=seed_data.ift={bad}", "--no-progress"])
    assert res.exit_code == 2 and f"{bad}:2: invalid JSON" in res.output, res.output
    assert snapshot(run_dir) == before


def test_incompatible_run_directory_is_refused_untouched(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(_base_yaml(tmp_path))
    run_dir = tmp_path / "runs" / "bad"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("recipe: self_rewarding\n")
    (run_dir / "manifest.json").write_text(json.dumps({"format": 99, "selfalign_version": "9.0.0", "stages": {}}))
    (run_dir / "iter_1").mkdir()
    (run_dir / "iter_1" / "respond.jsonl").write_text('{"id": "x"}\n')
    before = snapshot(run_dir)
    res = runner.invoke(app, ["run", str(cfg), "--no-progress"])
    assert res.exit_code == 2, res.output
    msg = res.output
    assert msg.count("error:") == 1
    assert f"{run_dir / 'manifest.json'}: field 'format'" in msg
    assert "incompatible version (manifest format 99, this selfalign reads 1)" in msg and "selfalign 9.0.0" in msg
    assert snapshot(run_dir) == before
    print(f"\n| run directory from an incompatible version | {' '.join(msg.split()).removeprefix('error: ')} | {res.exit_code} |")


# --------------------------------------------------------------------------- disk full


class _DiskFullFile:
    """A file whose writes put half the bytes on disk and then fail with ENOSPC."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_disk_full_during_generate_keeps_the_previous_records(tmp_path, monkeypatch):
    """``selfalign generate`` extending a finished output when the disk fills up mid-write."""
    import selfalign.engines
    from scripted import ScriptedEngine

    monkeypatch.setattr(selfalign.engines, "create_engine",
                        lambda *a, **k: ScriptedEngine(lambda req, i: f"answer to {req.messages[-1].content} #{i}"))
    prompts = _jsonl(tmp_path / "p.jsonl", *[{"id": f"p{i}", "prompt": f"question {i}"} for i in range(3)])
    out = tmp_path / "out" / "responses.jsonl"
    args = ["generate", str(prompts), "--out", str(out), "--no-progress"]
    first = runner.invoke(app, [*args, "--limit", "2"])
    assert first.exit_code == 0, first.output
    before = snapshot(out.parent)
    assert before[out.name].count(b"\n") == 2

    real_open = open
    monkeypatch.setattr(records, "open", lambda *a, **k: _DiskFullFile(real_open(*a, **k)), raising=False)
    full = runner.invoke(app, args)
    monkeypatch.undo()
    assert full.exit_code == 2, full.output
    assert full.output.count("error:") == 1 and "Traceback" not in full.output
    assert f"{out}: could not write 1 records (No space left on device)" in " ".join(full.output.split())
    after = snapshot(out.parent)
    assert after[out.name] == before[out.name]  # the half-written record was cut off again
    assert after[out.name + ".meta.json"] == before[out.name + ".meta.json"]
    # the completion marker is withdrawn as soon as new records are queued: the output is not complete
    assert out.name + ".done" not in after
    print(f"\n| disk full (simulated) | {' '.join(full.output.split()).removeprefix('error: ')} | {full.exit_code} |")

    # with space again, a rerun completes it: the two earlier records unchanged, one added
    monkeypatch.setattr(selfalign.engines, "create_engine",
                        lambda *a, **k: ScriptedEngine(lambda req, i: f"answer to {req.messages[-1].content} #{i}"))
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    data = out.read_bytes()
    assert data.startswith(before[out.name]) and data.count(b"\n") == 3
    assert records.is_done(out)


def test_disk_full_in_a_stage_keeps_records_and_manifest_byte_identical(tmp_path, monkeypatch):
    """fsync failing with ENOSPC (the page cache took the bytes, the disk could not): the stage
    fails with a clear error, its JSONL and the manifest are exactly as before the failed write."""
    run = Run.open(tmp_path / "run", {"recipe": "x", "stage": {"n": 1}})
    stage = run.stage("iter_1/respond", depends_on=["stage"])
    with pytest.raises(RunError) as info:
        with stage as st:
            w = st.writer(batch_size=100)
            for i in range(5):
                w.write({"id": f"r{i}", "text": f"response {i}"})
            w.flush()
            before = snapshot(run.root)
            assert before["iter_1/respond.jsonl"].count(b"\n") == 5

            def no_space(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(os, "fsync", no_space)
            for i in range(5, 8):
                w.write({"id": f"r{i}", "text": f"response {i}"})
            w.flush()
    monkeypatch.undo()
    message = str(info.value)
    assert "respond.jsonl: could not write 3 records (No space left on device)" in message
    assert "with its 5 complete records" in message
    assert snapshot(run.root) == before  # records, manifest, fingerprint: byte-identical, no temp files

    # the manifest itself: a save that cannot complete leaves the old one in place
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(RunError, match=r"manifest\.json: could not save the run manifest \(No space left on device\)"):
        run.stage("iter_1/judge", depends_on=["stage"]).start()
    monkeypatch.undo()
    assert snapshot(run.root) == before

    # space again: the stage reruns, keeps its 5 records and adds the 3 lost ones
    run = Run.open(tmp_path / "run", {"recipe": "x", "stage": {"n": 1}})
    with run.stage("iter_1/respond", depends_on=["stage"]) as st:
        w = st.writer()
        assert len(w.existing_ids()) == 5
        for i in range(8):
            w.write({"id": f"r{i}", "text": f"response {i}"})
        st.finish({"responses": w.count})
    data = (run.root / "iter_1" / "respond.jsonl").read_bytes()
    assert data.startswith(before["iter_1/respond.jsonl"]) and data.count(b"\n") == 8
