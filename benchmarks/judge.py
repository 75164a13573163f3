"""Judging throughput: K = 3 judgments per response against K = 1, with the real judge, in one run.

64 responses are judged by :class:`selfalign.stages.judge.LLMJudge` with the built-in additive
5-point rubric template (``judge``) on the hf engine at its default settings, the embedded
SmolLM2-135M-Instruct judging its own kind of output. The responses are the AlpacaEval 2.0
reference outputs of the first 64 AlpacaEval instructions (../shared/data/alpaca_eval/), cut to
``--response-tokens`` tokens (default 128, what the Self-Rewarding demo's respond stage writes at
most). Judgment sampling as in the demo config: temperature 0.7, top-p 0.9, up to 96 new tokens,
sampled scoring (``--scoring expected`` adds the digit-probability probe).

Rows: K = 1 and K = 3 (``--ks`` to change), each timed over all responses ``--repeats`` times
(default 3, interleaved; the table shows the median run and the range); the table gives
judgments/s, judge tokens/s, parse rate and the cost of each K relative to K = 1, in wall
time and in CPU time (the latter barely depends on what else runs on the machine). The engine
prefills each judge prompt once for its K samples (and the rubric, which every judge prompt
shares, once per batch), and while decoding keeps those keys/values once per prompt rather than
once per sample (``--compare-plain`` adds rows with that off), so K judgments should cost well
under K times one.

    .venv/bin/python benchmarks/judge.py            # -> benchmarks/results/judge.json
    .venv/bin/python benchmarks/judge.py --compare-plain   # + the same K with prompt keys/values per sample
    .venv/bin/python benchmarks/judge.py --quick    # smoke run: 8 responses, 32 new tokens
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, cpu_seconds, load_average, machine_info, print_table, ratio, write_results

DATA_FILE = SHARED_DATA / "alpaca_eval" / "alpaca_eval_805_ref_gpt4_1106_preview.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--responses", type=int, default=64)
    p.add_argument("--response-tokens", type=int, default=128, help="cut each reference output to this many tokens")
    p.add_argument("--ks", default="1,3", help="judgments per response, one row each; the first is the baseline")
    p.add_argument("--max-new-tokens", type=int, default=96, help="judge.max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--scoring", choices=["sampled", "expected"], default="sampled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-set", action="append", default=[], metavar="KEY=VALUE", help="override an engine: config key (e.g. threads=1)")
    p.add_argument("--repeats", type=int, default=3,
                   help="time every row this many times, the rows interleaved; the table gives each row's median run")
    p.add_argument("--compare-plain", action="store_true",
                   help="also run every K with the engine's shared-prompt decode off (prompt keys/values repeated per sample): "
                        "what that measure is worth, in the same run")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 responses, 32 new tokens")
    p.add_argument("--name", default=None, help="results file stem (default: judge, or judge_quick)")
    p.add_argument("--data-file", type=Path, default=DATA_FILE)
    args = p.parse_args(argv)
    if args.quick:
        args.responses, args.max_new_tokens, args.repeats = min(args.responses, 8), min(args.max_new_tokens, 32), 1
    if args.repeats < 1:
        p.error("--repeats needs a positive integer")
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if not args.ks or min(args.ks) < 1:
        p.error("--ks needs positive integers, e.g. 1,3")
    return args


def load_responses(path: Path, n: int, tokenizer, max_tokens: int) -> list[dict]:
    """Response records (the judge stage's input layout) from AlpacaEval's reference outputs."""
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a JSON list of {{instruction, output, ...}} objects")
    out = []
    for i, rec in enumerate(data[:n]):
        for key in ("instruction", "output"):
            if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
                raise SystemExit(f"{path}: item {i} has no string field {key!r}")
        ids = tokenizer(rec["output"], add_special_tokens=False)["input_ids"][:max_tokens]
        out.append({
            "id": f"alpaca-{i}",
            "kind": "response",
            "prompt_id": f"alpaca-prompt-{i}",
            "messages": [{"role": "user", "content": rec["instruction"]}],
            "response": tokenizer.decode(ids, skip_special_tokens=True),
        })
    return out


def run_k(engine, responses: list[dict], k: int, args) -> dict:
    from selfalign.stages.judge import LLMJudge

    judge = LLMJudge(engine=engine, k=k, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                     seed=args.seed, scoring=args.scoring)
    load_before = load_average()
    t0, c0 = time.perf_counter(), cpu_seconds()
    judgments, tokens = [], 0
    for _resp, js, n_tokens in judge.judge(responses):
        judgments.extend(js)
        tokens += n_tokens
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    parsed = sum(1 for j in judgments if j.get("parse_error") is None and j.get("score") is not None)
    return {
        "row": f"K = {k}", "k": k, "responses": len(responses), "judgments": len(judgments), "judge_tokens": tokens,
        "wall_s": wall, "cpu_s": cpu, "judgments_per_s": len(judgments) / wall, "tokens_per_s": tokens / wall,
        "parse_rate": parsed / len(judgments) if judgments else None, "load_before": load_before, "load_after": load_average(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data_file.is_file():
        print(f"SKIPPED: the data file {args.data_file} is absent (it comes with the shared data under ../shared/data)")
        return 0
    from selfalign.config import EngineConfig, ModelConfig
    from selfalign.engines.hf import HFEngine
    from selfalign.prompts import judge_prompt, load_template

    info = machine_info()
    engine_cfg = EngineConfig(**{"kind": "hf", **dict(kv.split("=", 1) for kv in args.engine_set)})
    t0 = time.perf_counter()
    engine = HFEngine.from_config(ModelConfig(), engine_cfg)
    setup = time.perf_counter() - t0
    responses = load_responses(args.data_file, args.responses, engine.tokenizer, args.response_tokens)
    template = load_template("judge")
    prompt_tokens = [len(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": judge_prompt(template, r["messages"][0]["content"], r["response"])}],
        add_generation_prompt=True, tokenize=True, return_dict=False)) for r in responses]
    print(f"machine: {info['cpu']}, {info['cpus_usable']} cores, load {info['load_average']}; engine {engine.describe()}; "
          f"judge prompts {min(prompt_tokens)}-{max(prompt_tokens)} tokens (mean {sum(prompt_tokens) / len(prompt_tokens):.0f})", flush=True)
    run_k(engine, responses[:2], 1, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}))  # warm-up, not timed

    runs: dict[tuple[bool, int], list[dict]] = {}
    for rep in range(args.repeats):  # interleaved, so a drift in machine load touches every row alike
        for shared_decode in (True, False) if args.compare_plain else (True,):
            engine.shared_decode = shared_decode
            for k in args.ks:
                label = f"K={k}{'' if shared_decode else ', plain decode'}, run {rep + 1}/{args.repeats}"
                print(f"[{label}] judging {len(responses)} responses ... (load {load_average()})", flush=True)
                row = run_k(engine, responses, k, args)
                print(f"[{label}] {row['judgments']} judgments in {row['wall_s']:.1f}s = {row['judgments_per_s']:.2f}/s", flush=True)
                runs.setdefault((shared_decode, k), []).append(row)
    rows = []
    for (shared_decode, _k), got in runs.items():
        row = dict(sorted(got, key=lambda x: x["wall_s"])[len(got) // 2])  # the median run (upper median for even counts)
        row["shared_decode"] = shared_decode
        row["runs_wall_s"] = [x["wall_s"] for x in got]
        row["runs"] = f"{min(row['runs_wall_s']):.1f}-{max(row['runs_wall_s']):.1f}"
        if not shared_decode:
            row["row"] += " (prompt KV per sample)"
        rows.append(row)
    for r in rows:  # each K against the first K of the same decode
        base = next(x for x in rows if x["shared_decode"] == r["shared_decode"])
        r["cost_vs_base"] = ratio(r["wall_s"], base["wall_s"])
        r["cost_per_judgment_vs_base"] = ratio(r["wall_s"] / r["judgments"], base["wall_s"] / base["judgments"])
        r["cpu_cost_vs_base"] = ratio(r["cpu_s"], base["cpu_s"])
        r["load"] = f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}" if r["load_before"] and r["load_after"] else None
    title = (f"Judging: {len(responses)} AlpacaEval reference outputs (<= {args.response_tokens} tokens) x K judgments, rubric template "
             f"'judge', T={args.temperature}, top-p={args.top_p}, <= {args.max_new_tokens} new tokens, scoring {args.scoring}; "
             f"hf engine defaults ({engine.describe().get('dtype')}); baseline K = {base['k']} (of the same decode)")
    print_table(rows, [("row", "row"), ("judgments", "judgments"), ("judge_tokens", "judge tokens"), ("wall_s", "wall s", ".1f"),
                       ("judgments_per_s", "judgments/s", ".2f"), ("tokens_per_s", "tok/s", ".1f"), ("parse_rate", "parsed", ".0%"),
                       ("cost_vs_base", f"cost vs K={base['k']}", ".2f"), ("cost_per_judgment_vs_base", "cost/judgment", ".2f"),
                       ("runs", "wall s of all runs"), ("cpu_s", "CPU s", ".1f"), ("cpu_cost_vs_base", f"CPU cost vs K={base['k']}", ".2f"),
                       ("load", "load 1m before/after")], title=title)
    engine.close()
    name = args.name or ("judge_quick" if args.quick else "judge")
    path = write_results(name, {
        "benchmark": "judge",
        "command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": info,
        "engine": engine.describe(),
        "engine_setup_s": setup,
        "judge_prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens), "mean": sum(prompt_tokens) / len(prompt_tokens)},
        "rows": rows,
    })
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
