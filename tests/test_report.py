"""The HTML run report: a synthetic run directory written by hand (two finished iterations, a
third killed mid-way, evaluation results, hostile text), the page and PNGs built from it, the
CLI, and a headless-Chromium rendering of the page."""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from selfalign.errors import RunError
from selfalign.report.html import write_report

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script>"


# --------------------------------------------------------------------------- a synthetic run


def _stage(status: str, seconds: float | None, counts: dict | None = None, start: str = "2026-01-01T10:00:00+00:00",
           end: str | None = "2026-01-01T10:01:00+00:00", error: str | None = None) -> dict:
    return {"status": status, "depends_on": ["recipe"], "outputs": [], "started_at": start,
            "ended_at": end if status != "running" else None, "seconds": seconds, "counts": counts or {}, "error": error}


def _write_jsonl(path: Path, records: list[dict], torn_tail: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if torn_tail is not None:
            f.write(torn_tail)  # what a writer killed mid-line leaves


def _training(path: Path, kind: str, steps: int, rng: random.Random) -> None:
    hist = []
    for s in range(1, steps + 1):
        if kind == "sft":
            hist.append({"loss": 2.5 / (1 + 0.3 * s) + rng.random() * 0.05, "learning_rate": 1e-5, "step": s})
        else:
            margin = 0.02 * s + rng.random() * 0.01
            hist.append({"loss": 0.6931 - margin / 2, "rewards/margins": margin, "rewards/chosen": margin / 2,
                         "rewards/rejected": -margin / 2, "rewards/accuracies": min(1.0, 0.5 + 0.05 * s), "step": s})
    hist.append({"train_runtime": 12.0, "train_loss": 0.6, "step": steps})
    path.mkdir(parents=True, exist_ok=True)
    (path / "training.json").write_text(json.dumps({"fingerprint": {}, "finished_at": "x", "dtype": "float32",
                                                    "result": {"steps": steps, "history": hist}}))


def _iteration(root: Path, t: int, rng: random.Random, prompts: int, n: int, k: int, *, finished: bool) -> dict:
    d = root / f"iter_{t}"
    d.mkdir(parents=True)
    _write_jsonl(d / "self_instruct.jsonl", [
        {"id": f"p{t}-{i}", "kind": "prompt", "kept": True, "text": f"Prompt {i} of iteration {t}?"} for i in range(prompts)
    ])
    responses = []
    for i in range(prompts):
        for s in range(n):
            responses.append({"id": f"r{t}-{i}-{s}", "kind": "response", "prompt_id": f"p{t}-{i}",
                              "messages": [{"role": "user", "content": f"Prompt {i} of iteration {t}?"}],
                              "response": f"Answer {s} to prompt {i}.", "sample_index": s,
                              "completion_tokens": int(rng.gauss(40 + 15 * t, 10))})
    if not finished:  # killed while responding: a torn last line and no later files
        _write_jsonl(d / "respond.jsonl", responses[: len(responses) // 2], torn_tail='{"id": "torn", "kind": "resp')
        return {}
    _write_jsonl(d / "respond.jsonl", responses)
    judgments, scores = [], {}
    for r in responses:
        for j in range(k):
            failed = rng.random() < 0.15 / t
            score = None if failed else float(min(5, max(0, round(rng.gauss(2.5 + 0.4 * t, 1.1)))))
            output = f"The response is fine.\nScore: {score}" if not failed else "I think it is good."
            if r["id"] == responses[0]["id"] and j == 0:
                output, failed, score = f"Nice answer {EVIL} Score: 4", False, 4.0
            judgments.append({"id": f"j-{r['id']}-{j}", "kind": "judgment", "response_id": r["id"], "prompt_id": r["prompt_id"],
                              "sample_index": j, "judge_output": output, "score": score,
                              "parse_error": "no Score line" if failed else None})
            if score is not None:
                scores.setdefault(r["id"], []).append(score)
    _write_jsonl(d / "judge.jsonl", judgments)
    pairs, dropped = [], {"tie": 0, "too_few_scored": 0}
    for i in range(prompts):
        cands = [(sum(scores[r][:]) / len(scores[r]), r) for r in (f"r{t}-{i}-{s}" for s in range(n)) if r in scores]
        if len(cands) < 2:
            dropped["too_few_scored"] += 1
            continue
        best, worst = max(cands), min(cands)
        if best[0] == worst[0]:
            dropped["tie"] += 1
            continue
        pairs.append({"id": f"pair{t}-{i}", "kind": "pair", "prompt_id": f"p{t}-{i}",
                      "prompt": [{"role": "user", "content": f"Prompt {i} of iteration {t}? {EVIL}"}],
                      "chosen": [{"role": "assistant", "content": f"Answer to {i}"}],
                      "rejected": [{"role": "assistant", "content": "No."}],
                      "chosen_score": best[0], "rejected_score": worst[0], "chosen_id": best[1], "rejected_id": worst[1]})
    _write_jsonl(d / "pairs.jsonl", pairs)
    _training(d / "model", "dpo", 8, rng)
    parse_failures = sum(1 for j in judgments if j["parse_error"])
    hist: dict[str, int] = {}
    for j in judgments:
        if j["score"] is not None:
            hist[str(int(j["score"]))] = hist.get(str(int(j["score"])), 0) + 1
    metrics = {
        "iteration": t, "prompts_generated": prompts + 3, "prompts_kept": prompts, "prompts_rejected": {"duplicate": 2, "too_long": 1},
        "candidates": len(responses), "mean_response_tokens": sum(r["completion_tokens"] for r in responses) / len(responses),
        "judgments": len(judgments), "parse_failure_rate": parse_failures / len(judgments), "score_histogram": hist,
        "pairs": len(pairs), "pairs_dropped": {k: v for k, v in dropped.items() if v},
        "mean_reward_gap": sum(p["chosen_score"] - p["rejected_score"] for p in pairs) / max(len(pairs), 1),
        "dpo_loss_first": 0.69, "dpo_loss_last": 0.61, "reward_margin_last": 0.16,
        "curation_score_histogram": {"3": 4 * t, "4": 6, "5": 2 + t},
    }
    if t == 2:
        metrics[EVIL] = 1  # a hostile metric key must be escaped too
        metrics["pairs_dropped"]["odd $reason_{x"] = 1  # and must not reach matplotlib as mathtext
    (d / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def build_run(root: Path, *, prompts: int = 12, n: int = 4, k: int = 3, seed: int = 0) -> Path:
    """A Self-Rewarding run directory: SFT, iterations 1-2 finished (with evaluations), iteration 3
    killed during ``respond`` (its stage still says "running")."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({
        "recipe": "self_rewarding", "name": root.name, "iterations": 3, "seed": 0,
        "model": {"spec": "smollm2-135m-instruct", "dtype": "auto"}, "note": EVIL,
    }))
    (root / "seed_data.json").write_text(json.dumps({"ift": 48, "eft_train": 42, "eft_heldout": 6, "ift_dropped": {}}))
    _training(root / "sft" / "model", "sft", 10, rng)
    stages = {"sft": _stage("done", 61.5, {"examples": 90, "steps": 10})}
    for t in (1, 2):
        _iteration(root, t, rng, prompts, n, k, finished=True)
        for name, secs in (("self_instruct", 30.0), ("respond", 95.2), ("judge", 210.7), ("pairs", 0.1), ("dpo", 48.0)):
            counts = {"dropped": {"tie": 1}} if name == "pairs" else {"n": 1}
            stages[f"iter_{t}/{name}"] = _stage("done", secs, counts)
    _iteration(root, 3, rng, prompts, n, k, finished=False)
    stages["iter_3/self_instruct"] = _stage("done", 28.0, {"candidates": 15, "kept": 12})
    stages["iter_3/respond"] = _stage("running", None)
    stages["iter_3/judge"] = _stage("pending", None, start=None, end=None)
    (root / "iter_1" / "eval_judge.json").write_text(json.dumps({
        "kind": "judge_agreement", "n": 200,
        "metrics": {"pairwise_accuracy": 0.64, "tie_rate": 0.12, "exact_match_best": 0.41, "spearman": 0.33,
                    "kendall_tau": 0.27, "parse_failure_rate": 0.05},
        "baselines": {"random": {"pairwise_accuracy": 0.5, "spearman": 0.0, "kendall_tau": 0.0, "exact_match_best": 0.25},
                      "longer_wins": {"pairwise_accuracy": 0.58, "spearman": 0.2, "kendall_tau": 0.15, "exact_match_best": 0.3}},
    }))
    (root / "iter_2" / "eval_winrate.json").write_text(json.dumps({
        "kind": "winrate", "a": "iter_2/model", "b": "sft/model", "n": 100, "wins": 48, "ties": 17, "losses": 35,
        "win_rate": 0.565, "ci95": [0.49, 0.64], "mean_words_a": 83.2, "mean_words_b": 61.0, "first_position_share": 0.55,
    }))
    manifest = {"format": 1, "selfalign_version": "0.1.0", "created_at": "2026-01-01T10:00:00+00:00",
                "updated_at": "2026-01-01T11:30:00+00:00", "config_hash": "abc", "packages": {"python": "3.11"},
                "stages": stages}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    return build_run(tmp_path / "runs" / "demo")


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def _pixels(path: Path):
    """(width, height, number of distinct colours, share of the most common colour)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            colors = im.getcolors(maxcolors=1 << 24)
            w, h = im.size
    except ImportError:  # pragma: no cover - pillow comes with matplotlib
        import matplotlib.image
        import numpy as np

        arr = matplotlib.image.imread(str(path))[..., :3]
        h, w = arr.shape[:2]
        uniq, counts = np.unique(arr.reshape(-1, 3), axis=0, return_counts=True)
        colors = list(zip(counts.tolist(), map(tuple, uniq)))
    top = max(c for c, _ in colors)
    return w, h, len(colors), top / (w * h)


# --------------------------------------------------------------------------- the page


def test_report_sections_images_and_files(run_dir):
    index = write_report(run_dir)
    assert index == run_dir / "report" / "index.html"
    html = index.read_text(encoding="utf-8")
    for sid in ("summary", "stages", "metrics", "scores", "pairs", "parse-failures", "lengths", "training",
                "judge-agreement", "winrate", "histograms", "trends", "examples", "config"):
        assert f'<section id="{sid}">' in html, sid
    assert "self_rewarding" in html and "smollm2-135m-instruct" in html
    assert "running or interrupted" in html  # the killed iteration and the run status
    assert "Notes" not in html  # no figure failed
    pngs = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert pngs == sorted(["scores.png", "pairs.png", "parse_failures.png", "lengths.png", "training.png",
                           "judge_agreement.png", "winrate.png", "trends.png", "hist_curation_score_histogram.png"])
    for name in pngs:
        p = run_dir / "report" / name
        assert _is_png(p), name
        w, h, ncolors, _ = _pixels(p)
        assert w > 300 and h > 100 and ncolors > 10, name
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == len(pngs)
    assert {base64.b64decode(u) for u in uris} == {(run_dir / "report" / n).read_bytes() for n in pngs}
    # the stage table carries durations, the metrics table every metrics.json key
    assert "3 min 30 s" in html  # iter_*/judge: 210.7 s
    assert "curation_score_histogram" in html and "mean_reward_gap" in html
    assert re.search(r"<th>iter 3<span[^>]*>running or interrupted</span></th>", html)


def test_report_escapes_run_text(run_dir):
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "<script>" not in html  # the page has no script of its own either
    assert "&lt;script&gt;alert(" in html
    # in a judge output (examples), a prompt, a metric key and the config
    assert html.count("&lt;script&gt;") >= 4


def test_report_partial_runs(tmp_path, run_dir):
    # a run that has only just been created: manifest and config, nothing else
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "manifest.json").write_text(json.dumps({"format": 1, "stages": {}}))
    html = write_report(fresh).read_text(encoding="utf-8")
    assert "No stage has started yet" in html
    assert not list((fresh / "report").glob("*.png"))
    # unreadable and missing files everywhere: still a page
    (run_dir / "iter_1" / "metrics.json").write_text("{not json")
    (run_dir / "iter_2" / "judge.jsonl").write_bytes(b"\xff\xfe garbage\n{\"score\": 3, \"response_id\": 1}\n")
    (run_dir / "sft" / "model" / "training.json").unlink()
    (run_dir / "config.yaml").write_text(": : not yaml [")
    (run_dir / "iter_4").mkdir()  # an iteration directory with nothing in it yet
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "iter 4" in html and "Notes" not in html
    # a DPO killed mid-training: its latest checkpoint's log history stands in for training.json
    (run_dir / "iter_2" / "model" / "training.json").unlink()
    ckpt = run_dir / "iter_2" / "model.checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"loss": 0.69, "rewards/margins": 0.01, "step": 2}, {"loss": 0.66, "rewards/margins": 0.05, "step": 4}]}))
    write_report(run_dir)
    from selfalign.report.rundata import load_run

    assert [label for label, _, _ in load_run(run_dir).trainings] == ["iter 1", "iter 2 (in progress)"]
    # a later, smaller report removes the figures that no longer apply
    (run_dir / "iter_2" / "eval_winrate.json").unlink()
    write_report(run_dir)
    assert not (run_dir / "report" / "winrate.png").exists()


def test_report_out_dir_and_humpback_like_metrics(tmp_path):
    run = tmp_path / "hb"
    (run / "iter_1").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"format": 1, "stages": {"iter_1/curate": _stage("done", 12.0)}}))
    (run / "config.yaml").write_text("recipe: humpback\niterations: 1\nmodel: {spec: tiny}\n")
    (run / "iter_1" / "metrics.json").write_text(json.dumps({
        "iteration": 1, "curated": 120, "augmented": 400, "mean_instruction_words": 14.5, "mean_output_words": 180.2,
        "curation_score_histogram": {"1": 50, "2": 80, "3": 100, "4": 90, "5": 80}, "sft_loss_first": 2.1, "sft_loss_last": 1.4,
    }))
    _write_jsonl(run / "iter_1" / "curate.jsonl", [
        {"id": f"c{i}", "kind": "judgment", "response_id": f"a{i}", "score": 1 + i % 5, "parse_error": None} for i in range(40)
    ] + [{"id": "cx", "kind": "judgment", "response_id": "ax", "score": None, "parse_error": "no Score line"}])
    (run / "iter_1" / "metrics.json").write_text(json.dumps({
        **json.loads((run / "iter_1" / "metrics.json").read_text()), "pairs_rated": 400, "unrated_pairs": 10, "curation_threshold": 4,
    }))
    (run / "corpus.json").write_text(json.dumps({"documents": 50, "kept": 120,
                                                 "dropped": {"low_score": 250, "too_long": 30, "empty": 0}}))
    _training(run / "backward" / "model", "sft", 5, random.Random(1))
    # where `selfalign eval winrate --out RUN/eval/winrate_iter_1` puts its summary
    (run / "eval" / "winrate_iter_1").mkdir(parents=True)
    (run / "eval" / "winrate_iter_1" / "summary.json").write_text(json.dumps({
        "kind": "winrate", "a": "iter_1/model", "b": "sft/model", "n": 10, "wins": 6, "ties": 1, "losses": 3,
        "win_rate": 0.65, "ci95": None, "judge": {"model": "judge-x"}}))
    out = tmp_path / "elsewhere"
    index = write_report(run, out_dir=out)
    assert index == out / "index.html"
    html = index.read_text(encoding="utf-8")
    assert "humpback" in html and "mean_instruction_words" in html and 'id="corpus"' in html
    assert (out / "corpus.png").is_file() and (out / "lengths.png").is_file()
    assert (out / "hist_curation_score_histogram.png").is_file()
    assert (out / "scores.png").is_file() and (out / "parse_failures.png").is_file()  # from curate.jsonl
    assert (out / "curation.png").is_file() and (out / "training.png").is_file() and (out / "winrate.png").is_file()
    assert "eval/winrate_iter_1" in html and "Notes" not in html
    assert not (run / "report").exists()


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(RunError, match="not a selfalign run directory"):
        write_report(tmp_path)
    with pytest.raises(RunError, match="no such directory"):
        write_report(tmp_path / "missing")


