"""JSONL records: stable ids, a validating reader and a crash-safe, resumable writer.

Every stage reads and writes JSON Lines: one JSON object per line, UTF-8, ``\\n`` endings.

* :func:`record_id` derives a short id from everything that defines a record, so a rerun
  computes the same id and :class:`JsonlWriter` can skip records that are already on disk.
* :func:`read_jsonl` streams a file and turns every problem into a :class:`DataError` that
  names the file, the 1-based line and the field; :func:`load_jsonl` reads a whole input
  into a list, so it is fully validated before the caller writes anything.
* :class:`JsonlWriter` appends in fsync'ed batches.  A process killed mid-write leaves at
  most one torn last line; the next writer opened on the file cuts exactly that tail off
  and leaves every complete record byte-for-byte untouched.
* :func:`mark_done` / :func:`is_done` record that an output is complete, together with its
  sha256, so a file changed afterwards no longer counts as done.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from selfalign.config import changed_keys
from selfalign.errors import DataError, RunError

try:  # advisory lock against two writers on one file (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- ids, atomic files


def record_id(*parts: Any) -> str:
    """Stable id: the first 16 hex chars of sha256 over the canonical JSON of ``list(parts)``.

    Pass everything that defines the record (prompt id, sample index, seed, settings...);
    changing any part changes the id.  Parts must be JSON-serialisable.
    """
    blob = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) so a reader sees the old or the new file, never half.

    Writes a temporary file in the same directory, fsyncs it, ``os.replace``s it over the
    target and fsyncs the directory.  Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON (non-ASCII kept as is)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def utc_now() -> str:
    """The current UTC time, ISO 8601 with seconds, e.g. ``2026-05-09T07:35:12+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- reading


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "<record>"
        if e["type"] == "missing":
            parts.append(f"field {field!r}: missing")
            continue
        if e["type"] == "extra_forbidden":
            parts.append(f"field {field!r}: unknown field")
            continue
        msg = e["msg"]
        if e["type"].endswith("_parsing") and ", " in msg:
            msg = msg.split(", ", 1)[0]  # "Input should be a valid integer, unable to parse ..."
        got = e.get("input")
        if isinstance(got, (str, int, float, bool)) or got is None:
            shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
            msg = f"{msg} (got {shown})"
        parts.append(f"field {field!r}: {msg}")
    return "; ".join(parts)


def _open_for_reading(path: Path):
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a JSONL file")
    return path.open("rb")


def read_jsonl(
    path: PathLike,
    schema: type[BaseModel] | None = None,
    *,
    allow_torn_tail: bool = False,
    unique_ids: bool = True,
) -> Iterator[dict | BaseModel]:
    """Stream the records of a JSONL file, one line at a time (the file is never loaded whole).

    Yields dicts, or ``schema`` instances when a pydantic model is given.  Blank lines are
    skipped; every line must hold a JSON object.  Any problem raises :class:`DataError`
    ``"<file>:<line>: <problem>"``: not UTF-8, invalid JSON, not an object, a schema
    violation (each ``field 'a.b': problem``), or - with ``unique_ids`` - a repeated ``id``.
    ``allow_torn_tail`` silently drops a last line that has no newline and does not parse
    (what a killed writer leaves behind).  An empty file yields nothing; see
    :func:`load_jsonl` for inputs that must not be empty.  The errors are raised lazily,
    when iteration reaches them.
    """
    path = Path(path)
    seen: dict[Any, int] = {}
    with _open_for_reading(path) as f:
        for lineno, raw in enumerate(f, start=1):
            torn = not raw.endswith(b"\n")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if torn and allow_torn_tail:
                    return
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                value = json.loads(text.rstrip("\r\n"))  # a syntax error reports its column on this line
            except json.JSONDecodeError as e:
                if torn and allow_torn_tail:
                    return
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(value).__name__}")
            rid = value.get("id")
            if unique_ids and isinstance(rid, (str, int)) and not isinstance(rid, bool):
                if rid in seen:
                    raise DataError(f"{path}:{lineno}: duplicate id {rid!r} (first seen on line {seen[rid]})")
                seen[rid] = lineno
            if schema is None:
                yield value
                continue
            try:
                yield schema.model_validate(value)
            except ValidationError as e:
                raise DataError(f"{path}:{lineno}: {_format_validation_error(e)}") from None


