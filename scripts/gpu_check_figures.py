"""The figures of a finished run: generation tokens/s, DPO pairs/s, peak GPU memory.

    python scripts/gpu_check_figures.py RUN_DIR [--nvidia-smi SAMPLES.csv] [--json OUT.json]

scripts/gpu_check.sh runs the demo on a GPU and then this. Standard library only, so it runs
with any Python, on the run directory of any recipe. What it reads:

- ``RUN_DIR/manifest.json``: every finished stage's ``counts`` and ``seconds``. A generation
  stage is one whose counts hold generated tokens (``tokens``: respond, ``generation_tokens``:
  self_instruct, ``judge_tokens``: judge); its time is the generation's own (``counts.seconds``,
  or tokens / ``tokens_per_second``), and the stage's wall time, which also holds the engine's
  start-up when the stage is the first to use it, is reported next to it. A DPO stage is one
  named ``.../dpo``; its pairs/s come from ``training.json`` of the model it wrote
  (``examples_per_second``: pairs per second of the training loop, each epoch counted) and,
  end to end, pairs x epochs / the stage's wall time (loading, reference log-probs and saving
  included). Memory: the stages' own ``memory.peak_cuda_mb`` and those of their training
  workers (``torch.cuda.max_memory_allocated`` in each process).
- ``--nvidia-smi``: samples of ``nvidia-smi --query-gpu=index,memory.used,memory.total
  --format=csv,noheader,nounits``, one GPU per line: the device's peak, which is the only
  figure that sees vLLM's memory (its worker is a process of its own, and vLLM takes
  ``engine.gpu_memory_utilization`` of the GPU up front).

Exit status 1, with the reason, when the run directory has no manifest, or no finished
generation or DPO stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOKEN_KEYS = ("tokens", "generation_tokens", "judge_tokens")


class FiguresError(Exception):
    """The run directory cannot give the figures; the message says why."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FiguresError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise FiguresError(f"{path}: cannot read it as JSON ({e})") from None


def _stage_tokens(counts: dict) -> int | None:
    for key in TOKEN_KEYS:
        if isinstance(counts.get(key), (int, float)):
            return int(counts[key])
    return None


def _generation_seconds(entry: dict, tokens: int) -> float | None:
    counts = entry.get("counts") or {}
    if isinstance(counts.get("seconds"), (int, float)) and counts["seconds"] > 0:
        return float(counts["seconds"])
    tps = counts.get("tokens_per_second")
    if isinstance(tps, (int, float)) and tps > 0:
        return tokens / tps
    return entry.get("seconds")


def _peaks(entry: dict) -> list[float]:
    mem = entry.get("memory") or {}
    out = [mem["peak_cuda_mb"]] if isinstance(mem.get("peak_cuda_mb"), (int, float)) else []
    for w in mem.get("workers") or []:
        if isinstance(w.get("peak_cuda_mb"), (int, float)):
            out.append(w["peak_cuda_mb"])
    return out


