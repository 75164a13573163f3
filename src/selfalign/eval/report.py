"""The run report: one self-contained HTML page (plus the PNGs it embeds) for any run.

``write_report(run_dir)`` reads what a run directory holds *now* - finished, failed, killed
mid-iteration or still running - and writes ``run_dir/report/index.html`` and
``run_dir/report/*.png``.  The page works offline: every figure is embedded as a base64
``data:`` URI (the PNG files next to it are the same figures, for slides and diffs).

What it reads (each piece is optional; what is missing is left out, never an error):

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
skipped.  All text taken from the run is HTML-escaped by the template (jinja2 autoescape).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from selfalign.errors import RunError

REPORT_DIR = "report"
TEMPLATE = "report.html.jinja"
# figures this module may write; stale ones (from an earlier report) are removed
FIGURES = ("scores", "pairs", "curation", "parse_failures", "lengths", "training", "judge_agreement", "winrate", "corpus",
           "trends", "ifeval")
MAX_TEXT = 2000  # characters of a prompt / response / judgment shown in the examples
_ITER_DIR = re.compile(r"^iter_(\d+)$")
_SKIP_DIRS = {REPORT_DIR, ".superseded"}


# --------------------------------------------------------------------------- reading


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


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_time(s: Any) -> datetime | None:
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


def _clip(text: Any, limit: int = MAX_TEXT) -> str:
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
        if _num(r.get("completion_tokens")):
            it.lengths.append(float(r["completion_tokens"]))

    # pairs first, so the judge pass can pick up the example pair's judgments
    pairs_file = next((d / n for n in ("pairs.jsonl", "actor_pairs.jsonl") if (d / n).exists()), None)
    n_pairs, it.example = _example_pair(_jsonl(pairs_file)) if pairs_file else (0, None)
    counts_stage = next((it.stages[n] for n in ("pairs", "actor_pairs") if n in it.stages), {})
    counts = counts_stage.get("counts") if isinstance(counts_stage.get("counts"), dict) else {}
    if _num(m.get("pairs")):
        it.pairs_kept = int(m["pairs"])
    elif _num(counts.get("pairs")):
        it.pairs_kept = int(counts["pairs"])
    elif pairs_file is not None:
        it.pairs_kept = n_pairs
    dropped = m.get("pairs_dropped") if isinstance(m.get("pairs_dropped"), dict) else counts.get("dropped")
    it.pairs_dropped = {str(k): v for k, v in (dropped or {}).items() if _num(v)}

    meta_counts = it.stages.get("meta_judge", {}).get("counts") or {}
    jp = m.get("judge_pairs") if "judge_pairs" in m else meta_counts.get("judge_pairs")
    if _num(jp):
        it.judge_pairs_kept = int(jp)
    elif (d / "judge_pairs.jsonl").exists():
        it.judge_pairs_kept = sum(1 for _ in _jsonl(d / "judge_pairs.jsonl"))
    jd = m.get("judge_pairs_dropped") if isinstance(m.get("judge_pairs_dropped"), dict) else meta_counts.get("dropped")
    it.judge_pairs_dropped = {str(k): v for k, v in (jd or {}).items() if _num(v)}

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
                it.parse_failure_example = {"error": str(j["parse_error"]), "output": _clip(j.get("judge_output")),
                                            "score": j.get("score")}
        score = j.get("score")
        if _num(score):
            it.judgment_scores.append(float(score))
            rid = j.get("response_id")
            if isinstance(rid, str):
                per_response.setdefault(rid, []).append(float(score))
        role = wanted.get(j.get("response_id"))
        if role and it.example is not None and f"{role}_judgment" not in it.example:
            it.example[f"{role}_judgment"] = _clip(j.get("judge_output"))
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
        g = cs - rs if _num(cs) and _num(rs) else -1e300
        if best is None or g > gap:
            best, gap = p, g
    if best is None:
        return n, None
    return n, {
        "prompt": _clip(_messages_text(best.get("prompt"))),
        "chosen": _clip(_messages_text(best.get("chosen"))),
        "rejected": _clip(_messages_text(best.get("rejected"))),
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


# --------------------------------------------------------------------------- formatting


def fmt_value(v: Any) -> str:
    """A scalar as table text: '–' for missing, 4 significant digits for floats."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == int(v) and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return _clip(json.dumps(v, ensure_ascii=False, default=str), 300)
    return _clip(v, 300)


