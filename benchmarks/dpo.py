"""DPO throughput: selfalign's training defaults against TRL's DPOTrainer defaults, in one run.

The same preference pairs and the same model (the embedded SmolLM2-135M-Instruct) go through:

* ``trl_defaults`` (the baseline): TRL's ``DPOTrainer`` with ``DPOConfig(output_dir=...,
  use_cpu=True, num_train_epochs=1)`` and nothing else changed (without a GPU, transformers
  refuses TRL's default bf16 unless told to use the CPU; one epoch, like every row, instead of
  the Trainer's default 3) (TRL's own defaults: batch 8, bf16 autocast, gradient checkpointing, a
  reference model run at every step, learning rate 1e-6, beta 0.1);
* ``trl_fp32`` (only with ``--rows``): the same with ``bf16=False`` (what TRL's defaults do
  where bf16 is unavailable);
* ``ours_plain``: ``ours`` without its two speed measures (length-grouped batches, LM head on
  completion tokens only; see selfalign.training.dpo), i.e. TRL's trainer as selfalign
  configures it: the "before" of the speed work, and the learning check's reference;
* ``ours``: :func:`selfalign.training.train_dpo` with ``DPOSettings()`` defaults, as the
  recipes call it;
* ``ours_bf16`` (only with ``--rows``): ``ours`` with ``bf16: true``, i.e. bfloat16 autocast
  as in TRL's defaults: selfalign's speed measures at TRL's precision (not a default: for full
  fine-tuning of a model stored in bf16, autocast hides DPO-sized updates, see
  selfalign.training.config);
* ``ours_lora``: the same with ``lora: {}`` (LoRA r=16 on every linear layer; bf16 autocast
  is on under ``bf16: auto`` on hardware with native bf16).

Every row trains one epoch in its own subprocess (so its RSS high-water mark is its own) and
saves its model. The timed span is what a user waits for: loading the model, tokenizing,
reference log-probs, the training loop and writing the model. ``pairs/s`` is pairs trained per
second of that span, ``tok/s`` counts the non-padding tokens of prompt+chosen and
prompt+rejected. ``loop pairs/s`` times the training loop alone (the trainer's
``train_runtime``). ``CPU s`` is the CPU time the row's process used in the timed span and
``x (CPU time)`` the ratio of pairs per CPU-second: on a machine shared with other work (load
above the core count) wall times stretch with the load, CPU times far less.

Learning check (outside the timed span): every saved model scores the pairs once more in
float32, and the implicit DPO reward margin ``beta * ((log pi(c) - log ref(c)) - (log pi(r) -
log ref(r)))`` is averaged over the pairs, with ``ref`` the starting model (scored once, in a
subprocess of its own). A faster setting that leaves this margin near zero did not learn.

Pairs: the demo runs' own pairs (``runs/*/iter_*/pairs.jsonl``, in path order), or the
files given with ``--pairs``; when they hold fewer than ``--num-pairs``, the rest are built
deterministically from ../shared/data/oasst/oasst_en_100_trees.jsonl (for each prompter turn
with ranked replies, in file order: best-ranked reply chosen, worst-ranked rejected, both at
most 700 characters so their length is that of the demo's 128-token responses). The JSON says
how many came from each source.

    .venv/bin/python benchmarks/dpo.py                       # 64 pairs, the default rows
    .venv/bin/python benchmarks/dpo.py --quick               # 8 pairs, trl_defaults and ours
    .venv/bin/python benchmarks/dpo.py --rows ours,ours_lora --num-pairs 16
    .venv/bin/python benchmarks/dpo.py --rows trl_defaults,ours --num-pairs 8 --profile --results-name dpo_profile

Results: benchmarks/results/dpo.json (``--results-name`` to change).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, machine_info, print_table, ratio, write_results  # noqa: E402

OASST_TREES = SHARED_DATA / "oasst" / "oasst_en_100_trees.jsonl"
ROWS = ("trl_defaults", "trl_fp32", "ours_plain", "ours", "ours_bf16", "ours_lora")
DEFAULT_ROWS = ("trl_defaults", "ours_plain", "ours", "ours_lora")
BASELINE = "trl_defaults"
PROFILE = False  # --profile
MAX_REPLY_CHARS = 700


# ----------------------------------------------------------------------------- data
def demo_pair_files() -> list[Path]:
    return [Path(p) for p in sorted(glob.glob(str(ROOT / "runs" / "*" / "iter_*" / "pairs.jsonl")))]


def oasst_pairs(path: Path = OASST_TREES) -> list[dict]:
    """Preference pairs from human rankings: best- vs worst-ranked short replies, in file order."""
    from selfalign.data.oasst import eft_groups, load_oasst

    out = []
    for g in eft_groups(load_oasst(path), first_turn_only=False):
        replies = sorted(g["replies"], key=lambda r: r["rank"])
        best, worst = replies[0], replies[-1]
        if best["rank"] == worst["rank"] or max(len(best["text"]), len(worst["text"])) > MAX_REPLY_CHARS:
            continue
        out.append({
            "id": f"oasst:{g['prompt_id']}",
            "prompt": g["messages"],
            "chosen": [{"role": "assistant", "content": best["text"]}],
            "rejected": [{"role": "assistant", "content": worst["text"]}],
        })
    return out


def load_pairs(files: list[Path], n: int) -> tuple[list[dict], dict[str, int]]:
    """``n`` pairs from ``files`` (then OASST), and how many came from each source."""
    pairs: list[dict] = []
    sources: dict[str, int] = {}
    for f in files:
        if len(pairs) >= n:
            break
        with open(f) as fh:
            got = [json.loads(line) for line in fh if line.strip()][: n - len(pairs)]
        pairs += got
        sources[str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f)] = len(got)
    if len(pairs) < n:
        if not OASST_TREES.is_file():
            raise SystemExit(f"only {len(pairs)} pairs found and {OASST_TREES} is absent to build the rest from")
        extra = oasst_pairs()[: n - len(pairs)]
        pairs += extra
        sources[str(OASST_TREES.relative_to(ROOT.parent))] = len(extra)
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} pairs available, {n} asked for")
    return [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs], sources


# ----------------------------------------------------------------------------- scoring
def sequence_logps(model, tokenizer, pairs: list[dict], max_length: int, batch_size: int = 8) -> list[tuple[float, float]]:
    """Summed float32 log-probabilities of each reply (chosen, rejected) given its prompt,
    formatted with the chat template as TRL does, cut at ``max_length`` tokens."""
    import torch

    def ids(messages, gen):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]

    rows = []  # (pair index, 0 chosen / 1 rejected, token ids, prompt length)
    for i, p in enumerate(pairs):
        n_prompt = len(ids(p["prompt"], True))
        for j, key in enumerate(("chosen", "rejected")):
            rows.append((i, j, ids(p["prompt"] + p[key], False)[:max_length], n_prompt))
    rows.sort(key=lambda r: len(r[2]))  # similar lengths together: little padding
    out = [[0.0, 0.0] for _ in pairs]
    model.eval()
    with torch.no_grad():
        for b in range(0, len(rows), batch_size):
            batch = rows[b : b + batch_size]
            width = max(len(r[2]) for r in batch)
            x = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(x)
            for k, r in enumerate(batch):
                x[k, : len(r[2])] = torch.tensor(r[2])
                mask[k, : len(r[2])] = 1
            logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
            for k, (i, j, toks, n_prompt) in enumerate(batch):
                out[i][j] = float(lp[k, n_prompt - 1 : len(toks) - 1].sum())
    return [tuple(r) for r in out]


def count_tokens(tokenizer, pairs: list[dict], max_length: int) -> int:
    n = 0
    for p in pairs:
        for key in ("chosen", "rejected"):
            enc = tokenizer.apply_chat_template(p["prompt"] + p[key], tokenize=True, return_dict=True)
            n += min(len(enc["input_ids"]), max_length)
    return n


# ----------------------------------------------------------------------------- rows (subprocess side)
def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _train_trl(model_dir: Path, pairs: list[dict], out: Path, *, bf16: bool | None) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    kw = {} if bf16 is None else {"bf16": bf16}
    torch.manual_seed(0)
    # use_cpu: without it TrainingArguments refuses TRL's default bf16=True on a machine without a GPU;
    # num_train_epochs=1: the same work as every other row (the Trainer's default is 3 epochs)
    args = DPOConfig(output_dir=str(out / "trl_ckpt"), use_cpu=not torch.cuda.is_available(), num_train_epochs=1, **kw)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    hist = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "loop_s": result.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "batch": args.per_device_train_batch_size,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "max_length": args.max_length,
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "logged_margins": [h.get("rewards/margins") for h in hist],
    }


def _without_speedups() -> None:
    """Turn off selfalign.training.dpo's length grouping and completion-only LM head (this process only)."""
    import contextlib

    from trl import DPOTrainer

    import selfalign.training.dpo as dpo

    dpo.completion_only_lm_head = contextlib.nullcontext
    dpo._dpo_trainer_class = lambda: DPOTrainer
    dpo.sort_by_length = lambda tokenizer, data: data


