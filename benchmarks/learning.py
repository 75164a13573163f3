"""The learning check: does the Self-Rewarding loop raise a reward that cannot be fooled?

The real recipe (:func:`selfalign.recipes.self_rewarding.run_self_rewarding`) runs on the
embedded SmolLM2-135M-Instruct with the LLM judge replaced by a verifiable constraint: every
prompt carries the system message "Answer in at most N words." and the reward is
``selfalign.rewards.constraints:max_<N>_words`` (1.0 within the limit, ``N / words`` above it,
0.0 under 3 words). No SFT: M0 is the instruct model itself. Each iteration writes prompts,
samples ``n`` responses each, scores them, and DPO-trains M_{t+1} on best-vs-worst pairs.

Then M0, M1, ... are sampled on held-out prompts that no iteration trained on (the first
``--heldout`` prompts of ../shared/data/oasst/oasst_prompt_lottery_en_250.jsonl, with the same
system message), all in float32, and compared: mean reward with a bootstrap 95% interval over
prompts, share of responses that satisfy the limit, mean words, and the paired difference
M_t - M0 over the same prompts.

    .venv/bin/python benchmarks/learning.py                      # defaults: runs/learning_check
    .venv/bin/python benchmarks/learning.py --num-prompts 4 --heldout 4 --samples 1 --out /tmp/lc_tiny

Rerunning the same command resumes: the recipe skips finished stages, held-out generation
skips finished samples. Results: ``<out>/learning_check.json``; see docs/learning_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_FILE = ROOT.parent / "shared" / "data" / "oasst" / "oasst_prompt_lottery_en_250.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/learning_check"), help="run directory (its parent is runs_dir)")
    p.add_argument("--limit", type=int, default=25, help="the word limit stated in every prompt and checked by the reward")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=32, help="self_instruct.num_prompts per iteration")
    p.add_argument("--n", type=int, default=4, help="respond.n: candidates per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96, help="respond.max_new_tokens (and the held-out samples')")
    p.add_argument("--lr", type=float, default=1e-5, help="dpo.learning_rate")
    p.add_argument("--epochs", type=float, default=3.0, help="dpo.epochs")
    p.add_argument("--beta", type=float, default=0.1, help="dpo.beta")
    p.add_argument("--seed", type=int, default=0, help="the run's seed")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    p.add_argument("--heldout-file", type=Path, default=HELDOUT_FILE)
    p.add_argument("--heldout", type=int, default=48, help="held-out prompts (the first N of the file)")
    p.add_argument("--samples", type=int, default=2, help="held-out samples per prompt and model")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype every model is sampled in")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the overrides and exit")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- configuration
def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides of the packaged self_rewarding_demo.yaml this check runs with."""
    from selfalign.rewards.constraints import word_limit_instruction

    out = args.out.resolve()
    return [
        f"runs_dir={out.parent}",
        f"name={out.name}",
        f"iterations={args.iterations}",
        f"seed={args.seed}",
        "sft.enabled=false",
        f"self_instruct.num_prompts={args.num_prompts}",
        f"respond.n={args.n}",
        f"respond.max_new_tokens={args.max_new_tokens}",
        f"respond.system_prompt={word_limit_instruction(args.limit)}",
        "judge.kind=function",
        f"judge.function=selfalign.rewards.constraints:max_{args.limit}_words",
        f"dpo.learning_rate={_yaml_float(args.lr)}",
        f"dpo.epochs={_yaml_float(args.epochs)}",
        f"dpo.beta={_yaml_float(args.beta)}",
        *args.extra,
    ]


def _yaml_float(x: float) -> str:
    """A float as YAML reads it back as a float (PyYAML reads '1e-05', without a dot, as a string)."""
    text = repr(float(x))
    if "e" in text and "." not in text.split("e")[0]:
        text = text.replace("e", ".0e", 1)
    return text


def demo_config_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("selfalign").joinpath("configs/self_rewarding_demo.yaml")))


def load_recipe_config(overrides: list[str]):
    from selfalign.config import load_config
    from selfalign.recipes.config import SelfRewardingConfig

    return load_config(SelfRewardingConfig, demo_config_path(), overrides)


# ----------------------------------------------------------------------------- held-out evaluation
def eval_settings(args: argparse.Namespace, system: str) -> dict:
    return {
        "prompts_file": str(args.heldout_file.name),
        "prompts": args.heldout,
        "samples_per_prompt": args.samples,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.eval_seed,
        "dtype": args.eval_dtype,
        "system_prompt": system,
    }