def fmt_cell(v: Any) -> dict:
    """A metrics-table cell: ``{"text": ...}`` or ``{"kv": [(key, value), ...]}`` for a dict."""
    if isinstance(v, dict):
        if not v:
            return {"text": "none"}
        items = list(v.items())
        if all(_is_number_text(k) for k, _ in items):  # histogram buckets in numeric order
            items.sort(key=lambda kv: float(kv[0]))
        return {"kv": [(str(k), fmt_value(x)) for k, x in items]}
    return {"text": fmt_value(v)}


def _is_number_text(k: Any) -> bool:
    try:
        float(k)
    except (TypeError, ValueError):
        return False
    return True


def fmt_duration(seconds: Any) -> str:
    if not _num(seconds):
        return "–"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_counts(counts: Any) -> str:
    if not isinstance(counts, dict) or not counts:
        return ""
    parts = []
    for k, v in counts.items():
        if isinstance(v, dict):
            inner = ", ".join(f"{a}: {fmt_value(b)}" for a, b in v.items())
            parts.append(f"{k}: {{{inner}}}")
        else:
            parts.append(f"{k}: {fmt_value(v)}")
    return _clip("; ".join(parts), 400)


def _with_ci(metrics: dict, name: str) -> str:
    """A metric's value, followed by its 95% interval when the evaluation gives one (``ci95``)."""
    ci = (metrics.get("ci95") or {}).get(name) if isinstance(metrics.get("ci95"), dict) else None
    text = fmt_value(metrics.get(name))
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(c) for c in ci):
        text += f" [{fmt_value(ci[0])}, {fmt_value(ci[1])}]"
    return text


def _metric_titles() -> dict[str, str]:
    """Readable names for the metrics keys the recipes write (from the text report's rows)."""
    from selfalign.report import ITERATION_ROWS, META_ROWS

    titles = {key: title for title, key in ITERATION_ROWS + META_ROWS if isinstance(key, str)}
    titles.update({
        "prompts_generated": "prompts generated", "prompts_kept": "prompts kept",
        "dpo_loss_first": "DPO loss (first step)", "dpo_loss_last": "DPO loss (last step)",
        "mean_chosen_tokens": "mean chosen tokens", "mean_rejected_tokens": "mean rejected tokens",
        "generation_dtype": "generation dtype", "weights_changed_at_bf16": "weights changed at bf16",
    })
    return titles


def _stage_rows(manifest: dict) -> list[dict]:
    rows = []
    for name, e in manifest.get("stages", {}).items():
        if not isinstance(e, dict):
            continue
        status = str(e.get("status") or "unknown")
        note = ""
        if status == "running":
            note = "no end recorded: still running, or the process was stopped"
        rows.append({
            "name": name, "status": status, "started": str(e.get("started_at") or "–"),
            "duration": fmt_duration(e.get("seconds")), "counts": fmt_counts(e.get("counts")),
            "error": _clip(e.get("error"), 600) if e.get("error") else "", "note": note,
        })
    return rows


def _run_status(data: RunData) -> str:
    statuses = [e.get("status") for e in data.manifest.get("stages", {}).values() if isinstance(e, dict)]
    planned = data.config.get("iterations")
    done = [it for it in data.iterations if it.complete]
    if "failed" in statuses:
        return "failed"
    if "running" in statuses:
        return "running or interrupted"
    if _num(planned) and planned > 0:
        if any(it.t >= planned for it in done):
            return "finished"
        return f"incomplete: {len(done)} of {int(planned)} iterations finished"
    if statuses and all(s == "done" for s in statuses):
        return "finished"
    return "incomplete"


