"""The Meta-Rewarding recipe end to end on the real embedded model, at tiny sizes."""

from __future__ import annotations

import json

import pytest

from selfalign.config import load_config
from selfalign.data.records import read_jsonl
from selfalign.recipes.config import MetaRewardingConfig
from selfalign.recipes.meta_rewarding import run_meta_rewarding

ROOT_CONFIG = "configs/meta_rewarding_demo.yaml"
TINY = [
    "iterations=2",
    "sft.settings.max_steps=2",
    "sft.settings.per_device_batch_size=2",
    "sft.settings.max_length=384",
    "self_instruct.num_prompts=2",
    "self_instruct.max_new_tokens=40",
    "respond.n=3",
    "respond.max_new_tokens=32",
    "judge.k=3",
    "judge.max_new_tokens=40",
    "meta_judge.top_k=2",
    "meta_judge.max_new_tokens=24",
    "dpo.max_steps=1",
    "dpo.per_device_batch_size=2",
    "dpo.max_length=640",
]


def _rerun_with_scripted_meta_judge(cfg, monkeypatch):
    """Redo iteration 1 from its meta-judge step with a scripted meta-judge that prefers the
    longer judgment whatever its position (then judge pairs, DPO and iteration 2 for real).

    Equal lengths are broken by the text itself, so two different judgments get the same winner
    in both orders; only two identical texts (indistinguishable in either order) go to A twice."""
    import dataclasses

    from scripted import ScriptedEngine

    import selfalign.recipes.meta_rewarding as recipe

    def verdict(req, i):
        text = req.messages[0].content
        a = text[text.index("<judgment_a>") + len("<judgment_a>") : text.index("</judgment_a>")]
        b = text[text.index("<judgment_b>") + len("<judgment_b>") : text.index("</judgment_b>")]
        return "Comparing the two.\nWinner: " + ("A" if (len(a), a) >= (len(b), b) else "B")

    real = recipe.run_meta_judge

    def scripted(engine, responses, judgments, writer, settings, **kw):
        return real(ScriptedEngine(verdict), responses, judgments, writer, dataclasses.replace(settings, verdict="sampled"), **kw)

    monkeypatch.setattr(recipe, "run_meta_judge", scripted)
    return run_meta_rewarding(cfg, restart_from="iter_1/meta_judge", show_progress=False)


@pytest.mark.slow
def test_two_iterations_with_actor_and_judge_pairs(tmp_path, embedded_model_dir, monkeypatch):
    from importlib import resources

    path = resources.files("selfalign").joinpath("configs/meta_rewarding_demo.yaml")
    cfg = load_config(MetaRewardingConfig, str(path), [f"runs_dir={tmp_path}", "name=tiny", *TINY])
    assert cfg.plan(1) == "actor+judge" and cfg.plan(2) == "actor"
    result = run_meta_rewarding(cfg, show_progress=False)
    run_dir = tmp_path / "tiny"
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values()), stages
    assert "iter_1/meta_judge" in stages and "iter_2/meta_judge" not in stages  # the schedule

    it1 = run_dir / "iter_1"
    actor = list(read_jsonl(it1 / "actor_pairs.jsonl"))
    comparisons = list(read_jsonl(it1 / "meta_judge.jsonl"))
    judge_pairs = list(read_jsonl(it1 / "judge_pairs.jsonl"))
    assert actor, "no actor pairs"
    assert all(p["rho"] == cfg.length_control.rho and p["chosen_tokens"] > 0 for p in actor)
    # both orders of every pair of judgments of the selected responses: 2 responses x 3 pairs x 2 orders
    assert len(comparisons) == 12 and {c["order"] for c in comparisons} == {"forward", "reverse"}
    assert all(c["winner"] in (c["judgment_a_id"], c["judgment_b_id"]) for c in comparisons)  # forced verdicts
    meta = stages["iter_1/meta_judge"]["counts"]
    if not judge_pairs:
        # Said explicitly, as the issue asks: the embedded 135M model, as meta-judge, prefers the
        # judgment shown first (or second) every time, so the position weights zero out all its
        # wins and every response's Elo ratings tie. The pipeline is right to make no judge pair
        # from that. To show the rest of the loop with judge pairs, the meta-judge step alone is
        # redone below with a scripted meta-judge; everything else stays the real model.
        assert meta["first_position_win_share"] in (0.0, 1.0) and meta["dropped"] == {"elo_tie": 2}, meta
        print("embedded meta-judge is fully position-biased:", json.dumps(meta))
        result = _rerun_with_scripted_meta_judge(cfg, monkeypatch)
        stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
        judge_pairs = list(read_jsonl(it1 / "judge_pairs.jsonl"))
        meta = stages["iter_1/meta_judge"]["counts"]
        # Position-blind verdicts: each unordered pair gives one A and one B win, except a pair of
        # identical judgment texts (sampling can repeat one), which the script can only call "A" twice.
        texts = {j["id"]: j["judge_output"] for j in read_jsonl(it1 / "judge.jsonl")}
        forward = [c for c in read_jsonl(it1 / "meta_judge.jsonl") if c["order"] == "forward"]
        same = sum(texts[c["judgment_a_id"]] == texts[c["judgment_b_id"]] for c in forward)
        expected = round((len(forward) + same) / (2 * len(forward)), 4)
        assert meta["first_position_win_share"] == expected and len(judge_pairs) == 2, (meta, same)
    for p in judge_pairs:
        assert p["kind"] == "judge_pair" and "<response>" in p["prompt"][0]["content"]
        assert p["chosen_score"] != p["rejected_score"] and p["chosen_elo"] > p["rejected_elo"]
    m1, m2 = result.iterations
    assert m1["judge_pairs"] == len(judge_pairs) and m1["first_position_win_share"] is not None
    assert m2["schedule"] == "actor" and m2["judge_pairs"] == 0 and m2["pairs"] > 0
    assert (run_dir / "iter_2" / "model" / "model.safetensors").is_file()
