"""Meta-Rewarding Language Models (Wu et al., 2024), as a resumable run.

One model plays actor, judge and meta-judge (each role's model is a setting, see
:mod:`selfalign.recipes.roles`):

    M1 = SFT(M0, EFT)                                # the seed model learns the judge format
    for t = 1 .. T:
        prompts    = pool draw (self_instruct.prompts) # the paper: 5k a round from a fixed pool
                     or self_instruct(writer)        #   else a fixed writer (default: M0) writes them
        responses  = respond(M_t, K)                 # K = 7, exact duplicates removed later
        judgments  = judge(M_t, responses, N)        # N = 5 per response, mean score
        actor      = length-controlled pairs(rho)    # shortest of the top tier vs longest of the bottom
        if schedule[t] trains the judge:
            verdicts = meta_judge(M_t, both orders of every pair of the judgments of the one response
                                  per prompt whose scores vary most)  # meta_judge.per_prompt: 1
            judge    = Elo best vs worst judgment    # position-bias weighted battle matrix
        M_{t+1}    = DPO(M_t, actor (+ judge) pairs)

Files per iteration (``runs/<name>/iter_<t>/``): ``self_instruct``, ``respond``, ``judge``,
``actor_pairs``, ``meta_judge`` (every comparison), ``judge_pairs`` (JSONL), ``model/`` and
``metrics.json``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from selfalign.data.records import atomic_write_json, read_jsonl
from selfalign.data.seeding import SeedData
from selfalign.recipes.config import MetaRewardingConfig
from selfalign.recipes.evals import run_iteration_evals
from selfalign.recipes.iterate import run_iterations
from selfalign.recipes.steps import (
    SEED_KEYS,
    GenerationModel,
    common_metrics,
    RecipeResult,
    dpo_step,
    judge_step,
    respond_step,
    self_instruct_step,
)
from selfalign.recipes.roles import RoleEngines
from selfalign.run import Run
from selfalign.stages.judge import aggregate
from selfalign.stages.length_control import make_actor_pairs
from selfalign.stages.meta_judge import MetaJudgeSettings, run_meta_judge
from selfalign.stages.pairs import Scored

ITER_KEYS = ["self_instruct", "respond", "judge", "length_control", "meta_judge", "schedule", "dpo"]


def run_meta_rewarding(cfg: MetaRewardingConfig, *, restart_from: str | None = None, show_progress: bool = True) -> RecipeResult:
    """M1 = SFT(M0, EFT), then :func:`iteration` ``cfg.iterations`` times (the shared loop: :mod:`selfalign.recipes.iterate`)."""
    return run_iterations(cfg, iteration, restart_from=restart_from, show_progress=show_progress)


def iteration(
    run: Run, cfg: MetaRewardingConfig, t: int, model: Path, parent: Path | None, seed: SeedData, log, show_progress: bool,
    roles: RoleEngines,
) -> tuple[Path, dict]:
    """One Meta-Rewarding iteration with M_t = ``model``; returns M_{t+1} and the metrics."""
    it = f"iter_{t}"
    keys = SEED_KEYS + ITER_KEYS
    train_judge = cfg.plan(t) == "actor+judge"
    names = ["self_instruct", "respond", "judge", "actor_pairs"] + (["meta_judge", "judge_pairs"] if train_judge else [])
    stage = {name: run.stage(f"{it}/{name}", depends_on=keys) for name in names}
    stage["dpo"] = run.stage(f"{it}/dpo", depends_on=keys, outputs=[f"{it}/model"])
    engine = GenerationModel(cfg, model, parent, it, log)
    roles.for_iteration(engine)
    judge_pairs: list[dict] = []
    try:
        prompts = self_instruct_step(stage["self_instruct"], cfg, t, roles.engine("self_instruct"), seed, show_progress)
        responses = respond_step(stage["respond"], cfg, t, roles.engine("respond"), prompts, show_progress)  # the actor: K each
        judge_step(stage["judge"], cfg, t, roles.engine("judge"), responses, show_progress)  # the judge: N each
        if train_judge:
            judge_pairs = meta_judge_step(stage["meta_judge"], stage["judge_pairs"], cfg, t, roles.engine("meta_judge"),
                                          responses, show_progress)
    finally:
        engine.close()
        roles.release()  # a GPU is left free for DPO
    actor_pairs = actor_pairs_step(stage["actor_pairs"], run, cfg, t, responses)
    dpo_step(stage["dpo"], cfg, model, actor_pairs + judge_pairs, run.root / it / "model", cfg.dpo, log, it)
    metrics = iteration_metrics(run, cfg, t, responses, actor_pairs, judge_pairs)
    metrics.update(run_iteration_evals(run, cfg, t, keys, run.root / it / "model", model, seed.eft_heldout, log, show_progress))
    metrics["generation_dtype"] = engine.dtype
    metrics["role_models"] = {r: roles.label(r) for r in ("self_instruct", "respond", "judge", "meta_judge")}
    atomic_write_json(run.root / it / "metrics.json", metrics)
    return run.root / it / "model", metrics


def actor_pairs_step(stage, run: Run, cfg: MetaRewardingConfig, t: int, responses: list[dict]) -> list[dict]:
    """Length-controlled actor pairs from the mean judgment scores (lengths in actor tokens)."""
    if not stage.done:
        rewards = aggregate(run.root / f"iter_{t}" / "judge.jsonl")
        cands = [
            Scored(r["id"], r["prompt_id"], tuple(r["messages"]), r["response"], r["sample_index"], rewards.get(r["id"]))
            for r in responses
        ]
        lengths = {r["id"]: r["completion_tokens"] for r in responses}
        with stage as st:
            pairs, stats = make_actor_pairs(cands, lengths, cfg.length_control.rho, iteration=t)
            with st.writer() as w:
                for p in pairs:
                    w.write(p)
            st.finish(stats.as_dict())
    return list(read_jsonl(stage.path()))


def meta_judge_step(stage, pairs_stage, cfg: MetaRewardingConfig, t: int, engine, responses: list[dict], show_progress: bool) -> list[dict]:
    """The meta-judge compares judgments in both orders; Elo picks the best and worst judgment."""
    if not pairs_stage.done:
        mj = cfg.meta_judge
        settings = MetaJudgeSettings(
            template=mj.template, judge_template=cfg.judge.template, top_k=mj.top_k, min_variance=mj.min_variance,
            per_prompt=mj.per_prompt,
            temperature=mj.temperature, top_p=mj.top_p, max_new_tokens=mj.max_new_tokens, seed=cfg.seed + 2000 + t,
            elo_l2=mj.elo_l2, verdict=mj.verdict, max_judgment_chars=mj.max_judgment_chars, max_judgment_tokens=mj.max_judgment_tokens,
            iteration=t,
        )
        judgments = list(read_jsonl(stage.path().with_name("judge.jsonl")))
        eng = engine()
        count = _token_counter(eng) if mj.max_judgment_tokens else None
        with stage as st:
            with st.writer() as w:
                pairs, stats = run_meta_judge(eng, responses, judgments, w, settings, count_tokens=count, show_progress=show_progress)
            st.finish(stats.as_dict())
        with pairs_stage as st:
            with st.writer() as w:
                for p in pairs:
                    w.write(p)
            st.finish({"judge_pairs": len(pairs)})
    return list(read_jsonl(pairs_stage.path()))


def _token_counter(engine):
    tok = getattr(engine, "tokenizer", None)
    if tok is None:
        raise ValueError("meta_judge.max_judgment_tokens needs the hf engine (a tokenizer); use max_judgment_chars")
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def iteration_metrics(run: Run, cfg: MetaRewardingConfig, t: int, responses, actor_pairs, judge_pairs) -> dict:
    counts = {k: v.get("counts", {}) for k, v in run.manifest["stages"].items() if k.startswith(f"iter_{t}/")}
    meta = counts.get(f"iter_{t}/meta_judge", {})
    actor = counts.get(f"iter_{t}/actor_pairs", {})
    return {
        **common_metrics(run, t, responses, actor_pairs),
        "schedule": cfg.plan(t),
        "pairs_dropped": actor.get("dropped", {}),
        "duplicates_removed": actor.get("duplicates_removed"),
        "mean_chosen_tokens": round(statistics.fmean(p["chosen_tokens"] for p in actor_pairs), 1) if actor_pairs else None,
        "mean_rejected_tokens": round(statistics.fmean(p["rejected_tokens"] for p in actor_pairs), 1) if actor_pairs else None,
        "judge_pairs": len(judge_pairs),
        "judge_pairs_dropped": meta.get("dropped", {}),
        "meta_comparisons": meta.get("comparisons"),
        "meta_parse_failures": meta.get("parse_failures"),
        "first_position_win_share": meta.get("first_position_win_share"),
        "elo_spread": meta.get("elo_spread"),
        "mean_judgment_chars": meta.get("mean_judgment_chars"),
    }
