"""Check a recipe's inputs before its run directory is created or touched.

A run that fails on bad input should fail at once, with one error naming the file, line and
field, and leave nothing behind: no half-made run directory, no changed ``config.yaml``.
:func:`check_inputs` reads (and fully validates) everything the config points at that is
read again on every invocation - the model spec, the seed data files, the prompt templates,
the evaluation prompt file - plus the Humpback corpus when the run has not stored its
segments yet. Every recipe calls it before :meth:`selfalign.run.Run.open`.

It reads what the recipe reads, with the same functions, so the two cannot disagree; the
cost is reading those files twice (the seed data and templates are small; the corpus is read
twice only by the first invocation of a Humpback run).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from selfalign.data.records import is_done
from selfalign.errors import ConfigError, ModelError


def check_inputs(cfg) -> None:
    """Raise the first :class:`selfalign.errors.SelfAlignError` the run's inputs would cause."""
    from selfalign.data.oasst import load_oasst
    from selfalign.data.seeding import load_seed_data
    from selfalign.models import resolve_model

    try:
        resolve_model(cfg.model.spec, dtype=cfg.model.dtype)
    except ModelError as e:
        raise ModelError(f"model.spec: {e}") from None
    _check_paths(cfg)
    seed = load_seed_data(cfg.seed_data)  # IFT / EFT files: every line validated
    eft = cfg.seed_data.eft
    if eft.startswith("oasst:") and eft != cfg.seed_data.ift:  # built by a stage later; validate now
        load_oasst(eft.removeprefix("oasst:"))
    _check_templates(cfg)
    _check_judge(cfg)
    _check_roles(cfg)
    _check_judge_eval(cfg, seed)
    _check_eval(cfg)
    corpus = getattr(cfg, "corpus", None)
    if corpus is not None and not is_done(Path(cfg.runs_dir) / cfg.name / "corpus.jsonl"):
        from selfalign.data.corpus import iter_documents

        for _ in iter_documents(corpus):  # every document decoded and validated
            pass


def _check_paths(cfg) -> None:
    """The data files the config names exist (a missing one is named with its key)."""
    from selfalign.errors import DataError

    sd = cfg.seed_data
    named = [("seed_data.ift", sd.ift), ("seed_data.eft", sd.eft)]
    corpus = getattr(cfg, "corpus", None)
    if corpus is not None:
        named.append(("corpus.source", corpus.source))
    for key, value in named:
        if value in ("demo", "none"):
            continue
        path = Path(value.removeprefix("oasst:").removeprefix("hf:")).expanduser()
        if not path.exists():
            raise DataError(f"{key}: {path}: file not found (paths are relative to the directory the run starts in)")


def _check_templates(cfg) -> None:
    from selfalign.prompts import (
        BACKTRANSLATE_VARIABLES,
        JUDGE_VARIABLES,
        load_template,
        validate_template,
    )

    judge = getattr(cfg, "judge", None)
    if judge is not None and judge.kind == "llm":
        validate_template(load_template(judge.template), JUDGE_VARIABLES, JUDGE_VARIABLES)
    meta = getattr(cfg, "meta_judge", None)
    if meta is not None:
        from selfalign.stages.meta_judge import META_REQUIRED, META_VARIABLES

        validate_template(load_template(meta.template), META_VARIABLES, META_REQUIRED)
    curate = getattr(cfg, "curate", None)
    if curate is not None:
        validate_template(load_template(curate.template), JUDGE_VARIABLES, JUDGE_VARIABLES)
    backward = getattr(cfg, "backward", None)
    if backward is not None:
        validate_template(load_template(backward.template), BACKTRANSLATE_VARIABLES, BACKTRANSLATE_VARIABLES)


def _check_judge(cfg) -> None:
    judge = getattr(cfg, "judge", None)
    if judge is None:
        return
    if judge.kind == "function":
        mod, _, attr = judge.function.partition(":")
        if not mod or not attr:
            raise ConfigError(f"judge.function: expected 'module:function', got {judge.function!r}")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"judge.function: cannot load {judge.function!r} ({type(e).__name__}: {e})") from None
        if not callable(fn):
            raise ConfigError(f"judge.function: {judge.function!r} is not callable")
    elif judge.kind == "classifier" and not (Path(judge.classifier_model).expanduser() / "config.json").is_file():
        raise ConfigError(f"judge.classifier_model: {judge.classifier_model} is not a model directory (no config.json)")


def _check_roles(cfg) -> None:
    """Every fixed role model resolves (``self_instruct.model`` ...), and a prompt pool lasts the run."""
    from selfalign.recipes.roles import check_roles

    check_roles(cfg)
    si = getattr(cfg, "self_instruct", None)
    if si is not None and si.prompts:
        from selfalign.data.prompt_pool import check_pool

        check_pool(si.prompts, si.num_prompts, cfg.iterations)


def _check_judge_eval(cfg, seed) -> None:
    """``eval.judge`` needs a held-out EFT split with ranked replies; a run that could not measure
    its judge fails here instead of skipping the evaluation."""
    ev = getattr(cfg, "eval", None)
    if ev is None or not ev.judge.enabled:
        return
    sd = cfg.seed_data
    if sd.eft == "none" or sd.eft_heldout_fraction == 0:
        raise ConfigError(
            f"eval.judge is enabled but there is no held-out EFT split (seed_data.eft: {sd.eft}, seed_data.eft_heldout_fraction: "
            f"{sd.eft_heldout_fraction}): set both, or eval.judge.enabled: false"
        )
    if sd.eft.startswith("oasst:") and sd.eft_targets == "agree":
        return  # held-out OpenAssistant groups: ranked by construction (recipes/seed_eft.py)
    from selfalign.data.judge_items import items_from_eft

    items = items_from_eft(seed.eft_heldout, where=f"the held-out split of seed_data.eft={sd.eft}")
    if not items:
        raise ConfigError(
            f"eval.judge: the held-out split of seed_data.eft={sd.eft!r} ({len(seed.eft_heldout)} records) has no prompt with two "
            f"differently ranked replies (dropped: {dict(items.dropped)}); give the file's records a human_rank or a score "
            f"(or a final 'Score:' line) and several replies per instruction, or raise seed_data.eft_heldout_fraction"
        )


def _check_eval(cfg) -> None:
    ev = getattr(cfg, "eval", None)
    if ev is None or not ev.winrate.enabled:
        return
    from selfalign.data.prompt_sets import load_prompts
    from selfalign.prompts import PAIRWISE_VARIABLES
    from selfalign.prompts import load_template, validate_template

    w = ev.winrate
    validate_template(load_template(w.template), PAIRWISE_VARIABLES, PAIRWISE_VARIABLES)
    load_prompts(w.prompts, system=w.system_prompt, limit=w.limit)
