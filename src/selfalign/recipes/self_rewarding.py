"""Self-Rewarding Language Models (Yuan et al., 2024), as a resumable run.

    M0 = the base model
    M1 = SFT(M0, IFT + EFT)                       # EFT teaches the judge its format
    for t = 1 .. T:                               # the paper: T = 2 (its M2, M3)
        prompts    = self_instruct(writer)        # a fixed writer (default: M0), 8-shot, ROUGE-L < 0.7, keyword filter
        candidates = respond(M_t, prompts, N)     # N samples, temperature 0.7, top-p 0.9
        rewards    = judge(M_t, candidates, K)    # mean of K rubric scores (0-5)
        pairs      = highest vs lowest reward per prompt, ties dropped
        M_{t+1}    = DPO(M_t, pairs), reference = M_t

Each role's model is a setting (``self_instruct.model``, ``respond.model``, ``judge.model``:
M_t, the base model, any model spec or an endpoint; :mod:`selfalign.recipes.roles`); fixed
ones are loaded once per run and never trained.

Everything lands in ``runs/<name>/``: ``sft/model``, and per iteration ``iter_<t>/`` with
``self_instruct.jsonl``, ``respond.jsonl``, ``judge.jsonl``, ``pairs.jsonl``, the trained
``model/`` and ``metrics.json``. Every step is a stage of the run manifest: rerunning the
same config resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from selfalign.data.records import atomic_write_json, read_jsonl
from selfalign.data.seeding import SeedData
from selfalign.recipes.config import SelfRewardingConfig
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
    write_all,
)
from selfalign.recipes.roles import RoleEngines
from selfalign.run import Run
from selfalign.stages.judge import aggregate
from selfalign.stages.pairs import Scored, make_pairs

ITER_KEYS = ["self_instruct", "respond", "judge", "pairs", "dpo"]


def run_self_rewarding(cfg: SelfRewardingConfig, *, restart_from: str | None = None, show_progress: bool = True) -> RecipeResult:
    """M1 = SFT(M0, IFT + EFT), then :func:`iteration` ``cfg.iterations`` times (the shared loop: :mod:`selfalign.recipes.iterate`)."""
    return run_iterations(cfg, iteration, restart_from=restart_from, show_progress=show_progress)


def iteration(
    run: Run, cfg: SelfRewardingConfig, t: int, model: Path, parent: Path | None, seed: SeedData, log, show_progress: bool,
    roles: RoleEngines,
) -> tuple[Path, dict]:
    """One Self-Rewarding iteration with M_t = ``model`` (trained from ``parent``); returns M_{t+1} and the metrics."""
    it = f"iter_{t}"
    keys = SEED_KEYS + ITER_KEYS  # iteration t depends on every setting that shaped M_t
    stage = {name: run.stage(f"{it}/{name}", depends_on=keys) for name in ("self_instruct", "respond", "judge", "pairs")}
    stage["dpo"] = run.stage(f"{it}/dpo", depends_on=keys, outputs=[f"{it}/model"])
    next_model = run.root / it / "model"
    engine = GenerationModel(cfg, model, parent, it, log)
    roles.for_iteration(engine)
    try:
        prompts = self_instruct_step(stage["self_instruct"], cfg, t, roles.engine("self_instruct"), seed, show_progress)  # (1)
        responses = respond_step(stage["respond"], cfg, t, roles.engine("respond"), prompts, show_progress)  # (2) N each
        judge_step(stage["judge"], cfg, t, roles.engine("judge"), responses, show_progress)  # (3) K judgments each
    finally:
        engine.close()
        roles.release()  # a GPU is left free for DPO
    pairs = pairs_step(stage["pairs"], run, cfg, t, responses)  # (4) best vs worst, ties dropped
    dpo_step(stage["dpo"], cfg, model, pairs, next_model, cfg.dpo, log, it)  # (5) M_{t+1} = DPO(M_t)
    metrics = iteration_metrics(run, t, responses, pairs)
    metrics.update(run_iteration_evals(run, cfg, t, keys, next_model, model, seed.eft_heldout, log, show_progress))
    metrics["generation_dtype"] = engine.dtype
    metrics["role_models"] = {r: roles.label(r) for r in ("self_instruct", "respond", "judge")}
    metrics["weights_changed_at_bf16"] = None if engine.changed is None else round(engine.changed, 4)
    atomic_write_json(run.root / it / "metrics.json", metrics)
    return next_model, metrics


def pairs_step(stage, run: Run, cfg: SelfRewardingConfig, t: int, responses: list[dict]) -> list[dict]:
    """(4) Highest- vs lowest-reward candidate per prompt; no pair on ties or missing rewards."""
    if not stage.done:
        rewards = aggregate(run.root / f"iter_{t}" / "judge.jsonl")
        with stage as st:
            cands = [
                Scored(r["id"], r["prompt_id"], tuple(r["messages"]), r["response"], r["sample_index"], rewards.get(r["id"]))
                for r in responses
            ]
            pairs, perfect, pstats = make_pairs(
                cands, iteration=t, perfect_score=cfg.pairs.perfect_score if cfg.pairs.export_perfect else None
            )
            with st.writer() as w:
                for p in pairs:
                    w.write(p)
            if cfg.pairs.export_perfect:
                write_all(run.root / f"iter_{t}" / "sft_positive.jsonl", perfect)
            st.finish({**pstats.as_dict(), "perfect_examples": len(perfect)})
    return list(read_jsonl(stage.path()))


def iteration_metrics(run: Run, t: int, responses: list[dict], pairs: list[dict]) -> dict:
    dropped = run.manifest["stages"].get(f"iter_{t}/pairs", {}).get("counts", {}).get("dropped", {})
    return {**common_metrics(run, t, responses, pairs), "pairs_dropped": dropped}
