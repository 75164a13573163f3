"""The Self-Rewarding recipe end to end on the real embedded model, at tiny sizes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import shared_file
from selfalign.config import load_config
from selfalign.data.records import is_done, read_jsonl
from selfalign.errors import RunError
from selfalign.recipes.config import SelfRewardingConfig
from selfalign.recipes.self_rewarding import run_self_rewarding

TINY = [
    "iterations=2",
    "sft.settings.max_steps=2",
    "sft.settings.per_device_batch_size=2",
    "sft.settings.max_length=384",
    "self_instruct.num_prompts=3",
    "self_instruct.max_new_tokens=40",
    "respond.n=3",
    "respond.max_new_tokens=32",
    "judge.k=2",
    "judge.max_new_tokens=40",
    "judge.scoring=expected",
    "dpo.max_steps=1",
    "dpo.per_device_batch_size=2",
    "dpo.max_length=256",
    # the demo's judge data (OpenAssistant rank targets) at a tenth held out; its per-iteration
    # judge evaluation is switched on later in the test, with tiny settings
    "seed_data.eft_heldout_fraction=0.1",
    "eval.judge.enabled=false",
    # the demo's pairwise judge training (eft_objective pairwise) on 4 units, one step; IFEval later
    "seed_data.max_eft=8",
    "sft.judge_pairwise.max_steps=1",
    "sft.judge_pairwise.per_device_batch_size=2",
    "eval.ifeval.enabled=false",
]


def _cfg(tmp_path, *extra):
    from selfalign.cli.run_cmd import default_recipe_config as _default_recipe_config

    return load_config(SelfRewardingConfig, _default_recipe_config(), [f"runs_dir={tmp_path}", "name=tiny", *TINY, *extra])


def _kill_when(proc, path, min_lines: int, limit: float = 1800) -> None:
    # generous limit: on a loaded 2-core machine the stages before the judge take many minutes
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= min_lines:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return
        time.sleep(0.05)
    if proc.poll() is None:  # never leave the run going (reading its stderr would wait for it)
        proc.kill()
        proc.wait(timeout=30)
    out = proc.stderr.read().decode()[-3000:] if proc.stderr else ""
    pytest.fail(f"never reached {min_lines} lines in {path} (exit {proc.poll()}):\n{out}")


@pytest.mark.slow
def test_two_iterations_on_the_embedded_model(tmp_path, embedded_model_dir):
    shared_file("oasst/oasst_en_100_trees.jsonl")  # the default config's EFT source: skip with its reason when absent
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "tiny"
    # first attempt: killed with SIGKILL in the middle of iteration 1's judging
    # small engine batches make results stream one request at a time (engine settings may change on resume)
    args = [f"--set={o}" for o in [f"runs_dir={tmp_path}", "name=tiny", *TINY, "engine.max_batch_size=2"]]
    proc = subprocess.Popen([sys.executable, "-m", "selfalign.cli", "run", *args, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(proc, run_dir / "iter_1" / "judge.jsonl", 2)
    killed = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert killed["sft"]["status"] == killed["judge_pairwise"]["status"] == "done" and killed["iter_1/judge"]["status"] == "running"
    before = (run_dir / "iter_1" / "judge.jsonl").read_bytes()
    before = before[: before.rfind(b"\n") + 1]

    # the rerun resumes: finished stages are kept, the judge continues from its last record
    result = run_self_rewarding(cfg, show_progress=False)
    assert (run_dir / "iter_1" / "judge.jsonl").read_bytes().startswith(before)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values()), manifest["stages"]
    assert [m["iteration"] for m in result.iterations] == [1, 2]
    for t in (1, 2):
        it = run_dir / f"iter_{t}"
        for name in ("self_instruct", "respond", "judge", "pairs"):
            assert is_done(it / f"{name}.jsonl"), name
        prompts = [r for r in read_jsonl(it / "self_instruct.jsonl") if r["kept"]]
        responses = list(read_jsonl(it / "respond.jsonl"))
        judgments = list(read_jsonl(it / "judge.jsonl"))
        pairs = list(read_jsonl(it / "pairs.jsonl"))
        assert len(prompts) == 3 and len(responses) == 9 and len(judgments) == 18
        assert len({j["id"] for j in judgments}) == 18  # nothing duplicated by the resume
        assert all(0 <= j["score"] <= 5 for j in judgments)  # expected scores never fail to parse
        assert pairs, "expected scores should separate at least one prompt's candidates"
        for p in pairs:
            assert p["chosen_score"] > p["rejected_score"]
            assert p["prompt"][-1]["role"] == "user" and p["chosen"][0]["role"] == "assistant"
        assert (it / "model" / "model.safetensors").is_file()
        metrics = json.loads((it / "metrics.json").read_text())
        assert metrics["candidates"] == 9 and metrics["pairs"] == len(pairs)
        assert metrics["dpo_loss_first"] is not None
    assert result.final_model == run_dir / "iter_2" / "model"

    # rerunning the finished run does nothing and changes nothing
    before = (run_dir / "iter_2" / "pairs.jsonl").read_bytes()
    again = run_self_rewarding(cfg, show_progress=False)
    assert (run_dir / "iter_2" / "pairs.jsonl").read_bytes() == before
    assert [m["pairs"] for m in again.iterations] == [m["pairs"] for m in result.iterations]

    # a change that would invalidate finished stages is refused, naming the key
    with pytest.raises(RunError, match="respond.temperature"):
        run_self_rewarding(_cfg(tmp_path, "respond.temperature=0.9"), show_progress=False)

    # evaluations asked for afterwards run on the finished run and redo nothing else
    prompts = shared_file("oasst/oasst_prompt_lottery_en_250.jsonl")
    evals = [
        "eval.judge.enabled=true", "eval.judge.k=1", "eval.judge.max_new_tokens=16",
        "eval.winrate.enabled=true", f"eval.winrate.prompts={prompts}", "eval.winrate.limit=2",
        "eval.winrate.max_new_tokens=12", "eval.winrate.verdict=forced", "eval.winrate.judge_max_new_tokens=8",
        "eval.ifeval.enabled=true", "eval.ifeval.limit=2", "eval.ifeval.max_new_tokens=8",
    ]
    evaluated = run_self_rewarding(_cfg(tmp_path, *evals), show_progress=False)
    assert (run_dir / "iter_2" / "pairs.jsonl").read_bytes() == before
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["sft/eval_judge"]["status"] == "done"  # M1, the judge of iteration 1, is evaluated too
    sft_eval = json.loads((run_dir / "sft" / "eval_judge.json").read_text())
    assert sft_eval["judge"]["model"] == "judge_pairwise/model" and sft_eval["items"] == json.loads((run_dir / "iter_1" / "eval_judge.json").read_text())["items"]
    for t, m in zip((1, 2), evaluated.iterations):
        it = run_dir / f"iter_{t}"
        assert stages[f"iter_{t}/eval_judge"]["status"] == stages[f"iter_{t}/eval_winrate"]["status"] == "done"
        judge_eval = json.loads((it / "eval_judge.json").read_text())
        assert judge_eval["kind"] == "judge_agreement" and judge_eval["items"] >= 1
        assert m["heldout_judge_accuracy"] == judge_eval["metrics"]["pairwise_accuracy"]
        assert m["heldout_longer_wins_accuracy"] == judge_eval["baselines"]["longer_wins"]["pairwise_accuracy"]
        assert m["heldout_random_accuracy"] == judge_eval["baselines"]["random"]["pairwise_accuracy"]
        assert m["heldout_length_balanced_accuracy"] == judge_eval["metrics"]["length_balanced_accuracy"]
        assert len(m["heldout_judge_accuracy_ci95"]) == 2
        assert stages[f"iter_{t}/eval_ifeval"]["status"] == "done" and 0 <= m["ifeval_prompt_level_strict"] <= 1
        assert ("ifeval_start_prompt_level_strict" in m) == (t == 1)  # the starting model once
        wr = json.loads((it / "eval_winrate.json").read_text())
        assert wr["kind"] == "winrate" and wr["n"] == 2 and wr["wins"] + wr["ties"] + wr["losses"] == 2
        assert wr["a"] == f"iter_{t}/model" and wr["b"] == ("judge_pairwise/model" if t == 1 else "iter_1/model")
        assert m["win_rate_vs_previous"] == wr["win_rate"]
    # each model's outputs are generated once: iter_1/model is side A in iteration 1 and side B in iteration 2
    assert sorted(p.name for p in (run_dir / "eval_outputs").glob("*.jsonl")) == ["iter_1_model.jsonl", "iter_2_model.jsonl", "judge_pairwise_model.jsonl"]