def read_json_list(path: PathLike, what: str = "records") -> list:
    """The list a ``.json`` file holds; :class:`DataError` naming the file (and the line of a
    syntax error) when it is not UTF-8, not JSON, or not a list. A UTF-8 BOM is accepted."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {what} (a .json file must hold a list), got {type(data).__name__}")
    return data


def load_jsonl(path: PathLike, schema: type[BaseModel] | None = None, *, min_records: int = 1) -> list:
    """Read and validate a whole JSONL input before any work starts (see :func:`read_jsonl`).

    Raises :class:`DataError` for a missing file (``file not found``), any bad line, duplicate
    ids, or fewer than ``min_records`` records (``"<file>: no records (the file is empty)"``).
    """
    records = list(read_jsonl(path, schema))
    if len(records) < min_records:
        if not records:
            raise DataError(f"{path}: no records (the file is empty)")
        raise DataError(f"{path}: only {len(records)} records, at least {min_records} needed")
    return records


# --------------------------------------------------------------------------- completion markers


def done_marker_path(path: PathLike) -> Path:
    """``<path>.done``."""
    path = Path(path)
    return path.with_name(path.name + ".done")


def meta_path(path: PathLike) -> Path:
    """``<path>.meta.json``: the fingerprint sidecar of a :class:`JsonlWriter` output."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def _digest(path: Path) -> tuple[str, int, int]:
    """(sha256 hex, number of non-blank lines, bytes) of a JSONL file; refuses a torn tail."""
    h = hashlib.sha256()
    records = size = 0
    with path.open("rb") as f:
        for line in f:
            h.update(line)
            size += len(line)
            if not line.endswith(b"\n"):
                raise RunError(f"{path}: the last line is incomplete (no newline); the file is not finished")
            if line.strip():
                records += 1
    return h.hexdigest(), records, size


_RESERVED = ("records", "sha256", "bytes", "finished_at")


def mark_done(path: PathLike, extra: dict | None = None) -> dict:
    """Write ``<path>.done`` atomically, recording that ``path`` is complete; return its content.

    The marker is ``{records, sha256, bytes, finished_at, **extra}``; ``extra`` may not use
    those four keys.  Call it only after the writer is closed.
    """
    path = Path(path)
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"mark_done: extra keys {clash} are reserved")
    if not path.is_file():
        raise RunError(f"{path}: cannot mark as done, the file does not exist")
    sha, records, size = _digest(path)
    marker = {"records": records, "sha256": sha, "bytes": size, "finished_at": utc_now(), **extra}
    atomic_write_json(done_marker_path(path), marker)
    return marker


