"""Self-Alignment with Instruction Backtranslation ("Humpback", Li et al., 2024), as a resumable run.

    segments = corpus(unlabeled text)                     # segmented, deduplicated, length-filtered
    M_yx     = SFT(M_base, seed pairs reversed)           # output -> instruction
    A        = {(M_yx(y), y) for y in segments}           # self-augmentation
    M_0      = SFT(M_base, seed)
    for r = 1 .. R:
        A(r) = {(x, y) in A : rating(M_{r-1}, x, y) >= k} # self-curation, 1-5 scale
        M_r  = SFT(M_base, seed + A(r))                   # seed and augmented examples tagged
    final model = M_R                                     # used with the seed system prompt

Seed examples are trained with ``tagging.seed_system`` as their system prompt, augmented ones
with ``tagging.augmented_system``; prompt the final model with the seed one (written to
``inference.json``). Run directory: ``corpus.jsonl`` (+ stats in the manifest and
``corpus.json``), ``backward/model``, ``augment.jsonl``, ``sft/model`` (M_0), and per round
``iter_<r>/``: ``curate.jsonl`` (ratings), ``curated.jsonl`` (A(r)), ``model/`` (M_r) and
``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

from selfalign.data.records import atomic_write_json, read_jsonl
from selfalign.data.seeding import load_seed_data
from selfalign.models import resolve_model
from selfalign.recipes.humpback_config import HumpbackConfig
from selfalign.recipes.steps import GenerationModel, Log, RecipeResult, final_report, train_summary
from selfalign.recipes.preflight import check_inputs
from selfalign.run import Run
from selfalign.runlock import run_lock
from selfalign.stages.backtranslate import AugmentSettings, reversed_examples, run_augment
from selfalign.stages.curate import as_responses, curated_examples, curation_metrics, ratings, tag
from selfalign.stages.judge import LLMJudge, run_judge
from selfalign.training.launch import train

BASE_KEYS = ["recipe", "seed", "model"]
CORPUS_KEYS = BASE_KEYS + ["corpus"]
BACKWARD_KEYS = BASE_KEYS + ["seed_data", "backward"]
AUGMENT_KEYS = CORPUS_KEYS + BACKWARD_KEYS + ["augment"]
FORWARD_KEYS = BASE_KEYS + ["seed_data", "tagging", "sft"]


def run_humpback(cfg: HumpbackConfig, *, restart_from: str | None = None, show_progress: bool = True) -> RecipeResult:
    """Run (or resume) instruction backtranslation: the steps of the loop above, each a resumable stage."""
    with run_lock(Path(cfg.runs_dir) / cfg.name):  # one owner per run directory, before anything is read
        log = Log(quiet=not show_progress)
        check_inputs(cfg)  # bad input fails here, before the run directory is touched
        run = Run.open(Path(cfg.runs_dir) / cfg.name, cfg.model_dump(mode="json"), restart_from=restart_from)
        log(f"run directory: {run.root}")
        base = resolve_model(cfg.model.spec, dtype=cfg.model.dtype)
        seed = load_seed_data(cfg.seed_data).ift
        segments = corpus_step(run, cfg, log)  # unlabeled text: segmented, deduplicated, length-filtered
        backward = backward_step(run, cfg, base, seed, log)  # M_yx = SFT(base, reversed seed)
        augmented = augment_step(run, cfg, backward, base, segments, log, show_progress)  # A = {(M_yx(y), y)}
        model = forward_step(run, cfg, base, seed, [], "sft", log)  # M_0 = SFT(base, seed)
        iterations = []
        for r in range(1, cfg.rounds + 1):
            model, metrics = curation_round(run, cfg, r, model, base, seed, augmented, log, show_progress)  # A(r), M_r
            iterations.append(metrics)
        inference_note(run, cfg, model)  # the final model and the system prompt to use it with
        final_report(run, log)
        return RecipeResult(run.root, model, iterations)


def curation_round(
    run: Run, cfg: HumpbackConfig, r: int, model: Path, base: Path, seed: list[dict], augmented: list[dict], log, show_progress: bool
) -> tuple[Path, dict]:
    """Round r: A(r) = the pairs M_{r-1} rates at least k, then M_r = SFT(base, seed + A(r)); returns M_r and the metrics."""
    curated = curate_step(run, cfg, r, model, base, augmented, log, show_progress)
    model = forward_step(run, cfg, base, seed, curated, f"iter_{r}", log)
    metrics = round_metrics(run, cfg, r, augmented, len(seed), len(curated))
    atomic_write_json(run.root / f"iter_{r}" / "metrics.json", metrics)
    return model, metrics


def inference_note(run: Run, cfg: HumpbackConfig, model: Path) -> None:
    """``inference.json``: the final model and the seed system prompt it was trained to answer under."""
    atomic_write_json(run.root / "inference.json", {
        "model": str(model), "system_prompt": cfg.tagging.seed_system if cfg.tagging.enabled else None,
        "note": "prompt the final model with this system prompt (the tag its seed examples were trained with)",
    })


def corpus_step(run: Run, cfg: HumpbackConfig, log) -> list[dict]:
    """The unlabeled corpus: segmented, normalised, deduplicated and length-filtered, once per run."""
    from selfalign.data.corpus import load_corpus

    stage = run.stage("corpus", depends_on=CORPUS_KEYS)
    if not stage.done:
        segments, stats = load_corpus(cfg.corpus)
        with stage as st:
            with st.writer() as w:
                for seg in segments:
                    w.write(seg)
            st.finish(stats.as_dict())
        atomic_write_json(run.root / "corpus.json", stats.as_dict())
        log(f"corpus: {stats.kept} segments kept of {stats.segments} from {stats.documents} documents; dropped {dict(stats.dropped)}")
    return list(read_jsonl(stage.path()))


def backward_step(run: Run, cfg: HumpbackConfig, base: Path, seed: list[dict], log) -> Path:
    """M_yx: the base model fine-tuned to write the instruction for a given output."""
    stage = run.stage("backward", depends_on=BACKWARD_KEYS, outputs=["backward/model"])
    out = run.root / "backward" / "model"
    if not stage.done:
        examples = reversed_examples(seed, cfg.backward.template)
        with stage as st:
            log(f"backward model: SFT of {base.name} on {len(examples)} reversed seed pairs (output -> instruction)")
            res = train("sft", base, examples, out, cfg.backward.settings, launch=cfg.training, engine=cfg.engine, log=log)
            st.finish({"examples": len(examples), "steps": res.steps, "final_loss": res.final_loss, "seconds": round(res.seconds, 1),
                       "processes": res.world_size})
    return out


def augment_step(run: Run, cfg: HumpbackConfig, backward: Path, base: Path, segments: list[dict], log, show_progress: bool) -> list[dict]:
    """Self-augmentation: one instruction per segment, written by the backward model."""
    stage = run.stage("augment", depends_on=AUGMENT_KEYS)
    if not stage.done:
        a = cfg.augment
        settings = AugmentSettings(template=cfg.backward.template, temperature=a.temperature, top_p=a.top_p,
                                   max_new_tokens=a.max_new_tokens, min_words=a.min_words, max_words=a.max_words, seed=cfg.seed)
        engine = GenerationModel(cfg, backward, base, "augment", log)
        try:
            with stage as st:
                with st.writer() as w:
                    stats = run_augment(engine(), segments, w, settings, show_progress=show_progress)
                st.finish(stats.as_dict())
                log(f"augment: {stats.instructions} instructions for {stats.segments} segments; dropped {dict(stats.dropped)}")
        finally:
            engine.close()
    return list(read_jsonl(stage.path()))


def curate_step(
    run: Run, cfg: HumpbackConfig, r: int, model: Path, base: Path, augmented: list[dict], log, show_progress: bool
) -> list[dict]:
    """Self-curation with M_{r-1}: rate every augmented pair, keep those rated at least k."""
    it = f"iter_{r}"
    keys = AUGMENT_KEYS + FORWARD_KEYS + ["curate"]
    rate = run.stage(f"{it}/curate", depends_on=keys)
    keep = run.stage(f"{it}/curated", depends_on=keys)
    if not rate.done:
        c = cfg.curate
        engine = GenerationModel(cfg, model, base, it, log)
        try:
            with rate as st:
                judge = LLMJudge(engine(), template=c.template, k=c.judgments, temperature=c.temperature, top_p=c.top_p,
                                 max_new_tokens=c.max_new_tokens, seed=cfg.seed + 2000 + r, scoring=c.scoring, min_score=1, max_score=5)
                with st.writer() as w:
                    stats = run_judge(judge, as_responses(augmented), w, expected=judge.judgments_per_response, show_progress=show_progress)
                st.finish(stats.as_dict())
        finally:
            engine.close()
    if not keep.done:
        kept = curated_examples(augmented, ratings(rate.path()), cfg.curate.k)
        with keep as st:
            with st.writer() as w:
                for ex in kept:
                    w.write(ex)
            st.finish({"curated": len(kept), "k": cfg.curate.k})
        log(f"[{it}] curation by {model.parent.name}/{model.name}: kept {len(kept)} of {sum(1 for a in augmented if a['instruction'])} pairs rated >= {cfg.curate.k}")
    return list(read_jsonl(keep.path()))


def training_examples(cfg: HumpbackConfig, seed: list[dict], curated: list[dict]) -> list[dict]:
    """Seed + curated examples, each tagged with its source's system prompt (when tagging is on)."""
    t = cfg.tagging
    seed_ex = [tag(e, t.seed_system if t.enabled else None) for e in seed]
    aug_ex = [tag({"id": c["id"], "messages": c["messages"]}, t.augmented_system if t.enabled else None) for c in curated]
    return seed_ex + aug_ex


