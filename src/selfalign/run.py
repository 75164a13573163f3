"""The run directory and its manifest: what ran, with which settings, and what is finished.

Layout of ``runs/<name>/``::

    config.yaml          the resolved config of the latest open (YAML)
    manifest.json        format, versions, config hash, and one entry per stage (in run order)
    generate.jsonl       output of stage "generate"  (+ .done marker, .meta.json fingerprint)
    iter_1/respond.jsonl output of stage "iter_1/respond"
    iter_1/train/        a directory output (``stage.dir``), e.g. a model
    .superseded/<UTC>/   outputs moved aside by ``--restart-from`` (never deleted)
    .lock                the owner's lock while a writer runs (see :mod:`selfalign.runlock`)

File naming rule: a stage named ``a/b`` writes ``root/a/b.<ext>`` (``stage.path("jsonl")``)
and, for directory outputs, ``root/a/b/`` (``stage.dir``).  A stage's declared ``outputs``
are paths relative to the run root; the default is ``["<name>.jsonl"]``.

Each stage's entry records its ``memory``: the peak resident set of this process during the
stage (``peak_rss_mb``), the peak CUDA allocation (``peak_cuda_mb``, when the GPU was used),
and under ``workers`` the training processes' own peaks (see :mod:`selfalign.memory`).

Each stage declares ``depends_on``: dotted config-key prefixes whose values shape its
outputs.  Reopening a run with a config that changes such a key for a stage that has
already run (done, or partially run) is refused unless the user names a stage to restart
from; that stage and every later one are then moved to ``.superseded`` and redone.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from selfalign import __version__, memory
from selfalign.config import changed_keys, config_hash, flatten
from selfalign.data.records import (
    JsonlWriter,
    atomic_write_json,
    atomic_write_text,
    done_marker_path,
    is_done,
    mark_done,
    meta_path,
    utc_now,
)
from selfalign.errors import RunError
from selfalign.runlock import LOCK_FILE

MANIFEST_FORMAT = 1
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
SUPERSEDED = ".superseded"
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# the temporary file of an atomic write of config.yaml / manifest.json that a kill interrupted
_LEFTOVER = re.compile(r"^\.(?:config\.yaml|manifest\.json)\.[A-Za-z0-9_]+\.tmp$")


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def key_matches(changed: str, prefix: str) -> bool:
    """True if config key ``changed`` lies under ``prefix`` (or is a parent section of it)."""
    return changed == prefix or changed.startswith(prefix + ".") or prefix.startswith(changed + ".")


def _check_stage_name(name: str) -> None:
    parts = name.split("/")
    if not name or any(not _NAME_PART.match(p) or p in (".", "..") for p in parts):
        raise ValueError(f"invalid stage name {name!r}: use path parts of letters, digits, '_', '-', '.'")


def _check_relative(root: Path, rel: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"stage output {rel!r} must be a path relative to the run directory {root}")


class Run:
    """An open run directory.  Create or resume one with :meth:`Run.open`."""

    def __init__(self, root: Path, config: dict, manifest: dict) -> None:
        self.root = root
        self.config = config
        self.manifest = manifest

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, root: str | os.PathLike, config: dict, *, restart_from: str | None = None) -> Run:
        """Create ``root`` for ``config``, or resume it.

        Resuming compares ``config`` with the stored ``config.yaml``.  Changed keys that no
        recorded stage depends on are accepted.  Otherwise :class:`RunError` names the keys
        and stages, unless ``restart_from`` names a recorded stage: that stage and all later
        ones are moved to ``.superseded/<UTC time>/<stage>/`` and dropped from the manifest.
        Everything is checked before anything is written: when this raises, the directory
        is untouched.
        """
        root = Path(root)
        config = json.loads(json.dumps(config))  # plain JSON types only (tuples -> lists)
        manifest_file = root / "manifest.json"
        if not manifest_file.exists() and cls._is_fresh(root):
            if restart_from is not None:
                raise RunError(f"--restart-from {restart_from}: run directory {root} has no stages yet")
            return cls._create(root, config)
        manifest = cls._read_manifest(root)
        old_config = cls._read_config(root)
        changed = changed_keys(old_config, config)
        stages: dict[str, dict] = manifest["stages"]
        order = list(stages)
        affected = [
            name
            for name, entry in stages.items()
            if entry.get("status") != "pending"
            and any(key_matches(k, p) for k in changed for p in entry.get("depends_on", []))
        ]
        reset: list[str] = []
        if restart_from is not None:
            if restart_from not in stages:
                known = ", ".join(order) or "none yet"
                raise RunError(f"--restart-from {restart_from}: no such stage in {root} (known stages: {known})")
            reset = order[order.index(restart_from):]
        remaining = [s for s in affected if s not in reset]
        if remaining:
            keys = [k for k in changed if any(key_matches(k, p) for s in remaining for p in stages[s]["depends_on"])]
            hint = f"pass --restart-from {remaining[0]} to redo it and every later stage"
            if restart_from is not None:
                hint = f"--restart-from {restart_from} is too late: {hint}"
            raise RunError(
                f"run directory {root}: the config changed ({', '.join(keys)}) and that affects stages "
                f"that already ran ({', '.join(remaining)}); {hint}, or use a new run directory"
            )
        cls._remove_leftovers(root)
        run = cls(root, config, manifest)
        if reset:
            run._supersede(reset)
        if changed or reset:
            manifest["config_hash"] = config_hash(config)
            run._save()
            atomic_write_text(root / "config.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        return run

    @staticmethod
    def _is_fresh(root: Path) -> bool:
        """No directory, an empty one, or one interrupted during creation (config.yaml, the
        temporary files of its first config or manifest write and the ownership lock at most)."""
        if not root.exists():
            return True
        if not root.is_dir():
            raise RunError(f"run directory {root} exists and is not a directory")
        return all(p.name in ("config.yaml", LOCK_FILE) or _LEFTOVER.match(p.name) for p in root.iterdir())

    @staticmethod
    def _remove_leftovers(root: Path) -> None:
        """Delete the temporary files of config/manifest writes that a killed process left."""
        for p in root.iterdir():
            if _LEFTOVER.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)

    @classmethod
    def _create(cls, root: Path, config: dict) -> Run:
        root.mkdir(parents=True, exist_ok=True)
        cls._remove_leftovers(root)
        now = utc_now()
        manifest = {
            "format": MANIFEST_FORMAT,
            "selfalign_version": __version__,
            "created_at": now,
            "updated_at": now,
            "config_hash": config_hash(config),
            "packages": _package_versions(),
            "stages": {},
        }
        atomic_write_text(root / "config.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        run = cls(root, config, manifest)
        run._save()  # the manifest last: its presence means the directory is a complete run
        return run

    @staticmethod
    def _read_manifest(root: Path) -> dict:
        path = root / "manifest.json"
        if not path.is_file():
            raise RunError(f"{path}: missing; {root} is not a selfalign run directory (or it is damaged)")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{path}: unreadable manifest ({e})") from None
        if not isinstance(manifest, dict):
            raise RunError(f"{path}: unreadable manifest (not a JSON object)")
        if manifest.get("format") != MANIFEST_FORMAT:
            made_by = manifest.get("selfalign_version")
            raise RunError(
                f"{path}: field 'format': run directory {root} was made by an incompatible version "
                f"(manifest format {manifest.get('format')!r}, this selfalign reads {MANIFEST_FORMAT})"
                + (f"; it was written by selfalign {made_by}" if made_by else "")
                + ". Nothing was changed: use a new run directory, or the selfalign version that made this one"
            )
        if not isinstance(manifest.get("stages"), dict):
            raise RunError(f"{path}: unreadable manifest ('stages' is not a mapping)")
        return manifest

    @staticmethod
    def _read_config(root: Path) -> dict:
        path = root / "config.yaml"
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise RunError(f"{path}: cannot read the run's recorded config ({e})") from None
        return data if isinstance(data, dict) else {}

    def _supersede(self, names: list[str]) -> None:
        """Move the outputs of ``names`` to ``.superseded/<UTC>/<stage>/`` and drop their entries."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        base = self.root / SUPERSEDED / stamp
        n = 1
        while base.exists():
            n += 1
            base = self.root / SUPERSEDED / f"{stamp}-{n}"
        for name in names:
            entry = self.manifest["stages"].pop(name)
            for rel in entry.get("outputs", []):
                src = self.root / rel
                for p in (src, done_marker_path(src), meta_path(src)):
                    if p.exists() or p.is_symlink():
                        dest = base / name / p.name
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(str(p), str(dest))

    # ------------------------------------------------------------------ manifest

    def _save(self) -> None:
        self.manifest["updated_at"] = utc_now()
        path = self.root / "manifest.json"
        try:
            atomic_write_json(path, self.manifest)
        except OSError as e:  # a full disk, a quota, a read-only file system...
            raise RunError(
                f"{path}: could not save the run manifest ({e.strerror or type(e).__name__}); "
                f"the previous manifest is kept unchanged. Free space (or fix the error) and rerun to continue."
            ) from None

    def stages(self) -> list[str]:
        """Names of the stages recorded in the manifest, in run order."""
        return list(self.manifest["stages"])

    def stage(self, name: str, depends_on: list[str], outputs: list[str] | None = None) -> Stage:
        """The stage ``name`` (e.g. ``"generate"`` or ``"iter_1/respond"``).

        ``depends_on``: config-key prefixes its outputs depend on.  ``outputs``: paths
        relative to the run root (default ``["<name>.jsonl"]``).  A new stage is added to
        the manifest (in memory) as "pending"; it is persisted when it starts.
        """
        _check_stage_name(name)
        outputs = list(outputs) if outputs is not None else [f"{name}.jsonl"]
        for rel in outputs:
            _check_relative(self.root, rel)
        if name not in self.manifest["stages"]:
            self.manifest["stages"][name] = {
                "status": "pending",
                "depends_on": list(depends_on),
                "outputs": outputs,
                "started_at": None,
                "ended_at": None,
                "seconds": None,
                "counts": {},
                "error": None,
            }
        return Stage(self, name, list(depends_on), outputs)


