"""Evaluation hooks a run can ask for after each iteration (the ``eval`` config section).

- ``eval.judge``: the judge skill of M_{t+1} (the model iteration t trained) on the run's
  held-out EFT split, the metrics of ``selfalign eval judge`` (pairwise accuracy against the
  reference ranking, ties, Spearman/Kendall, parse failures, random and longer-wins baselines).
  With an SFT stage, M1 (the judge of iteration 1) is evaluated the same way first
  (``sft/eval_judge``, :func:`run_seed_judge_eval`).
- ``eval.winrate``: M_{t+1} against M_t on a prompt set none of the iterations trained on,
  judged in both orders by a fixed judge (by default the base model, which no iteration changes),
  as ``selfalign eval winrate`` reports it.

- ``eval.ifeval``: IFEval of M_{t+1} (greedy answers to a fixed subset of the 541 prompts,
  checked by lm-eval's copy of the reference checkers; no judge), and once, in iteration 1, of
  M_1, the model the first iteration starts from (stage ``start/eval_ifeval``).

Each is a stage of the run (``iter_<t>/eval_judge``, ``iter_<t>/eval_winrate``), so a finished
evaluation is never redone; results land in ``iter_<t>/eval_judge.json`` and
``iter_<t>/eval_winrate.json`` (read by ``selfalign report``), with the judgments and outputs
under ``iter_<t>/eval_judge/``, ``iter_<t>/eval_winrate/`` and ``eval_outputs/<model>.jsonl``
(one file per model, shared by the two comparisons a model takes part in).
"""

from __future__ import annotations

import json
from pathlib import Path

from selfalign.config import ModelConfig
from selfalign.data.records import atomic_write_json
from selfalign.run import Run

EVAL_KEYS = ["eval"]


def run_iteration_evals(run: Run, cfg, t: int, keys: list[str], new_model: Path, model: Path, eft_heldout: list[dict],
                        log, show_progress: bool) -> dict:
    """The evaluations ``cfg.eval`` asks for after iteration ``t`` (M_t = ``model``, M_{t+1} =
    ``new_model``); returns the headline figures for the iteration's metrics."""
    out: dict = {}
    e = cfg.eval
    if e.judge.enabled:
        out.update(_judge_eval(run, cfg, t, keys + EVAL_KEYS, new_model, model, eft_heldout, log, show_progress))
    if e.winrate.enabled:
        out.update(_winrate_eval(run, cfg, t, keys + EVAL_KEYS, new_model, model, log, show_progress))
    if e.ifeval.enabled:
        if t == 1:  # the starting model, once
            start = _ifeval_eval(run, cfg, "start", keys + EVAL_KEYS, model, _parent_of(run, model), log, show_progress)
            out.update({k.replace("ifeval_", "ifeval_start_", 1): v for k, v in start.items()})
        out.update(_ifeval_eval(run, cfg, f"iter_{t}", keys + EVAL_KEYS, new_model, model, log, show_progress))
    return out


