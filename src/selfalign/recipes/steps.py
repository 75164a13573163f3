"""Steps the recipes share: seed EFT, SFT, a lazily loaded generation model, the
self-instruct / respond / judge / DPO stages, and the dtype rule for generating from trained models.

Each function runs one stage of a :class:`selfalign.run.Run` (skipping it when it is done) and
knows nothing about which recipe called it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from selfalign.config import GenerationConfig, ModelConfig
from selfalign.data.prompt_sets import Prompt
from selfalign.data.records import JsonlWriter, atomic_write_json, read_jsonl
from selfalign.data.seeding import SeedData, eft_to_chat, load_seed_data
from selfalign.models import resolve_model
from selfalign.engines import create_engine
from selfalign.run import Run, Stage
from selfalign.stages.generate import run_generate
from selfalign.stages.judge import ClassifierReward, FunctionReward, LLMJudge, run_judge
from selfalign.stages.self_instruct import SelfInstructSettings, kept_prompts, run_self_instruct
from selfalign.training.launch import train

# config sections every seed step depends on
SEED_KEYS = ["recipe", "seed", "model", "seed_data", "sft"]


@dataclass
class RecipeResult:
    run_dir: Path
    final_model: Path
    iterations: list[dict]
    start: dict = field(default_factory=dict)  # evaluations of the model the first iteration starts from (M1)


class Log:
    """Recipe log lines on stderr (silent with ``quiet``)."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg, highlight=False, markup=False)


def seed_model(run: Run, cfg, log, show_progress: bool) -> tuple[SeedData, Path, Path | None]:
    """Seed data, then M1 = SFT(M0) unless ``sft.enabled`` is off; returns (seed data, M1, M1's parent)."""
    base = resolve_model(cfg.model.spec, dtype=cfg.model.dtype)
    seed = load_seed_data(cfg.seed_data)
    if cfg.seed_data.eft.startswith("oasst:") and cfg.seed_data.eft_targets == "agree":
        from selfalign.recipes.seed_eft import eft_from_oasst

        seed = eft_from_oasst(run, cfg, base, seed, log, show_progress, SEED_KEYS)  # the paper's EFT construction
    atomic_write_json(run.root / "seed_data.json", {
        "ift": len(seed.ift), "eft_train": len(seed.eft_train), "eft_heldout": len(seed.eft_heldout), "ift_dropped": seed.dropped,
        "judge_pairwise_examples": len(seed.judge_chat), **({"eft": seed.eft_stats} if seed.eft_stats else {}),
    })
    if not cfg.sft.enabled:
        return seed, base, None
    return seed, sft_step(run, cfg, base, seed, log), base


class GenerationModel:
    """M_t for generation, loaded on first use (a finished stage never loads it) and closed after."""

    def __init__(self, cfg, model: Path, parent: Path | None, label: str, log) -> None:
        self.cfg, self.model, self.label, self.log = cfg, model, label, log
        self.dtype, self.changed = generation_dtype(cfg, model, parent)
        self._engine = None

    def __call__(self):
        if self._engine is None:
            why = f" ({self.changed:.1%} of the weights differ from its parent at bf16 precision)" if self.changed is not None else ""
            self.log(f"[{self.label}] loading {self.model} for generation in {self.dtype}{why}")
            self._engine = create_engine(ModelConfig(spec=str(self.model), dtype=self.dtype), self.cfg.engine)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def self_instruct_step(stage: Stage, cfg, t: int, engine, seed: SeedData, show_progress: bool) -> list[Prompt]:
    """(1) New prompts: written by the prompt writer (``engine``, the ``self_instruct.model`` role), or
    drawn from the fixed pool ``self_instruct.prompts``; returns the kept ones as prompts to answer."""
    si = cfg.self_instruct
    if not stage.done:
        with stage as st:
            if si.prompts:
                with st.writer() as w:
                    counts = write_pool_draw(w, si.prompts, si.num_prompts, t, cfg.seed)
                st.finish(counts)
            else:
                settings = self_instruct_settings(si, cfg.seed + t)
                with st.writer() as w:
                    stats = run_self_instruct(engine(), seed.prompts, w, settings, show_progress=show_progress)
                st.finish(stats.as_dict())
    return [
        Prompt(id=r["id"], messages=_with_system(r["messages"], cfg.respond.system_prompt), source=stage.name)
        for r in kept_prompts(stage.path())
    ]


def write_pool_draw(writer: JsonlWriter, pool: str, n: int, t: int, seed: int) -> dict:
    """Iteration ``t``'s draw from the prompt pool, written as kept prompt records (with each
    prompt's index in the file, so the draw can be audited); returns the stage counts."""
    from selfalign.data.prompt_pool import draw_pool

    drawn = draw_pool(pool, n, t, seed)
    for index, p in drawn:
        writer.write({"id": p.id, "kind": "prompt", "kept": True, "reject_reason": None, "text": p.text,
                      "messages": list(p.messages), "pool": pool, "pool_index": index, "source": p.source})
    return {"candidates": len(drawn), "kept": len(drawn), "rejected": {}, "pool": pool, "pool_draw": [n * (t - 1), n * t]}