class Stage:
    """One step of a run.  ``with run.stage(...) as st:`` starts it, finishes it on success
    (with empty counts if :meth:`finish` was not called) and records the error on failure."""

    def __init__(self, run: Run, name: str, depends_on: list[str], outputs: list[str]) -> None:
        self.run = run
        self.name = name
        self.depends_on = depends_on
        self.outputs = outputs
        self._started: float | None = None
        self._finished = False
        self._writers: list[JsonlWriter] = []

    @property
    def entry(self) -> dict:
        return self.run.manifest["stages"][self.name]

    @property
    def status(self) -> str:
        return self.entry["status"]

    @property
    def dir(self) -> Path:
        """``root/<name>``: the place for a directory output (not created here)."""
        return self.run.root / self.name

    def path(self, ext: str = "jsonl") -> Path:
        """``root/<name>.<ext>``, e.g. ``root/iter_1/respond.jsonl`` for ``iter_1/respond``."""
        return self.run.root / f"{self.name}.{ext.lstrip('.')}"

    def fingerprint(self) -> dict:
        """The config values under this stage's ``depends_on`` prefixes (flattened)."""
        flat = flatten(self.run.config)
        return {k: v for k, v in sorted(flat.items()) if any(key_matches(k, p) for p in self.depends_on)}

    @property
    def done(self) -> bool:
        """Manifest says done, the outputs are the declared ones, and each one verifies
        (``.jsonl``: its ``.done`` marker matches the file; otherwise: it exists)."""
        entry = self.entry
        if entry.get("status") != "done" or entry.get("outputs") != self.outputs:
            return False
        for rel in self.outputs:
            p = self.run.root / rel
            if not (is_done(p) if rel.endswith(".jsonl") else p.exists()):
                return False
        return True

    def writer(self, **kw: Any) -> JsonlWriter:
        """A :class:`JsonlWriter` on the first ``.jsonl`` output; by default fingerprinted with
        :meth:`fingerprint`.  Writers made here are closed by :meth:`finish`."""
        jsonl = [rel for rel in self.outputs if rel.endswith(".jsonl")]
        if not jsonl:
            raise ValueError(f"stage {self.name} declares no .jsonl output ({self.outputs})")
        kw.setdefault("fingerprint", self.fingerprint())
        w = JsonlWriter(self.run.root / jsonl[0], **kw)
        self._writers.append(w)
        return w

    def start(self) -> Stage:
        """Mark the stage running (persisted) and create its directory."""
        (self.run.root / self.name).parent.mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        self._finished = False
        memory.start()
        self.entry.update(
            status="running", depends_on=self.depends_on, outputs=self.outputs,
            started_at=utc_now(), ended_at=None, seconds=None, counts={}, error=None,
        )
        self.run._save()
        return self

    def finish(self, counts: dict | None = None) -> None:
        """Close this stage's writers, mark every ``.jsonl`` output done, record status done."""
        counts = dict(counts or {})
        for w in self._writers:
            w.close()
        self._writers.clear()
        for rel in self.outputs:
            if rel.endswith(".jsonl"):
                p = self.run.root / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch(exist_ok=True)  # a stage that produced nothing still has an (empty) output
                mark_done(p, {"stage": self.name, "counts": counts})
        self._end("done", counts=counts, error=None, memory=memory.stage_peak())
        self._finished = True

    def fail(self, error: str) -> None:
        """Close this stage's writers (keeping what they wrote) and record status failed."""
        for w in self._writers:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - recording the original failure matters more
                pass
        self._writers.clear()
        self._end("failed", error=error, memory=memory.stage_peak())

    def _end(self, status: str, **fields: Any) -> None:
        started = self._started
        seconds = round(time.time() - started, 3) if started is not None else None
        self.entry.update(status=status, ended_at=utc_now(), seconds=seconds, **fields)
        if status != "failed":
            self.run._save()
            return
        try:
            self.run._save()
        except RunError:  # e.g. the disk is full: the error being recorded matters more; the
            pass  # manifest on disk keeps its previous, complete content (atomic writes)

    def __enter__(self) -> Stage:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            if not self._finished:
                self.finish({})
        elif isinstance(exc, Exception):
            self.fail(str(exc) or type(exc).__name__)
        else:
            self.fail(f"interrupted ({type(exc).__name__})")
        return False
