"""The run report: one self-contained HTML page (plus the PNGs it embeds) for any run.

``write_report(run_dir)`` reads the run (:mod:`selfalign.report.rundata`), draws its figures
(:mod:`selfalign.report.figures`) and writes ``run_dir/report/index.html`` and
``run_dir/report/*.png``.  The page works offline: every figure is embedded as a base64
``data:`` URI (the PNG files next to it are the same figures, for slides and diffs).  All text
taken from the run is HTML-escaped by the template (jinja2 autoescape).
"""

from __future__ import annotations

import base64
import json
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from selfalign.report.figures import FIGURES, draw_figures
from selfalign.report.rundata import MAX_TEXT, REPORT_DIR, RunData, clip, is_number, load_run, parse_time

TEMPLATE = "report.html.jinja"


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
        return clip(json.dumps(v, ensure_ascii=False, default=str), 300)
    return clip(v, 300)


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
    if not is_number(seconds):
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
    return clip("; ".join(parts), 400)


def _with_ci(metrics: dict, name: str) -> str:
    """A metric's value, followed by its 95% interval when the evaluation gives one (``ci95``)."""
    ci = (metrics.get("ci95") or {}).get(name) if isinstance(metrics.get("ci95"), dict) else None
    text = fmt_value(metrics.get(name))
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(c) for c in ci):
        text += f" [{fmt_value(ci[0])}, {fmt_value(ci[1])}]"
    return text


def _metric_titles() -> dict[str, str]:
    """Readable names for the metrics keys the recipes write (from the text report's rows)."""
    from selfalign.report.tables import ITERATION_ROWS, META_ROWS

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
            "error": clip(e.get("error"), 600) if e.get("error") else "", "note": note,
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
    if is_number(planned) and planned > 0:
        if any(it.t >= planned for it in done):
            return "finished"
        return f"incomplete: {len(done)} of {int(planned)} iterations finished"
    if statuses and all(s == "done" for s in statuses):
        return "finished"
    return "incomplete"


def _timing(manifest: dict) -> dict:
    stages = [e for e in manifest.get("stages", {}).values() if isinstance(e, dict)]
    total = sum(float(e["seconds"]) for e in stages if is_number(e.get("seconds")))
    starts = [t for t in (parse_time(e.get("started_at")) for e in stages) if t]
    ends = [t for t in (parse_time(e.get("ended_at")) for e in stages) if t]
    span = None
    if starts:
        end = max(ends + [t for t in [parse_time(manifest.get("updated_at"))] if t] + starts)
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
    figs, notes = draw_figures(data)
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