def test_report_cli(run_dir, tmp_path):
    from selfalign.cli import app

    res = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "index.html").is_file()
    assert "index.html" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "not a selfalign run directory" in res.output


# --------------------------------------------------------------------------- in a browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    shot = tmp_path / "shot.png"
    proc = subprocess.run([str(ROOT / "scripts" / "screenshot_report.sh"), str(run_dir), str(shot)],
                          check=False, capture_output=True, text=True, timeout=180, env={"PATH": "/usr/bin:/bin", "HEIGHT": "2400",
                                                                            "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "report" / "index.html").is_file()  # the script built the report
    assert _is_png(shot)
    w, h, ncolors, top_share = _pixels(shot)
    assert (w, h) == (1400, 2400)
    assert ncolors > 50, "the screenshot is (nearly) one colour"
    assert top_share < 0.95, "the screenshot is mostly blank"


def test_plots_draw_edge_cases():
    """Scores off the 0-5 rubric (a reward model), single points, empty inputs, hostile labels."""
    from selfalign.report import plots, trend_plots

    png = plots.score_distribution(["iter 1", "iter 2"], [[-3.2, 0.5, 7.9], [1.0, 2.0]], [[-3.2, 7.9], []])
    assert png[:8] == PNG_MAGIC
    assert plots.score_distribution([], [], []) is None
    assert plots.pairs_breakdown(["iter 1"], [None], [{}]) is None
    assert trend_plots.training_curves([("x", [{"train_runtime": 1.0}])]) is None
    assert trend_plots.winrates([("w", {"wins": 0, "ties": 0, "losses": 0})]) is None
    assert trend_plots.judge_agreement([("j", {"metrics": "broken"})]) is None
    assert trend_plots.histograms("$bad{", ["iter $1"], [{"$": 2, "a_b": 1}])[:8] == PNG_MAGIC
    assert trend_plots.trends(["iter 1", "iter 2"], {"m$": [1, None]})[:8] == PNG_MAGIC


def test_report_evaluations_outside_the_run(run_dir, tmp_path):
    ext = tmp_path / "runs" / "eval_winrate_iter_1_vs_sft"
    ext.mkdir(parents=True)
    (ext / "summary.json").write_text(json.dumps({"kind": "winrate", "a": "iter_1", "b": "sft", "n": 20, "wins": 9,
                                                  "ties": 4, "losses": 7, "win_rate": 0.55, "ci95": [0.4, 0.7]}))
    (tmp_path / "junk.json").write_text("{}")
    html = write_report(run_dir, evals=[ext]).read_text(encoding="utf-8")
    assert "eval_winrate_iter_1_vs_sft" in html and "iter_2/eval_winrate" in html
    with pytest.raises(RunError, match="not a judge-agreement or win-rate result"):
        write_report(run_dir, evals=[tmp_path / "junk.json"])
    with pytest.raises(RunError, match="no such file"):
        write_report(run_dir, evals=[tmp_path / "nope"])
    from selfalign.cli import app

    res = CliRunner().invoke(app, ["report", str(run_dir), "--eval", str(ext / "summary.json")])
    assert res.exit_code == 0, res.output
