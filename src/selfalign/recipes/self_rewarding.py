"""Self-Rewarding Language Models (Yuan et al., 2024), as a resumable run.

    M0 = the base model
    M1 = SFT(M0, IFT + EFT)                       # EFT teaches the judge its format
    for t = 1 .. T:
        prompts    = self_instruct(M_t)           # 8-shot, ROUGE-L < 0.7 against the pool
        candidates = respond(M_t, prompts, N)     # N samples, temperature 0.7, top-p 0.9
        rewards    = judge(M_t, candidates, K)    # mean of K rubric scores (0-5)
        pairs      = highest vs lowest reward per prompt, ties dropped
        M_{t+1}    = DPO(M_t, pairs), reference = M_t

Everything lands in ``runs/<name>/``: ``sft/model``, and per iteration ``iter_<t>/`` with
``self_instruct.jsonl``, ``respond.jsonl``, ``judge.jsonl``, ``pairs.jsonl``, the trained
``model/`` and ``metrics.json``. Every step is a stage of the run manifest: rerunning the
same config resumes where it stopped.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from selfalign.config import ModelConfig
from selfalign.data.prompts import Prompt
from selfalign.data.records import atomic_write_json, read_jsonl
from selfalign.data.seeding import SeedData, eft_to_chat, load_seed_data
from selfalign.engines import create_engine
from selfalign.models import resolve_model
from selfalign.recipes.config import SelfRewardingConfig
from selfalign.run import Run
from selfalign.stages.generate import run_generate
from selfalign.stages.judge import ClassifierReward, FunctionReward, LLMJudge, aggregate, judge_stats, run_judge
from selfalign.stages.pairs import Scored, make_pairs
from selfalign.stages.self_instruct import SelfInstructSettings, kept_prompts, run_self_instruct
from selfalign.training import train_dpo, train_sft

# what each step's output depends on (config sections); later steps depend on all earlier ones
SEED_KEYS = ["recipe", "seed", "model", "seed_data", "sft"]
ITER_KEYS = ["self_instruct", "respond", "judge", "pairs", "dpo"]


@dataclass
class RecipeResult:
    run_dir: Path
    final_model: Path
    iterations: list[dict]


class _Log:
    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg, highlight=False, markup=False)


def run_self_rewarding(cfg: SelfRewardingConfig, *, restart_from: str | None = None, show_progress: bool = True) -> RecipeResult:
    log = _Log(quiet=not show_progress)
    run = Run.open(Path(cfg.runs_dir) / cfg.name, cfg.model_dump(mode="json"), restart_from=restart_from)
    log(f"run directory: {run.root}")
    base = resolve_model(cfg.model.spec, dtype=cfg.model.dtype)
    seed = load_seed_data(cfg.seed_data)
    atomic_write_json(run.root / "seed_data.json", _seed_summary(seed))

    model = sft_step(run, cfg, base, seed, log) if cfg.sft.enabled else base
    iterations = []
    for t in range(1, cfg.iterations + 1):
        model, metrics = iteration(run, cfg, t, model, seed, log, show_progress)
        iterations.append(metrics)
    return RecipeResult(run.root, model, iterations)


def sft_step(run: Run, cfg: SelfRewardingConfig, base: Path, seed: SeedData, log) -> Path:
    """M1 = SFT of the base model on IFT (+ EFT as judge-prompt -> judgment examples)."""
    examples = list(seed.ift) + (eft_to_chat(seed.eft_train, cfg.judge.template) if cfg.sft.use_eft else [])
    stage = run.stage("sft", depends_on=SEED_KEYS + ["judge.template"], outputs=["sft/model"])
    out = run.root / "sft" / "model"
    if not stage.done:
        with stage as st:
            log(f"SFT of {base.name} on {len(seed.ift)} IFT + {len(examples) - len(seed.ift)} EFT examples")
            res = train_sft(base, examples, out, cfg.sft.settings, log=log)
            st.finish({"examples": len(examples), "steps": res.steps, "final_loss": res.final_loss, "seconds": round(res.seconds, 1)})
    return out


def iteration(run: Run, cfg: SelfRewardingConfig, t: int, model: Path, seed: SeedData, log, show_progress: bool) -> tuple[Path, dict]:
    """One Self-Rewarding iteration with M_t = ``model``; returns M_{t+1} and the metrics."""
    it = f"iter_{t}"
    keys = SEED_KEYS + ITER_KEYS  # iteration t depends on every setting that shaped M_t
    stages = {name: run.stage(f"{it}/{name}", depends_on=keys) for name in ("self_instruct", "respond", "judge", "pairs")}
    train_stage = run.stage(f"{it}/dpo", depends_on=keys, outputs=[f"{it}/model"])
    next_model = run.root / it / "model"
    engine = None

    def get_engine():
        nonlocal engine
        if engine is None:
            log(f"[{it}] loading M_{t} from {model} for generation")
            engine = create_engine(ModelConfig(spec=str(model), dtype=cfg.model.dtype), cfg.engine)
        return engine

    try:
        # (1) new prompts, written by M_t itself
        st = stages["self_instruct"]
        if not st.done:
            with st:
                si = cfg.self_instruct
                settings = SelfInstructSettings(**si.model_dump(), seed=cfg.seed + t)
                with st.writer() as w:
                    stats = run_self_instruct(get_engine(), seed.prompts, w, settings, show_progress=show_progress)
                st.finish(stats.as_dict())
        prompts = [
            Prompt(id=r["id"], messages=_with_system(r["messages"], cfg.respond.system_prompt), source=f"{it}/self_instruct")
            for r in kept_prompts(st.path())
        ]

        # (2) N candidate responses per prompt
        st = stages["respond"]
        if not st.done:
            with st:
                gen = _respond_generation(cfg, t)
                res = run_generate(get_engine(), prompts, st.path(), gen, show_progress=show_progress)
                st.finish({"prompts": res.prompts, "responses": res.responses, "tokens": res.completion_tokens,
                           "tokens_per_second": round(res.tokens_per_second, 1)})
        responses = list(read_jsonl(st.path()))

        # (3) K judgments per candidate, by M_t as its own judge
        st = stages["judge"]
        if not st.done:
            with st:
                reward = _reward(cfg, get_engine, t)
                expected = cfg.judge.k if cfg.judge.kind == "llm" else 1
                with st.writer() as w:
                    stats = run_judge(reward, responses, w, expected=expected, show_progress=show_progress)
                st.finish(stats.as_dict())
    finally:
        if engine is not None:
            engine.close()

    # (4) preference pairs: highest vs lowest reward, ties dropped
    rewards = aggregate(stages["judge"].path())
    st = stages["pairs"]
    if not st.done:
        with st:
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
                _write_all(run.root / it / "sft_positive.jsonl", perfect)
            st.finish({**pstats.as_dict(), "perfect_examples": len(perfect)})
    pairs = list(read_jsonl(st.path()))

    # (5) M_{t+1} = DPO(M_t) on the pairs, reference = M_t
    dpo_result = None
    if not train_stage.done:
        if not pairs:
            raise RuntimeError(
                f"[{it}] no preference pairs (all candidates tied or unscored); see {stages['pairs'].path()} "
                "and the judge's parse failures in the manifest. Raise respond.n or judge.k, or fine-tune the judge with more EFT."
            )
        with train_stage as st:
            log(f"[{it}] DPO on {len(pairs)} pairs (beta {cfg.dpo.beta}, lr {cfg.dpo.learning_rate})")
            dpo_result = train_dpo(model, pairs, next_model, cfg.dpo, ref_model_dir=model, log=log)
            st.finish({"pairs": len(pairs), "steps": dpo_result.steps, "final_loss": dpo_result.final_loss,
                       "seconds": round(dpo_result.seconds, 1)})
    metrics = iteration_metrics(run, t, responses, pairs)
    atomic_write_json(run.root / it / "metrics.json", metrics)
    return next_model, metrics


def iteration_metrics(run: Run, t: int, responses: list[dict], pairs: list[dict]) -> dict:
    it = f"iter_{t}"
    counts = {name: run.manifest["stages"].get(f"{it}/{name}", {}).get("counts", {}) for name in
              ("self_instruct", "respond", "judge", "pairs", "dpo")}
    judge = judge_stats(responses, run.root / it / "judge.jsonl").as_dict()
    lengths = [r["completion_tokens"] for r in responses]
    train = _train_summary(run.root / it / "model")
    return {
        "iteration": t,
        "prompts_generated": counts["self_instruct"].get("candidates"),
        "prompts_kept": counts["self_instruct"].get("kept"),
        "prompts_rejected": counts["self_instruct"].get("rejected", {}),
        "candidates": len(responses),
        "mean_response_tokens": round(statistics.fmean(lengths), 1) if lengths else None,
        "judgments": judge["judgments"],
        "parse_failure_rate": judge["parse_failure_rate"],
        "score_histogram": judge["score_histogram"],
        "responses_with_score_text": judge["responses_with_score_text"],
        "pairs": len(pairs),
        "pairs_dropped": counts["pairs"].get("dropped", {}),
        "mean_reward_gap": round(statistics.fmean(p["chosen_score"] - p["rejected_score"] for p in pairs), 3) if pairs else None,
        **train,
    }


def _train_summary(model_dir: Path) -> dict:
    import json

    f = model_dir / "training.json"
    if not f.is_file():
        return {}
    info = json.loads(f.read_text())
    hist = info.get("result", info).get("history", [])
    losses = [h["loss"] for h in hist if "loss" in h]
    margins = [h["rewards/margins"] for h in hist if "rewards/margins" in h]
    return {
        "dpo_loss_first": round(losses[0], 4) if losses else None,
        "dpo_loss_last": round(losses[-1], 4) if losses else None,
        "reward_margin_last": round(margins[-1], 4) if margins else None,
    }


def _with_system(messages: list[dict], system: str | None) -> tuple[dict, ...]:
    if system and messages and messages[0]["role"] != "system":
        return ({"role": "system", "content": system}, *messages)
    return tuple(messages)


def _respond_generation(cfg: SelfRewardingConfig, t: int):
    from selfalign.config import GenerationConfig

    r = cfg.respond
    return GenerationConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=cfg.seed + t)


def _reward(cfg: SelfRewardingConfig, get_engine, t: int):
    j = cfg.judge
    if j.kind == "function":
        return FunctionReward.from_path(j.function)
    if j.kind == "classifier":
        return ClassifierReward(j.classifier_model)
    return LLMJudge(
        get_engine(), template=j.template, k=j.k, temperature=j.temperature, top_p=j.top_p,
        max_new_tokens=j.max_new_tokens, seed=cfg.seed + 1000 + t, scoring=j.scoring,
    )


def _write_all(path: Path, records: list[dict]) -> None:
    from selfalign.data.records import JsonlWriter

    with JsonlWriter(path) as w:
        for r in records:
            w.write(r)
        w.mark_done()


def _seed_summary(seed: SeedData) -> dict:
    return {"ift": len(seed.ift), "eft_train": len(seed.eft_train), "eft_heldout": len(seed.eft_heldout), "ift_dropped": seed.dropped}