def self_instruct_settings(si, seed: int) -> SelfInstructSettings:
    """The stage settings of a run's ``self_instruct`` section (without its role model and pool)."""
    extra = {"keywords": tuple(si.keywords)} if si.keywords is not None else {}
    return SelfInstructSettings(**si.model_dump(exclude={"model", "prompts", "keywords"}), **extra, seed=seed)


def respond_step(stage: Stage, cfg, t: int, engine, prompts: list[Prompt], show_progress: bool) -> list[dict]:
    """(2) ``respond.n`` candidate responses per prompt."""
    if not stage.done:
        with stage as st:
            r = cfg.respond
            gen = GenerationConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=cfg.seed + t)
            res = run_generate(engine(), prompts, st.path(), gen, show_progress=show_progress)
            st.finish({"prompts": res.prompts, "responses": res.responses, "failed": res.errors,
                       "tokens": res.completion_tokens, "tokens_per_second": round(res.tokens_per_second, 1)})
    return list(read_jsonl(stage.path()))


def judge_step(stage: Stage, cfg, t: int, engine, responses: list[dict], show_progress: bool) -> None:
    """(3) ``judge.k`` judgments of every candidate (or one reward per candidate for other rewards)."""
    if stage.done:
        return
    with stage as st:
        reward = make_reward(cfg, engine, t)
        with st.writer() as w:
            stats = run_judge(reward, responses, w, expected=reward.judgments_per_response, show_progress=show_progress)
        st.finish(stats.as_dict())


def make_reward(cfg, engine, t: int):
    j = cfg.judge
    if j.kind == "function":
        return FunctionReward.from_path(j.function)
    if j.kind == "classifier":
        return ClassifierReward(j.classifier_model)
    return LLMJudge(
        engine(), template=j.template, k=j.k, temperature=j.temperature, top_p=j.top_p,
        max_new_tokens=j.max_new_tokens, seed=cfg.seed + 1000 + t, scoring=j.scoring,
    )


def dpo_step(stage: Stage, cfg, model: Path, pairs: list[dict], out: Path, settings, log, label: str) -> None:
    """(5) M_{t+1} = DPO(M_t) on ``pairs`` with M_t as the reference model (run where ``cfg.training`` says)."""
    if stage.done:
        return
    if not pairs:
        raise RuntimeError(
            f"[{label}] no preference pairs (all candidates tied or unscored); see the pairs file and the judge's "
            "parse failures in the manifest. Raise respond.n or judge.k, use judge.scoring: expected, "
            "or fine-tune the judge with more EFT."
        )
    with stage as st:
        log(f"[{label}] DPO on {len(pairs)} pairs (beta {settings.beta}, lr {settings.learning_rate})")
        res = train("dpo", model, pairs, out, settings, launch=cfg.training, engine=cfg.engine, ref_model_dir=model, log=log)
        st.finish({"pairs": len(pairs), "steps": res.steps, "final_loss": res.final_loss, "seconds": round(res.seconds, 1),
                   "processes": res.world_size})


def write_all(path: Path, records: list[dict]) -> None:
    with JsonlWriter(path) as w:
        for r in records:
            w.write(r)
        w.mark_done()


def sft_step(run: Run, cfg, base: Path, seed: SeedData, log) -> Path:
    """M1 = SFT of the base model on IFT (+ EFT as judge-prompt -> judgment examples); with
    ``seed_data.eft_objective: pairwise`` the EFT units train the judge afterwards (:func:`judge_pairwise_step`)."""
    pairwise = cfg.sft.use_eft and getattr(cfg.seed_data, "eft_objective", "sft") == "pairwise"
    ift = list(seed.ift) if getattr(cfg.sft, "use_ift", True) else []
    eft = (list(seed.judge_chat) + ([] if pairwise else eft_to_chat(seed.eft_train, cfg.judge.template))) if cfg.sft.use_eft else []
    examples = ift + eft
    out = base
    if examples or not pairwise:
        stage = run.stage("sft", depends_on=SEED_KEYS + ["judge.template"], outputs=["sft/model"])
        out = run.root / "sft" / "model"
        if not stage.done:
            with stage as st:
                log(f"SFT of {base.name} on {len(ift)} IFT + {len(eft)} EFT examples")
                res = train("sft", base, examples, out, cfg.sft.settings, launch=cfg.training, engine=cfg.engine, log=log)
                st.finish({"examples": len(examples), "steps": res.steps, "final_loss": res.final_loss,
                           "seconds": round(res.seconds, 1), "processes": res.world_size})
    return judge_pairwise_step(run, cfg, out, seed, log) if pairwise else out


