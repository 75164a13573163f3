"""The ownership lock of a run directory (selfalign.runlock): one writer, released by the OS.

Rival owners are real processes (a short Python child that takes the lock and waits), since a
``flock`` lock is what other processes see; nothing here loads a model.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfalign import runlock
from selfalign.errors import ModelError, RunError
from selfalign.run import Run
from selfalign.runlock import LockUnsupportedError, RunBusyError, acquire, run_lock

HOLDER = textwrap.dedent("""
    import sys, time
    from selfalign.runlock import acquire
    acquire(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
""")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (runlock.ENV_OWNER, runlock.ENV_UNLOCKED)}
    return {**env, **extra}


@pytest.fixture()
def holder():
    """Start a process that owns a directory; killed (SIGKILL) at the end of the test."""
    procs: list[subprocess.Popen] = []

    def start(root: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env())
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.strip() == "locked", proc.stderr.read()
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def _try_lock(root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Another process asks for the lock: prints 'ok' or 'busy: <message>'."""
    code = textwrap.dedent("""
        import sys
        from selfalign.runlock import acquire, RunBusyError
        try:
            acquire(sys.argv[1])
        except RunBusyError as e:
            print("busy:", e)
        else:
            print("ok")
    """)
    return subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120,
                          env=env or _env())


def test_owner_is_recorded_and_a_rival_is_refused_naming_it(tmp_path, holder):
    root = tmp_path / "runs" / "r"
    proc = holder(root)
    owner = runlock.read_owner(root)
    assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
    assert owner["started_at"].endswith("Z") and str(root) in owner["command"]
    with pytest.raises(RunBusyError) as info:
        acquire(root)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"run directory {root} is owned by another selfalign process: pid {proc.pid} on host {socket.gethostname()}" in msg
    assert f"started {owner['started_at']}" in msg and f"command: {owner['command']}" in msg
    assert "no longer running" not in msg
    assert not runlock.held_here(root)
    assert runlock.read_owner(root) == owner  # the refused rival changed nothing


def test_the_os_releases_the_lock_of_a_killed_owner(tmp_path, holder):
    root = tmp_path / "r"
    proc = holder(root)
    assert _try_lock(root).stdout.startswith("busy:")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert runlock.read_owner(root)["pid"] == proc.pid  # a kill leaves the last owner's line behind ...
    with run_lock(root):  # ... and nothing that blocks the next owner
        assert runlock.read_owner(root)["pid"] == os.getpid()
        assert _try_lock(root).stdout.startswith(f"busy: run directory {root} is owned by another selfalign process: pid {os.getpid()}")
    assert not (root / ".lock").exists()  # a clean release removes the lock file
    assert _try_lock(root).stdout.strip() == "ok"


def test_reentrant_in_one_process_and_tidy_after_release(tmp_path):
    root = tmp_path / "a" / "b" / "run"
    with run_lock(root):
        with run_lock(root):  # the recipe locks again under the CLI's lock
            assert runlock.held_here(root)
        assert runlock.held_here(root)
        assert _try_lock(root).stdout.startswith("busy:")
    assert not runlock.held_here(root)
    assert list(tmp_path.iterdir()) == []  # directories made only for the lock are removed again
    kept = tmp_path / "kept"
    with run_lock(kept):
        (kept / "config.yaml").write_text("x: 1\n")
    assert sorted(p.name for p in kept.iterdir()) == ["config.yaml"]


def test_a_directory_holding_only_a_stale_lock_file_is_a_fresh_run(tmp_path, holder):
    root = tmp_path / "r"
    proc = holder(root)
    proc.kill()  # killed before it wrote anything else: only .lock is left
    proc.wait(timeout=30)
    assert [p.name for p in root.iterdir()] == [".lock"]
    with run_lock(root):
        run = Run.open(root, {"recipe": "x"})
    assert run.stages() == [] and (root / "manifest.json").is_file()


def test_a_forked_child_neither_keeps_nor_drops_the_parents_lock(tmp_path):
    root = tmp_path / "r"
    with run_lock(root):
        pid = os.fork()
        if pid == 0:  # the child: what a fork-started helper might do on its way out
            try:
                with run_lock(root):  # works under the parent's lock, takes nothing
                    pass
                runlock._release(runlock._key(root))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert runlock.held_here(root)
        assert _try_lock(root).stdout.startswith("busy:")  # still ours after the child exited
    assert _try_lock(root).stdout.strip() == "ok"


WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from selfalign import runlock
    root = Path(sys.argv[1])
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")]
    release = runlock.acquire(root)  # under the parent's ownership: takes nothing
    release()
    print(json.dumps({"inherited_lock_fd": any(f.endswith("/.lock") for f in fds),
                      "held_here": runlock.held_here(root), "still_held": runlock._someone_holds(root)}))
