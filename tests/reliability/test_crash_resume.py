"""Crash-resume suite (issue 8, part 1): every stage of every recipe, SIGKILLed and resumed.

Each test runs a recipe's stages in a child process (tests/reliability/driver.py, calling the
same step functions the recipes call, on a real run directory), SIGKILLs it at seeded random
points - part-way through a JSONL batch, between a batch's write and its fsync, between
batches, at a random record count, between a ``.done`` marker and the manifest update, after
or inside a training checkpoint, inside the final model save, inside a report file - then
finishes the run and checks:

* after every kill: each ``.done`` marker matches its file and no stage is done in the
  manifest with incomplete output; a torn last line is refused by the strict reader (naming
  file and line) and skipped by the tolerant one (DESIGN.md: the next writer cuts exactly
  that tail off);
* after the resume: every stage done, every JSONL valid with unique ids, every record any
  killed process wrote completely still there byte for byte, and the outputs (scripted
  generation, pairs, Elo judge pairs, length control, filters, curation, metrics, report
  figures) byte-identical to an uninterrupted run;
* training (SFT, DPO) resumes from its last complete checkpoint: the resumed process's first
  step is the one after it, the model is published complete, ``training.json`` agrees.

``SELFALIGN_CRASH_SEED`` (default in harness.py) picks the kill points; the table of kill
points per stage is printed at the end of the session.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import shared_file

from selfalign.data.records import read_jsonl

from . import driver
from .harness import (
    check_killed_state,
    check_resumed,
    complete_lines,
    kill_child,
    lines_at_least,
    manifest,
    rng,
    same_as_reference,
)

IT = "iter_1"


def _kill(scenario: str, run: Path, kills: list, **kw):
    k = kill_child(scenario, run, **kw)
    check_killed_state(run, k)
    kills.append(k)
    return k


def _torn(rel: str, write: int, r) -> dict:
    return {"label": f"torn write #{write}", "target": rel,
            "hook": {"kind": "torn", "file": rel, "write": write, "cut": round(r.uniform(0.02, 0.98), 4)}}


def _unsynced(rel: str, write: int) -> dict:
    return {"label": f"before fsync #{write}", "target": rel, "hook": {"kind": "unsynced", "file": rel, "write": write}}


def _between(rel: str, write: int) -> dict:
    return {"label": f"between batches #{write}", "target": rel, "hook": {"kind": "between", "file": rel, "write": write}}


def _done_marker(rel: str) -> dict:
    return {"label": ".done before manifest", "target": rel, "hook": {"kind": "done_marker", "file": rel}}


def _manifest(save: int) -> dict:
    return {"label": f"inside manifest save #{save}", "target": None, "hook": {"kind": "manifest_write", "write": save}}


def _at_records(run: Path, rel: str, n: int, r, delay: float = 0.02) -> dict:
    return {"label": f"at {n} records", "target": rel, "hook": {"kind": "slow", "delay": delay},
            "until": lines_at_least(run / rel, n), "after": round(r.uniform(0.0, 0.02), 4)}


def _rows(table, stage_of: dict, kills: list, reference: dict) -> None:
    for stage in dict.fromkeys(stage_of[id(k)] for k in kills):
        mine = [k for k in kills if stage_of[id(k)] == stage]
        table.add(stage, [k.label for k in mine], sum(k.compared for k in mine), reference.get(stage, 0))


# --------------------------------------------------------------------------- Self-Rewarding


def test_self_instruct_resumes_with_the_next_round_and_the_same_filter(tmp_path, crash_table):
    """Self-instruct writes one fsynced batch per round; a killed round's complete records stay,
    the resume starts the next round, and the ROUGE-L/length/duplicate filter replays exactly."""
    from selfalign.data.seeding import load_seed_data
    from selfalign.stages.rouge import RougeFilter
    from selfalign.recipes.steps import self_instruct_settings
    from selfalign.stages.self_instruct import _norm, decide

    r, run, rel = rng("self_instruct"), tmp_path / "killed" / "run", f"{IT}/self_instruct.jsonl"
    kills: list = []
    _kill("self_rewarding", run, kills, **_torn(rel, r.choice([1, 2]), r))
    _kill("self_rewarding", run, kills, **_unsynced(rel, 1))
    driver.run_scenario("self_rewarding", run)
    check_resumed(run, kills)

    cfg = driver.self_rewarding_config(run)
    records = list(read_jsonl(run / rel))
    for k in kills:  # each resumed process started with the round after the last one on disk
        before = [json.loads(x) for x in complete_lines(k.files[rel]).splitlines()]
        assert before, "the kill left no complete round"
        assert all(rec["round"] > before[-1]["round"] for rec in records[len(before):])
    assert sum(rec["kept"] for rec in records) == cfg.self_instruct.num_prompts

    seed_prompts = load_seed_data(cfg.seed_data).prompts
    s = self_instruct_settings(cfg.self_instruct, 0)
    pool, seen, kept = RougeFilter(s.rouge_threshold, seed_prompts), {_norm(p) for p in seed_prompts}, 0
    for rec in records:  # the filter's decisions, replayed over the final file, are the recorded ones
        reason, score, _ = decide(rec["text"], pool, seen, s)
        if reason is None and kept >= s.num_prompts:
            reason = "surplus"
        assert (reason, round(score, 4)) == (rec["reject_reason"], rec["rouge_max"]), rec["id"]
        if reason is None:
            kept += 1
            pool.add(rec["text"])
            seen.add(_norm(rec["text"]))
    crash_table.add("self-instruct (+ ROUGE-L filter replay)", [k.label for k in kills], sum(k.compared for k in kills),
                    len(records))


def test_self_rewarding_respond_judge_pairs(tmp_path, crash_table):
    """Eight kills across respond, judge and pairs of one Self-Rewarding iteration; the resumed
    run's files (and metrics) are byte-identical to an uninterrupted run's."""
    r, run, ref = rng("self_rewarding"), tmp_path / "killed" / "run", tmp_path / "ref" / "run"
    driver.run_scenario("self_rewarding", ref)
    R, J, P = f"{IT}/respond.jsonl", f"{IT}/judge.jsonl", f"{IT}/pairs.jsonl"
    plan = [
        ("respond", _torn(R, r.choice([1, 2]), r)),
        ("respond", _unsynced(R, 1)),
        ("judge", _at_records(run, J, r.randint(6, 80), r)),
        ("judge", _between(J, r.randint(2, 6))),
        ("judge", _torn(J, r.randint(1, 6), r)),
        ("judge", _done_marker(J)),
        ("pairs", _torn(P, 1, r)),
        ("pairs", _done_marker(P)),
    ]
    kills, stage_of = [], {}
    for stage, kw in plan:
        stage_of[id(_kill("self_rewarding", run, kills, **kw))] = stage
    driver.run_scenario("self_rewarding", run)
    check_resumed(run, kills)
    reference = {
        "respond": same_as_reference(run, ref, [R, f"{IT}/self_instruct.jsonl"]),
        "judge": same_as_reference(run, ref, [J]),
        "pairs": same_as_reference(run, ref, [P, f"{IT}/metrics.json"]),
    }
    cfg, counts = driver.self_rewarding_config(run), manifest(run)["stages"]
    n = cfg.self_instruct.num_prompts * cfg.respond.n
    assert counts[f"{IT}/respond"]["counts"]["responses"] == n == len(list(read_jsonl(run / R)))
    assert counts[f"{IT}/judge"]["counts"]["judgments"] == n * cfg.judge.k
    assert counts[f"{IT}/pairs"]["counts"]["pairs"] == len(list(read_jsonl(run / P)))
    _rows(crash_table, stage_of, kills, reference)


# --------------------------------------------------------------------------- Meta-Rewarding


def test_meta_rewarding_meta_judge_elo_and_length_control(tmp_path, crash_table):
    """Kills in the meta-judge's comparisons, the Elo judge pairs and the length-controlled
    actor pairs; the comparisons, both pair files and the metrics match an uninterrupted run."""
    r, run, ref = rng("meta_rewarding"), tmp_path / "killed" / "run", tmp_path / "ref" / "run"
    driver.run_scenario("meta_rewarding", ref)
    M, JP, AP = f"{IT}/meta_judge.jsonl", f"{IT}/judge_pairs.jsonl", f"{IT}/actor_pairs.jsonl"
    plan = [
        ("run manifest", _manifest(1)),
        ("run manifest", _manifest(r.randint(2, 6))),
        ("meta-judge (comparisons)", _at_records(run, M, r.randint(5, 90), r)),
        ("meta-judge (comparisons)", _torn(M, r.randint(1, 8), r)),
        ("judge pairs (Elo)", _torn(JP, 1, r)),
        ("judge pairs (Elo)", _done_marker(JP)),
        ("actor pairs (length control)", _torn(AP, 1, r)),
    ]
    kills, stage_of = [], {}
    for stage, kw in plan:
        stage_of[id(_kill("meta_rewarding", run, kills, **kw))] = stage
    driver.run_scenario("meta_rewarding", run)
    check_resumed(run, kills)
    leftovers = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert not leftovers, f"temporary files of killed manifest saves left in {run}: {leftovers}"
    comparisons = list(read_jsonl(run / M))
    assert len(comparisons) == manifest(run)["stages"][f"{IT}/meta_judge"]["counts"]["comparisons"]
    reference = {
        "meta-judge (comparisons)": same_as_reference(run, ref, [M, f"{IT}/judge.jsonl", f"{IT}/respond.jsonl"]),
        "judge pairs (Elo)": same_as_reference(run, ref, [JP]),
        "actor pairs (length control)": same_as_reference(run, ref, [AP, f"{IT}/metrics.json"]),
    }
    _rows(crash_table, stage_of, kills, reference)


# --------------------------------------------------------------------------- Humpback


def test_humpback_corpus_augmentation_and_curation(tmp_path, crash_table):
    """Kills in the corpus filter, self-augmentation, the curation ratings and the k filter."""
    corpus = str(shared_file("web_text/ud_english_ewt_web_docs.jsonl"))
    r, run, ref = rng("humpback"), tmp_path / "killed" / "run", tmp_path / "ref" / "run"
    driver.run_scenario("humpback", ref, corpus=corpus)
    C, A, RT, CU = "corpus.jsonl", "augment.jsonl", f"{IT}/curate.jsonl", f"{IT}/curated.jsonl"
    plan = [
        ("corpus (filters)", _torn(C, r.randint(1, 3), r)),
        ("augmentation", _between(A, 2)),
        ("augmentation", _torn(A, 1, r)),
        ("augmentation", _unsynced(A, 1)),
        ("curation (ratings)", _at_records(run, RT, r.randint(4, 40), r)),
        ("curation (ratings)", _torn(RT, r.randint(1, 4), r)),
        ("curation (k filter)", _torn(CU, 1, r)),
    ]
    kills, stage_of = [], {}
    for stage, kw in plan:
        stage_of[id(_kill("humpback", run, kills, corpus=corpus, **kw))] = stage
    driver.run_scenario("humpback", run, corpus=corpus)
    check_resumed(run, kills)
    reference = {
        "corpus (filters)": same_as_reference(run, ref, [C, "corpus.json"]),
        "augmentation": same_as_reference(run, ref, [A]),
        "curation (ratings)": same_as_reference(run, ref, [RT]),
        "curation (k filter)": same_as_reference(run, ref, [CU, f"{IT}/metrics.json"]),
    }
    _rows(crash_table, stage_of, kills, reference)


# --------------------------------------------------------------------------- report


def test_report_is_never_half_written(tmp_path, crash_table):
    """Killed inside a figure of the first report, and inside index.html of a later one: a
    reader sees no page or the previous page, never half of one; the rerun leaves no
    temporary files and draws the same figures as an uninterrupted run."""
    from selfalign.report.html import write_report

    r, run, ref = rng("report"), tmp_path / "killed" / "run", tmp_path / "ref" / "run"
    driver.run_scenario("report", ref)
    figures = sorted(p.name for p in (ref / "report").glob("*.png"))
    assert len(figures) >= 2
    kills: list = []
    w = r.randint(1, len(figures))
    k = _kill("report", run, kills, label=f"inside figure #{w}", hook={"kind": "report_write", "write": w})
    assert not (run / "report" / "index.html").exists()
    for png in (run / "report").glob("*.png"):  # figures already in place are complete files
        assert png.read_bytes() == (ref / "report" / png.name).read_bytes()
    assert k.marker["tmp"] and Path(k.marker["tmp"]).is_file()

    write_report(run)
    page = (run / "report" / "index.html").read_bytes()
    _kill("report", run, kills, label="inside index.html", hook={"kind": "report_write", "write": len(figures) + 1})
    assert (run / "report" / "index.html").read_bytes() == page  # the previous page, intact

    write_report(run)
    out = run / "report"
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert not leftovers, f"temporary files left in {out}: {leftovers}"
    assert (out / "index.html").read_text().rstrip().endswith("</html>")
    compared = same_as_reference(run, ref, [f"report/{f}" for f in figures])
    check_resumed(run, kills)
    crash_table.add("report", [k.label for k in kills], 0, compared)


# --------------------------------------------------------------------------- training


def _steps(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(r"step (\d+)/\d+", line))]


def _resumed_at(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(r"resuming from .*checkpoint-(\d+) \(step (\d+)\)", line))]


def _published(model_dir: Path) -> dict:
    """A finished training output: a plain model, tokenizer and training.json; nothing half-saved beside it."""
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
    assert not (model_dir / "adapter_config.json").exists()
    assert not model_dir.with_name(model_dir.name + ".checkpoints").exists()
    assert not list(model_dir.parent.glob(f".{model_dir.name}.tmp-*")), "a half-saved model was left behind"
    return json.loads((model_dir / "training.json").read_text())


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].allclose(wb[name], rtol=1e-4, atol=1e-6), f"{name}: the resumed model differs from the uninterrupted one"


def test_sft_resumes_from_its_last_complete_checkpoint(tmp_path, tiny_model_dir, crash_table):
    """Seed SFT (recipes.steps.sft_step, tiny model, 6 steps, a checkpoint every 2): killed after
    a checkpoint, then inside the next one; the rerun drops the partial checkpoint, resumes from
    the complete one, and trains the same steps an uninterrupted run trains."""
    r, run, ref = rng("sft"), tmp_path / "killed" / "run", tmp_path / "ref" / "run"
    k1 = r.choice([2, 4])
    ckpts, model = run / "sft" / "model.checkpoints", run / "sft" / "model"
    kills: list = []
    _kill("sft", run, kills, model=tiny_model_dir, label=f"after checkpoint-{k1}", timeout=600,
          hook={"kind": "checkpoint_saved", "step": k1})
    assert (ckpts / f"checkpoint-{k1}" / "trainer_state.json").is_file() and not model.exists()
    assert manifest(run)["stages"]["sft"]["status"] == "running"
    k = _kill("sft", run, kills, model=tiny_model_dir, label=f"inside checkpoint-{k1 + 2}", timeout=600,
              hook={"kind": "checkpoint_partial", "step": k1 + 2})
    assert _resumed_at(k.log.splitlines()) == [k1] and _steps(k.log.splitlines())[0] == k1 + 1
    partial = ckpts / f"checkpoint-{k1 + 2}"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()

    lines: list[str] = []
    driver.run_scenario("sft", run, model=tiny_model_dir, log=lines.append)
    assert _resumed_at(lines) == [k1], lines
    assert _steps(lines) == list(range(k1 + 1, 7)), lines
    info = _published(model)
    assert info["result"]["steps"] == 6 and info["result"]["resumed_from_step"] == k1
    assert manifest(run)["stages"]["sft"]["counts"]["steps"] == 6
    check_resumed(run, kills)

    driver.run_scenario("sft", ref, model=tiny_model_dir)  # uninterrupted
    want = {h["step"]: h["loss"] for h in _published(ref / "sft" / "model")["result"]["history"] if "loss" in h}
    got = {h["step"]: h["loss"] for h in info["result"]["history"] if "loss" in h}
    assert sorted(got) == list(range(1, 7))
    assert got == pytest.approx(want, rel=1e-4), "the resumed steps did not train what an uninterrupted run trains"
    _same_weights(model, ref / "sft" / "model")
    crash_table.add("SFT (tiny model)", [k.label for k in kills], 0, len(want))


def test_dpo_resumes_and_a_killed_final_save_is_redone(tmp_path, tiny_model_dir, crash_table):
    """DPO after a scripted Self-Rewarding iteration (recipes.steps.dpo_step, tiny model, 4 steps):
    killed after checkpoint-2, then inside the final save; the model is published once, complete."""
    run = tmp_path / "killed" / "run"
    model = run / IT / "model"
    kills: list = []
    _kill("self_rewarding_dpo", run, kills, model=tiny_model_dir, label="after checkpoint-2", timeout=600,
          hook={"kind": "checkpoint_saved", "step": 2})
    k = _kill("self_rewarding_dpo", run, kills, model=tiny_model_dir, label="inside the final save", timeout=600,
              hook={"kind": "final_save"})
    log = k.log.splitlines()
    assert _resumed_at(log) == [2] and _steps(log) == [3, 4], log
    assert Path(k.marker["tmp"]).is_dir() and not model.exists()
    assert manifest(run)["stages"][f"{IT}/dpo"]["status"] == "running"
    trained = _weights(Path(k.marker["tmp"]))  # the killed save had the trained model complete

    lines: list[str] = []
    driver.run_scenario("self_rewarding_dpo", run, model=tiny_model_dir, log=lines.append)
    assert _resumed_at(lines) == [4] and _steps(lines) == [], lines  # checkpoint-4 was complete
    info = _published(model)
    got = _weights(model)
    assert got.keys() == trained.keys() and all(got[n].equal(trained[n]) for n in got), "the published weights differ"
    assert info["result"]["steps"] == 4 and [h["step"] for h in info["result"]["history"] if "loss" in h] == [1, 2, 3, 4]
    entry = manifest(run)["stages"][f"{IT}/dpo"]
    assert entry["counts"]["steps"] == 4 and entry["counts"]["pairs"] == len(list(read_jsonl(run / IT / "pairs.jsonl")))
    check_resumed(run, kills)

    ref = tmp_path / "ref" / "run"
    driver.run_scenario("self_rewarding_dpo", ref, model=tiny_model_dir)  # uninterrupted
    want = {h["step"]: h["loss"] for h in _published(ref / IT / "model")["result"]["history"] if "loss" in h}
    got = {h["step"]: h["loss"] for h in info["result"]["history"] if "loss" in h}
    assert got == pytest.approx(want, rel=1e-4), "the resumed steps did not train what an uninterrupted run trains"
    _same_weights(model, ref / IT / "model")
    crash_table.add("DPO (tiny model)", [k.label for k in kills], 0, len(want))


# --------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_generation_on_the_embedded_model(tmp_path, embedded_model_dir, crash_table):
    """Respond with SmolLM2-135M (6 seed prompts x 3 samples, 12 tokens): killed inside the
    first batch's write; the rerun cuts the torn line and generates only what is missing."""
    r, run, rel = rng("real_respond"), tmp_path / "killed" / "run", f"{IT}/respond.jsonl"
    kills: list = []
    k = _kill("real_respond", run, kills, model=embedded_model_dir, timeout=900, **_torn(rel, 1, r))
    driver.run_scenario("real_respond", run, model=embedded_model_dir)
    check_resumed(run, kills)
    records = list(read_jsonl(run / rel))
    assert sorted((x["prompt_id"], x["sample_index"]) for x in records) == sorted(
        {(x["prompt_id"], i) for x in records for i in range(3)})
    assert len(records) == 18 and all(x["response"] for x in records[: k.compared])
    crash_table.add("respond (embedded model)", [k.label for k in kills], k.compared, 0)


@pytest.mark.slow
def test_dpo_on_the_embedded_model(tmp_path, embedded_model_dir, crash_table):
    """LoRA DPO of SmolLM2-135M (4 pairs, 3 steps, a checkpoint every step), killed after or
    inside a checkpoint; the rerun resumes after checkpoint-1 and publishes a merged model."""
    r, run = rng("real_dpo"), tmp_path / "killed" / "run"
    kind, step = r.choice([("checkpoint_saved", 1), ("checkpoint_partial", 2)])
    kills: list = []
    _kill("real_dpo", run, kills, model=embedded_model_dir, label=f"{kind.replace('_', ' ')} {step}", timeout=900,
          hook={"kind": kind, "step": step})
    lines: list[str] = []
    driver.run_scenario("real_dpo", run, model=embedded_model_dir, log=lines.append)
    assert _resumed_at(lines) == [1] and _steps(lines) == [2, 3], lines
    info = _published(run / IT / "model")
    assert info["result"]["steps"] == 3 and info["result"]["resumed_from_step"] == 1
    check_resumed(run, kills)
    crash_table.add("DPO (embedded model, LoRA)", [k.label for k in kills], 0, 0)