def judge_pairwise_step(run: Run, cfg, start: Path, seed: SeedData, log) -> Path:
    """The judge of M1 trained to rank: a Bradley-Terry loss on its direct score of each EFT
    unit's preferred vs other reply (:mod:`selfalign.training.judge_pairwise`), from ``start``."""
    if not seed.eft_units:
        raise RuntimeError("seed_data.eft_objective pairwise: the seed data has no preference units")
    settings = cfg.sft.judge_pairwise.model_copy(update={"template": cfg.judge.template})
    stage = run.stage("judge_pairwise", depends_on=SEED_KEYS + ["judge.template"], outputs=["judge_pairwise/model"])
    out = run.root / "judge_pairwise" / "model"
    if not stage.done:
        with stage as st:
            longer = sum(len(u["chosen"].strip()) > len(u["rejected"].strip()) for u in seed.eft_units)
            log(f"pairwise judge training of {start.name} on {len(seed.eft_units)} preference units ({longer} with the "
                f"longer reply preferred; lr {settings.learning_rate}, scale {settings.scale}, template {settings.template})")
            res = train("judge_pairwise", start, seed.eft_units, out, settings, launch=cfg.training, engine=cfg.engine, log=log)
            acc = res.metric("pair_accuracy")
            st.finish({"units": len(seed.eft_units), "steps": res.steps, "final_loss": res.final_loss,
                       "last_pair_accuracy": acc[-1] if acc else None, "seconds": round(res.seconds, 1),
                       "processes": res.world_size})
    return out


def generation_dtype(cfg, model: Path, parent: Path | None) -> tuple[str, float | None]:
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

    if cfg.model.dtype != "auto" or parent is None or cfg.engine.kind not in ("hf", "vllm"):
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


def common_metrics(run: Run, t: int, responses: list[dict], pairs: list[dict]) -> dict:
    """The metrics every recipe reports for iteration ``t``: prompts, candidates, judging, actor pairs."""
    import statistics

    from selfalign.stages.judge import judge_stats

    it = f"iter_{t}"
    stages = run.manifest["stages"]
    si = stages.get(f"{it}/self_instruct", {}).get("counts", {})
    judge = judge_stats(responses, run.root / it / "judge.jsonl").as_dict()
    lengths = [r["completion_tokens"] for r in responses]
    return {
        "iteration": t,
        "prompts_generated": si.get("candidates"),
        "prompts_kept": si.get("kept"),
        "prompts_rejected": si.get("rejected", {}),
        "candidates": len(responses),
        "mean_response_tokens": round(statistics.fmean(lengths), 1) if lengths else None,
        "judgments": judge["judgments"],
        "parse_failure_rate": judge["parse_failure_rate"],
        "score_histogram": judge["score_histogram"],
        "responses_with_score_text": judge["responses_with_score_text"],
        "pairs": len(pairs),
        "mean_reward_gap": round(statistics.fmean(p["chosen_score"] - p["rejected_score"] for p in pairs), 3) if pairs else None,
        **train_summary(run.root / it / "model"),
    }


def train_summary(model_dir: Path, kind: str = "dpo") -> dict:
    """First and last logged loss of the training that produced ``model_dir`` as
    ``<kind>_loss_first/last`` (plus the last reward margin for DPO); empty when untrained."""
    import json

    f = model_dir / "training.json"
    if not f.is_file():
        return {}
    info = json.loads(f.read_text())
    hist = info.get("result", info).get("history", [])
    losses = [h["loss"] for h in hist if "loss" in h]
    out = {
        f"{kind}_loss_first": round(losses[0], 4) if losses else None,
        f"{kind}_loss_last": round(losses[-1], 4) if losses else None,
    }
    if kind == "dpo":
        margins = [h["rewards/margins"] for h in hist if "rewards/margins" in h]
        out["reward_margin_last"] = round(margins[-1], 4) if margins else None
    return out


def _with_system(messages: list[dict], system: str | None) -> tuple[dict, ...]:
    if system and messages and messages[0]["role"] != "system":
        return ({"role": "system", "content": system}, *messages)
    return tuple(messages)


def final_report(run: Run, log) -> Path | None:
    """``runs/<name>/report/index.html`` at the end of a run; a failure to draw it is logged,
    never fatal (the run's results are already on disk; ``selfalign report`` can retry)."""
    from selfalign.report.html import write_report

    try:
        path = write_report(run.root)
    except Exception as e:  # noqa: BLE001 - the report is a view of results that are already saved
        log(f"could not write the run report ({type(e).__name__}: {e}); retry with: selfalign report {run.root}")
        return None
    log(f"report: {path}")
    return path
