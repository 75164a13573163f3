"""Paper fidelity (issue 25): role models, the prompt pool, Self-Instruct's keyword filter,
one meta-judged response per prompt, the paper configs, the optimiser details.

Recipe runs here use scripted engines and a fake trainer (a copy of the model directory), so
they exercise the recipe's wiring (which model plays which role, what is trained) in seconds.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
from scripted import ScriptedEngine

from selfalign.config import load_config
from selfalign.data.records import JsonlWriter
from selfalign.errors import DataError, ModelError
from selfalign.recipes.config import MetaRewardingConfig, SelfRewardingConfig
from selfalign.stages.self_instruct import (
    UNFIT_KEYWORDS, SelfInstructSettings, decide, keyword_pattern, run_self_instruct, unfit_keyword,
)
from selfalign.stages.rouge import RougeFilter

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- keyword filter
@pytest.mark.parametrize("text, word", [
    ("Draw a cat sitting on a fence.", "draw"),
    ("Describe the attached IMAGE in detail.", "image"),
    ("Make a flowchart of the hiring process.", "flowchart"),
    ("Please go to  the website and summarise it.", "go to"),
    ("Plot the function y = x squared.", "plot"),
    ("Compose music for a birthday party.", "music"),
])
def test_keyword_filter_flags_requests_a_text_model_cannot_do(text, word):
    assert unfit_keyword(text, keyword_pattern(UNFIT_KEYWORDS)) == word


@pytest.mark.parametrize("text", [
    "Write a short profile of a famous chemist.",  # 'file' inside a word
    "Explain how drawing conclusions from data can mislead.",  # 'drawing' is not 'draw'
    "Give me a recipe for lentil soup.",
])
def test_keyword_filter_keeps_whole_words_only(text):
    assert unfit_keyword(text, keyword_pattern(UNFIT_KEYWORDS)) is None


def test_self_instruct_counts_keyword_drops(tmp_path):
    replies = itertools.cycle([
        "Draw a map of the old town for tourists.",
        "Explain why the sky looks blue during the day.",
        "Show me a picture of a happy dog playing outside.",
        "List three ways to save money on groceries each week.",
    ])
    seeds = ["Write a poem about autumn leaves falling.", "How do vaccines train the immune system?"]
    s = SelfInstructSettings(num_prompts=2, batch_size=4, seed=0)
    with JsonlWriter(tmp_path / "si.jsonl") as w:
        stats = run_self_instruct(ScriptedEngine(lambda req, i: next(replies)), seeds, w, s, show_progress=False)
    assert stats.kept == 2 and stats.rejected["keyword"] == 2
    recs = [json.loads(x) for x in (tmp_path / "si.jsonl").read_text().splitlines()]
    assert {r["text"] for r in recs if r["reject_reason"] == "keyword"} == {
        "Draw a map of the old town for tourists.", "Show me a picture of a happy dog playing outside."}
    off = SelfInstructSettings(keyword_filter=False)
    assert decide("Draw a map of the old town.", RougeFilter(0.7, seeds), set(), off, None)[0] is None


# ----------------------------------------------------------------------------- prompt pool
def _pool(tmp_path, n: int) -> Path:
    path = tmp_path / "pool.jsonl"
    lines = [json.dumps(f"Question number {i} about topic {i * 7}?") for i in range(n - 2)]
    lines += [json.dumps({"prompt": "An object prompt?"}), json.dumps({"instruction": "An instruction prompt?"})]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_pool_draws_without_replacement_and_repeats_exactly(tmp_path):
    from selfalign.data.prompt_pool import draw_pool

    path = _pool(tmp_path, 12)
    draws = [draw_pool(path, 4, t, seed=3) for t in (1, 2, 3)]
    texts = [[p.text for _, p in d] for d in draws]
    assert sum(len(x) for x in texts) == 12 and len({x for d in texts for x in d}) == 12  # every prompt once
    assert [p.text for _, p in draw_pool(path, 4, 2, seed=3)] == texts[1]  # a resumed run draws the same
    assert [p.text for _, p in draw_pool(path, 4, 1, seed=4)] != texts[0]  # the seed picks the order
    with pytest.raises(DataError, match=r"self_instruct\.prompts: .*pool\.jsonl holds 12 distinct prompts.*iteration 4 needs prompts 13-16"):
        draw_pool(path, 4, 4, seed=3)
    with pytest.raises(DataError, match=r"self_instruct\.prompts: prompt pool file not found"):
        draw_pool(tmp_path / "missing.jsonl", 4, 1, seed=3)


# ----------------------------------------------------------------------------- meta-judge selection
def test_meta_judge_selects_the_most_disputed_response_of_each_prompt():
    from selfalign.stages.meta_judge import select_for_meta

    def js(*scores):
        return [{"score": s} for s in scores]

    groups = {"p1a": js(1, 5, 3), "p1b": js(4, 4, 3), "p2a": js(2, 3, 2), "p2b": js(0, 5, 0), "p3a": js(3, 3, 3)}
    prompt_of = {"p1a": "p1", "p1b": "p1", "p2a": "p2", "p2b": "p2", "p3a": "p3"}
    assert select_for_meta(groups, per_prompt=1, prompt_of=prompt_of) == ["p2b", "p1a"]  # p3: no disagreement
    assert sorted(select_for_meta(groups)) == ["p1a", "p1b", "p2a", "p2b"]
    assert MetaRewardingConfig().meta_judge.per_prompt == 1


# ----------------------------------------------------------------------------- role models in a run
def _reply(req, i):
    text = req.messages[-1].content
    if "Add one more task to the list" in text:
        return f"Explain idea number {len(text) * 10 + i} about {req.id[:6]} clearly and briefly."
    if "Score:" in text or "score" in text.lower():
        return f"Reasoning.\nScore: {1 + (hash((req.id, i)) % 5)}"
    return f"Answer {i} " * (i + 1)


@pytest.fixture
def fake_world(monkeypatch):
    """Every engine is scripted and records the model it was built for; training copies M_t."""
    import selfalign.recipes.roles as roles
    import selfalign.recipes.steps as steps
    from selfalign.training.outputs import TrainResult

    class Built(list):
        engines: list = []

    built = Built()  # the model spec of every engine made, in order (and the engines, in .engines)
    trained: list[tuple[str, str]] = []

    def create_engine(model_cfg, engine_cfg):
        built.append(str(model_cfg.spec))
        built.engines.append(ScriptedEngine(_reply))
        return built.engines[-1]

    def train(kind, model_dir, records, out_dir, settings, **kw):
        trained.append((kind, str(model_dir)))
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        return TrainResult(out_dir=Path(out_dir), steps=1, seconds=0.0, final_loss=0.5, num_examples=len(records))

    monkeypatch.setattr(steps, "create_engine", create_engine)
    monkeypatch.setattr(roles, "create_engine", create_engine)
    monkeypatch.setattr(steps, "train", train)
    return built, trained


def _sr_config(tmp_path, model_dir, **over) -> SelfRewardingConfig:
    data = {
        "name": "fid", "runs_dir": str(tmp_path / "runs"), "iterations": 2,
        "model": {"spec": str(model_dir), "dtype": "float32"}, "sft": {"enabled": False},
        "seed_data": {"ift": "demo", "eft": "demo"},
        "self_instruct": {"num_prompts": 3, "batch_size": 4},
        "respond": {"n": 3, "max_new_tokens": 8}, "judge": {"k": 2},
    }
    for key, value in over.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return SelfRewardingConfig.model_validate(data)


def test_fixed_prompt_writer_is_the_base_model_in_every_iteration_and_never_trained(tmp_path, tiny_model_dir, fake_world):
    from selfalign.recipes.self_rewarding import run_self_rewarding

    built, trained = fake_world
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = _sr_config(tmp_path, base)
    assert cfg.self_instruct.model == "base"  # the paper's default: a fixed writer
    res = run_self_rewarding(cfg, show_progress=False)
    metrics = [m["role_models"] for m in res.iterations]
    assert [m["self_instruct"] for m in metrics] == [str(base), str(base)]  # the writer never changes
    assert [m["respond"] for m in metrics] == [str(base), str(res.run_dir / "iter_1" / "model")]  # the actor is M_t
    assert metrics[1]["judge"] == str(res.run_dir / "iter_1" / "model")
    assert trained == [("dpo", str(base)), ("dpo", str(res.run_dir / "iter_1" / "model"))]  # DPO only ever from M_t
    # iteration 1: M_t is the base model and serves the writer too; iteration 2 loads the fixed writer, then M_2
    assert built == [str(base), str(base), str(res.run_dir / "iter_1" / "model")]


def test_external_judge_is_one_setting_and_current_writer_follows_m_t(tmp_path, tiny_model_dir, fake_world):
    from selfalign.recipes.self_rewarding import run_self_rewarding

    built, _ = fake_world
    judge_dir = tmp_path / "judge"
    shutil.copytree(tiny_model_dir, judge_dir)
    cfg = _sr_config(tmp_path, tiny_model_dir, self_instruct={"model": "current"}, judge={"model": str(judge_dir)})
    res = run_self_rewarding(cfg, show_progress=False)
    roles = [m["role_models"] for m in res.iterations]
    assert [r["judge"] for r in roles] == [str(judge_dir)] * 2
    assert roles[1]["self_instruct"] == str(res.run_dir / "iter_1" / "model")
    assert built.count(str(judge_dir)) == 1  # loaded once for the whole run (CPU: kept between iterations)


def test_on_a_gpu_a_fixed_judge_is_released_for_training_and_reloaded_unchanged(tmp_path, tiny_model_dir, fake_world, monkeypatch):
    from selfalign.recipes import roles
    from selfalign.recipes.self_rewarding import run_self_rewarding

    built, _ = fake_world
    monkeypatch.setattr(roles.RoleEngines, "_exclusive", staticmethod(lambda engine: True))  # as on a GPU
    judge_dir = tmp_path / "judge"
    shutil.copytree(tiny_model_dir, judge_dir)
    cfg = _sr_config(tmp_path, tiny_model_dir, self_instruct={"model": "current"}, judge={"model": str(judge_dir)})
    res = run_self_rewarding(cfg, show_progress=False)
    m2 = str(res.run_dir / "iter_1" / "model")
    # one model at a time: M_t, then the judge (M_t closed), next iteration M_2, then the judge again
    assert built == [str(tiny_model_dir), str(judge_dir), m2, str(judge_dir)]
    assert [m["role_models"]["judge"] for m in res.iterations] == [str(judge_dir)] * 2


def test_a_missing_role_model_fails_before_the_run_naming_the_key(tmp_path, tiny_model_dir):
    from selfalign.recipes.self_rewarding import run_self_rewarding

    cfg = _sr_config(tmp_path, tiny_model_dir, judge={"model": str(tmp_path / "no_such_model")})
    with pytest.raises(ModelError, match=r"^judge\.model: "):
        run_self_rewarding(cfg, show_progress=False)
    assert not (tmp_path / "runs").exists()
    cfg = _sr_config(tmp_path, tiny_model_dir, self_instruct={"model": {"spec": "llama", "engine": {"kind": "openai"}}})
    with pytest.raises(ModelError, match=r"self_instruct\.model: .*base_url"):
        run_self_rewarding(cfg, show_progress=False)


def test_meta_rewarding_answers_the_pool_draw_of_each_iteration(tmp_path, tiny_model_dir, fake_world):
    from selfalign.data.records import read_jsonl
    from selfalign.recipes.meta_rewarding import run_meta_rewarding

    pool = _pool(tmp_path, 8)
    cfg = MetaRewardingConfig.model_validate({
        "name": "mr", "runs_dir": str(tmp_path / "runs"), "iterations": 2, "schedule": ["actor"],
        "model": {"spec": str(tiny_model_dir), "dtype": "float32"}, "sft": {"enabled": False},
        "seed_data": {"ift": "demo", "eft": "demo"}, "self_instruct": {"prompts": str(pool), "num_prompts": 4},
        "respond": {"n": 3, "max_new_tokens": 8}, "judge": {"k": 2},
    })
    res = run_meta_rewarding(cfg, show_progress=False)
    drawn = [[r["text"] for r in read_jsonl(res.run_dir / f"iter_{t}" / "self_instruct.jsonl")] for t in (1, 2)]
    assert len(set(drawn[0] + drawn[1])) == 8  # the whole pool, no prompt twice
    answered = {r["messages"][-1]["content"] for r in read_jsonl(res.run_dir / "iter_2" / "respond.jsonl")}
    assert answered == set(drawn[1])
    cfg3 = cfg.model_copy(update={"iterations": 3, "name": "mr3"})
    with pytest.raises(DataError, match=r"holds 8 distinct prompts.*iteration 3 needs prompts 9-12"):
        run_meta_rewarding(cfg3, show_progress=False)  # caught by the preflight, before any work


# ----------------------------------------------------------------------------- paper configs
@pytest.mark.parametrize("pkg", [False, True])
def test_paper_configs_validate_and_carry_the_papers_parameters(pkg):
    base = ROOT / ("src/selfalign/configs" if pkg else "configs")
    sr = load_config(SelfRewardingConfig, base / "self_rewarding_paper.yaml")
    assert sr.iterations == 2  # M2 and M3
    si = sr.self_instruct
    assert (si.seed_shots, si.generated_shots, si.temperature, si.top_p, si.rouge_threshold) == (6, 2, 0.6, 0.9, 0.7)
    assert si.keyword_filter and si.model != "current"
    assert (sr.respond.n, sr.respond.temperature, sr.respond.top_p, sr.judge.k) == (4, 0.7, 0.9, 3)
    assert sr.seed_data.eft_targets == "agree" and sr.seed_data.eft_judge == "ift_sft" and sr.seed_data.eft_downsample_score == 4
    for s, lr, lo in ((sr.sft.settings, 5.5e-6, 1.1e-6), (sr.dpo, 1e-6, 1e-7)):
        assert (s.learning_rate, s.min_learning_rate, s.lr_scheduler, s.dropout, s.save_steps) == (lr, lo, "cosine", 0.1, 200)
        assert s.per_device_batch_size * s.gradient_accumulation_steps == 16
    assert sr.dpo.beta == 0.1
    mr = load_config(MetaRewardingConfig, base / "meta_rewarding_paper.yaml")
    assert mr.self_instruct.prompts and mr.self_instruct.num_prompts == 5000
    assert (mr.respond.n, mr.judge.k, mr.meta_judge.per_prompt, mr.iterations) == (7, 5, 1, 4)
    assert mr.schedule == ["actor+judge", "actor+judge", "actor", "actor"]
    assert (mr.respond.model, mr.judge.model, mr.meta_judge.model) == ("current",) * 3
    if pkg:
        assert (base / "self_rewarding_paper.yaml").read_text() == (ROOT / "configs/self_rewarding_paper.yaml").read_text()


# ----------------------------------------------------------------------------- optimiser details
def test_cosine_to_a_floor_and_dropout_reach_the_trainer(tmp_path, tiny_model_dir):
    from selfalign.training.common import load_model, trainer_kwargs
    from selfalign.training.config import DPOSettings

    s = DPOSettings(learning_rate=1e-6, min_learning_rate=1e-7, lr_scheduler="cosine", dropout=0.1)
    kw = trainer_kwargs(s, tmp_path / "ckpt", bf16=False)
    assert kw["lr_scheduler_type"] == "cosine_with_min_lr" and kw["lr_scheduler_kwargs"] == {"min_lr": 1e-7}
    model = load_model(tiny_model_dir, dropout=0.1)
    attn = [m for m in model.modules() if hasattr(m, "attention_dropout") and m is not model]
    assert attn and all(m.attention_dropout == 0.1 for m in attn) and model.config.attention_dropout == 0.1
    assert load_model(tiny_model_dir).config.attention_dropout == 0.0
    with pytest.raises(ValueError, match="min_learning_rate needs lr_scheduler: cosine"):
        DPOSettings(min_learning_rate=1e-7)


# ----------------------------------------------------------------------------- EFT as the paper builds it
def test_paper_eft_splits_before_judging_and_keeps_heldout_prompts_out_of_training(tmp_path, tiny_model_dir, fake_world, monkeypatch):
    from conftest import shared_file

    import selfalign.recipes.seed_eft as seed_eft
    from selfalign.data.oasst import eft_groups, load_oasst
    from selfalign.data.seeding import split_groups
    from selfalign.recipes.steps import Log, seed_model
    from selfalign.run import Run

    built, trained = fake_world
    monkeypatch.setattr(seed_eft, "create_engine", __import__("selfalign.recipes.steps", fromlist=["x"]).create_engine)
    monkeypatch.setattr(seed_eft, "train", __import__("selfalign.recipes.steps", fromlist=["x"]).train)
    oasst = shared_file("oasst/oasst_en_100_trees.jsonl")
    cfg = _sr_config(tmp_path, tiny_model_dir, sft={"enabled": True}, seed_data={
        "ift": f"oasst:{oasst}", "eft": f"oasst:{oasst}", "eft_targets": "agree", "eft_heldout_fraction": 0.3})
    assert cfg.seed_data.eft_judge == "ift_sft" and cfg.seed_data.eft_downsample_score == 4
    run = Run.open(tmp_path / "runs" / "eft", cfg.model_dump(mode="json"))
    seed, m1, parent = seed_model(run, cfg, Log(quiet=True), show_progress=False)

    groups = eft_groups(load_oasst(oasst), lang=("en",))
    train_groups, held_groups = split_groups(list(groups), 0.3, 0)
    held = {g["prompt"] for g in held_groups}
    ift_prompts = {e["messages"][0]["content"] for e in seed.ift}
    assert held and not held & ift_prompts  # held-out prompts left IFT
    assert not held & {e["instruction"] for e in seed.eft_train}  # and are not EFT training data
    # the held-out split is every reply of every held-out prompt: nothing filtered it
    assert len(seed.eft_heldout) == sum(len(g["replies"]) for g in held_groups)
    assert {e["instruction"] for e in seed.eft_heldout} == held
    # the EFT judge is the SFT baseline, trained on the cleaned IFT only; M1 starts from the base model
    sft_ift = str(run.root / "sft_ift" / "model")
    assert trained[0] == ("sft", str(tiny_model_dir)) and trained[1] == ("sft", str(tiny_model_dir))
    assert built == [sft_ift] and m1 == run.root / "sft" / "model" and parent == tiny_model_dir
    assert run.manifest["stages"]["sft_ift"]["counts"]["examples"] == len(seed.ift)
    judged = {r.messages[-1].content for r in built.engines[0].requests}
    assert len(judged) == sum(len(g["replies"]) for g in train_groups)  # only train prompts' replies were judged
    train_prompts = {g["prompt"] for g in train_groups}
    assert all(any(p in text for p in train_prompts) for text in judged)
    stats = json.loads((run.root / "seed_data.json").read_text())
    assert stats["ift_dropped"]["eft_heldout_prompt"] > 0 and stats["eft"]["judged_by"] == "sft_ift/model"
    assert stats["eft"]["train_prompts"] == len(train_groups) and stats["eft"]["heldout_prompts"] == len(held_groups)


def test_downsampling_cuts_the_over_represented_score_to_the_next_count():
    from selfalign.data.seeding import downsample_score

    eft = [{"id": str(i), "score": s} for i, s in enumerate([4] * 9 + [5] * 3 + [2] * 2 + [0])]
    kept, removed = downsample_score(eft, 4, seed=0)
    assert removed == 6 and [e["score"] for e in kept].count(4) == 3 and len(kept) == 9
    assert [e["id"] for e in kept] == sorted((e["id"] for e in kept), key=int)  # order kept
    assert downsample_score(eft, None, 0) == (eft, 0)
    assert downsample_score(eft[9:], 4, 0)[1] == 0  # nothing to cut


def test_file_eft_keeps_ranks_for_eval_judge_and_its_heldout_prompts_leave_ift(tmp_path):
    from selfalign.data.seeding import load_seed_data
    from selfalign.data.judge_items import items_from_eft
    from selfalign.recipes.config import SeedDataConfig

    eft = tmp_path / "eft.jsonl"
    rows = []
    for q in range(6):
        for r in range(3):
            rows.append({"instruction": f"Question {q}?", "response": f"reply {r}", "judgment": f"ok.\nScore: {5 - r}",
                         "human_rank": r, "prompt_id": f"q{q}"})
    eft.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    ift = tmp_path / "ift.jsonl"
    ift.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {q}?"},
                                                       {"role": "assistant", "content": "A."}]}) for q in range(6)) + "\n")
    seed = load_seed_data(SeedDataConfig(ift=str(ift), eft=str(eft), eft_heldout_fraction=0.34))
    held = {e["instruction"] for e in seed.eft_heldout}
    assert len(held) == 2 and seed.dropped["eft_heldout_prompt"] == 2
    assert not held & {e["messages"][0]["content"] for e in seed.ift}
    assert seed.eft_train[0]["score"] == 5 and seed.eft_train[0]["human_rank"] == 0
    items = items_from_eft(seed.eft_heldout)
    assert len(items) == 2 and [r["rank"] for r in items[0]["replies"]] == [0, 1, 2]


def test_eval_judge_without_a_ranked_heldout_split_fails_before_the_run(tmp_path, tiny_model_dir):
    from selfalign.errors import ConfigError
    from selfalign.recipes.preflight import check_inputs

    eft = tmp_path / "eft.jsonl"
    eft.write_text("\n".join(json.dumps({"instruction": f"Q{q}?", "response": "r", "judgment": "Score: 3"}) for q in range(8)) + "\n")
    cfg = _sr_config(tmp_path, tiny_model_dir, seed_data={"eft": str(eft), "eft_heldout_fraction": 0.5}, eval={"judge": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"eval\.judge: the held-out split of seed_data\.eft=.*no prompt with two differently ranked replies"):
        check_inputs(cfg)
    cfg = _sr_config(tmp_path, tiny_model_dir, seed_data={"eft_heldout_fraction": 0.0}, eval={"judge": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"eval\.judge is enabled but there is no held-out EFT split"):
        check_inputs(cfg)


def test_paper_configs_name_the_missing_input_they_need(tmp_path, tiny_model_dir, monkeypatch):
    from selfalign.recipes.humpback_config import HumpbackConfig
    from selfalign.recipes.preflight import check_inputs

    monkeypatch.chdir(tmp_path)  # none of the user-provided files exist here
    sr = load_config(SelfRewardingConfig, ROOT / "configs/self_rewarding_paper.yaml", [f"model.spec={tiny_model_dir}"])
    with pytest.raises(DataError, match=r"^seed_data\.ift: data/oasst1_train\.jsonl: file not found"):
        check_inputs(sr)
    mr = load_config(MetaRewardingConfig, ROOT / "configs/meta_rewarding_paper.yaml",
                     [f"model.spec={tiny_model_dir}", "seed_data.ift=demo", "seed_data.eft=demo"])
    with pytest.raises(DataError, match=r"^self_instruct\.prompts: prompt pool file not found: data/prompt_pool\.jsonl"):
        check_inputs(mr)
    hb = load_config(HumpbackConfig, ROOT / "configs/humpback_paper.yaml", [f"model.spec={tiny_model_dir}", "seed_data.ift=demo"])
    with pytest.raises(DataError, match=r"^corpus\.source: data/clueweb_segments\.jsonl: file not found"):
        check_inputs(hb)
