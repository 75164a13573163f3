"""EFT from human-ranked OpenAssistant replies as Self-Rewarding builds it (``seed_data.eft: oasst:<file>``,
``eft_targets: agree``):

    groups          = prompter turns with >= 2 human-ranked replies
    train, heldout  = split by prompt (eft_heldout_fraction)     # before any judging
    IFT            -= heldout prompts                            # no held-out prompt is trained on
    judge           = SFT(M0, IFT)    (eft_judge: ift_sft)       # the paper's SFT baseline; or M0 (base)
    EFT             = judge's judgments of the train replies, kept per prompt where their ranking
                      agrees with the humans'; score 4 down-sampled (eft_downsample_score)

The held-out side is every ranked group of the held-out prompts (no judgment, no filter), so
``eval.judge`` measures agreement on prompts nobody selected for being easy.
"""

from __future__ import annotations

from pathlib import Path

from selfalign.config import ModelConfig
from selfalign.data.records import read_jsonl
from selfalign.data.seeding import SeedData, downsample_score, drop_heldout_prompts, heldout_group_records, split_groups
from selfalign.engines import create_engine
from selfalign.run import Run
from selfalign.training.launch import train


def eft_from_oasst(run: Run, cfg, base: Path, seed: SeedData, log, show_progress: bool, seed_keys: list[str]) -> SeedData:
    """``seed`` with its EFT train/held-out sets built from ``seed_data.eft`` and its IFT cleared of
    held-out prompts; the counts land in ``seed.eft_stats``."""
    from selfalign.data.oasst import eft_groups, load_oasst
    from selfalign.stages.eft import build_eft

    sd = cfg.seed_data
    groups = eft_groups(load_oasst(sd.eft.removeprefix("oasst:")), lang=tuple(sd.oasst_lang))
    train_groups, held_groups = split_groups(list(groups), sd.eft_heldout_fraction, sd.seed)
    seed.ift, removed = drop_heldout_prompts(seed.ift, heldout_group_records(held_groups))
    if removed:
        seed.dropped = {**seed.dropped, "eft_heldout_prompt": removed}
    train_groups = train_groups[: sd.eft_max_groups] if sd.eft_max_groups else train_groups
    judge = base if sd.eft_judge == "base" else sft_ift_step(run, cfg, base, seed.ift, log, seed_keys)
    stage = run.stage("seed_eft", depends_on=seed_keys + ["judge.template"])
    if not stage.done:
        with stage as st:
            log(f"building EFT: {judge.name if judge != base else 'the base model'} judges "
                f"{sum(len(g['replies']) for g in train_groups)} replies of {len(train_groups)} train prompts "
                f"({len(held_groups)} prompts held out before judging)")
            with create_engine(ModelConfig(spec=str(judge), dtype=cfg.model.dtype), cfg.engine) as engine:
                with st.writer() as w:
                    stats = build_eft(engine, train_groups, w, template=cfg.judge.template, max_new_tokens=sd.eft_max_new_tokens,
                                      ties=sd.eft_ties, seed=cfg.seed, show_progress=show_progress)
            st.finish(stats.as_dict())
            log(f"EFT: kept {stats.kept_groups}/{stats.groups} prompts ({stats.examples} examples); dropped {dict(stats.dropped)}")
    agreed = list(read_jsonl(stage.path()))
    eft, downsampled = downsample_score(agreed, sd.eft_downsample_score, sd.seed)
    seed.eft_train = eft[: sd.max_eft] if sd.max_eft is not None else eft
    seed.eft_heldout = heldout_group_records(held_groups)
    seed.eft_stats = {
        "judged_by": "base" if judge == base else "sft_ift/model", "train_prompts": len(train_groups),
        "heldout_prompts": len(held_groups), "agreeing_examples": len(agreed),
        "downsampled": {"score": sd.eft_downsample_score, "removed": downsampled},
    }
    return seed


def sft_ift_step(run: Run, cfg, base: Path, ift: list[dict], log, seed_keys: list[str]) -> Path:
    """The paper's SFT baseline: the base model fine-tuned on IFT only (``sft.settings``); it writes
    the EFT judgments and is never used again."""
    stage = run.stage("sft_ift", depends_on=seed_keys, outputs=["sft_ift/model"])
    out = run.root / "sft_ift" / "model"
    if not stage.done:
        with stage as st:
            log(f"SFT baseline (IFT only) of {base.name} on {len(ift)} IFT examples: the EFT judge")
            res = train("sft", base, ift, out, cfg.sft.settings, launch=cfg.training, engine=cfg.engine, log=log)
            st.finish({"examples": len(ift), "steps": res.steps, "final_loss": res.final_loss, "seconds": round(res.seconds, 1),
                       "processes": res.world_size})
    return out