def _timing(manifest: dict) -> dict:
    stages = [e for e in manifest.get("stages", {}).values() if isinstance(e, dict)]
    total = sum(float(e["seconds"]) for e in stages if _num(e.get("seconds")))
    starts = [t for t in (_parse_time(e.get("started_at")) for e in stages) if t]
    ends = [t for t in (_parse_time(e.get("ended_at")) for e in stages) if t]
    span = None
    if starts:
        end = max(ends + [t for t in [_parse_time(manifest.get("updated_at"))] if t] + starts)
        span = (end - min(starts)).total_seconds()
    return {"stage_seconds": fmt_duration(total) if stages else "–", "elapsed": fmt_duration(span)}


def _flat_items(d: dict | None) -> list[tuple[str, str]]:
    out = []
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.append((str(k), ", ".join(f"{a}: {fmt_value(b)}" for a, b in v.items()) or "none"))
        else:
            out.append((str(k), fmt_value(v)))
    return out


# --------------------------------------------------------------------------- figures


def _figures(data: RunData) -> tuple[list[dict], list[str]]:
    """Draw every figure the data allows: ``[{name, section, title, caption, png}]`` and notes
    about figures that failed (a broken figure never stops the report)."""
    from selfalign.eval import plots

    its = data.iterations
    labels = [it.label for it in its]
    m = [it.metrics or {} for it in its]
    figs: list[dict] = []
    notes: list[str] = []

    def add(name, section, title, caption, fn, /, *args, **kwargs):
        try:
            png = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - report what failed, keep the rest
            notes.append(f"figure {name!r} could not be drawn: {type(e).__name__}: {e}")
            return
        if png:
            figs.append({"name": name, "section": section, "title": title, "caption": caption, "png": png})

    if its:
        add("scores", "scores", "Score distribution",
            "Left: every judgment's score, rounded to the nearest whole score, as a share of the iteration's "
            "judgments (from judge.jsonl, or Humpback's curate.jsonl; metrics' score_histogram where that file "
            "is missing). Right: each "
            "response's reward, the mean of its judgments: box = quartiles, line = median, red diamond = mean. "
            "Pairs are made from these rewards, so a narrow box means many ties.",
            plots.score_distribution, labels, [it.judgment_scores for it in its],
            [it.response_rewards for it in its], [mm.get("score_histogram") for mm in m])
        add("pairs", "pairs", "Pairs kept and dropped",
            "Per iteration: prompts that gave a preference pair (green) and prompts without one, by reason "
            "(e.g. tie: best and worst candidate got the same reward; too_few_scored: fewer than two scored "
            "candidates). Meta-Rewarding adds the judge pairs the meta-judge selected, per response.",
            plots.pairs_breakdown, labels, [it.pairs_kept for it in its], [it.pairs_dropped for it in its],
            [it.judge_pairs_kept for it in its], [it.judge_pairs_dropped for it in its],
            [f"schedule: {mm['schedule']}" if mm.get("schedule") and "judge" not in str(mm["schedule"]) else None for mm in m])
        curated = [mm.get("curated") for mm in m]
        rated = [mm.get("pairs_rated") for mm in m]
        if any(_num(c) for c in curated) and any(_num(r) for r in rated):
            below = []
            for mm in m:
                c, r, u = mm.get("curated"), mm.get("pairs_rated"), mm.get("unrated_pairs")
                d = {}
                if _num(c) and _num(r):
                    unrated = int(u) if _num(u) else 0
                    d = {f"rated below {mm.get('curation_threshold', 'k')}": max(int(r) - int(c) - unrated, 0), "unrated": unrated}
                below.append(d)
            add("curation", "pairs", "Curation",
                "Per round: augmented (instruction, output) pairs kept by self-curation (green) and the others: "
                "rated below the threshold, or with no parsable rating.",
                plots.pairs_breakdown, labels, [int(c) if _num(c) else None for c in curated], below,
                title="Self-curation per round", kept_label="curated", unit="augmented pairs")
        meta_rates = []
        for it, mm in zip(its, m):
            if it.meta_comparisons:
                meta_rates.append(it.meta_parse_failures / it.meta_comparisons)
            elif _num(mm.get("meta_parse_failures")) and _num(mm.get("meta_comparisons")) and mm["meta_comparisons"]:
                meta_rates.append(mm["meta_parse_failures"] / mm["meta_comparisons"])
            else:
                meta_rates.append(None)
        add("parse_failures", "parse-failures", "Parse failures",
            "Share of judgments whose score could not be parsed, split by error kind (from judge.jsonl). "
            "Such a judgment counts for nothing when the reward is averaged.",
            plots.parse_failures, labels, [dict(it.parse_errors) for it in its], [it.judgments for it in its],
            [mm.get("parse_failure_rate") for mm in m], meta_rates)
        extra = {name: [mm.get(key) for mm in m] for key, name in
                 (("mean_chosen_tokens", "pairs, chosen (mean)"), ("mean_rejected_tokens", "pairs, rejected (mean)"))}
        word_keys = list(dict.fromkeys(k for mm in m for k in mm if "mean_" in k and k.endswith("_words")))
        words = {k.replace("_", " "): [mm.get(k) for mm in m] for k in word_keys}
        add("lengths", "lengths", "Response length",
            "Completion tokens of the candidate responses per iteration (from respond.jsonl): mean, and median "
            "with the middle half as whiskers. A steady rise is the length bias of a self-judge. Word counts "
            "come from metrics.json (e.g. the curated instructions and outputs of instruction backtranslation).",
            plots.response_lengths, labels, [it.lengths for it in its],
            [mm.get("mean_response_tokens") for mm in m], extra, words)
    if data.trainings:
        add("training", "training", "Training",
            "Loss per logged optimizer step of every model the run trained (SFT of the seed model, the DPO of "
            "each iteration); for DPO also the reward margin (chosen minus rejected implicit reward, solid) "
            "and the share of pairs the policy already ranks right (dotted, right axis).",
            plots.training_curves, [(label, hist) for label, hist, _ in data.trainings])
    if data.judge_evals:
        add("judge_agreement", "judge-agreement", "Judge agreement",
            "How often the judge ranks responses the way the reference labels do, next to the baselines "
            "(random scores; always preferring the longer response), overall and split by whether the preferred "
            "response is the longer or the shorter one. Length-balanced accuracy is the mean of the two; 50% "
            "means nothing beyond length was learned. Whiskers: 95% bootstrap intervals over prompts.",
            plots.judge_agreement, data.judge_evals)
    if data.winrate_evals:
        add("winrate", "winrate", "Win rate",
            "Pairwise comparisons of model A against model B: wins, ties and losses, and the win rate (ties "
            "count half) with its bootstrap 95% interval. Left of the dotted line B is better.",
            plots.winrates, data.winrate_evals)
    if any("ifeval_prompt_level_strict" in mm for mm in m):
        from selfalign.eval.ifeval_plot import ifeval_across_iterations

        add("ifeval", "ifeval", "IFEval",
            "IFEval (judge-free instruction following) of the model the run starts from and of the model each "
            "iteration trained: share of prompts whose answer follows all their instructions (prompt level) and "
            "of all instructions followed (instruction level), strict (solid) and loose (dotted), on the subset "
            "eval.ifeval names, with 95% bootstrap intervals over prompts.",
            ifeval_across_iterations, labels, m)
    if data.corpus:
        kept = data.corpus.get("kept")
        dropped = data.corpus.get("dropped")
        if (_num(kept) or isinstance(dropped, dict)):
            add("corpus", "corpus", "Corpus",
                "The training corpus: examples kept and dropped, by reason (corpus.json).",
                plots.kept_dropped, "Corpus: kept and dropped", int(kept) if _num(kept) else None,
                dropped if isinstance(dropped, dict) else {})
    # any other {bucket: count} metric, e.g. Humpback's curation_score_histogram
    hist_keys = []
    for mm in m:
        for k, v in mm.items():
            if k != "score_histogram" and k.endswith("histogram") and isinstance(v, dict) and k not in hist_keys:
                hist_keys.append(k)
    for k in hist_keys:
        safe = re.sub(r"[^A-Za-z0-9_]+", "_", k)[:60]
        add(f"hist_{safe}", "histograms", k.replace("_", " "),
            f"metrics.json key {k}: each bucket's share of the iteration's total.",
            plots.histograms, k.replace("_", " "), labels, [mm.get(k) for mm in m])
    complete = [i for i, it in enumerate(its) if it.complete]
    if len(complete) >= 2:
        keys = []
        for i in complete:
            for k, v in m[i].items():
                if k != "iteration" and _num(v) and k not in keys:
                    keys.append(k)
        # only the metrics that moved: a flat line says nothing the table does not
        keys = [k for k in keys if len({m[i].get(k) for i in complete if _num(m[i].get(k))}) > 1]
        add("trends", "trends", "Metric trends",
            "Every numeric metric of metrics.json that changed across the finished iterations (the constant "
            "ones are in the table).",
            plots.trends, [labels[i] for i in complete], {k: [m[i].get(k) for i in complete] for k in keys})
    return figs, notes