def run_seed_judge_eval(run: Run, cfg, keys: list[str], model: Path, parent: Path | None, eft_heldout: list[dict],
                        log, show_progress: bool) -> dict:
    """``eval.judge`` for M1, the SFT model that judges iteration 1 (stage ``sft/eval_judge``,
    results in ``sft/eval_judge.json``); nothing when the run has no SFT (M1 is the base model,
    and the first iteration's evaluation is of its successor)."""
    if not cfg.eval.judge.enabled or parent is None:
        return {}
    return _judge_eval(run, cfg, 0, keys + EVAL_KEYS, model, parent, eft_heldout, log, show_progress, name="sft",
                       label=_relative(model, run.root))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _judge_eval(run, cfg, t, keys, new_model, model, eft_heldout, log, show_progress, name: str | None = None,
                label: str | None = None) -> dict:
    from selfalign.data.judge_items import items_from_eft
    from selfalign.eval.judge_agreement import evaluate_judge
    from selfalign.recipes.steps import GenerationModel

    it = name or f"iter_{t}"
    stage = run.stage(f"{it}/eval_judge", depends_on=keys, outputs=[f"{it}/eval_judge.json"])
    if not stage.done:
        items = items_from_eft(eft_heldout, where="held-out EFT split")
        if not items:
            log(f"[{it}] eval.judge: the held-out EFT split has no ranked items (seed_data.eft_heldout_fraction, "
                f"or EFT without scores/ranks); skipped")
            return {}
        j, hook = cfg.judge, cfg.eval.judge
        engine = GenerationModel(cfg, new_model, model, f"{it} eval judge", log)
        try:
            with stage as st:
                summary = evaluate_judge(
                    engine(), items, out_dir=run.root / it / "eval_judge", template=j.template, k=hook.k,
                    scoring=hook.scoring or j.scoring, temperature=j.temperature, top_p=j.top_p,
                    max_new_tokens=hook.max_new_tokens or j.max_new_tokens, seed=cfg.seed + 3000 + t,
                    show_progress=show_progress, data="held-out EFT split", model=label or f"{it}/model",
                )
                atomic_write_json(st.run.root / it / "eval_judge.json", summary)
                st.finish({"items": summary.get("items"), **{k: summary["metrics"].get(k) for k in ("pairwise_accuracy", "tie_rate")}})
        finally:
            engine.close()
    summary = json.loads((run.root / it / "eval_judge.json").read_text())
    m, base = summary["metrics"], summary.get("baselines", {})
    rand, longer = base.get("random", {}).get("pairwise_accuracy"), base.get("longer_wins", {}).get("pairwise_accuracy")
    ci = m.get("ci95") or {}
    log(f"[{it}] held-out judge ({summary.get('pairs')} pairs of {summary.get('items')} prompts, the whole held-out "
        f"EFT split): pairwise accuracy "
        f"{_pct(m.get('pairwise_accuracy'), ci.get('pairwise_accuracy'))}, length-balanced "
        f"{_pct(m.get('length_balanced_accuracy'), ci.get('length_balanced_accuracy'))} (longer preferred "
        f"{_pct(m.get('longer_preferred_accuracy'))}, shorter preferred {_pct(m.get('shorter_preferred_accuracy'))}); "
        f"agrees with longer-wins {_pct(m.get('longer_wins_agreement'))}; baselines: random {_pct(rand)}, "
        f"longer reply wins {_pct(longer)} (length-balanced: both 50%)")
    return {"heldout_judge_accuracy": m.get("pairwise_accuracy"), "heldout_judge_tie_rate": m.get("tie_rate"),
            "heldout_judge_items": summary.get("items"), "heldout_random_accuracy": rand, "heldout_longer_wins_accuracy": longer,
            "heldout_judge_accuracy_ci95": ci.get("pairwise_accuracy"),
            "heldout_length_balanced_accuracy": m.get("length_balanced_accuracy"),
            "heldout_length_balanced_ci95": ci.get("length_balanced_accuracy"),
            "heldout_longer_preferred_accuracy": m.get("longer_preferred_accuracy"),
            "heldout_shorter_preferred_accuracy": m.get("shorter_preferred_accuracy"),
            "heldout_longer_wins_agreement": m.get("longer_wins_agreement"),
            "heldout_five_best": m.get("five_best")}