def generate_heldout(label: str, model_dir: Path, prompts, path: Path, settings: dict, engine_cfg, show_progress: bool) -> float:
    """Sample ``model_dir`` on the held-out prompts into ``path`` (resumable); returns seconds spent."""
    from selfalign.config import GenerationConfig, ModelConfig
    from selfalign.data.records import is_done
    from selfalign.engines import create_engine
    from selfalign.stages.generate import run_generate

    gen = GenerationConfig(
        n=settings["samples_per_prompt"], temperature=settings["temperature"], top_p=settings["top_p"],
        max_new_tokens=settings["max_new_tokens"], seed=settings["seed"],
    )
    if is_done(path):
        return 0.0
    t0 = time.monotonic()
    print(f"[{label}] sampling {len(prompts)} held-out prompts x {gen.n} from {model_dir} in {settings['dtype']}", file=sys.stderr)
    with create_engine(ModelConfig(spec=str(model_dir), dtype=settings["dtype"]), engine_cfg) as engine:
        run_generate(engine, prompts, path, gen, show_progress=show_progress)
    return time.monotonic() - t0


def summarize(path: Path, limit: int, resamples: int, seed: int) -> tuple[dict, dict[str, dict[str, float]]]:
    """Per-model summary of one held-out file, and the per-prompt values the paired differences use."""
    from selfalign.data.records import read_jsonl
    from selfalign.rewards.constraints import (
        DEFAULT_MIN_WORDS,
        count_words,
        satisfies_word_limit,
        word_limit_score,
    )
    from selfalign.rewards.stats import bootstrap_mean, per_prompt_means

    recs = list(read_jsonl(path))
    per = {
        "reward": per_prompt_means((r["prompt_id"], word_limit_score(r["response"], limit)) for r in recs),
        "satisfied": per_prompt_means((r["prompt_id"], float(satisfies_word_limit(r["response"], limit))) for r in recs),
        "words": per_prompt_means((r["prompt_id"], float(count_words(r["response"]))) for r in recs),
    }
    words = [count_words(r["response"]) for r in recs]
    summary = {
        "responses": len(recs),
        "prompts": len(per["reward"]),
        "reward": bootstrap_mean(list(per["reward"].values()), resamples=resamples, seed=seed).as_dict(),
        "satisfied": bootstrap_mean(list(per["satisfied"].values()), resamples=resamples, seed=seed).as_dict(),
        "mean_words": round(statistics.fmean(words), 2),
        "median_words": statistics.median(words),
        "under_min_words_share": round(sum(w < DEFAULT_MIN_WORDS for w in words) / len(words), 4),
        "over_limit_share": round(sum(w > limit for w in words) / len(words), 4),
        "cut_at_max_tokens_share": round(sum(r.get("finish_reason") == "length" for r in recs) / len(recs), 4),
        "mean_completion_tokens": round(statistics.fmean(r["completion_tokens"] for r in recs), 1),
        "distinct_responses_share": round(len({r["response"].strip() for r in recs}) / len(recs), 4),
    }
    return summary, per


# ----------------------------------------------------------------------------- in-loop signals
def loop_signals(run_dir: Path, t: int, manifest: dict) -> dict:
    """What iteration ``t`` reported: pairs, in-loop reward of M_{t-1}'s candidates, DPO loss and margins."""
    from selfalign.data.records import read_jsonl
    from selfalign.stages.judge import aggregate

    it = run_dir / f"iter_{t}"
    m = json.loads((it / "metrics.json").read_text()) if (it / "metrics.json").is_file() else {}
    rewards = list(aggregate(it / "judge.jsonl").values()) if (it / "judge.jsonl").is_file() else []
    hist: list[dict] = []
    tj = it / "model" / "training.json"
    if tj.is_file():
        info = json.loads(tj.read_text())
        hist = info.get("result", info).get("history", [])

    def series(key: str) -> list[float]:
        return [h[key] for h in hist if key in h]

    margins, accs = series("rewards/margins"), series("rewards/accuracies")
    stages = manifest.get("stages", {})
    seconds = {k.split("/", 1)[1]: v.get("seconds") for k, v in stages.items() if k.startswith(f"iter_{t}/")}
    responses = list(read_jsonl(it / "respond.jsonl")) if (it / "respond.jsonl").is_file() else []
    words = [_words(r["response"]) for r in responses]
    return {
        "iteration": t,
        "prompts_kept": m.get("prompts_kept"),
        "candidates": m.get("candidates"),
        "candidate_mean_reward": round(statistics.fmean(rewards), 4) if rewards else None,
        "candidate_mean_words": round(statistics.fmean(words), 1) if words else None,
        "pairs": m.get("pairs"),
        "pairs_dropped": m.get("pairs_dropped"),
        "mean_reward_gap": m.get("mean_reward_gap"),
        "dpo_steps": len(series("loss")),
        "dpo_loss_first": m.get("dpo_loss_first"),
        "dpo_loss_last": m.get("dpo_loss_last"),
        "reward_margin_first": round(margins[0], 4) if margins else None,
        "reward_margin_last": m.get("reward_margin_last"),
        "reward_accuracy_last": round(accs[-1], 4) if accs else None,
        "generation_dtype": m.get("generation_dtype"),
        "stage_seconds": seconds,
    }