# --------------------------------------------------------------------------- the page


def _context(data: RunData, figs: list[dict], notes: list[str]) -> dict:
    cfg = data.config
    model = cfg.get("model")
    model_spec = model.get("spec") if isinstance(model, dict) else model
    titles = _metric_titles()
    its = data.iterations
    keys: list[str] = []
    for it in its:
        for k in it.metrics or {}:
            if k != "iteration" and k not in keys:
                keys.append(k)
    metric_rows = [
        {"key": k, "title": titles.get(k, k.replace("_", " ")), "cells": [fmt_cell((it.metrics or {}).get(k)) for it in its]}
        for k in keys
    ]
    columns = [{"label": it.label, "state": it.state, "complete": it.complete} for it in its]
    for f in figs:
        f["data_uri"] = "data:image/png;base64," + base64.b64encode(f["png"]).decode("ascii")
        f["file"] = f"{f['name']}.png"
    by_section: dict[str, list[dict]] = {}
    for f in figs:
        by_section.setdefault(f["section"], []).append(f)
    examples = []
    for it in its:
        if it.example or it.parse_failure_example:
            ex = dict(it.example or {})
            for k in ("chosen_score", "rejected_score", "chosen_judgment_score", "rejected_judgment_score"):
                if k in ex:
                    ex[k] = fmt_value(ex[k])
            examples.append({"label": it.label, "pair": ex if it.example else None, "parse_failure": it.parse_failure_example})
    judge_tables = []
    for label, ev in data.judge_evals:
        metrics = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else {}
        baselines = {str(b): v for b, v in (ev.get("baselines") or {}).items() if isinstance(v, dict)} if isinstance(ev.get("baselines"), dict) else {}
        names = list(metrics) + [k for b in baselines.values() for k in b if k not in metrics]
        names = [n for n in dict.fromkeys(names) if n != "ci95"]  # intervals go beside their values
        judge_tables.append({
            "label": label, "baselines": list(baselines),
            "rows": [{"name": n, "judge": _with_ci(metrics, n), "baselines": [_with_ci(b, n) for b in baselines.values()]}
                     for n in names],
            "info": [(k, fmt_value(v)) for k, v in ev.items() if k not in {"metrics", "baselines", "kind"} and not isinstance(v, (dict, list))]
            + ([("judge", fmt_value(ev["judge"]["model"]))] if isinstance(ev.get("judge"), dict) and ev["judge"].get("model") else []),
        })
    win_rows = []
    for label, ev in data.winrate_evals:
        ci = ev.get("ci95")
        ci_text = f"{fmt_value(ci[0])} – {fmt_value(ci[1])}" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "–"
        win_rows.append({
            "label": label, "a": fmt_value(ev.get("a")), "b": fmt_value(ev.get("b")), "n": fmt_value(ev.get("n")),
            "wins": fmt_value(ev.get("wins")), "ties": fmt_value(ev.get("ties")), "losses": fmt_value(ev.get("losses")),
            "win_rate": fmt_value(ev.get("win_rate")), "ci": ci_text,
            "words": f"{fmt_value(ev.get('mean_words_a'))} / {fmt_value(ev.get('mean_words_b'))}",
            "first": fmt_value(ev.get("first_position_share")),
        })
    sections = [("summary", "Run"), ("stages", "Stages")]
    if metric_rows or its:
        sections.append(("metrics", "Metrics"))
    for sid, title in (("scores", "Scores"), ("pairs", "Pairs"), ("parse-failures", "Parse failures"),
                       ("lengths", "Lengths"), ("training", "Training"), ("ifeval", "IFEval")):
        if sid in by_section:
            sections.append((sid, title))
    if judge_tables:
        sections.append(("judge-agreement", "Judge agreement"))
    if win_rows:
        sections.append(("winrate", "Win rate"))
    if data.corpus:
        sections.append(("corpus", "Corpus"))
    for sid, title in (("histograms", "Histograms"), ("trends", "Trends")):
        if sid in by_section:
            sections.append((sid, title))
    if examples:
        sections.append(("examples", "Examples"))
    if data.config_text is not None:
        sections.append(("config", "Config"))
    man = data.manifest
    packages = man.get("packages") if isinstance(man.get("packages"), dict) else {}
    return {
        "name": data.root.resolve().name,
        "recipe": cfg.get("recipe") or "unknown",
        "model": model_spec or "unknown",
        "run_dir": str(data.root.resolve()),
        "status": _run_status(data),
        "planned_iterations": cfg.get("iterations"),
        "timing": _timing(man),
        "created": man.get("created_at") or "–",
        "updated": man.get("updated_at") or "–",
        "version": man.get("selfalign_version") or "–",
        "config_hash": man.get("config_hash") or "–",
        "packages": [(k, v if v is not None else "–") for k, v in packages.items()],
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "stages": _stage_rows(man),
        "columns": columns,
        "metric_rows": metric_rows,
        "figs": by_section,
        "judge_tables": judge_tables,
        "win_rows": win_rows,
        "corpus_items": _flat_items(data.corpus),
        "seed_items": _flat_items(data.seed_data),
        "examples": examples,
        "config_text": data.config_text,
        "notes": notes,
        "max_text": f"{MAX_TEXT:,}",
        "sections": sections,
    }