def _pct(x, ci=None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def _winrate_eval(run, cfg, t, keys, new_model, model, log, show_progress) -> dict:
    from selfalign.data.prompt_sets import load_prompts
    from selfalign.engines import create_engine
    from selfalign.eval.winrate import generate_outputs, winrate
    from selfalign.models import resolve_model
    from selfalign.recipes.steps import GenerationModel

    it = f"iter_{t}"
    stage = run.stage(f"{it}/eval_winrate", depends_on=keys, outputs=[f"{it}/eval_winrate.json"])
    w = cfg.eval.winrate
    if not stage.done:
        prompts = load_prompts(w.prompts, system=w.system_prompt, limit=w.limit)
        with stage as st:
            outputs = {}
            for label, m, parent in ((f"{it}/model", new_model, model), (_label(run, model), model, None)):
                path = run.root / "eval_outputs" / (label.replace("/", "_") + ".jsonl")
                engine = GenerationModel(cfg, m, parent if parent is not None else _parent_of(run, m), f"{it} eval winrate", log)
                try:
                    outputs[label] = generate_outputs(
                        engine(), prompts, path, max_new_tokens=w.max_new_tokens, temperature=w.temperature,
                        top_p=w.top_p, seed=cfg.seed + 4000, label=label, show_progress=show_progress,
                    )
                finally:
                    engine.close()
            judge_spec = w.judge_model or cfg.model.spec
            judge_dir = resolve_model(judge_spec, dtype=cfg.model.dtype)
            with create_engine(ModelConfig(spec=str(judge_dir), dtype=cfg.model.dtype), cfg.engine) as judge:
                a_label, b_label = list(outputs)
                summary = winrate(
                    prompts, outputs[a_label], outputs[b_label], judge, template=w.template, verdict=w.verdict,
                    max_new_tokens=w.judge_max_new_tokens, temperature=w.judge_temperature, seed=cfg.seed + 5000 + t,
                    out_dir=run.root / it / "eval_winrate", show_progress=show_progress, prompts_label=w.prompts,
                    judge_label=judge_spec, log=lambda m: log(f"[{it}] eval.winrate: {m}"),
                )
            atomic_write_json(run.root / it / "eval_winrate.json", summary)
            st.finish({k: summary.get(k) for k in ("n", "wins", "ties", "losses", "win_rate")})
            log(f"[{it}] win rate of {a_label} over {b_label}: {summary.get('win_rate')} {summary.get('ci95')} "
                f"(wins {summary.get('wins')}, ties {summary.get('ties')}, losses {summary.get('losses')})")
    s = json.loads((run.root / it / "eval_winrate.json").read_text())
    return {"win_rate_vs_previous": s.get("win_rate"), "win_rate_ci95": s.get("ci95"),
            "win_tie_loss_vs_previous": f"{s.get('wins')}/{s.get('ties')}/{s.get('losses')}"}


def _ifeval_eval(run, cfg, it: str, keys, model, parent, log, show_progress) -> dict:
    """``eval.ifeval`` of ``model``: stage ``<it>/eval_ifeval``, summary in ``<it>/eval_ifeval.json``,
    answers and per-prompt results under ``<it>/eval_ifeval/``."""
    from selfalign.eval.ifeval import evaluate_ifeval, headline, load_items, subset_label
    from selfalign.recipes.steps import GenerationModel

    h = cfg.eval.ifeval
    stage = run.stage(f"{it}/eval_ifeval", depends_on=keys, outputs=[f"{it}/eval_ifeval.json"])
    if not stage.done:
        items = load_items(h.input, limit=h.limit, sample=h.sample, seed=h.seed)
        subset = subset_label(h.limit, h.sample, h.seed, h.input)
        engine = GenerationModel(cfg, model, parent, f"{it} eval ifeval", log)
        try:
            with stage as st:
                summary = evaluate_ifeval(
                    items, run.root / it / "eval_ifeval", engine=engine(), max_new_tokens=h.max_new_tokens,
                    system_prompt=h.system_prompt, seed=h.seed, show_progress=show_progress, input_path=h.input,
                    subset=subset, model=_label(run, model),
                )
                atomic_write_json(st.run.root / it / "eval_ifeval.json", summary)
                st.finish({"prompts": summary.get("scored"),
                           **{k: summary["metrics"][k]["value"] for k in ("prompt_level_strict", "instruction_level_strict")}})
        finally:
            engine.close()
    summary = json.loads((run.root / it / "eval_ifeval.json").read_text())
    m = summary.get("metrics", {})

    def fig(name: str) -> str:
        return f"{_pct(m[name]['value'])} [{_pct(m[name]['ci95'][0])}, {_pct(m[name]['ci95'][1])}]" if name in m else "n/a"

    log(f"[{it}] IFEval of {summary.get('model')} ({_subset_words(summary, h.input)}): prompt-level strict {fig('prompt_level_strict')}, "
        f"instruction-level strict {fig('instruction_level_strict')}, loose {fig('prompt_level_loose')} / "
        f"{fig('instruction_level_loose')}")
    return headline(summary)


def _subset_words(summary: dict, input_path: str) -> str:
    """Which IFEval prompts were scored, in words; a subset says that it is one and that its
    intervals are wide (issue 22: a small subset must say so in the output)."""
    subset, scored = summary.get("subset"), summary.get("scored")
    if subset in (None, "all"):
        return f"all {scored} prompts"
    try:
        total = sum(1 for line in Path(input_path).open("rb") if line.strip())
    except OSError:
        total = None
    of = f" of the {total}" if total else ""
    return f"{scored} prompts, {subset}{of}: a small fixed subset, the same for every model; its intervals are wide"


def _label(run: Run, model: Path) -> str:
    try:
        return str(Path(model).relative_to(run.root))
    except ValueError:
        return "base"


def _parent_of(run: Run, model: Path) -> Path | None:
    """The model M_t was trained from, for the dtype rule (None for the base model)."""
    rel = _label(run, model)
    if rel == "base":
        return None
    if rel.startswith("iter_"):
        t = int(rel.split("/")[0][5:])
        prev = run.root / (f"iter_{t - 1}" if t > 1 else "sft") / "model"
        if prev.is_dir():
            return prev
    from selfalign.models import resolve_model

    return resolve_model(run.config["model"]["spec"], dtype=run.config["model"]["dtype"])

