"""One owner per run directory, end to end: a second ``selfalign run`` is refused at once.

The owner is the real command line (``owner_driver.py``: ``selfalign run`` with scripted text
generation and the tiny random model for SFT and DPO), held still at a point of its run: after
its first SFT checkpoint, in the middle of the judge stage, after its first DPO checkpoint, or in
the judge stage of a ``--restart-from``. While it waits, a second ``selfalign run`` (the
installed command, nothing patched) on the same directory must exit with status 2 and one line
naming the directory and the owner (pid, host, start time, command), leaving every file of the
run as it was; ``selfalign report`` (read-only) works on the run meanwhile. The owner then goes
on, and its results must be byte-identical to those of an undisturbed run. After a ``kill -9``
of the owner, the next ``selfalign run`` takes the lock and resumes.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .harness import child_env, jsonl_files

DRIVER = Path(__file__).with_name("owner_driver.py")
MODELS = ("sft/model/model.safetensors", "iter_1/model/model.safetensors")
STAGES = ["sft", "iter_1/self_instruct", "iter_1/respond", "iter_1/judge", "iter_1/pairs", "iter_1/dpo"]


def _config(tmp: Path, model: Path) -> Path:
    train = {"max_steps": 2, "save_steps": 1, "per_device_batch_size": 2, "max_length": 128, "logging_steps": 1}
    cfg = {
        "recipe": "self_rewarding", "runs_dir": str(tmp / "runs"), "name": "ref", "iterations": 1, "seed": 7,
        "model": {"spec": str(model)},
        "seed_data": {"max_ift": 12, "max_eft": 4},
        "sft": {"enabled": True, "settings": train},
        "self_instruct": {"num_prompts": 4, "batch_size": 4, "max_rounds": 8},
        "respond": {"n": 3, "max_new_tokens": 32},
        "judge": {"k": 2, "scoring": "sampled", "max_new_tokens": 32},
        "dpo": train,
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


class Owner:
    """``selfalign run CFG --set name=NAME`` in a child process, pausing at ``pauses``."""

    def __init__(self, cfg: Path, name: str, pauses=(), extra=()) -> None:
        self.run_dir = cfg.parent / "runs" / name
        n = len(list(cfg.parent.glob(f"{name}-*.log"))) + 1
        self.signals = cfg.parent / f"{name}-{n}.signals"
        self.signals.mkdir()
        self.log_path = cfg.parent / f"{name}-{n}.log"
        self.args = [str(cfg), "--no-progress", "--set", f"name={name}", *extra]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(DRIVER), "--pause", ",".join(pauses), "--signals", str(self.signals), "--", *self.args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**child_env(), "OWNER_RUN_DIR": str(self.run_dir)},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_at(self, point: str, timeout: float = 600) -> dict:
        path = self.signals / f"{point}.reached"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"the owner exited ({self.proc.returncode}) before reaching {point}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the owner did not reach {point} in {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return json.loads(path.read_text())

    def go(self, point: str) -> None:
        (self.signals / f"{point}.go").touch()

    def finish(self, timeout: float = 600) -> None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the owner did not finish in {timeout}s:\n{self.log()}")
        assert rc == 0, self.log()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


def selfalign_run(cfg: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """The installed ``selfalign run`` (nothing patched), as a user would start it."""
    exe = Path(sys.executable).with_name("selfalign")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "selfalign.cli"]
    return subprocess.run([*cmd, "run", str(cfg), "--no-progress", "--set", f"name={name}", *extra],
                          capture_output=True, text=True, timeout=600, env={**child_env(), "COLUMNS": "400"})


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(owner: Owner, cfg: Path, *extra: str) -> str:
    """A second ``selfalign run`` on the owner's directory: exit 2, one line naming the owner, and
    not one byte of the run changed (the owner is paused, so the directory holds still)."""
    before = snapshot(owner.run_dir)
    res = selfalign_run(cfg, owner.run_dir.name, *extra)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    owner_line = json.loads((owner.run_dir / ".lock").read_text())
    assert line.startswith(f"error: run directory {owner.run_dir} is owned by another selfalign process: "
                           f"pid {owner.pid} on host {socket.gethostname()}, started {owner_line['started_at']}, "
                           f"command: selfalign run {' '.join(owner.args)}"), line
    assert "loading" not in res.stderr
    assert snapshot(owner.run_dir) == before, "the refused run changed the owner's files"
    return line


def _report_during_run(owner: Owner, out: Path) -> None:
    exe = Path(sys.executable).with_name("selfalign")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "selfalign.cli"]
    before = snapshot(owner.run_dir)
    res = subprocess.run([*cmd, "report", str(owner.run_dir), "--out", str(out)], capture_output=True, text=True,
                         timeout=600, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "index.html").is_file()
    assert snapshot(owner.run_dir) == before


def assert_same_results(run_dir: Path, ref_dir: Path) -> None:
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert list(stages) == STAGES and all(s["status"] == "done" for s in stages.values()), stages
    assert jsonl_files(run_dir) == jsonl_files(ref_dir)
    for rel in MODELS:
        assert (run_dir / rel).read_bytes() == (ref_dir / rel).read_bytes(), f"{rel} differs from the undisturbed run"
    assert not (run_dir / ".lock").exists()  # the owner released it on its way out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The undisturbed run, and the config every test of this module runs."""
    tmp = tmp_path_factory.mktemp("owner")
    cfg = _config(tmp, tiny_model_dir)
    owner = Owner(cfg, "ref")
    owner.finish()
    assert_same_results(owner.run_dir, owner.run_dir)
    return cfg, owner.run_dir


