"""Reading a run directory for the report: ``load_run(run_dir)`` -> :class:`RunData`.

It reads what a run directory holds *now* - finished, failed, killed mid-iteration or still
running.  Each piece is optional (what is missing is left out, never an error):

* ``manifest.json`` (required: it is what makes a directory a run), ``config.yaml``,
  ``seed_data.json``, ``corpus.json``
* per iteration ``iter_<t>/``: ``metrics.json`` (every key is shown, whatever the recipe),
  ``respond.jsonl`` (``completion_tokens``), ``judge.jsonl`` (``response_id``, ``score``,
  ``parse_error``), ``pairs.jsonl`` / ``actor_pairs.jsonl``, ``meta_judge.jsonl``,
  ``model/training.json`` (or the checkpoints of a training still running)
* any ``training.json`` of a model directory (``sft/model``, ``iter_<t>/model``, ...)
* evaluation results ``eval_*.json`` in the run directory or one level below, recognised by
  their ``kind`` (``judge_agreement``, ``winrate``) or their name (``eval_judge*``,
  ``eval_winrate*``)

JSONL files are streamed; lines that do not parse (the torn tail a killed writer leaves) are
skipped.  Nothing here draws or renders: :mod:`selfalign.report.figures` and
:mod:`selfalign.report.html` do.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from selfalign.errors import RunError

REPORT_DIR = "report"
MAX_TEXT = 2000  # characters of a prompt / response / judgment shown in the examples
_ITER_DIR = re.compile(r"^iter_(\d+)$")
_SKIP_DIRS = {REPORT_DIR, ".superseded"}


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (partial runs)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _read_yaml(path: Path) -> tuple[dict, str | None]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}, None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    return (data if isinstance(data, dict) else {}), text


def _jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of ``path``, skipping lines that do not parse; nothing if it is missing."""
    try:
        f = path.open("rb")
    except OSError:
        return
    with f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_time(s: Any) -> datetime | None:
    if not isinstance(s, str):
        return None
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _error_kind(err: Any) -> str:
    return str(err or "unknown").split(":")[0].strip() or "unknown"


def _messages_text(m: Any) -> str:
    """A message list as "role: content" lines (a plain string as is)."""
    if isinstance(m, str):
        return m
    if isinstance(m, list):
        parts = []
        for msg in m:
            if isinstance(msg, dict):
                parts.append(f"[{msg.get('role', '?')}] {msg.get('content', '')}")
            else:
                parts.append(str(msg))
        return "\n".join(parts)
    return "" if m is None else json.dumps(m, ensure_ascii=False)


def clip(text: Any, limit: int = MAX_TEXT) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[:limit] + f" … [{len(s) - limit} more characters]"


