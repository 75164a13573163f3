"""Kill a driver process at a chosen point, and check what a killed run left on disk.

The crash-resume tests (test_crash_resume.py) start :mod:`driver` in a child process, SIGKILL
it at a seeded random point (:func:`kill_child`), snapshot the run directory, check the state a
kill may leave (:func:`check_killed_state`), finish the run and then check the whole history
(:func:`check_resumed`). Every wait is bounded; a child that exits early or never reaches
its kill point fails the test with its log.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from selfalign.data.records import done_marker_path, is_done, read_done, read_jsonl
from selfalign.errors import DataError

DRIVER = Path(__file__).with_name("driver.py")
SEED = int(os.environ.get("SELFALIGN_CRASH_SEED", "20240508"))
SKIP_DIRS = {".superseded", "report"}


def rng(name: str) -> random.Random:
    """The seeded random source of one test (``SELFALIGN_CRASH_SEED`` changes every kill point)."""
    return random.Random(f"{SEED}:{name}")


def complete_lines(data: bytes) -> bytes:
    """Everything up to and including the last newline: the complete records of a JSONL file."""
    return data[: data.rfind(b"\n") + 1]


def jsonl_files(run_dir: Path) -> dict[str, bytes]:
    """Every ``*.jsonl`` of a run directory (relative path -> content), outside ``.superseded``."""
    out = {}
    for p in sorted(run_dir.rglob("*.jsonl")):
        rel = p.relative_to(run_dir)
        if rel.parts[0] in SKIP_DIRS or any(part.endswith(".checkpoints") or part.startswith(".") for part in rel.parts[:-1]):
            continue
        if rel.parts[-2:-1] and rel.parts[-2] == "model":  # a trained model's train_log.jsonl
            continue
        out[str(rel)] = p.read_bytes()
    return out


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


# --------------------------------------------------------------------------- killing


@dataclass
class Kill:
    """One kill point: where it was aimed, what the child reported, what the disk held after."""

    label: str
    target: str | None  # the run-relative file the kill was aimed at
    marker: dict = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    log: str = ""
    compared: int = 0  # records it left complete, found unchanged after the resume (check_resumed)

    @property
    def records_on_disk(self) -> int:
        return sum(v.count(b"\n") for v in self.files.values())


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kill_child(
    scenario: str,
    run_dir: Path,
    *,
    label: str,
    target: str | None = None,
    hook: dict | None = None,
    until: Callable[[], bool] | None = None,
    after: float = 0.0,
    model: Path | None = None,
    corpus: str | None = None,
    timeout: float = 120.0,
) -> Kill:
    """Run ``driver.py scenario run_dir`` and SIGKILL it at its stopping point.

    With ``hook`` the child stops itself at the armed point and writes a marker file; the kill
    follows at once. With ``until`` the parent kills when ``until()`` turns true, ``after``
    seconds later (the child keeps running meanwhile; a ``slow`` hook paces it). A child that exits on its own first,
    or does not get there within ``timeout`` seconds, fails the test with its log.
    """
    assert hook is not None or until is not None, "give a hook or an until condition"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    n = len(list(run_dir.parent.glob(f"{run_dir.name}.kill-*.log"))) + 1
    log_path = run_dir.parent / f"{run_dir.name}.kill-{n}.log"
    marker = run_dir.parent / f"{run_dir.name}.kill-{n}.marker.json"
    cmd = [sys.executable, str(DRIVER), scenario, str(run_dir)]
    if model is not None:
        cmd += ["--model", str(model)]
    if corpus is not None:
        cmd += ["--corpus", corpus]
    if hook is not None:
        hook = {**hook, "marker": str(marker)}
        if "file" in hook:
            hook["file"] = str(run_dir / hook["file"])
        cmd += ["--hook", json.dumps(hook)]
    reached = until if until is not None else marker.exists
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
    deadline = time.monotonic() + timeout
    try:
        while not reached():
            rc = proc.poll()
            if rc is not None:
                pytest.fail(f"{label}: the child exited (code {rc}) before reaching its kill point\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{label}: the kill point was not reached within {timeout:.0f}s\n{_tail(log_path)}")
            time.sleep(0.005)
        if after:
            time.sleep(after)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"{label}: the child finished (code {proc.returncode}) before the kill landed\n{_tail(log_path)}")
    info = json.loads(marker.read_text()) if marker.exists() else {}
    return Kill(label, target, info, jsonl_files(run_dir), log_path.read_text(errors="replace"))


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return "--- child log (tail) ---\n" + path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no child log)"


def lines_at_least(path: Path, n: int) -> Callable[[], bool]:
    """A kill condition: ``path`` holds at least ``n`` complete records."""

    def check() -> bool:
        try:
            return path.read_bytes().count(b"\n") >= n
        except FileNotFoundError:
            return False

    return check


# --------------------------------------------------------------------------- checks


def check_markers_and_manifest(run_dir: Path) -> dict:
    """What must hold at every moment, killed or not; returns the manifest's stages.

    * every ``.done`` marker matches its file now (records, bytes, sha256): no marker ever
      describes an incomplete or changed output;
    * every stage the manifest calls done has its outputs complete (``.jsonl``: a valid
      ``.done`` marker; a model directory: ``training.json`` present);
    * a stage whose output has no valid marker is not done in the manifest.
    """
    if not (run_dir / "manifest.json").exists():  # killed while the run directory was being created
        assert not jsonl_files(run_dir), f"{run_dir}: stage outputs but no manifest"
        return {}
    stages = manifest(run_dir)["stages"]
    for marker in run_dir.rglob("*.jsonl.done"):
        if marker.relative_to(run_dir).parts[0] in SKIP_DIRS:
            continue
        out = marker.with_name(marker.name[: -len(".done")])
        assert is_done(out), f"{marker} does not match {out} (a .done marker for incomplete output)"
        assert read_done(out)["records"] == out.read_bytes().count(b"\n")
    for name, entry in stages.items():
        assert entry["status"] in ("pending", "running", "done", "failed"), (name, entry["status"])
        if entry["status"] != "done":
            continue
        for rel in entry["outputs"]:
            p = run_dir / rel
            if rel.endswith(".jsonl"):
                assert is_done(p), f"stage {name} is done in the manifest but {rel} is not complete"
            else:
                assert (p / "training.json").is_file(), f"stage {name} is done in the manifest but {rel} is not finished"
    return stages


def check_killed_state(run_dir: Path, kill: Kill) -> None:
    """After a kill: the invariants above, and the target file's tail as DESIGN.md describes it.

    A torn last line (a kill inside a write) is what the strict reader refuses, naming the
    file and the line, and what the tolerant reader (``allow_torn_tail``) skips; the stage
    aimed at is not done.
    """
    stages = check_markers_and_manifest(run_dir)
    if kill.target is None or kill.target not in kill.files:
        return
    path, data = run_dir / kill.target, kill.files[kill.target]
    complete = data.count(b"\n")
    name = kill.target[: -len(".jsonl")]
    if kill.marker.get("kind") != "done_marker" and name in stages:
        assert stages[name]["status"] == "running", f"{name}: {stages[name]['status']} after a kill inside it"
        assert not done_marker_path(path).exists(), f"{kill.target}.done exists while the stage was still writing"
    if kill.marker.get("kind") == "torn":
        assert not data.endswith(b"\n") and len(data) == kill.marker["size_before"] + kill.marker["written"]
        with pytest.raises(DataError, match=rf"{path.name}:{complete + 1}: "):
            list(read_jsonl(path))
        assert len(list(read_jsonl(path, allow_torn_tail=True))) == complete
    elif kill.marker.get("kind") in ("unsynced", "between"):
        assert data.endswith(b"\n") or not data
        assert len(data) == kill.marker["size_before"] + kill.marker["written"]


def check_resumed(run_dir: Path, kills: list[Kill]) -> int:
    """After the final rerun: every stage done and verified, every JSONL valid with unique ids,
    and every record any killed process had written completely is still there, byte for byte,
    at the same place. Returns the number of pre-kill records compared."""
    stages = check_markers_and_manifest(run_dir)
    assert all(e["status"] == "done" for e in stages.values()), {k: e["status"] for k, e in stages.items()}
    final = jsonl_files(run_dir)
    for rel, data in final.items():
        assert data.endswith(b"\n") or not data, f"{rel}: torn tail after the resume"
        records = list(read_jsonl(run_dir / rel))  # strict: valid JSON objects, no duplicate ids
        assert len(records) == data.count(b"\n")
    for kill in kills:
        kill.compared = 0
        for rel, before in kill.files.items():
            prefix = complete_lines(before)
            assert final[rel].startswith(prefix), f"{rel}: records written before kill '{kill.label}' changed or vanished"
            kill.compared += prefix.count(b"\n")
    return sum(k.compared for k in kills)


def same_as_reference(run_dir: Path, ref_dir: Path, rels: list[str]) -> int:
    """Byte-identical outputs of a resumed and an uninterrupted run; returns the records compared."""
    n = 0
    for rel in rels:
        got, want = (run_dir / rel).read_bytes(), (ref_dir / rel).read_bytes()
        assert got == want, f"{rel}: the resumed run's output differs from an uninterrupted run's"
        n += want.count(b"\n") if rel.endswith(".jsonl") else 1
    return n