def _train_ours(model_dir: Path, pairs: list[dict], out: Path, *, lora: bool, bf16: bool | None = None) -> dict:
    from selfalign.training import train_dpo
    from selfalign.training.config import DPOSettings, LoraSettings
    from selfalign.training.common import resolve_bf16

    settings = DPOSettings(lora=LoraSettings() if lora else None, **({} if bf16 is None else {"bf16": bf16}))
    result = train_dpo(model_dir, pairs, out / "model", settings)
    hist = result.history
    return {
        "loop_s": next((h["train_runtime"] for h in hist if "train_runtime" in h), None),
        "steps": result.steps,
        "batch": settings.per_device_batch_size,
        "bf16": resolve_bf16(settings.bf16, lora=lora),  # what the settings resolve to on this machine
        "gradient_checkpointing": settings.gradient_checkpointing,
        "max_length": settings.max_length,
        "learning_rate": settings.learning_rate,
        "beta": settings.beta,
        "logged_margins": [h.get("rewards/margins") for h in hist if "rewards/margins" in h],
    }


def run_row(name: str, model_dir: Path, pairs_file: Path, ref_file: Path, work: Path) -> dict:
    """Train one row, time it, score its model; returns the row's figures."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch  # noqa: F401  (imports are outside the timed span)
    import trl  # noqa: F401

    from selfalign.training.common import load_model, load_tokenizer

    pairs = json.loads(pairs_file.read_text())
    out = work / name
    rss_before = _rss_mib()
    profiler = None
    if os.environ.get("SELFALIGN_BENCH_PROFILE") == "1":
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
        profiler.__enter__()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    if name == "trl_defaults":
        info = _train_trl(model_dir, pairs, out, bf16=None)
    elif name == "trl_fp32":
        info = _train_trl(model_dir, pairs, out, bf16=False)
    elif name == "ours_plain":
        _without_speedups()
        info = _train_ours(model_dir, pairs, out, lora=False)
    elif name == "ours":
        info = _train_ours(model_dir, pairs, out, lora=False)
    elif name == "ours_bf16":
        info = _train_ours(model_dir, pairs, out, lora=False, bf16=True)
    elif name == "ours_lora":
        info = _train_ours(model_dir, pairs, out, lora=True)
    else:
        raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    seconds = time.perf_counter() - t0
    cpu_seconds = _cpu_s() - cpu0
    peak = _rss_mib()
    if profiler is not None:
        profiler.__exit__(None, None, None)
        info["profile"] = summarize_profile(profiler)

    ref = json.loads(ref_file.read_text())
    tok = load_tokenizer(model_dir)
    pol = sequence_logps(load_model(out / "model"), tok, pairs, ref["max_length"])
    beta = info["beta"]
    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(pol, ref["logps"])]
    info.update(
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        peak_rss_mib=peak,
        rss_after_imports_mib=rss_before,
        margin_after=sum(margins) / len(margins),
        accuracy_after=sum(m > 0 for m in margins) / len(margins),
    )
    return info


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "mkldnn", "aten::_weight_int")


def summarize_profile(prof, top: int = 15) -> dict:
    """Self CPU time by operator (top ``top``) and the share spent in matrix multiplications."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_OPS))
    attention = sum(e.self_cpu_time_total for e in events if "attention" in e.key or "softmax" in e.key)
    optimizer = sum(e.self_cpu_time_total for e in events if "adam" in e.key.lower() or e.key.startswith("Optimizer."))
    return {
        "total_self_cpu_s": total / 1e6,
        "matmul_share": matmul / total if total else None,
        "attention_share": attention / total if total else None,
        "optimizer_share": optimizer / total if total else None,
        "top_ops": [
            {"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3), "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
            for e in events[:top]
        ],
    }


def run_reference(model_dir: Path, pairs_file: Path, out_file: Path, max_length: int) -> None:
    from selfalign.training.common import load_model, load_tokenizer

    pairs = json.loads(pairs_file.read_text())
    tok = load_tokenizer(model_dir)
    logps = sequence_logps(load_model(model_dir), tok, pairs, max_length)
    out_file.write_text(json.dumps({"max_length": max_length, "logps": logps, "tokens": count_tokens(tok, pairs, max_length)}))


# ----------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-pairs", type=int, default=64)
    p.add_argument("--pairs", type=Path, action="append", default=None, help="pairs JSONL file(s); default: runs/*/iter_*/pairs.jsonl")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated rows among {', '.join(ROWS)}")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model spec (selfalign.models.resolve_model)")
    p.add_argument("--quick", action="store_true", help="8 pairs, rows trl_defaults and ours (a smoke test)")
    p.add_argument("--results-name", default="dpo", help="benchmarks/results/<name>.json")
    p.add_argument("--profile", action="store_true", help="run each row under torch.profiler and add its operator breakdown (slower)")
    p.add_argument("--keep", type=Path, default=None, help="keep the trained models in this folder (default: a temporary one)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _subprocess(args: list[str], check: bool = True) -> bool:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    if PROFILE:
        env["SELFALIGN_BENCH_PROFILE"] = "1"
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        if check:
            raise SystemExit(f"benchmark subprocess failed ({done.returncode}): {' '.join(cmd)}")
        print(f"row failed ({done.returncode}): {' '.join(cmd)}", file=sys.stderr)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:  # subprocess side
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        work, model_dir = args.work, args.model_dir
        if args.worker == "reference":
            run_reference(model_dir, work / "pairs.json", work / "reference.json", 1024)
            return
        res = run_row(args.worker, model_dir, work / "pairs.json", work / "reference.json", work)
        (work / f"{args.worker}.result.json").write_text(json.dumps(res))
        return

    from selfalign.models import resolve_model

    if args.quick:
        args.num_pairs, args.rows = 8, "trl_defaults,ours"
    global PROFILE
    PROFILE = args.profile
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; rows: {', '.join(ROWS)}")
    model_dir = resolve_model(args.model)
    pairs, sources = load_pairs(args.pairs if args.pairs else demo_pair_files(), args.num_pairs)
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="selfalign_bench_dpo_")
        work = Path(tmp.name)
    else:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    (work / "pairs.json").write_text(json.dumps(pairs))
    common_args = ["--work", str(work), "--model-dir", str(model_dir)]
    info = machine_info()
    print(f"{len(pairs)} pairs ({', '.join(f'{k}: {v}' for k, v in sources.items())}); model {model_dir}; load {info['load_average']}")
    _subprocess(["--worker", "reference", *common_args])
    ref = json.loads((work / "reference.json").read_text())
    results = {}
    for r in rows:
        print(f"-- {r} (load {os.getloadavg()[0]:.2f})", flush=True)
        if _subprocess(["--worker", r, *common_args], check=False):
            results[r] = json.loads((work / f"{r}.result.json").read_text())
            results[r]["load_1min_after"] = round(os.getloadavg()[0], 2)
    rows = [r for r in rows if r in results]
    if not rows:
        raise SystemExit("every row failed")

    tokens = ref["tokens"]
    table = []
    base = results.get(BASELINE)
    for r in rows:
        x = results[r]
        x["pairs_per_s"] = len(pairs) / x["seconds"]
        x["tokens_per_s"] = tokens / x["seconds"]
        x["loop_pairs_per_s"] = len(pairs) / x["loop_s"] if x.get("loop_s") else None
        x["pairs_per_cpu_s"] = len(pairs) / x["cpu_seconds"] if x.get("cpu_seconds") else None
        table.append({
            "row": r,
            "setup": f"batch {x['batch']}, {'bf16' if x['bf16'] else 'fp32'}{', grad ckpt' if x['gradient_checkpointing'] else ''}"
            + (", grouped, compact head" if r in ("ours", "ours_bf16", "ours_lora") else ""),
            "seconds": x["seconds"],
            "pairs_per_s": x["pairs_per_s"],
            "tokens_per_s": x["tokens_per_s"],
            "loop_pairs_per_s": x["loop_pairs_per_s"],
            "vs_base": ratio(x["pairs_per_s"], base["pairs_per_s"]) if base else None,
            "cpu_seconds": x.get("cpu_seconds"),
            "vs_base_cpu": ratio(x.get("pairs_per_cpu_s"), base.get("pairs_per_cpu_s")) if base else None,
            "peak_rss_mib": x["peak_rss_mib"],
            "margin_after": x["margin_after"],
            "accuracy_after": x["accuracy_after"],
        })
    text = print_table(
        table,
        [("row", "row"), ("setup", "setup"), ("seconds", "s", ".1f"), ("pairs_per_s", "pairs/s", ".3f"),
         ("tokens_per_s", "tok/s", ".0f"), ("loop_pairs_per_s", "loop pairs/s", ".3f"),
         ("vs_base", f"x {BASELINE}", ".2f"), ("cpu_seconds", "CPU s", ".0f"), ("vs_base_cpu", "x (CPU time)", ".2f"),
         ("peak_rss_mib", "peak RSS MiB", ".0f"),
         ("margin_after", "margin after", ".3f"), ("accuracy_after", "acc after", ".2f")],
        title=f"DPO, {len(pairs)} pairs x 1 epoch, {tokens} tokens (load {info['load_average']})",
    )
    for r in rows:
        prof = results[r].get("profile")
        if prof:
            print(f"{r}: {prof['total_self_cpu_s']:.1f} s of operator time, matmul {prof['matmul_share']:.0%}, "
                  f"attention {prof['attention_share']:.0%}, optimizer {prof['optimizer_share']:.0%}; top: "
                  + ", ".join(f"{o['op']} {o['share']:.0%}" for o in prof["top_ops"][:6]))
    path = write_results(args.results_name, {
        "benchmark": "dpo",
        "command": "python benchmarks/dpo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "load_average_end": machine_info()["load_average"],
        "model": str(model_dir),
        "num_pairs": len(pairs),
        "pair_sources": sources,
        "tokens_per_epoch": tokens,
        "baseline": BASELINE,
        "rows": results,
        "table": table,
        "table_text": text,
    })
    print(f"results: {path}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
