"""Judge training curve: held-out pairwise accuracy of the embedded judge against EFT examples.

Held-out set: the first-turn prompts (with differently ranked replies) of the OpenAssistant
trees that ``split_trees(trees, --heldout-fraction, --seed)`` holds out of
../shared/data/oasst/oasst_en_100_trees.jsonl; no message of those trees is ever trained on.
Training pool: the other trees' first turns (best vs worst reply) plus every pairwise file in
../shared/data/preference/llmbar/ (LLMBar and the Processed FairEval / LLMEval2 / MT-Bench
sets), length-balanced (:func:`selfalign.data.preferences.balance_length`: the preferred reply
is the longer one in exactly half the units), then shuffled with the seed. The first N units
of that order train the N-point of the curve, so larger points contain the smaller ones.

Rows (one SFT of the embedded SmolLM2-135M-Instruct per training size, from the base model;
``seed_data.eft_targets: ranks`` builds the same examples inside a run):

* ``pointwise``: each unit gives two examples, the ``judge_brief`` prompt answered with
  ``Score: 4`` (preferred reply) or ``Score: 1``; evaluated with ``judge.scoring: direct``
  (the probability-weighted digit after ``Score: ``, no reasoning), a pair counts as correct
  when the preferred reply scores strictly higher (ties are misses).
* ``mixed`` (at ``--mixed-at`` units): the same pointwise examples plus two ``pairwise_brief``
  examples per unit (both orders, ``Winner: A|B``); evaluated pointwise, by the forced pairwise
  verdict (P(A) after ``Winner: ``, averaged over both orders), and by their combination
  (the mean of the two preferences, each mapped to [0, 1]).
* at 0 units, the base model is evaluated the same three ways.

* ``bt`` (``--objective pairwise`` or ``both``): pairwise Bradley-Terry training of the direct
  score (:mod:`selfalign.training.judge_pairwise`; ``seed_data.eft_objective: pairwise`` in a
  run): ONE training pass over the first max(points) units, the model saved after each
  point's number of units has been seen and evaluated there (so the BT curve is "units seen"
  within one lr schedule, not separate trainings per size). Optional ``--length-expert``.
  ``--bt-schedule-units N`` plans that pass over the first N units (sampling order and lr
  schedule as for N) and stops after max(points): the early points of a longer pass, without
  paying for the rest of it.

Every row reports overall pairwise accuracy and the length split of
:mod:`selfalign.eval.length_balance` (accuracy where the preferred reply is the longer / the
shorter one, their mean = length-balanced accuracy, agreement with longer-wins), each with a
95% bootstrap interval over held-out prompts, plus training time and peak RSS.

Baselines on the same held-out pairs: random (50%) and "the longer reply wins".

    .venv/bin/python benchmarks/judge_training.py                 # -> benchmarks/results/judge_training.json
    .venv/bin/python benchmarks/judge_training.py --points 0,32 --mixed-at 0 --quick   # smoke run
    .venv/bin/python benchmarks/judge_training.py --objective pairwise --points 0,80,160,240 --mixed-at 0 \
        --no-balance --oasst-pairs all --oasst-turns all --pairwise-files <stems> --out judge_training_bt
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, machine_info, print_table, write_results

OASST = SHARED_DATA / "oasst" / "oasst_en_100_trees.jsonl"
PAIRWISE_GLOB = str(SHARED_DATA / "preference" / "llmbar" / "*.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--points", default="0,64,160,320", help="training sizes in preference units (each = 2 pointwise examples)")
    p.add_argument("--mixed-at", type=int, default=160, help="units of the pointwise + pairwise row (0: none)")
    p.add_argument("--heldout-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-rate", type=float, default=3e-5)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-balance", action="store_true", help="train on the unbalanced pool (length-biased)")
    p.add_argument("--oasst-pairs", choices=("extremes", "all"), default="extremes",
                   help="OASST units per turn: best vs worst reply, or every two replies of different rank")
    p.add_argument("--oasst-turns", choices=("first", "all"), default="first", help="OASST prompter turns to take units from")
    p.add_argument("--pairwise-files", default="all",
                   help="comma-separated stems of the llmbar/*.json files to add to the pool, 'all' or 'none'")
    p.add_argument("--no-pairwise", action="store_true", help="skip the forced pairwise verdict of the base model (slow on a CPU)")
    p.add_argument("--objective", choices=("sft", "pairwise", "both"), default="both",
                   help="which trained rows: SFT to score targets ('pointwise'), pairwise Bradley-Terry ('bt'), or both")
    p.add_argument("--bt-learning-rate", type=float, default=1e-5)
    p.add_argument("--bt-batch-size", type=int, default=4, help="units per step (each unit = 2 sequences)")
    p.add_argument("--bt-scale", type=float, default=2.0)
    p.add_argument("--bt-max-length", type=int, default=1024)
    p.add_argument("--bt-bf16", choices=("auto", "true", "false"), default="true",
                   help="bf16 autocast for BT (true: as in the probe of issue 23; needs native bf16 to be fast)")
    p.add_argument("--length-expert", default="0", help="BT length expert weight: a number, or 'fit'")
    p.add_argument("--bt-schedule-units", type=int, default=0,
                   help="BT: plan the pass (its data, sampling order and lr schedule) over the first N units, but stop "
                        "after max(--points) of them: reproduces the early points of a longer pass (0: N = max(--points))")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for training and evaluation (default: all cores; 1 lets two runs share 2 cores "
                        "without oversubscribing them)")
    p.add_argument("--quick", action="store_true", help="8 held-out items only (smoke run)")
    p.add_argument("--work", default=None, help="folder for the trained models (default: a temporary one, removed)")
    p.add_argument("--out", default="judge_training", help="results name under benchmarks/results/")
    return p.parse_args(argv)


def build_data(args):
    from selfalign.data.oasst import load_oasst
    from selfalign.data.preferences import balance_length, heldout_records, split_trees, units_from_pairwise, units_from_trees
    from selfalign.data.judge_items import items_from_eft, load_items

    trees = load_oasst(OASST)
    train_trees, held_trees = split_trees(trees, args.heldout_fraction, args.seed)
    pool = units_from_trees(train_trees, pairs=args.oasst_pairs, first_turn_only=args.oasst_turns == "first")
    files = sorted(glob.glob(PAIRWISE_GLOB))
    if args.pairwise_files != "all":
        wanted = [] if args.pairwise_files == "none" else args.pairwise_files.split(",")
        unknown = sorted(set(wanted) - {Path(f).stem for f in files})
        if unknown:
            raise SystemExit(f"--pairwise-files: no {', '.join(unknown)} in {PAIRWISE_GLOB}")
        files = [f for f in files if Path(f).stem in wanted]
    for f in files:
        pool.extend(units_from_pairwise(load_items(f), source=Path(f).stem))
    raw_stats = pool.stats()
    if not args.no_balance:
        pool = balance_length(pool, seed=args.seed)
    units = list(pool.units)
    random.Random(args.seed).shuffle(units)
    items = items_from_eft(heldout_records(held_trees), where="held-out OASST trees")
    if args.quick:
        items = items[:8]
    return units, items, {"pool_before_balance": raw_stats, "pool": pool.stats(), "train_trees": len(train_trees),
                          "heldout_trees": len(held_trees)}


def held_pairs(items):
    """(item, better reply, worse reply) for every pair with different human ranks."""
    for it in items:
        for a, b in itertools.combinations(it["replies"], 2):
            if a["rank"] != b["rank"]:
                yield (it, a, b) if a["rank"] < b["rank"] else (it, b, a)


def pointwise_scores(engine, items, work: Path) -> dict:
    from selfalign.eval.judge_agreement import evaluate_judge

    summary = evaluate_judge(engine, items, out_dir=work, template="judge_brief", scoring="direct", show_progress=False,
                             data="held-out OASST trees")
    scores = {}
    for row in map(json.loads, (work / "items.jsonl").read_text().splitlines()):
        for r in row["replies"]:
            scores[(row["id"], r["id"])] = r["score"]
    return {"summary": summary, "scores": scores}


def pairwise_prefs(engine, items) -> dict:
    """P(better reply wins) per held-out pair from the forced verdict, averaged over both orders."""
    from selfalign.prompts import pairwise_prompt

    pairs = list(held_pairs(items))
    probes = []
    for it, x, y in pairs:
        for a, b in ((x, y), (y, x)):
            probes.append(([{"role": "user", "content": pairwise_prompt("pairwise_brief", it["instruction"], a["text"], b["text"])}],
                           "Winner: "))
    probs = engine.next_token_probs(probes, ["A", "B"])
    out = {}
    for i, (it, x, y) in enumerate(pairs):
        (a1, b1), (a2, b2) = probs[2 * i], probs[2 * i + 1]
        first = a1 / (a1 + b1) if a1 + b1 > 0 else 0.5  # better reply shown as A
        second = b2 / (a2 + b2) if a2 + b2 > 0 else 0.5  # better reply shown as B
        out[(it["id"], x["id"], y["id"])] = ((first + second) / 2, first, second)
    return out


def accuracy(prefs: list[float]) -> float:
    """Share of pairs where the better reply is strictly preferred (0.5 = tie = miss)."""
    return round(sum(p > 0.5 for p in prefs) / len(prefs), 4)


def evaluate(model_dir, items, work: Path, with_pairwise: bool, threads: int | None = None) -> dict:
    from selfalign.engines.hf import HFEngine

    engine = HFEngine(model_dir, dtype="auto", threads=threads)
    t0 = time.time()
    try:
        pw = pointwise_scores(engine, items, work / "pointwise")
        pairs = list(held_pairs(items))
        point_pref = []
        for it, x, y in pairs:
            sx, sy = pw["scores"][(it["id"], x["id"])], pw["scores"][(it["id"], y["id"])]
            point_pref.append(0.5 if sx is None or sy is None else 0.5 + (sx - sy) / 10)  # 0-5 scale -> [0, 1]
        m = pw["summary"]["metrics"]
        ci = m.get("ci95") or {}
        row = {"pointwise": m["pairwise_accuracy"], "pointwise_ci95": ci.get("pairwise_accuracy"),
               "length_balanced": m.get("length_balanced_accuracy"), "length_balanced_ci95": ci.get("length_balanced_accuracy"),
               "longer_preferred": m.get("longer_preferred_accuracy"), "shorter_preferred": m.get("shorter_preferred_accuracy"),
               "longer_wins_agreement": m.get("longer_wins_agreement"),
               "pointwise_tie_rate": pw["summary"]["metrics"].get("tie_rate"),
               "score_histogram": pw["summary"]["metrics"].get("score_histogram"),
               "pointwise_longer_agreement": round(sum((p > 0.5) == (len(x["text"].strip()) > len(y["text"].strip()))
                                                       for p, (it, x, y) in zip(point_pref, pairs)) / len(pairs), 4)}
        if with_pairwise:
            pp = pairwise_prefs(engine, items)
            pair_pref = [pp[(it["id"], x["id"], y["id"])][0] for it, x, y in pairs]
            row["pairwise"] = accuracy(pair_pref)
            row["pairwise_first_position_rate"] = round(
                sum(pp[k][1] > 0.5 for k in pp) / (2 * len(pp)) + sum(pp[k][2] < 0.5 for k in pp) / (2 * len(pp)), 4)
            row["combined"] = accuracy([(a + b) / 2 for a, b in zip(point_pref, pair_pref)])
        row["eval_seconds"] = round(time.time() - t0, 1)
        return row, pw["summary"]
    finally:
        engine.close()


def train(base, units, work: Path, args, pairwise: bool) -> tuple[Path, dict]:
    from selfalign.data.preferences import pairwise_examples, pointwise_records
    from selfalign.data.seeding import eft_to_chat
    from selfalign.training.config import SFTSettings
    from selfalign.training.sft import train_sft

    examples = eft_to_chat(pointwise_records(units), "judge_brief")
    if pairwise:
        examples += pairwise_examples(units)
    random.Random(args.seed).shuffle(examples)
    settings = SFTSettings(learning_rate=args.learning_rate, epochs=args.epochs, per_device_batch_size=args.batch_size,
                           max_length=1024, save_steps=10_000, bf16="auto", seed=args.seed)
    out = work / "model"
    res = train_sft(base, examples, out, settings)
    return out, {"examples": len(examples), "steps": res.steps, "final_loss": res.final_loss, "train_seconds": round(res.seconds, 1)}


def train_bt_curve(base, units, points: list[int], work: Path, args) -> list[tuple[int, Path, dict]]:
    """One BT pass over ``units[:max(points)]``; the model after each point's units is saved
    and returned as (units seen, model dir, training info)."""
    from transformers import TrainerCallback

    from selfalign import memory
    from selfalign.training.config import JudgePairwiseSettings
    from selfalign.training.judge_pairwise import train_judge_pairwise

    n = max(points)
    planned = max(n, args.bt_schedule_units)  # units the pass (and its lr schedule) is planned over
    bs = args.bt_batch_size
    at_step = {p // bs: p for p in points if p > 0 and p % bs == 0}
    if len(at_step) != len([p for p in points if p > 0]):
        raise SystemExit(f"--points must be multiples of --bt-batch-size ({bs}) for the BT curve")
    saved: dict[int, Path] = {}
    t0 = time.time()
    seconds: dict[int, float] = {}

    class SaveAt(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, processing_class=None, **kw):
            if state.global_step in at_step:
                u = at_step[state.global_step]
                d = work / f"bt_{u}" / "model"
                model.save_pretrained(d)
                processing_class.save_pretrained(d)
                saved[u], seconds[u] = d, round(time.time() - t0, 1)
            if planned > n and state.global_step >= n // bs:
                control.should_training_stop = True  # the rest of the planned pass is not needed

    expert = args.length_expert if args.length_expert == "fit" else float(args.length_expert)
    bf16 = {"auto": "auto", "true": True, "false": False}[args.bt_bf16]
    settings = JudgePairwiseSettings(learning_rate=args.bt_learning_rate, epochs=1, per_device_batch_size=bs, scale=args.bt_scale,
                                     max_length=args.bt_max_length, save_steps=10_000, bf16=bf16, seed=args.seed,
                                     length_expert=expert, template="judge_brief")
    memory.start()
    lines: list[str] = []
    def log(line: str) -> None:
        lines.append(line)
        print(f"  [bt] {line}", flush=True)

    print(f"BT: {planned} units, of which {sum(len(u['chosen'].strip()) > len(u['rejected'].strip()) for u in units[:planned])} "
          f"longer-preferred" + (f"; stopping after {n // bs} steps ({n} units seen)" if planned > n else ""), flush=True)
    res = train_judge_pairwise(base, units[:planned], work / "bt_final", settings, callbacks=[SaveAt()], log=log)
    peak = memory.own_peak()["peak_rss_mb"]
    dropped = next((ln for ln in lines if "dropped" in ln), None)
    expert_line = next((ln for ln in lines if "length expert" in ln), None)
    out = []
    for u in sorted(saved):
        hist = [h for h in res.history if "loss" in h and h.get("step", 0) <= u // bs]
        out.append((u, saved[u], {"examples": 2 * u, "steps": u // bs, "train_seconds": seconds[u], "peak_rss_mb": peak,
                                  "final_loss": hist[-1]["loss"] if hist else None, "dropped": dropped,
                                  "length_expert": expert_line}))
    shutil.rmtree(work / "bt_final", ignore_errors=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not OASST.is_file():
        print(f"skipped: {OASST} is not here (see ../shared/data/SOURCES.md)", file=sys.stderr)
        return 2
    if args.threads:
        import os

        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for any child process
        torch.set_num_threads(args.threads)
    from selfalign.models import resolve_model

    base = resolve_model("smollm2-135m-instruct", dtype="auto")
    units, items, data_info = build_data(args)
    points = [int(x) for x in args.points.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="judge_training_"))
    rows, summary0 = [], None
    sft_points = points if args.objective in ("sft", "both") else [p for p in points if p == 0]
    runs = [(n, False) for n in sft_points] + ([(args.mixed_at, True)] if args.mixed_at else [])
    if args.mixed_at and 0 not in points:
        runs.insert(0, (0, False))
    if any(n > len(units) for n in points + [args.bt_schedule_units]):
        raise SystemExit(f"--points {max(points)} is more than the {len(units)} training units")
    try:
        if args.objective in ("pairwise", "both") and any(points):
            for n, model, tinfo in train_bt_curve(base, units, points, work, args):
                info = {"units": n, "row": "bt", **tinfo}
                ev, summary = evaluate(model, items, work / f"bt_{n}", with_pairwise=False, threads=args.threads)
                info.update(ev)
                summary0 = summary0 or summary
                rows.append(info)
                print(json.dumps(info), flush=True)
                shutil.rmtree(model, ignore_errors=True)
        for n, mixed in runs:
            if n > len(units):
                raise SystemExit(f"--points/--mixed-at {n} is more than the {len(units)} training units")
            d = work / (f"mixed_{n}" if mixed else f"pointwise_{n}")
            info = {"units": n, "row": "mixed" if mixed else "pointwise"}
            if n == 0:
                model = base
            else:
                model, tinfo = train(base, units[:n], d, args, pairwise=mixed)
                info.update(tinfo)
            ev, summary = evaluate(model, items, d, with_pairwise=mixed or (n == 0 and not args.no_pairwise), threads=args.threads)
            info.update(ev)
            summary0 = summary0 or summary
            rows.append(info)
            print(json.dumps(info), flush=True)
            if model != base:
                shutil.rmtree(model, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lw = summary0["baselines"]["longer_wins"]
    baselines = {"random": 0.5, "longer_wins": lw["pairwise_accuracy"], "longer_wins_ci95": (lw.get("ci95") or {}).get("pairwise_accuracy"),
                 "longer_preferred_pairs": summary0["metrics"].get("longer_preferred_pairs"),
                 "shorter_preferred_pairs": summary0["metrics"].get("shorter_preferred_pairs")}
    result = {"machine": machine_info(), "args": vars(args), "data": data_info,
              "heldout": {"items": summary0["items"], "pairs": summary0["pairs"], "replies": summary0["replies"]},
              "baselines": baselines, "rows": rows}
    path = write_results(args.out, result)
    def ci(x, c):
        return f"{x:.3f} [{c[0]:.3f}, {c[1]:.3f}]" if x is not None and c else ("-" if x is None else f"{x:.3f}")

    table = [{"row": r["row"], "units": r["units"], "accuracy [95% CI]": ci(r["pointwise"], r.get("pointwise_ci95")),
              "length-balanced [95% CI]": ci(r.get("length_balanced"), r.get("length_balanced_ci95")),
              "longer / shorter preferred": f"{r.get('longer_preferred')} / {r.get('shorter_preferred')}",
              "agrees w/ longer": r.get("longer_wins_agreement"), "train s": r.get("train_seconds", 0),
              "peak RSS MB": r.get("peak_rss_mb", ""), "pairwise": r.get("pairwise", ""), "longer wins": baselines["longer_wins"]}
             for r in rows]
    print_table(table, list(table[0]))
    print(f"held-out: {summary0['items']} prompts, {summary0['pairs']} pairs; results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
