"""Run directories: layout, manifest, resume, invalidation, --restart-from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from selfalign import __version__
from selfalign.config import config_hash
from selfalign.data.records import is_done, read_done
from selfalign.errors import RunError
from selfalign.run import MANIFEST_FORMAT, Run

CONFIG = {
    "model": {"spec": "smollm2-135m-instruct"},
    "generation": {"temperature": 0.7, "n": 2, "seed": 0},
    "judge": {"template": "default", "samples": 3},
    "train": {"lr": 1e-5, "epochs": 1},
    "report": {"title": "demo"},
}

STAGES = [  # name, depends_on
    ("generate", ["model", "generation"]),
    ("iter_1/judge", ["model", "generation", "judge"]),
    ("iter_1/train", ["model", "generation", "judge", "train"]),
]


def cfg(**changes) -> dict:
    out = json.loads(json.dumps(CONFIG))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        out[section][key] = value
    return out


def run_stage(run: Run, name: str, deps: list[str], n: int = 3) -> None:
    with run.stage(name, deps) as st:
        with st.writer(batch_size=2) as w:
            for i in range(n):
                w.write({"id": f"{name}-{i}", "i": i})
        st.finish({"written": n})


def full_run(root: Path) -> Run:
    run = Run.open(root, CONFIG)
    for name, deps in STAGES:
        run_stage(run, name, deps)
    return run


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_new_run_layout(tmp_path):
    root = tmp_path / "runs" / "demo"
    run = Run.open(root, CONFIG)
    assert run.root == root
    assert yaml.safe_load((root / "config.yaml").read_text()) == CONFIG
    assert list(yaml.safe_load((root / "config.yaml").read_text())) == list(CONFIG)  # order kept
    m = json.loads((root / "manifest.json").read_text())
    assert m["format"] == MANIFEST_FORMAT == 1
    assert m["selfalign_version"] == __version__
    assert m["config_hash"] == config_hash(CONFIG)
    assert m["stages"] == {} and m["created_at"] and m["updated_at"]
    assert set(m["packages"]) == {"python", "torch", "transformers", "trl", "peft", "accelerate", "datasets"}
    assert run.stages() == [] and run.manifest == m

    run_stage(run, "generate", ["generation"])
    st = run.stage("iter_1/respond", ["generation"])
    assert st.path("jsonl") == root / "iter_1" / "respond.jsonl"
    assert st.dir == root / "iter_1" / "respond"
    run_stage(run, "iter_1/respond", ["generation"])
    assert (root / "generate.jsonl").is_file() and is_done(root / "generate.jsonl")
    assert is_done(root / "iter_1" / "respond.jsonl")
    assert read_done(root / "generate.jsonl")["counts"] == {"written": 3}
    m = json.loads((root / "manifest.json").read_text())
    assert list(m["stages"]) == ["generate", "iter_1/respond"] == run.stages()
    entry = m["stages"]["generate"]
    assert entry["status"] == "done" and entry["counts"] == {"written": 3} and entry["error"] is None
    assert entry["depends_on"] == ["generation"] and entry["outputs"] == ["generate.jsonl"]
    assert entry["seconds"] >= 0 and entry["started_at"] and entry["ended_at"]


def test_reopen_same_config_skips_done_stages(tmp_path):
    root = tmp_path / "run"
    full_run(root)
    before = snapshot(root)
    run = Run.open(root, CONFIG)
    assert run.stages() == [name for name, _ in STAGES]
    assert all(run.stage(name, deps).done for name, deps in STAGES)
    assert snapshot(root) == before  # reopening with the same config writes nothing

    # an output changed after completion is no longer done
    out = root / "iter_1" / "judge.jsonl"
    out.write_bytes(out.read_bytes() + b'{"id": "tampered"}\n')
    assert not run.stage("iter_1/judge", STAGES[1][1]).done
    assert run.stage("generate", STAGES[0][1]).done


def test_changed_key_affecting_done_stage_is_refused_and_nothing_changes(tmp_path):
    root = tmp_path / "run"
    full_run(root)
    before = snapshot(root)
    with pytest.raises(RunError) as e:
        Run.open(root, cfg(judge__samples=5))
    msg = str(e.value)
    assert "judge.samples" in msg and "iter_1/judge" in msg and "iter_1/train" in msg
    assert "--restart-from iter_1/judge" in msg
    assert "generate" not in msg.split("affects stages")[1].split(";")[0]
    assert snapshot(root) == before
    assert not (root / ".superseded").exists()


def test_changed_key_affecting_no_stage_is_accepted(tmp_path):
    root = tmp_path / "run"
    full_run(root)
    new = cfg(report__title="other")
    run = Run.open(root, new)
    assert yaml.safe_load((root / "config.yaml").read_text()) == new
    assert json.loads((root / "manifest.json").read_text())["config_hash"] == config_hash(new)
    assert all(run.stage(name, deps).done for name, deps in STAGES)


def test_restart_from_moves_later_stages_aside(tmp_path):
    root = tmp_path / "run"
    full_run(root)
    old_judge = (root / "iter_1" / "judge.jsonl").read_bytes()
    new = cfg(judge__samples=5)
    run = Run.open(root, new, restart_from="iter_1/judge")
    assert run.stages() == ["generate"]
    assert run.stage("generate", STAGES[0][1]).done
    assert not (root / "iter_1" / "judge.jsonl").exists()
    assert not (root / "iter_1" / "train.jsonl").exists()
    stamps = list((root / ".superseded").iterdir())
    assert len(stamps) == 1
    moved = stamps[0] / "iter_1" / "judge"
    assert (moved / "judge.jsonl").read_bytes() == old_judge  # moved, not deleted
    assert (moved / "judge.jsonl.done").exists() and (moved / "judge.jsonl.meta.json").exists()
    assert (stamps[0] / "iter_1" / "train" / "train.jsonl").exists()
    assert yaml.safe_load((root / "config.yaml").read_text()) == new

    # the reset stages run again, with the new settings, from scratch
    judge = run.stage(*STAGES[1])
    assert not judge.done
    run_stage(run, *STAGES[1], n=2)
    assert run.stage(*STAGES[1]).done and run.stages() == ["generate", "iter_1/judge"]
    assert len((root / "iter_1" / "judge.jsonl").read_text().splitlines()) == 2


def test_restart_from_too_late_or_unknown_is_refused(tmp_path):
    root = tmp_path / "run"
    full_run(root)
    before = snapshot(root)
    with pytest.raises(RunError, match=r"no such stage.*known stages: generate, iter_1/judge, iter_1/train"):
        Run.open(root, CONFIG, restart_from="iter_9/judge")
    with pytest.raises(RunError, match="--restart-from iter_1/judge"):
        Run.open(root, cfg(judge__samples=5), restart_from="iter_1/train")
    assert snapshot(root) == before
    # restarting without a config change is allowed
    run = Run.open(root, CONFIG, restart_from="iter_1/train")
    assert run.stages() == ["generate", "iter_1/judge"]


def test_incompatible_or_missing_manifest(tmp_path):
    root = tmp_path / "run"
    Run.open(root, CONFIG)
    m = json.loads((root / "manifest.json").read_text())
    m["format"] = 7
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RunError, match=r"incompatible version \(manifest format 7, this selfalign reads 1\)"):
        Run.open(root, CONFIG)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(RunError, match="manifest.json: unreadable"):
        Run.open(root, CONFIG)
    (root / "manifest.json").unlink()
    (root / "something.txt").write_text("x")
    with pytest.raises(RunError, match="not a selfalign run directory"):
        Run.open(root, CONFIG)


def test_failed_stage_is_recorded(tmp_path):
    root = tmp_path / "run"
    run = Run.open(root, CONFIG)
    with pytest.raises(ValueError, match="engine exploded"):
        with run.stage("generate", ["generation"]) as st:
            with st.writer(batch_size=100) as w:
                w.write({"id": "a"})
            raise ValueError("engine exploded")
    entry = json.loads((root / "manifest.json").read_text())["stages"]["generate"]
    assert entry["status"] == "failed" and entry["error"] == "engine exploded" and entry["ended_at"]
    st = run.stage("generate", ["generation"])
    assert not st.done
    # the partial output survives, and a rerun resumes it
    with st:
        with st.writer() as w:
            assert "a" in w
            w.write({"id": "b"})
    assert run.stage("generate", ["generation"]).done
    assert json.loads((root / "manifest.json").read_text())["stages"]["generate"]["status"] == "done"

    # a stage left partial by a failure also blocks a config change that affects it
    with pytest.raises(RuntimeError):
        with run.stage("iter_1/judge", ["judge"]):
            raise RuntimeError("boom")
    with pytest.raises(RunError, match="iter_1/judge"):
        Run.open(root, cfg(judge__samples=9))


def test_stage_names_and_outputs_are_checked(tmp_path):
    run = Run.open(tmp_path / "run", CONFIG)
    for bad in ["", "../x", "/abs", "a//b"]:
        with pytest.raises(ValueError):
            run.stage(bad, [])
    with pytest.raises(ValueError):
        run.stage("train", [], outputs=["../elsewhere"])
    st = run.stage("iter_1/train", ["train"], outputs=["iter_1/train"])
    with st:
        st.dir.mkdir()
        (st.dir / "model.safetensors").write_bytes(b"w")
    assert run.stage("iter_1/train", ["train"], outputs=["iter_1/train"]).done
    with pytest.raises(ValueError, match="no .jsonl output"):
        st.writer()
