"""One owner per run directory: the advisory lock a writer of ``runs/<name>/`` holds for its life.

``selfalign run`` (and the recipe functions behind it, ``--restart-from`` and the evaluation
stages included) takes an exclusive lock on ``runs/<name>/.lock`` before it creates or reads
anything in the directory, and before any model is resolved or loaded. A second writer finds
the lock taken and stops at once with :class:`RunBusyError`: one line naming the directory and
the owner (pid, host, start time, command), which the owner wrote into the lock file.

Choices, and why:

- ``flock(2)``, not ``fcntl``/POSIX record locks. A POSIX lock is dropped as soon as the owning
  process closes *any* descriptor of the file (reading the owner line back would release it),
  and it is per process. A ``flock`` lock belongs to the open file description: it lasts until
  the last descriptor of it is closed, so the operating system releases it when the owner dies,
  however it dies (``kill -9`` included): nothing is left to clean up, and the next run takes
  the lock and resumes. The descriptor is opened close-on-exec, so processes the run starts
  (training workers, ``accelerate launch`` ranks, a vLLM server) never hold a copy; a child made
  by a bare ``fork`` shares the lock while it lives, and its exit cannot release it (only an
  explicit unlock could, and :func:`acquire`'s release does nothing outside the owning process).
- Training workers run under their parent's ownership: :func:`owner_env` is put into their
  environment (``SELFALIGN_RUN_OWNER``), and a process that finds its run named there does not
  take the lock itself (and never breaks it); it checks that the lock is still held.
- A clean exit removes ``.lock`` (the owner unlinks it while still holding the lock; a process
  that raced for the old file notices the replaced inode and tries again). A killed owner leaves
  ``.lock`` with its last owner line, which is harmless.
- File systems without working advisory locks (some network or FUSE file systems: ``flock``
  fails with ``ENOLCK``, ``EOPNOTSUPP`` or ``ENOSYS``) are refused with an error that says so,
  never silently run unlocked. ``SELFALIGN_UNLOCKED_RUNS=1`` is the explicit opt-out: the run
  goes on without a lock (and says so on stderr); the user then promises to start one writer.

Read-only commands (``selfalign report``, ``selfalign eval ...`` reading a run) do not lock.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from selfalign.errors import RunError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
ENV_OWNER = "SELFALIGN_RUN_OWNER"  # JSON {"pid": ..., "dirs": [...]}: what a child runs under
ENV_UNLOCKED = "SELFALIGN_UNLOCKED_RUNS"  # "1": run without the lock (file systems without locks)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_COMMAND_CHARS = 300


class RunBusyError(RunError):
    """Another process owns the run directory."""


class LockUnsupportedError(RunError):
    """The run directory's file system has no working advisory locks."""


@dataclass
class _Held:
    fd: int
    root: Path
    pid: int
    depth: int
    created: list[Path]  # directories this process made for the lock (removed again if left empty)


_HELD: dict[str, _Held] = {}
_WARNED: set[str] = set()


def _key(root: Path) -> str:
    return os.path.realpath(os.path.abspath(root))


def lock_path(root: str | os.PathLike) -> Path:
    return Path(root) / LOCK_FILE


@contextmanager
def run_lock(root: str | os.PathLike) -> Iterator[None]:
    """Hold the ownership of run directory ``root`` for the ``with`` block (see :func:`acquire`)."""
    release = acquire(root)
    try:
        yield
    finally:
        release()


def acquire(root: str | os.PathLike) -> Callable[[], None]:
    """Become the owner of ``root`` (created if missing) and return the function that releases it.

    Re-entrant within a process (the recipe functions lock again under the CLI's lock). Raises
    :class:`RunBusyError` when another process owns ``root``, :class:`LockUnsupportedError` when
    its file system cannot lock, :class:`RunError` when it cannot be created.
    """
    root = Path(root)
    key = _key(root)
    held = _HELD.get(key)
    if held is not None:
        if held.pid != os.getpid():  # a forked child: it works under its parent's lock
            return _noop
        held.depth += 1
        return lambda: _release(key)
    if _inherited(key):
        return _noop
    if os.environ.get(ENV_UNLOCKED, "").strip() not in ("", "0"):
        if key not in _WARNED:
            _WARNED.add(key)
            print(f"warning: {ENV_UNLOCKED} is set: run directory {root} is used without its ownership lock; "
                  "make sure no other process writes it", file=sys.stderr, flush=True)
        return _noop
    if fcntl is None:  # pragma: no cover - Windows
        raise LockUnsupportedError(_unsupported(root, "this platform has no flock()"))
    if root.exists() and not root.is_dir():
        raise RunError(f"run directory {root} exists and is not a directory")
    created = _make_dirs(root)
    try:
        fd = _lock(root)
    except BaseException:
        _remove_empty(created)
        raise
    _write_owner(fd)
    _HELD[key] = _Held(fd, root, os.getpid(), 1, created)
    return lambda: _release(key)


def _noop() -> None:
    pass


def held_here(root: str | os.PathLike) -> bool:
    """True when this process owns ``root``."""
    held = _HELD.get(_key(Path(root)))
    return held is not None and held.pid == os.getpid()