def render_html(data: RunData, figs: list[dict], notes: list[str]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
        autoescape=True,  # every value from the run is HTML-escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(TEMPLATE).render(**_context(data, figs, notes))


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Replace ``path`` with ``payload`` (temporary file + rename), readable by all like a plain file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(run_dir: Path, *, out_dir: Path | None = None, evals: Sequence[Path] = ()) -> Path:
    """Write the report of ``run_dir`` to ``out_dir`` (default ``run_dir/report``); return index.html.

    The PNGs are written first (each replaced atomically), figures an earlier report drew that
    no longer apply are removed, and ``index.html`` is written last, atomically: a reader sees
    the previous page or the new one (temporary files a killed report left are removed).
    Raises :class:`RunError` if ``run_dir`` is not a run
    directory (or an ``evals`` entry is not an evaluation result); anything else the run lacks
    is left out of the page.  ``evals`` adds evaluation results kept outside the run directory
    (``selfalign eval judge|winrate`` write to ``runs/eval_*/`` by default): each a
    ``summary.json`` or the folder holding one.
    """
    data = load_run(Path(run_dir), evals)
    out = Path(out_dir) if out_dir is not None else data.root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a report writer that was killed mid-write
        name = stale.name[1:].rsplit(".", 2)[0]
        if name == "index.html" or (name.endswith(".png") and (name[:-4] in FIGURES or name.startswith("hist_"))):
            stale.unlink(missing_ok=True)
    figs, notes = _figures(data)
    html = render_html(data, figs, notes)
    written = set()
    for f in figs:
        _atomic_write_bytes(out / f"{f['name']}.png", f["png"])
        written.add(f"{f['name']}.png")
    for p in out.glob("*.png"):
        ours = p.stem in FIGURES or p.stem.startswith("hist_")
        if ours and p.name not in written:
            p.unlink(missing_ok=True)
    index = out / "index.html"
    _atomic_write_bytes(index, html.encode("utf-8"))
    return index