def _history(training_json: Path) -> list[dict] | None:
    info = _read_json(training_json)
    if not isinstance(info, dict):
        return None
    result = info.get("result", info)
    hist = result.get("history") if isinstance(result, dict) else None
    return [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else None


def _checkpoint_history(model_dir: Path) -> list[dict] | None:
    """The log history of the latest checkpoint of a training still running (or killed)."""
    ckpts = model_dir.parent / (model_dir.name + ".checkpoints")
    best: tuple[int, Path] | None = None
    try:
        for p in ckpts.iterdir():
            m = re.match(r"^checkpoint-(\d+)$", p.name)
            if m and (p / "trainer_state.json").is_file() and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), p)
    except OSError:
        return None
    if best is None:
        return None
    state = _read_json(best[1] / "trainer_state.json")
    hist = state.get("log_history") if isinstance(state, dict) else None
    return [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else None


# --------------------------------------------------------------------------- the run's data


@dataclass
class IterationData:
    """What one ``iter_<t>/`` directory holds (collected from every file that exists)."""

    t: int
    dir: Path
    metrics: dict | None = None
    stages: dict[str, dict] = field(default_factory=dict)  # short stage name -> manifest entry
    judgment_scores: list[float] = field(default_factory=list)
    response_rewards: list[float] = field(default_factory=list)
    judgments: int = 0
    parse_errors: Counter = field(default_factory=Counter)
    lengths: list[float] = field(default_factory=list)
    responses: int = 0
    pairs_kept: int | None = None
    pairs_dropped: dict = field(default_factory=dict)
    judge_pairs_kept: int | None = None
    judge_pairs_dropped: dict = field(default_factory=dict)
    meta_comparisons: int = 0
    meta_parse_failures: int = 0
    example: dict | None = None
    parse_failure_example: dict | None = None
    judge_file: str = "judge.jsonl"

    @property
    def label(self) -> str:
        return f"iter {self.t}"

    @property
    def complete(self) -> bool:
        return isinstance(self.metrics, dict)

    @property
    def state(self) -> str:
        """finished / failed / running or interrupted / incomplete."""
        if any(e.get("status") == "failed" for e in self.stages.values()):
            return "failed"
        if self.complete:
            return "finished"
        if any(e.get("status") == "running" for e in self.stages.values()):
            return "running or interrupted"
        return "incomplete"


@dataclass
class RunData:
    root: Path
    manifest: dict
    config: dict
    config_text: str | None
    seed_data: dict | None
    corpus: dict | None
    iterations: list[IterationData]
    trainings: list[tuple[str, list[dict], bool]]  # (label, history, finished)
    judge_evals: list[tuple[str, dict]]
    winrate_evals: list[tuple[str, dict]]


def _iteration_numbers(root: Path, stages: dict) -> list[int]:
    nums = set()
    try:
        for p in root.iterdir():
            m = _ITER_DIR.match(p.name)
            if m and p.is_dir():
                nums.add(int(m.group(1)))
    except OSError:
        pass
    for name in stages:
        m = _ITER_DIR.match(name.split("/")[0])
        if m:
            nums.add(int(m.group(1)))
    return sorted(nums)


def _load_iteration(root: Path, t: int, stages: dict) -> IterationData:
    d = root / f"iter_{t}"
    it = IterationData(t=t, dir=d)
    prefix = f"iter_{t}/"
    it.stages = {name[len(prefix):]: e for name, e in stages.items() if name.startswith(prefix) and isinstance(e, dict)}
    metrics = _read_json(d / "metrics.json")
    it.metrics = metrics if isinstance(metrics, dict) else None
    m = it.metrics or {}

    for r in _jsonl(d / "respond.jsonl"):
        it.responses += 1
        if is_number(r.get("completion_tokens")):
            it.lengths.append(float(r["completion_tokens"]))

    # pairs first, so the judge pass can pick up the example pair's judgments
    pairs_file = next((d / n for n in ("pairs.jsonl", "actor_pairs.jsonl") if (d / n).exists()), None)
    n_pairs, it.example = _example_pair(_jsonl(pairs_file)) if pairs_file else (0, None)
    counts_stage = next((it.stages[n] for n in ("pairs", "actor_pairs") if n in it.stages), {})
    counts = counts_stage.get("counts") if isinstance(counts_stage.get("counts"), dict) else {}
    if is_number(m.get("pairs")):
        it.pairs_kept = int(m["pairs"])
    elif is_number(counts.get("pairs")):
        it.pairs_kept = int(counts["pairs"])
    elif pairs_file is not None:
        it.pairs_kept = n_pairs
    dropped = m.get("pairs_dropped") if isinstance(m.get("pairs_dropped"), dict) else counts.get("dropped")
    it.pairs_dropped = {str(k): v for k, v in (dropped or {}).items() if is_number(v)}

    meta_counts = it.stages.get("meta_judge", {}).get("counts") or {}
    jp = m.get("judge_pairs") if "judge_pairs" in m else meta_counts.get("judge_pairs")
    if is_number(jp):
        it.judge_pairs_kept = int(jp)
    elif (d / "judge_pairs.jsonl").exists():
        it.judge_pairs_kept = sum(1 for _ in _jsonl(d / "judge_pairs.jsonl"))
    jd = m.get("judge_pairs_dropped") if isinstance(m.get("judge_pairs_dropped"), dict) else meta_counts.get("dropped")
    it.judge_pairs_dropped = {str(k): v for k, v in (jd or {}).items() if is_number(v)}

    wanted = {}
    if it.example:
        wanted = {it.example.get("chosen_id"): "chosen", it.example.get("rejected_id"): "rejected"}
        wanted.pop(None, None)
    per_response: dict[str, list[float]] = {}
    # the judge's records (Self-/Meta-Rewarding), or Humpback's self-curation ratings (same layout)
    judge_file = next((d / n for n in ("judge.jsonl", "curate.jsonl") if (d / n).exists()), d / "judge.jsonl")
    it.judge_file = judge_file.name
    for j in _jsonl(judge_file):
        it.judgments += 1
        if j.get("parse_error"):
            it.parse_errors[_error_kind(j["parse_error"])] += 1
            if it.parse_failure_example is None:
                it.parse_failure_example = {"error": str(j["parse_error"]), "output": clip(j.get("judge_output")),
                                            "score": j.get("score")}
        score = j.get("score")
        if is_number(score):
            it.judgment_scores.append(float(score))
            rid = j.get("response_id")
            if isinstance(rid, str):
                per_response.setdefault(rid, []).append(float(score))
        role = wanted.get(j.get("response_id"))
        if role and it.example is not None and f"{role}_judgment" not in it.example:
            it.example[f"{role}_judgment"] = clip(j.get("judge_output"))
            it.example[f"{role}_judgment_score"] = score
    it.response_rewards = [statistics.fmean(v) for v in per_response.values()]

    for c in _jsonl(d / "meta_judge.jsonl"):
        it.meta_comparisons += 1
        if c.get("parse_error"):
            it.meta_parse_failures += 1
    return it


def _example_pair(pairs: Iterator[dict]) -> tuple[int, dict | None]:
    """The number of pairs and the one with the largest reward gap, as display text (streamed)."""
    best, gap, n = None, -math.inf, 0
    for p in pairs:
        n += 1
        cs, rs = p.get("chosen_score"), p.get("rejected_score")
        g = cs - rs if is_number(cs) and is_number(rs) else -1e300
        if best is None or g > gap:
            best, gap = p, g
    if best is None:
        return n, None
    return n, {
        "prompt": clip(_messages_text(best.get("prompt"))),
        "chosen": clip(_messages_text(best.get("chosen"))),
        "rejected": clip(_messages_text(best.get("rejected"))),
        "chosen_score": best.get("chosen_score"),
        "rejected_score": best.get("rejected_score"),
        "chosen_id": best.get("chosen_id"),
        "rejected_id": best.get("rejected_id"),
    }


def _model_dirs(root: Path) -> list[tuple[str, Path]]:
    """Model directories with a ``training.json`` (or training checkpoints): sft first, then iterations."""
    found: dict[Path, str] = {}
    for pattern in ("*/training.json", "*/*/training.json", "*/*.checkpoints", "*/*/*.checkpoints"):
        for p in root.glob(pattern):
            rel = p.relative_to(root)
            if rel.parts[0] in _SKIP_DIRS or rel.parts[0].startswith("."):
                continue
            model = p.parent if p.name == "training.json" else p.with_name(p.name[: -len(".checkpoints")])
            found.setdefault(model, "/".join(model.relative_to(root).parts))

    def label(rel: str) -> str:
        parts = rel.split("/")
        m = _ITER_DIR.match(parts[0])
        if m and parts[1:] == ["model"]:
            return f"iter {m.group(1)}"
        if parts[1:] == ["model"]:
            return parts[0]
        return rel

    def order(item):
        rel = item[1]
        m = _ITER_DIR.match(rel.split("/")[0])
        return (0 if rel.startswith("sft/") else 1 if m else 2, int(m.group(1)) if m else 0, rel)

    return [(label(rel), model) for model, rel in sorted(found.items(), key=order)]


def _classify(p: Path, label: str, data: Any, judge: list, win: list) -> bool:
    """Add an evaluation result to ``judge`` or ``win`` by its ``kind`` (or, without one, its file
    name ``eval_judge*`` / ``eval_winrate*``); False if it is neither."""
    if not isinstance(data, dict):
        return False
    kind = str(data.get("kind") or "")
    if kind == "judge_agreement" or (not kind and p.name.startswith("eval_judge")):
        judge.append((label, data))
    elif kind == "winrate" or (not kind and p.name.startswith("eval_winrate")):
        win.append((label, data))
    else:
        return False
    return True


def _extra_evaluations(paths, judge: list, win: list) -> None:
    """Evaluation results named by the user (``--eval``): a JSON file, or a folder with summary.json."""
    for given in paths:
        p = Path(given)
        f = p / "summary.json" if p.is_dir() else p
        label = p.name if p.is_dir() else (p.parent.name if p.name == "summary.json" else p.stem)
        if not f.is_file():
            raise RunError(f"--eval {given}: no such file (give an evaluation's summary.json or the folder that holds it)")
        if not _classify(f, label, _read_json(f), judge, win):
            raise RunError(f"--eval {given}: {f} is not a judge-agreement or win-rate result "
                           "(expected the summary.json of selfalign eval judge or selfalign eval winrate)")


def _evaluations(root: Path) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    judge, win = [], []
    files = set(root.glob("eval_*.json")) | set(root.glob("*/eval_*.json")) | set(root.glob("eval/*.json"))
    # the folders ``selfalign eval judge|winrate --out`` write (summary.json), placed inside the run
    files |= set(root.glob("*/summary.json")) | set(root.glob("*/*/summary.json"))

    def order(p: Path):
        rel = p.relative_to(root)
        m = _ITER_DIR.match(rel.parts[0]) if len(rel.parts) > 1 else None
        return (int(m.group(1)) if m else -1 if len(rel.parts) > 1 else -2, str(rel))

    for p in sorted(files, key=order):
        rel = p.relative_to(root)
        if rel.parts[0] in _SKIP_DIRS:
            continue
        label = "/".join((rel.parent if p.name == "summary.json" else rel.with_suffix("")).parts)
        _classify(p, label, _read_json(p), judge, win)
    return judge, win


def load_run(run_dir: Path, evals: Sequence[Path] = ()) -> RunData:
    """Everything the report shows; RunError if ``run_dir`` is not a run directory.

    ``evals``: evaluation results kept outside the run (``summary.json`` files, or their folders)."""
    root = Path(run_dir)
    if not root.exists():
        raise RunError(f"{root}: no such directory; pass a run directory such as runs/<name>")
    if not root.is_dir():
        raise RunError(f"{root} is not a directory; pass a run directory such as runs/<name>")
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise RunError(f"{root} is not a selfalign run directory (it has no manifest.json); pass a directory such as runs/<name>")
    manifest = _read_json(mpath)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
        raise RunError(f"{mpath}: unreadable manifest (not the JSON object a run writes)")
    manifest.setdefault("stages", {})
    config, config_text = _read_yaml(root / "config.yaml")
    stages = manifest["stages"]
    iterations = [_load_iteration(root, t, stages) for t in _iteration_numbers(root, stages)]
    trainings = []
    for label, model in _model_dirs(root):
        hist = _history(model / "training.json")
        finished = hist is not None
        if hist is None:
            hist = _checkpoint_history(model)
        if hist:
            trainings.append((label if finished else f"{label} (in progress)", hist, finished))
    judge_evals, winrate_evals = _evaluations(root)
    _extra_evaluations(evals, judge_evals, winrate_evals)
    seed = _read_json(root / "seed_data.json")
    corpus = _read_json(root / "corpus.json")
    return RunData(
        root=root, manifest=manifest, config=config, config_text=config_text,
        seed_data=seed if isinstance(seed, dict) else None, corpus=corpus if isinstance(corpus, dict) else None,
        iterations=iterations, trainings=trainings, judge_evals=judge_evals, winrate_evals=winrate_evals,
    )