def test_second_run_is_refused_during_sft_judge_and_dpo(reference):
    cfg, ref_dir = reference
    owner = Owner(cfg, "owned", pauses=["sft", "judge", "dpo"])
    try:
        for point, stage in (("sft", "sft"), ("judge", "iter_1/judge"), ("dpo", "iter_1/dpo")):
            at = owner.wait_at(point)
            assert at["stages"][stage] == "running", at
            assert_refused(owner, cfg)
            if point == "judge":  # a read-only command works on the owned run meanwhile
                _report_during_run(owner, cfg.parent / "report-during-run")
            owner.go(point)
        owner.finish()
    finally:
        owner.kill()
    assert_same_results(owner.run_dir, ref_dir)


def test_refused_during_restart_from_and_after_a_kill_9_the_next_run_resumes(reference):
    """The owner redoes the judge stage and what follows (``--restart-from iter_1/judge``): rivals,
    with or without their own ``--restart-from``, are refused and move nothing aside. Then the
    owner is killed with SIGKILL in DPO: the lock it held is gone with it, and the next plain
    ``selfalign run`` takes over and finishes the run from DPO's last checkpoint."""
    cfg, ref_dir = reference
    run_dir = cfg.parent / "runs" / "restarted"
    shutil.copytree(ref_dir, run_dir)
    owner = Owner(cfg, "restarted", pauses=["judge", "dpo"], extra=["--restart-from", "iter_1/judge"])
    try:
        at = owner.wait_at("judge")
        assert at["stages"]["iter_1/judge"] == "running" and at["stages"]["iter_1/dpo"] == "pending", at
        assert_refused(owner, cfg)
        assert_refused(owner, cfg, "--restart-from", "iter_1/judge")
        assert_refused(owner, cfg, "--restart-from", "iter_1/respond")
        owner.go("judge")
        assert owner.wait_at("dpo")["stages"]["iter_1/dpo"] == "running"
    finally:
        owner.kill()
    assert owner.proc.returncode == -signal.SIGKILL
    assert json.loads((run_dir / ".lock").read_text())["pid"] == owner.pid  # left behind, and harmless
    res = selfalign_run(cfg, "restarted")  # the real command: it needs no generation model to finish
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_results(run_dir, ref_dir)
    training = json.loads((run_dir / "iter_1" / "model" / "training.json").read_text())
    assert training["result"]["resumed_from_step"] == 1  # DPO went on from the killed owner's checkpoint
    stamps = list((run_dir / ".superseded").iterdir())
    assert len(stamps) == 1, stamps  # only the owner's restart moved anything aside
    assert sorted(p.name for p in (stamps[0] / "iter_1").iterdir()) == ["dpo", "judge", "pairs"]
