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
    if cfg.seed_data.eft.startswith("oasst:"):
        seed.eft_train, seed.eft_heldout = eft_from_oasst(run, cfg, base, log, show_progress)
    atomic_write_json(run.root / "seed_data.json", _seed_summary(seed))

    model = sft_step(run, cfg, base, seed, log) if cfg.sft.enabled else base
    parent = base if cfg.sft.enabled else None
    iterations = []
    for t in range(1, cfg.iterations + 1):
        next_model, metrics = iteration(run, cfg, t, model, parent, seed, log, show_progress)
        model, parent = next_model, model
        iterations.append(metrics)
    return RecipeResult(run.root, model, iterations)


def eft_from_oasst(run: Run, cfg: SelfRewardingConfig, base: Path, log, show_progress: bool) -> tuple[list, list]:
    """EFT from human-ranked OpenAssistant replies, judged by the base model (kept where it agrees)."""
    from selfalign.data.oasst import eft_groups, load_oasst
    from selfalign.data.seeding import split_eft
    from selfalign.stages.eft import build_eft

    sd = cfg.seed_data
    stage = run.stage("seed_eft", depends_on=SEED_KEYS + ["judge.template"])
    if not stage.done:
        groups = eft_groups(load_oasst(sd.eft.removeprefix("oasst:")), lang=tuple(sd.oasst_lang))
        groups = groups[: sd.eft_max_groups] if sd.eft_max_groups else groups
        with stage as st:
            log(f"building EFT: the base model judges {sum(len(g['replies']) for g in groups)} replies of {len(groups)} prompts")
            with create_engine(ModelConfig(spec=str(base), dtype=cfg.model.dtype), cfg.engine) as engine:
                with st.writer() as w:
                    stats = build_eft(engine, groups, w, template=cfg.judge.template, max_new_tokens=sd.eft_max_new_tokens,
                                      ties=sd.eft_ties, seed=cfg.seed, show_progress=show_progress)
            st.finish(stats.as_dict())
            log(f"EFT: kept {stats.kept_groups}/{stats.groups} prompts ({stats.examples} examples); dropped {dict(stats.dropped)}")
    eft = list(read_jsonl(stage.path()))
    return split_eft(eft, sd.eft_heldout_fraction, sd.seed)


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


def iteration(
    run: Run, cfg: SelfRewardingConfig, t: int, model: Path, parent: Path | None, seed: SeedData, log, show_progress: bool
) -> tuple[Path, dict]:
    """One Self-Rewarding iteration with M_t = ``model`` (trained from ``parent``); returns M_{t+1} and the metrics."""
    it = f"iter_{t}"
    keys = SEED_KEYS + ITER_KEYS  # iteration t depends on every setting that shaped M_t
    stages = {name: run.stage(f"{it}/{name}", depends_on=keys) for name in ("self_instruct", "respond", "judge", "pairs")}
    train_stage = run.stage(f"{it}/dpo", depends_on=keys, outputs=[f"{it}/model"])
    next_model = run.root / it / "model"
    engine = None

    gen_dtype, changed = generation_dtype(cfg, model, parent)

    def get_engine():
        nonlocal engine
        if engine is None:
            why = f" ({changed:.1%} of the weights differ from its parent at bf16 precision)" if changed is not None else ""
            log(f"[{it}] loading M_{t} from {model} for generation in {gen_dtype}{why}")
            engine = create_engine(ModelConfig(spec=str(model), dtype=gen_dtype), cfg.engine)
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
    metrics["generation_dtype"] = gen_dtype
    metrics["weights_changed_at_bf16"] = None if changed is None else round(changed, 4)
    atomic_write_json(run.root / it / "metrics.json", metrics)
    return next_model, metrics


def generation_dtype(cfg: SelfRewardingConfig, model: Path, parent: Path | None) -> tuple[str, float | None]:
    """The dtype to generate with from ``model``, and the share of its weights that differ from
    ``parent`` once both are rounded to bf16 (None when not measured).

    Training keeps float32 weights, and its updates are small: DPO at the paper's learning rate
    (1e-6) moves most weights by less than half a bf16 step, and even the demo's SFT changes
    only about a fifth of them at bf16 precision. Loaded in bf16, a trained model falls back
    most of the way to its parent (measured on the demo: the judge's parse rate after SFT was
    5% in bf16 and 67% in float32). So with ``model.dtype: auto`` a model trained by the run is
    generated from in the dtype it was saved in; set ``model.dtype: bfloat16`` to trade that
    fidelity for speed. The base model keeps ``auto`` (bf16 where the hardware has it).
    """
    from selfalign.engines.hf import pick_device
    from selfalign.models import resolve_dtype

    if cfg.model.dtype != "auto" or parent is None or cfg.engine.kind != "hf":
        return resolve_dtype(cfg.model.dtype, pick_device(cfg.engine.device)), None
    saved = _saved_dtype(model)
    changed = bf16_changed_fraction(model, parent) if saved == "float32" else None
    return saved, changed


def _saved_dtype(model: Path) -> str:
    import json

    cfg = json.loads((model / "config.json").read_text())
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return dtype if dtype in {"float32", "bfloat16", "float16"} else "float32"


def bf16_changed_fraction(model: Path, parent: Path) -> float:
    """Share of the weights of ``model`` whose bf16 value differs from ``parent``'s."""
    from safetensors import safe_open

    def tensors(d: Path):
        files = sorted(Path(d).glob("*.safetensors"))
        return {f: safe_open(str(f), "pt") for f in files}

    changed = total = 0
    mine, theirs = tensors(model), tensors(parent)
    parent_keys = {k: h for h in theirs.values() for k in h.keys()}
    for handle in mine.values():
        for key in handle.keys():
            if key not in parent_keys:
                continue
            a = handle.get_tensor(key).to(dtype=_bf16())
            b = parent_keys[key].get_tensor(key).to(dtype=_bf16())
            if a.shape != b.shape:
                continue
            changed += int((a != b).sum())
            total += a.numel()
    return changed / total if total else 1.0


def _bf16():
    import torch

    return torch.bfloat16


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