def nvidia_smi_peak(path: Path) -> dict:
    """Peak ``memory.used`` (MiB) per GPU index in a file of nvidia-smi CSV samples."""
    peak: dict[str, float] = {}
    total: dict[str, float] = {}
    samples = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise FiguresError(f"{path}: cannot read the nvidia-smi samples ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            index, used, tot = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise FiguresError(f"{path}:{n}: expected 'index, memory.used, memory.total' in MiB, got {line!r}") from None
        samples += 1
        peak[index] = max(peak.get(index, 0.0), used)
        total[index] = tot
    if not samples:
        raise FiguresError(f"{path}: no nvidia-smi samples")
    return {"samples": samples, "peak_used_mb": peak, "total_mb": total}


def run_figures(run_dir: Path, nvidia_smi: Path | None = None) -> dict:
    """The figures of ``run_dir`` (see the module doc) as a JSON-able dict."""
    run_dir = Path(run_dir)
    manifest = _read_json(run_dir / "manifest.json")
    stages = manifest.get("stages")
    if not isinstance(stages, dict):
        raise FiguresError(f"{run_dir / 'manifest.json'}: no 'stages'")
    generation, dpo, cuda_peaks = [], [], []
    for name, entry in stages.items():
        if entry.get("status") != "done":
            continue
        cuda_peaks += _peaks(entry)
        counts = entry.get("counts") or {}
        tokens = _stage_tokens(counts)
        if tokens is not None and tokens > 0:
            secs = _generation_seconds(entry, tokens)
            wall = entry.get("seconds")
            generation.append({
                "stage": name, "tokens": tokens, "seconds": secs, "wall_seconds": wall,
                "tokens_per_second": tokens / secs if secs else None,
                "tokens_per_wall_second": tokens / wall if wall else None,
            })
        if name.rsplit("/", 1)[-1] == "dpo":
            outputs = entry.get("outputs") or []
            marker = run_dir / outputs[0] / "training.json" if outputs else None
            if marker is None or not marker.is_file():
                raise FiguresError(f"stage {name} is done but {marker} is missing")
            stored = _read_json(marker)
            result = stored.get("result") or {}
            settings = ((stored.get("fingerprint") or {}).get("settings")) or {}
            pairs = counts.get("pairs", result.get("num_examples"))
            epochs = settings.get("epochs")
            wall = entry.get("seconds")
            dpo.append({
                "stage": name, "pairs": pairs, "steps": result.get("steps"), "epochs": epochs,
                "bf16": result.get("bf16"), "pairs_per_second": result.get("examples_per_second"),
                "wall_seconds": wall,
                "pairs_per_wall_second": pairs * epochs / wall if pairs and epochs and wall else None,
            })
    if not generation:
        raise FiguresError(f"{run_dir}: no finished stage generated tokens (is the run finished? see its manifest.json)")
    if not dpo:
        raise FiguresError(f"{run_dir}: no finished DPO stage")
    tokens = sum(g["tokens"] for g in generation)
    secs = sum(g["seconds"] or 0 for g in generation)
    wall = sum(g["wall_seconds"] or 0 for g in generation)
    loop = [d["pairs_per_second"] for d in dpo if d["pairs_per_second"]]
    out = {
        "run_dir": str(run_dir),
        "generation": {"stages": generation, "tokens": tokens, "seconds": secs, "wall_seconds": wall,
                       "tokens_per_second": tokens / secs if secs else None,
                       "tokens_per_wall_second": tokens / wall if wall else None},
        "dpo": {"stages": dpo, "pairs_per_second": sum(loop) / len(loop) if loop else None},
        "peak_cuda_allocated_mb": max(cuda_peaks) if cuda_peaks else None,
        "nvidia_smi": nvidia_smi_peak(nvidia_smi) if nvidia_smi is not None else None,
    }
    return out


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def summary_lines(fig: dict) -> list[str]:
    """The figures as the lines gpu_check.sh prints."""
    g, d = fig["generation"], fig["dpo"]
    lines = [f"run: {fig['run_dir']}", "generation (tokens/s in generation; per wall second of the stage, engine start-up included):"]
    for s in g["stages"]:
        lines.append(f"  {s['stage']:<24} {s['tokens']:>8} tokens  {_fmt(s['tokens_per_second']):>8} tok/s  "
                     f"{_fmt(s['tokens_per_wall_second']):>8} tok/s wall")
    lines.append(f"  {'all':<24} {g['tokens']:>8} tokens  {_fmt(g['tokens_per_second']):>8} tok/s  "
                 f"{_fmt(g['tokens_per_wall_second']):>8} tok/s wall")
    lines.append("DPO (pairs/s of the training loop, epochs counted; end to end per wall second of the stage):")
    for s in d["stages"]:
        lines.append(f"  {s['stage']:<24} {_fmt(s['pairs'], 'd') if isinstance(s['pairs'], int) else '-':>8} pairs  "
                     f"{_fmt(s['pairs_per_second'], '.2f'):>8} pairs/s  {_fmt(s['pairs_per_wall_second'], '.2f'):>8} pairs/s wall"
                     f"  (bf16 {s['bf16']})")
    lines.append(f"peak GPU memory allocated by torch in selfalign's processes (training): {_fmt(fig['peak_cuda_allocated_mb'], '.0f')} MiB")
    smi = fig.get("nvidia_smi")
    if smi:
        for idx, used in sorted(smi["peak_used_mb"].items()):
            lines.append(f"peak GPU memory used on GPU {idx} (nvidia-smi, vLLM included, {smi['samples']} samples): "
                         f"{used:.0f} of {smi['total_mb'][idx]:.0f} MiB")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--nvidia-smi", type=Path, default=None, help="nvidia-smi CSV samples (index, memory.used, memory.total)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    try:
        fig = run_figures(args.run_dir, args.nvidia_smi)
    except FiguresError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(fig)))
    if args.json is not None:
        args.json.write_text(json.dumps(fig, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
