"""Pairwise (Bradley-Terry) judge training: the trained number is the inference score, and it learns to rank."""

from __future__ import annotations

import json

import pytest

from selfalign.errors import DataError
from selfalign.training.config import JudgePairwiseSettings, LaunchSettings
from selfalign.training.judge_pairwise import PairCollator, encode_units, pair_scores, to_units, train_judge_pairwise

FAST = dict(bf16=False, per_device_batch_size=4, max_length=400, save_steps=1000, logging_steps=1)


def units(n: int) -> list[dict]:
    """The preferred reply is on topic and polite; the other is always the same off-topic line."""
    return [{"id": f"u{i}", "instruction": f"Name a colour number {i}.", "chosen": f"Colour {i}: blue, thank you.",
             "rejected": "zzz qqq"} for i in range(n)]


def direct_scores(model_dir, responses: list[tuple[str, str]]) -> list[float]:
    """The hf engine's ``judge.scoring: direct`` score of each (instruction, response)."""
    from selfalign.config import EngineConfig, ModelConfig
    from selfalign.engines import create_engine
    from selfalign.stages.judge import LLMJudge

    recs = [{"id": f"r{i}", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": q}], "response": a}
            for i, (q, a) in enumerate(responses)]
    with create_engine(ModelConfig(spec=str(model_dir), dtype="float32"), EngineConfig(kind="hf")) as engine:
        judge = LLMJudge(engine, template="judge_brief", scoring="direct")
        return [js[0]["score"] for _, js, _ in judge.judge(recs)]


def test_trained_score_is_the_direct_judge_score(tiny_model_dir):
    """Left padding, position ids and the last-position logits give the number the judge reports."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    us = units(3)
    us[1]["chosen"] = "A much longer reply that makes this row need a lot of left padding in the batch, " * 3
    settings = JudgePairwiseSettings(**FAST)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    examples, dropped = encode_units(tok, to_units(us), settings)
    assert dropped == 0 and len(examples) == 3
    batch = PairCollator(tok.pad_token_id)(examples)
    assert batch["input_ids"].shape[0] == 6 and (batch["attention_mask"][:, -1] == 1).all()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = pair_scores(model, batch, 0).tolist()
    theirs = direct_scores(tiny_model_dir, [(u["instruction"], u[side]) for u in us for side in ("chosen", "rejected")])
    assert ours == pytest.approx(theirs, abs=2e-3)


def test_training_makes_the_judge_rank_the_preferred_reply_higher(tmp_path, tiny_model_dir):
    train = units(8)
    before = direct_scores(tiny_model_dir, [(u["instruction"], u[s]) for u in train for s in ("chosen", "rejected")])
    lines: list[str] = []
    settings = JudgePairwiseSettings(**FAST, learning_rate=3e-3, epochs=3, lr_scheduler="constant", scale=4.0)
    result = train_judge_pairwise(tiny_model_dir, train, tmp_path / "m", settings, log=lines.append)
    assert result.steps == 6 and result.num_examples == 8
    acc = result.metric("pair_accuracy")
    assert len(acc) == 6 and acc[-1] == 1.0 and result.metric("loss")[-1] < result.metric("loss")[0]
    assert any("pair_accuracy" in line for line in lines)
    after = direct_scores(tmp_path / "m", [(u["instruction"], u[s]) for u in train for s in ("chosen", "rejected")])
    margin = lambda sc: sum(sc[0::2]) / 8 - sum(sc[1::2]) / 8  # noqa: E731
    assert margin(after) > margin(before) + 0.05
    assert not all(c > r for c, r in zip(before[0::2], before[1::2]))
    assert all(c > r for c, r in zip(after[0::2], after[1::2]))
    # the saved model is a plain model that generates as before; a rerun reuses it
    again = train_judge_pairwise(tiny_model_dir, train, tmp_path / "m", settings)
    assert again.reused
    saved = json.loads((tmp_path / "m" / "training.json").read_text())
    assert saved["fingerprint"]["kind"] == "judge_pairwise"


def test_resumes_from_a_checkpoint_and_runs_in_a_child(tmp_path, tiny_model_dir):
    from test_training import _Interrupt, _interrupt_after_save

    from selfalign.training.launch import train

    settings = JudgePairwiseSettings(**{**FAST, "save_steps": 2}, learning_rate=1e-3, max_steps=4)
    with pytest.raises(_Interrupt):
        train_judge_pairwise(tiny_model_dir, units(8), tmp_path / "m", settings, callbacks=[_interrupt_after_save(2)])
    lines: list[str] = []
    result = train_judge_pairwise(tiny_model_dir, units(8), tmp_path / "m", settings, log=lines.append)
    assert result.resumed_from_step == 2 and result.steps == 4
    lines = []
    with_expert = settings.model_copy(update={"length_expert": "fit"})
    child = train("judge_pairwise", tiny_model_dir, units(8), tmp_path / "c", with_expert, launch=LaunchSettings(isolate=True),
                  log=lines.append)
    assert child.steps == 4 and (tmp_path / "c" / "training.json").is_file()
    fitted = [float(line.split("w = ")[1].split()[0]) for line in lines if "length expert w = " in line]
    assert len(fitted) == 1 and fitted[0] > 10  # the chosen reply is always the longer one here: length explains it all


def test_bad_units_and_overlong_prompts(tmp_path, tiny_model_dir):
    with pytest.raises(DataError, match=r"unit 1 \(id b\): field 'rejected'"):
        to_units([{"instruction": "q", "chosen": "a", "rejected": "b"}, {"id": "b", "instruction": "q", "chosen": "a"}])
    with pytest.raises(DataError, match="no preference units"):
        to_units([])
    with pytest.raises(DataError, match="longer than max_length"):
        train_judge_pairwise(tiny_model_dir, units(2), tmp_path / "m", JudgePairwiseSettings(**{**FAST, "max_length": 16}))
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="min_score"):
        JudgePairwiseSettings(min_score=5, max_score=5)


def test_length_expert_fit_follows_how_often_the_longer_reply_wins():
    from selfalign.training.judge_pairwise import fit_length_expert, log_length_ratio

    longer_wins = [{"instruction": "q", "chosen": "a" * 20, "rejected": "b" * 10}] * 3 + [{"instruction": "q", "chosen": "a" * 10, "rejected": "b" * 20}]
    w = fit_length_expert(longer_wins)
    # 3 of 4 prefer the reply twice as long: sigmoid(w * log 2) = 3/4 at the optimum
    assert w * log_length_ratio(longer_wins[0]) == pytest.approx(__import__("math").log(3), abs=1e-6)
    assert fit_length_expert(longer_wins[:1] + longer_wins[3:]) == pytest.approx(0.0, abs=1e-9)
    assert 10 < fit_length_expert(longer_wins[:3]) <= 20.0  # length separates every unit: large, capped, finite


def test_seed_model_with_the_pairwise_objective(tmp_path, tiny_model_dir):
    """eft_objective pairwise: SFT sees the IFT only, then the judge_pairwise stage trains M1's judge
    on the preference units; M1 generates and judges like any model, and a rerun redoes nothing."""
    from conftest import shared_file

    from selfalign.cli.run_cmd import default_recipe_config as _default_recipe_config
    from selfalign.config import EngineConfig, ModelConfig, load_config
    from selfalign.engines import create_engine
    from selfalign.engines.base import GenerationRequest, SamplingParams
    from selfalign.recipes.config import SelfRewardingConfig
    from selfalign.recipes.steps import Log, seed_model
    from selfalign.run import Run

    shared_file("oasst/oasst_en_100_trees.jsonl")
    cfg = load_config(SelfRewardingConfig, _default_recipe_config(), [
        f"runs_dir={tmp_path}", "name=pw", f"model.spec={tiny_model_dir}", "model.dtype=float32",
        "seed_data.eft_objective=pairwise", "seed_data.max_ift=4", "seed_data.max_eft=16",
        "sft.settings.max_steps=1", "sft.settings.max_length=128", "sft.settings.bf16=false",
        "sft.judge_pairwise.max_steps=2", "sft.judge_pairwise.per_device_batch_size=2", "sft.judge_pairwise.bf16=false",
        "sft.judge_pairwise.max_length=700",
    ])
    run = Run.open(tmp_path / "pw", cfg.model_dump(mode="json"))
    seed, m1, parent = seed_model(run, cfg, Log(quiet=True), False)
    assert m1 == run.root / "judge_pairwise" / "model" and parent is not None
    stages = run.manifest["stages"]
    assert stages["sft"]["counts"]["examples"] == 4  # the IFT only: no 'Score: N' examples
    assert stages["judge_pairwise"]["counts"]["units"] == len(seed.eft_units) == 8 and stages["judge_pairwise"]["counts"]["steps"] == 2
    assert {"instruction", "chosen", "rejected"} <= set(seed.eft_units[0])
    with create_engine(ModelConfig(spec=str(m1), dtype="float32"), EngineConfig(kind="hf")) as engine:
        req = GenerationRequest.chat("q", [{"role": "user", "content": "Say hi."}], SamplingParams(max_new_tokens=4, temperature=0.0))
        assert len(list(engine.generate([req]))[0].samples) == 1
    assert len(direct_scores(m1, [("Say hi.", "Hi!")])) == 1
    before = (m1 / "training.json").read_text()
    again = Run.open(tmp_path / "pw", cfg.model_dump(mode="json"))
    assert seed_model(again, cfg, Log(quiet=True), False)[1] == m1 and (m1 / "training.json").read_text() == before


def test_pairwise_objective_needs_rank_units():
    from pydantic import ValidationError

    from selfalign.recipes.config import SeedDataConfig

    with pytest.raises(ValidationError, match="eft_targets: ranks"):
        SeedDataConfig(eft_objective="pairwise")