def forward_step(run: Run, cfg: HumpbackConfig, base: Path, seed: list[dict], curated: list[dict], where: str, log) -> Path:
    """M_r = SFT(base, seed + A(r)); ``where`` is ``sft`` for M_0 or ``iter_<r>``."""
    keys = FORWARD_KEYS if where == "sft" else AUGMENT_KEYS + FORWARD_KEYS + ["curate"]
    name = "sft" if where == "sft" else f"{where}/sft"
    stage = run.stage(name, depends_on=keys, outputs=[f"{where}/model"])
    out = run.root / where / "model"
    if not stage.done:
        examples = training_examples(cfg, seed, curated)
        with stage as st:
            log(f"[{where}] SFT of {base.name} on {len(seed)} seed + {len(curated)} augmented examples")
            res = train("sft", base, examples, out, cfg.sft, launch=cfg.training, engine=cfg.engine, log=log)
            st.finish({"examples": len(examples), "seed": len(seed), "augmented": len(curated), "steps": res.steps,
                       "final_loss": res.final_loss, "seconds": round(res.seconds, 1), "processes": res.world_size})
    return out


def round_metrics(run: Run, cfg: HumpbackConfig, r: int, augmented: list[dict], n_seed: int, n_curated: int) -> dict:
    stages = run.manifest["stages"]
    corpus = stages.get("corpus", {}).get("counts", {})
    aug = stages.get("augment", {}).get("counts", {})
    return {
        "iteration": r,
        "corpus_documents": corpus.get("documents"),
        "corpus_segments_kept": corpus.get("kept"),
        "corpus_dropped": corpus.get("dropped", {}),
        "instructions_generated": aug.get("instructions"),
        "instructions_dropped": aug.get("dropped", {}),
        **curation_metrics(augmented, run.root / f"iter_{r}" / "curate.jsonl", cfg.curate.k),
        "sft_examples": n_seed + n_curated,
        **train_summary(run.root / f"iter_{r}" / "model", kind="sft"),
    }