def read_done(path: PathLike) -> dict | None:
    """The content of ``<path>.done``, or None if it is missing or unreadable."""
    try:
        marker = json.loads(done_marker_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_done(path: PathLike) -> bool:
    """True only if ``<path>.done`` exists and its size, sha256 and record count match ``path`` now."""
    path = Path(path)
    marker = read_done(path)
    if marker is None or not path.is_file():
        return False
    if marker.get("bytes") != path.stat().st_size:
        return False
    try:
        sha, records, _ = _digest(path)
    except RunError:
        return False
    return sha == marker.get("sha256") and records == marker.get("records")


# --------------------------------------------------------------------------- writer


class JsonlWriter:
    """Append-only, crash-safe writer of one stage output; a rerun resumes where it stopped.

    On open it creates parent directories, checks the fingerprint sidecar, repairs a torn
    tail (see module doc) and reads the ids already present.  ``write`` skips ids already in
    the file, buffers, and every ``batch_size`` records ``flush`` appends the batch with one
    ``write`` call followed by fsync.  Use as a context manager or call :meth:`close`.

    ``fingerprint`` (a JSON-serialisable dict of the settings the output depends on) is
    stored in ``<path>.meta.json`` the first time; reopening with a different one raises
    :class:`RunError` naming the differing keys.  If the jsonl file is missing or empty the
    sidecar is simply replaced; a non-empty file without sidecar adopts the fingerprint.
    """

    def __init__(self, path: PathLike, *, batch_size: int = 16, fingerprint: dict | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.path = Path(path)
        self.batch_size = batch_size
        self._buffer: list[bytes] = []
        self._ids: set[str] = set()
        self._on_disk = 0
        self._done_cleared = False
        self._file = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fp = None if fingerprint is None else json.loads(json.dumps(fingerprint))
        if fp is not None:
            self._check_fingerprint(fp)
        self._file = open(self.path, "ab")
        try:
            self._lock()
            self._repair_and_scan()
            if fp is not None and (self._on_disk == 0 or not meta_path(self.path).exists()):
                atomic_write_json(meta_path(self.path), {"fingerprint": fp})
        except BaseException:
            self._file.close()
            self._file = None
            raise

    # -- opening

    def _check_fingerprint(self, fp: dict) -> None:
        meta = meta_path(self.path)
        if not meta.exists():
            return
        has_records = self.path.is_file() and self.path.stat().st_size > 0
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            if has_records:
                raise RunError(f"{meta}: unreadable fingerprint file; delete {self.path} or choose another output")
            return
        if old == fp or not has_records:
            return
        keys = changed_keys(old, fp) if isinstance(old, dict) else ["<fingerprint>"]
        raise RunError(
            f"{self.path}: the existing output was made with different settings "
            f"(changed: {', '.join(keys) or '<fingerprint>'}); delete the file (and {meta.name}) "
            f"or choose another output"
        )

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunError(f"{self.path}: another writer (in this or another process) has this file open") from None

    def _repair_and_scan(self) -> None:
        """Read existing ids; cut off a torn/invalid tail; refuse corruption before the tail."""
        good_end = 0  # byte offset just past the last complete, valid line
        first_bad: int | None = None
        count = 0
        ids: set[str] = set()
        offset = 0
        with self.path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                offset += len(raw)
                value: Any = None
                ok = raw.endswith(b"\n")
                if ok and raw.strip():
                    try:
                        value = json.loads(raw.decode("utf-8"))
                        ok = isinstance(value, dict)
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        ok = False
                if not ok:
                    first_bad = first_bad or lineno
                    continue
                if first_bad is not None:
                    raise DataError(
                        f"{self.path}:{first_bad}: line is not a valid JSON object but complete records "
                        f"follow it; this is not a torn tail, so it is not repaired automatically"
                    )
                good_end = offset
                if value is not None:
                    count += 1
                    if isinstance(value.get("id"), str):
                        ids.add(value["id"])
        if good_end < offset:
            with self.path.open("r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        self._ids, self._on_disk = ids, count

    # -- public API

    def existing_ids(self) -> set[str]:
        """Ids in the file, including records written (or buffered) by this writer."""
        return set(self._ids)

    def __contains__(self, rid: object) -> bool:
        return rid in self._ids

    @property
    def count(self) -> int:
        """Records in the file once the buffer is flushed (on disk + buffered)."""
        return self._on_disk + len(self._buffer)

    def write(self, record: dict) -> bool:
        """Queue ``record`` (which needs a str ``id``); False if that id is already present."""
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        rid = record.get("id") if isinstance(record, dict) else None
        if not isinstance(rid, str):
            raise ValueError(f"{self.path}: records need a str 'id', got {rid!r}")
        if rid in self._ids:
            return False
        if not self._done_cleared:  # new content: a completion marker would be stale
            marker = done_marker_path(self.path)
            if marker.exists():
                marker.unlink()
                _fsync_dir(marker.parent)
            self._done_cleared = True
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._buffer.append(line.encode("utf-8"))
        self._ids.add(rid)
        if len(self._buffer) >= self.batch_size:
            self.flush()
        return True

    def flush(self) -> None:
        """Append all buffered lines in one ``write`` call, then flush and fsync.

        If the write or the fsync fails (a full disk, a quota, an I/O error), the file is cut
        back to the records it held before this batch, the batch is dropped (its ids are no
        longer counted as present, so a rerun writes them) and :class:`RunError` says so.
        """
        if not self._buffer or self._file is None:
            return
        start = self._file.tell()
        try:
            self._file.write(b"".join(self._buffer))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            lost = len(self._buffer)
            self._undo_batch(start)
            reason = e.strerror or type(e).__name__
            raise RunError(
                f"{self.path}: could not write {lost} records ({reason}); the file is left as it was, "
                f"with its {self._on_disk} complete records. Free space (or fix the error) and rerun to continue."
            ) from None
        self._on_disk += len(self._buffer)
        self._buffer.clear()

    def _undo_batch(self, start: int) -> None:
        """After a failed append: drop the batch and cut the file back to ``start`` bytes."""
        for line in self._buffer:
            self._ids.discard(json.loads(line)["id"])
        self._buffer.clear()
        old, self._file = self._file, None
        try:
            old.close()  # may try (and fail) to flush what is still buffered; the truncate below wins
        except OSError:
            pass
        try:
            with self.path.open("r+b") as f:
                f.truncate(start)
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # a torn tail that could not be cut now is cut by the next writer
            pass
        self._file = open(self.path, "ab")
        self._lock()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            self._file.close()  # also releases the lock
            self._file = None

    def mark_done(self, extra: dict | None = None) -> dict:
        """Close, then :func:`mark_done` the file."""
        self.close()
        return mark_done(self.path, extra)

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
