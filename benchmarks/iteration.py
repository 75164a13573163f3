"""End to end: wall time and peak memory of one Self-Rewarding demo iteration, stage by stage.

Runs ``selfalign run`` on the packaged configs/self_rewarding_demo.yaml (or ``--config``) as a
subprocess, with one iteration, in a fresh run directory, and reads each stage's wall time and
counts from the run's manifest.json. Memory: the resident set of the run's whole process tree
(the run and any training child), sampled every 0.25 s; a stage's peak is the highest sample
between its start and end. ``CPU s`` is the CPU time the tree used during a stage: on a shared
machine (load above the core count) wall time stretches, CPU time much less so.

By default the demo's SFT step is skipped (``sft.enabled=false``): iteration 1 then starts from
the instruct model itself, and the figure is one iteration's own cost, which the demo's SFT
does not change (same model size, same settings). ``--with-sft`` runs SFT as well; it is
reported as its own row and not counted in the iteration's time.

    .venv/bin/python benchmarks/iteration.py                  # the demo's iteration 1 (several minutes of both cores)
    .venv/bin/python benchmarks/iteration.py --quick          # 2 prompts x 2 responses, tiny budgets (a smoke test)

The run directory (default runs/bench_iteration, ``--out``) is replaced at each start; a folder
this benchmark did not create is refused. Results: benchmarks/results/iteration.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_info, print_table, write_results  # noqa: E402

TARGET_S = 600.0
MARKER = "bench_iteration.marker"
QUICK = [
    "self_instruct.num_prompts=2",
    "self_instruct.max_new_tokens=32",
    "respond.n=2",
    "respond.max_new_tokens=24",
    "judge.k=1",
    "judge.max_new_tokens=24",
    "dpo.max_steps=1",
]


class TreeRss:
    """Samples the summed RSS and CPU time of a process and its descendants in a background thread."""

    def __init__(self, pid: int, every: float = 0.25):
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int]] = []  # (unix time, bytes)
        self.cpu: list[tuple[float, float]] = []  # (unix time, CPU seconds of the tree so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, cpu = 0, 0.0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    cpu += t.user + t.system + t.children_user + t.children_system
                except psutil.Error:
                    pass
            now = time.time()
            self.samples.append((now, total))
            self.cpu.append((now, cpu))
            self._stop.wait(self.every)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_seconds(self, start: float | None, end: float | None) -> float | None:
        """CPU seconds the tree used between two times (nearest samples), None without samples."""
        if not self.cpu or start is None or end is None:
            return None
        before = [c for t, c in self.cpu if t <= start] or [self.cpu[0][1]]
        upto = [c for t, c in self.cpu if t <= end] or [self.cpu[0][1]]
        return max(0.0, upto[-1] - before[-1])

    def peak(self, start: float | None = None, end: float | None = None) -> int | None:
        vals = [b for t, b in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return max(vals) if vals else None


def _ts(iso: str | None) -> float | None:
    return dt.datetime.fromisoformat(iso).timestamp() if iso else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="run config (default: the packaged self_rewarding_demo.yaml)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_iteration", help="run directory (replaced)")
    p.add_argument("--with-sft", action="store_true", help="run the demo's SFT step too (reported, not counted)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: 2 prompts x 2 responses, 1 judgment, 1 DPO step")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--report-only", action="store_true", help="only tabulate the finished run in --out (no memory figures)")
    p.add_argument("--results-name", default=None, help="benchmarks/results/<name>.json (default: iteration, or iteration_quick)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    if args.report_only:
        return report(args, out, None, None, None, [], machine_info())
    if out.exists():
        if not (out / MARKER).is_file():
            raise SystemExit(f"{out} exists and was not made by this benchmark; pick another --out")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    overrides = [f"runs_dir={out.parent}", f"name={out.name}", "iterations=1"]
    if not args.with_sft:
        overrides.append("sft.enabled=false")
    if args.quick:
        overrides += QUICK
    overrides += args.extra
    cmd = [str(Path(sys.executable).with_name("selfalign"))]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-c", "from selfalign.cli import main; main()"]
    cmd += ["run"] + ([str(args.config)] if args.config else [])
    for o in overrides:
        cmd += ["--set", o]
    cmd.append("--no-progress")

    info = machine_info()
    print(f"load {info['load_average']}; running: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeRss(proc.pid) as mem:
        log_lines = []
        for line in proc.stdout:
            log_lines.append(line)
            sys.stdout.write("  | " + line)
        rc = proc.wait()
    wall = time.time() - t0
    if out.is_dir():
        (out / MARKER).write_text("made by benchmarks/iteration.py; replaced at each run\n")
    (out / "bench_iteration.log").write_text("".join(log_lines))
    if rc != 0:
        raise SystemExit(f"selfalign run failed ({rc}); log: {out / 'bench_iteration.log'}")
    return report(args, out, mem, wall, cmd, overrides, info)


def report(args, out: Path, mem: TreeRss | None, wall: float | None, cmd, overrides, info) -> int:
    """Tabulate the run's manifest (and memory samples when there are any); write the JSON."""
    if mem is None:
        mem = TreeRss.__new__(TreeRss)
        mem.samples, mem.cpu = [], []
    manifest = json.loads((out / "manifest.json").read_text())
    rows, iter_s = [], 0.0
    for name, st in manifest["stages"].items():
        if st.get("status") != "done":
            continue
        start, end = _ts(st.get("started_at")), _ts(st.get("ended_at"))
        peak = mem.peak(start, end)
        counted = name.startswith("iter_1/")
        if counted:
            iter_s += st["seconds"]
        rows.append({
            "stage": name,
            "seconds": st["seconds"],
            "peak_rss_mib": peak / 2**20 if peak else None,
            "cpu_s": mem.cpu_seconds(start, end),
            "counted": counted,
            "counts": st.get("counts", {}),
        })
    for r in rows:
        r["share"] = r["seconds"] / iter_s if r["counted"] and iter_s else None
        c = r["counts"]
        r["detail"] = ", ".join(
            f"{k} {c[k]}" for k in ("kept", "candidates", "prompts", "responses", "judgments", "tokens", "tokens_per_second", "pairs", "steps", "examples_per_second") if k in c and not isinstance(c[k], dict)
        )
    peak_all = mem.peak()
    cpus = [r["cpu_s"] for r in rows if r["counted"]]
    iter_cpu = sum(cpus) if cpus and None not in cpus else None
    rows.append({"stage": "iteration 1 (sum of its stages)", "seconds": iter_s, "cpu_s": iter_cpu, "peak_rss_mib": max((r["peak_rss_mib"] or 0) for r in rows if r["counted"]) or None, "share": 1.0, "detail": f"target <= {TARGET_S:.0f} s: {'met' if iter_s <= TARGET_S else 'NOT met'}"})
    if wall is not None:
        rows.append({"stage": "whole command (start-up, model, report)", "seconds": wall, "peak_rss_mib": peak_all / 2**20 if peak_all else None, "detail": ""})
    text = print_table(
        rows,
        [("stage", "stage"), ("seconds", "s", ".1f"), ("share", "share", ".0%"), ("cpu_s", "CPU s", ".0f"), ("peak_rss_mib", "peak RSS MiB (tree)", ".0f"), ("detail", "counts")],
        title=f"One Self-Rewarding demo iteration{' (quick)' if args.quick else ''}{'' if args.with_sft else ', SFT skipped'} (load {info['load_average']} -> {machine_info()['load_average']})",
    )
    path = write_results(args.results_name or ("iteration_quick" if args.quick else "iteration"), {
        "benchmark": "iteration",
        "command": "python benchmarks/iteration.py " + " ".join(sys.argv[1:]),
        "machine": info,
        "load_average_end": machine_info()["load_average"],
        "selfalign_command": cmd,
        "overrides": overrides,
        "run_dir": str(out),
        "iteration_seconds": iter_s,
        "iteration_cpu_seconds": iter_cpu,
        "target_seconds": TARGET_S,
        "target_met": iter_s <= TARGET_S,
        "wall_seconds": wall,
        "peak_rss_mib": peak_all / 2**20 if peak_all else None,
        "stages": rows,
        "table_text": text,
    })
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