""")


def test_training_children_work_under_the_parents_ownership(tmp_path):
    from selfalign.training.launch import run_child

    root = tmp_path / "r"
    lines: list[str] = []
    with run_lock(root):
        owner = json.loads(runlock.owner_env()[runlock.ENV_OWNER])
        assert owner == {"pid": os.getpid(), "dirs": [os.path.realpath(root)]}
        run_child([sys.executable, "-c", WORKER, str(root)], tmp_path / "train.log", lines.append)
        seen = json.loads(lines[-1])
        assert seen == {"inherited_lock_fd": False, "held_here": False, "still_held": True}
        assert runlock.held_here(root)
        assert _try_lock(root).stdout.startswith("busy:")  # the child's exit released nothing
        # a process told it works under this ownership, for a directory it does not name, locks normally
        other = tmp_path / "other"
        assert _try_lock(other, _env(**runlock.owner_env())).stdout.strip() == "ok"
    assert runlock.owner_env() == {}


def test_a_child_whose_owner_is_gone_stops(tmp_path, holder):
    """A child told it works under pid 1's ownership: refused when nobody holds the lock, and when
    someone else (a later run) does."""
    root = tmp_path / "r"
    root.mkdir()
    env = _env(**{runlock.ENV_OWNER: json.dumps({"pid": 1, "dirs": [os.path.realpath(root)]})})
    code = "import sys; from selfalign.runlock import acquire; acquire(sys.argv[1])"
    for case in ("unowned", "owned by another"):
        if case == "owned by another":
            holder(root)
        res = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode != 0, case
        assert "started by pid 1 to work under its ownership" in res.stderr and "no longer holds the run's lock" in res.stderr


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_file_system_without_locks_is_refused_unless_opted_out(tmp_path, monkeypatch, capsys, code):
    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    monkeypatch.delenv(runlock.ENV_UNLOCKED, raising=False)
    root = tmp_path / "runs" / "r"
    with pytest.raises(LockUnsupportedError) as info:
        acquire(root)
    msg = str(info.value)
    assert f"run directory {root}: its file system does not support advisory locks" in msg
    assert os.strerror(code) in msg and "SELFALIGN_UNLOCKED_RUNS=1" in msg
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    monkeypatch.setenv(runlock.ENV_UNLOCKED, "1")
    with run_lock(root):
        pass
    assert "used without its ownership lock" in capsys.readouterr().err


def test_other_lock_errors_are_not_mistaken_for_a_busy_run(tmp_path, monkeypatch):
    def broken(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(runlock.fcntl, "flock", broken)
    with pytest.raises(RunError, match=r"cannot lock .*\.lock \(Input/output error\)"):
        acquire(tmp_path / "r")


def test_a_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunError, match="exists and is not a directory"):
        acquire(tmp_path / "f")


def test_cli_run_is_refused_before_anything_else(tmp_path, holder):
    """``selfalign run`` on an owned directory: exit 2, one line naming the owner, checked before
    the inputs (the model spec here would fail next) and without touching the directory."""
    from selfalign.cli import app

    root = tmp_path / "runs" / "r"
    proc = holder(root)
    before = sorted(p.name for p in root.iterdir())
    args = ["run", "--set", f"runs_dir={tmp_path / 'runs'}", "--set", "name=r", "--set",
            f"model.spec={tmp_path / 'no-such-model'}", "--no-progress"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert out.count("error:") == 1 and len(out.splitlines()) == 1, out
    assert f"run directory {root} is owned by another selfalign process: pid {proc.pid}" in out
    assert "no-such-model" not in out
    assert sorted(p.name for p in root.iterdir()) == before
    proc.kill()
    proc.wait(timeout=30)
    res = CliRunner().invoke(app, args, env={"COLUMNS": "400"})  # the owner is gone: the next check speaks
    assert res.exit_code == 2 and "model.spec" in res.output and "no-such-model" in res.output, res.output


@pytest.mark.parametrize("recipe", ["self_rewarding", "meta_rewarding", "humpback"])
def test_each_recipe_function_takes_the_lock_before_checking_its_inputs(tmp_path, holder, recipe):
    """The Python API (what the CLI calls) owns the run too: a busy directory is refused before the
    model spec (which does not exist here) is even looked at."""
    import importlib

    from selfalign.recipes.config import MetaRewardingConfig, SelfRewardingConfig
    from selfalign.recipes.humpback_config import HumpbackConfig

    config = {"self_rewarding": SelfRewardingConfig, "meta_rewarding": MetaRewardingConfig, "humpback": HumpbackConfig}[recipe]
    cfg = config.model_validate({"runs_dir": str(tmp_path / "runs"), "name": "r", "model": {"spec": str(tmp_path / "nope")}})
    runner = getattr(importlib.import_module(f"selfalign.recipes.{recipe}"), f"run_{recipe}")
    proc = holder(tmp_path / "runs" / "r")
    with pytest.raises(RunBusyError, match=f"pid {proc.pid}"):
        runner(cfg, show_progress=False)
    proc.kill()
    proc.wait(timeout=30)
    with pytest.raises(ModelError, match="model.spec"):  # the owner is gone: the inputs are checked next
        runner(cfg, show_progress=False)
    assert not runlock.held_here(tmp_path / "runs" / "r")  # released on the error