def owner_env() -> dict[str, str]:
    """Environment for the child processes of a run (training workers): the runs this process
    owns, so that a child does not try to take their locks itself. Empty when it owns none."""
    dirs = sorted(k for k, h in _HELD.items() if h.pid == os.getpid())
    if not dirs:
        return {}
    return {ENV_OWNER: json.dumps({"pid": os.getpid(), "dirs": dirs})}


def read_owner(root: str | os.PathLike) -> dict | None:
    """The owner line of ``root/.lock`` (the current or, after a kill, the last owner), or None."""
    try:
        return _parse_owner(lock_path(root).read_bytes())
    except OSError:
        return None


def _inherited(key: str) -> bool:
    """True when this process was started by the owner of ``key`` (``ENV_OWNER``) and that owner
    still holds the lock: the child works under it. RunError if the named owner no longer does."""
    raw = os.environ.get(ENV_OWNER)
    if not raw:
        return False
    try:
        info = json.loads(raw)
        pid, dirs = int(info["pid"]), list(info["dirs"])
    except (ValueError, KeyError, TypeError):
        return False
    if key not in dirs or pid == os.getpid():
        return False
    owner = read_owner(key)
    if _someone_holds(Path(key)) and owner is not None and owner.get("pid") == pid:
        return True
    raise RunError(
        f"run directory {key}: this process was started by pid {pid} to work under its ownership of the run, "
        f"but that process no longer holds the run's lock; stopping rather than writing the run unowned"
    )


def _someone_holds(root: Path) -> bool:
    try:
        fd = os.open(lock_path(root), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing the probe's own descriptor drops its shared lock, if it got one
    return False


def _make_dirs(root: Path) -> list[Path]:
    """Create ``root`` and its missing parents; return the ones created, deepest first."""
    missing = []
    p = Path(os.path.abspath(root))
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"run directory {root}: cannot create it ({e.strerror or e})") from None
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; stops mattering at the first one that is not empty
        try:
            d.rmdir()
        except OSError:
            return


def _lock(root: Path) -> int:
    """Open and lock ``root/.lock``; retry when the file was replaced under us (see module doc)."""
    path = lock_path(root)
    for _ in range(50):
        existed = path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the directory was removed by an owner that made it and left
            root.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:
            raise RunError(f"run directory {root}: cannot open its lock file {path} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner_from_fd(fd)
            os.close(fd)
            raise RunBusyError(_busy(root, owner)) from None
        except OSError as e:
            os.close(fd)
            if not existed:  # leave the directory as it was
                path.unlink(missing_ok=True)
            if e.errno in _NO_LOCKS:
                raise LockUnsupportedError(_unsupported(root, f"flock on {path}: {e.strerror or e}")) from None
            raise RunError(f"run directory {root}: cannot lock {path} ({e.strerror or e})") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous owner removed the file it held: lock the new one
    raise RunError(f"run directory {root}: could not lock {path}: it keeps being replaced")


def _write_owner(fd: int) -> None:
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if argv[0] in ("__main__.py", "cli.py"):  # python -m selfalign.cli ...
        argv[0] = "selfalign"
    command = shlex.join(argv)
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 3] + "..."
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command}
    data = (json.dumps(owner, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError:  # a full disk: the lock holds all the same; a rival just cannot name us
        pass


def _owner_from_fd(fd: int) -> dict | None:
    """The owner line of the locked file; the owner writes it right after locking, so an empty
    file is retried for a moment."""
    for _ in range(20):
        try:
            owner = _parse_owner(os.pread(fd, 4096, 0))
        except OSError:
            return None
        if owner is not None:
            return owner
        time.sleep(0.05)
    return None


def _parse_owner(data: bytes) -> dict | None:
    try:
        owner = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return owner if isinstance(owner, dict) and "pid" in owner else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def describe_owner(owner: dict | None) -> str:
    if owner is None:
        return "an unknown process (its lock file names no owner yet)"
    pid, host = owner.get("pid"), owner.get("host", "?")
    gone = ""
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        gone = " (no longer running: a process it started still holds the lock)"
    return (f"pid {pid} on host {host}{gone}, started {owner.get('started_at', '?')}, "
            f"command: {owner.get('command', '?')}")


def _busy(root: Path, owner: dict | None) -> str:
    return (f"run directory {root} is owned by another selfalign process: {describe_owner(owner)}; "
            f"one process writes a run at a time: wait for it to finish (or stop it), then rerun to resume")


def _unsupported(root: Path, why: str) -> str:
    return (f"run directory {root}: its file system does not support advisory locks ({why}), so selfalign "
            f"cannot make sure that only one process writes the run; put runs_dir on a local file system "
            f"(or one with working locks), or set {ENV_UNLOCKED}=1 to run without the lock at your own risk")


def _release(key: str) -> None:
    held = _HELD.get(key)
    if held is None or held.pid != os.getpid():
        return
    held.depth -= 1
    if held.depth > 0:
        return
    del _HELD[key]
    try:  # unlinked while still locked: a rival that opened the old file sees it replaced
        lock_path(held.root).unlink()
    except OSError:
        pass
    os.close(held.fd)  # releases the lock
    _remove_empty(held.created)