def _words(text: str) -> int:
    from selfalign.rewards.constraints import count_words

    return count_words(text)


# ----------------------------------------------------------------------------- report
def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=210)  # a log file gets the whole table
    ev = result["eval"]
    t = Table(title=f"Held-out: {ev['prompts']} prompts x {ev['samples_per_prompt']} samples, "
                    f"'{ev['system_prompt']}', {ev['dtype']} (95% bootstrap intervals over prompts)")
    for col in ("model", "mean reward", "satisfied", "mean words", "< 3 words", f"> {result['limit']} words",
                "cut at max tokens", "reward - M0", "satisfied - M0", "reward - previous"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for label, s in result["models"].items():
        d = result["differences"].get(label)
        step = result.get("differences_vs_previous", {}).get(label)
        t.add_row(
            label,
            _fmt(s["reward"]),
            _fmt(s["satisfied"]),
            f"{s['mean_words']:.1f}",
            f"{s['under_min_words_share']:.1%}",
            f"{s['over_limit_share']:.1%}",
            f"{s['cut_at_max_tokens_share']:.1%}",
            _fmt(d["reward"], signed=True) if d else "-",
            _fmt(d["satisfied"], signed=True) if d else "-",
            _fmt(step["reward"], signed=True) if step else "-",
        )
    console.print(t)
    lt = Table(title="In-loop training signals per iteration (M_t's own prompts and candidates)")
    for col in ("iter", "prompts", "cand.", "cand. reward", "cand. words", "pairs", "ties dropped", "reward gap",
                "DPO steps", "DPO loss first -> last", "margin first -> last", "acc. last", "gen dtype"):
        lt.add_column(col, justify="right")
    for s in result["iterations"]:
        dropped = s.get("pairs_dropped") or {}
        lt.add_row(
            str(s["iteration"]), str(s["prompts_kept"]), str(s["candidates"]), _num(s["candidate_mean_reward"]),
            _num(s["candidate_mean_words"], 1), str(s["pairs"]), str(sum(dropped.values()) if dropped else 0),
            _num(s["mean_reward_gap"]), str(s["dpo_steps"]),
            f"{_num(s['dpo_loss_first'])} -> {_num(s['dpo_loss_last'])}",
            f"{_num(s['reward_margin_first'])} -> {_num(s['reward_margin_last'])}",
            _num(s["reward_accuracy_last"], 2), str(s["generation_dtype"]),
        )
    console.print(lt)
    tm = result["timing"]
    console.print(f"wall time: this invocation {tm['this_invocation_s'] / 60:.1f} min, all {len(tm['invocations'])} invocations "
                  f"{tm['all_invocations_s'] / 60:.1f} min "
                  f"(recipe stages {tm['recipe_stage_seconds'] / 60:.1f} min, held-out sampling {tm['heldout_sampling_s'] / 60:.1f} min "
                  f"as recorded across invocations)")
    console.print(f"results: {result['run_dir']}/learning_check.json")


def _fmt(e: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(e['mean'])} [{f.format(e['ci_low'])}, {f.format(e['ci_high'])}]"


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine() -> dict:
    import torch

    from selfalign.models import cpu_has_native_bf16

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": _loadavg(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.limit < 3:
        sys.exit("--limit must be at least 3 (the reward requires 3 words)")
    overrides = recipe_overrides(args)
    bench_cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/learning.py", *(argv if argv is not None else sys.argv[1:])])
    recipe_cmd = " ".join(["selfalign run", shlex.quote(str(demo_config_path()))] + [f"--set {shlex.quote(o)}" for o in overrides])
    print("learning check:", bench_cmd)
    print(f"recipe config: {demo_config_path()} with the overrides")
    for o in overrides:
        print(f"  --set {shlex.quote(o)}")
    print(f"equivalent recipe command: {recipe_cmd}", flush=True)
    if args.dry_run:
        return 0
    if not args.heldout_file.is_file():
        print(f"held-out prompts not found: {args.heldout_file}\n(the learning check needs ../shared/data/oasst next to "
              "the checkout, or --heldout-file PATH); nothing was run.", file=sys.stderr)
        return 2

    from selfalign.config import config_hash
    from selfalign.data.prompt_sets import load_prompts
    from selfalign.errors import SelfAlignError
    from selfalign.models import resolve_model
    from selfalign.recipes.self_rewarding import run_self_rewarding
    from selfalign.rewards.constraints import word_limit_instruction
    from selfalign.rewards.stats import paired_difference

    try:
        cfg = load_recipe_config(overrides)
    except SelfAlignError as e:
        sys.exit(str(e))
    system = word_limit_instruction(args.limit)
    assert cfg.respond.system_prompt == system and cfg.judge.function.endswith(f"max_{args.limit}_words"), "override parsing"
    prompts = load_prompts(args.heldout_file, system=system, limit=args.heldout)
    if len(prompts) < args.heldout:
        print(f"note: {args.heldout_file} has only {len(prompts)} prompts", file=sys.stderr)

    # (1) the Self-Rewarding recipe, resumable
    t0 = time.monotonic()
    try:
        result = run_self_rewarding(cfg, show_progress=not args.no_progress)
    except SelfAlignError as e:
        sys.exit(f"recipe failed: {e}\n(a changed option refuses to resume an existing run: use another --out)")
    recipe_s = time.monotonic() - t0
    run_dir = result.run_dir

    # (2) held-out samples from every model, resumable; the settings hash names the folder
    settings = eval_settings(args, system)
    eval_dir = run_dir / "learning_check" / f"eval_{config_hash(settings)[:8]}"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    models = {"M0": resolve_model(cfg.model.spec, dtype=cfg.model.dtype)}
    for t in range(1, cfg.iterations + 1):
        models[f"M{t}"] = run_dir / f"iter_{t}" / "model"
    timings_file = eval_dir / "seconds.json"
    sampling_s = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for label, model_dir in models.items():
        spent = generate_heldout(label, model_dir, prompts, eval_dir / f"heldout_{label}.jsonl", settings, cfg.engine,
                                 not args.no_progress)
        if spent:
            sampling_s[label] = round(sampling_s.get(label, 0.0) + spent, 1)
            timings_file.write_text(json.dumps(sampling_s, indent=2) + "\n")

    # (3) statistics
    summaries, per = {}, {}
    for label in models:
        summaries[label], per[label] = summarize(eval_dir / f"heldout_{label}.jsonl", args.limit, args.resamples, args.eval_seed)
    labels = list(models)

    def diff(a: str, b: str) -> dict:
        return {
            key: paired_difference(per[a][key], per[b][key], resamples=args.resamples, seed=args.eval_seed).as_dict()
            for key in ("reward", "satisfied", "words")
        }

    diffs = {label: diff(label, "M0") for label in labels[1:]}  # M_t - M0
    steps = {label: diff(label, labels[i]) for i, label in enumerate(labels[1:])}  # M_t - M_{t-1}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    previous = json.loads((run_dir / "learning_check.json").read_text()) if (run_dir / "learning_check.json").is_file() else {}
    invocations = previous.get("timing", {}).get("invocations")
    if invocations is None and "this_invocation_s" in previous.get("timing", {}):  # written before invocations were kept
        invocations = [{"seconds": previous["timing"]["this_invocation_s"], "recipe_s": previous["timing"].get("recipe_this_invocation_s")}]
    invocations = [*(invocations or []), {"started_at": started_at, "seconds": round(time.monotonic() - t_start, 1),
                                           "recipe_s": round(recipe_s, 1), "load_average_at_end": _loadavg()}]
    iterations = [loop_signals(run_dir, t, manifest) for t in range(1, cfg.iterations + 1)]
    stage_s = sum(v.get("seconds") or 0 for v in manifest.get("stages", {}).values())
    out = {
        "what": "Self-Rewarding recipe with a verifiable word-limit reward; held-out reward of M0..MT",
        "command": bench_cmd,
        "recipe_config": str(demo_config_path()),
        "recipe_overrides": overrides,
        "recipe_command": recipe_cmd,
        "run_dir": str(run_dir),
        "reward": cfg.judge.function,
        "limit": args.limit,
        "eval": {**settings, "prompts": len(prompts), "dir": str(eval_dir), "bootstrap_resamples": args.resamples},
        "models": summaries,
        "model_dirs": {k: str(v) for k, v in models.items()},
        "differences": diffs,
        "differences_vs_previous": steps,
        "iterations": iterations,
        "timing": {
            "this_invocation_s": invocations[-1]["seconds"],
            "all_invocations_s": round(sum(i["seconds"] for i in invocations), 1),
            "invocations": invocations,
            "recipe_this_invocation_s": round(recipe_s, 1),
            "recipe_stage_seconds": round(stage_s, 1),
            "heldout_sampling_s": round(sum(sampling_s.values()), 1),
            "heldout_sampling_s_by_model": sampling_s,
        },
        "machine": machine(),
    }
    (run_dir / "learning_check.json").write_text(json.dumps(out, indent=2) + "\n")
    print_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
