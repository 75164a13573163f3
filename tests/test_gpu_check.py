"""scripts/gpu_check.sh and scripts/gpu_check_figures.py, on what a CPU can check.

The figures are computed from a run directory laid out as a real run writes it (the manifest's
stage entries as recorded by a tiny CPU run of the demo, with CUDA peaks filled in); the shell
script is checked for syntax and for stopping at once, with its reason, without a CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _figures_module():
    spec = importlib.util.spec_from_file_location("gpu_check_figures", ROOT / "scripts" / "gpu_check_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


figures = _figures_module()


def _stage(seconds, counts, *, peak_cuda=None, workers=None, outputs=None, status="done"):
    mem = {"peak_rss_mb": 1200.0, "peak_cuda_mb": peak_cuda}
    if workers is not None:
        mem["workers"] = workers
    return {"status": status, "depends_on": ["recipe"], "outputs": outputs or [], "started_at": "t", "ended_at": "t",
            "seconds": seconds, "counts": counts, "error": None, "memory": mem}


def _dpo_model(run: Path, it: str, *, pairs: int, epochs: float, eps: float, bf16: bool) -> None:
    model = run / it / "model"
    model.mkdir(parents=True)
    (model / "training.json").write_text(json.dumps({
        "fingerprint": {"kind": "dpo", "settings": {"epochs": epochs, "bf16": bf16}, "num_examples": pairs},
        "finished_at": "t", "dtype": "float32",
        "result": {"out_dir": str(model), "steps": 3, "seconds": 20.0, "examples_per_second": eps, "num_examples": pairs, "bf16": bf16},
    }))


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    run = tmp_path / "demo"
    run.mkdir()
    worker = {"rank": 0, "world_size": 1, "pid": 1, "distributed": "NO", "peak_rss_mb": 3000.0, "peak_cuda_mb": 2100.5}
    stages = {
        "seed_eft": _stage(30.0, {"groups": 10, "kept": 8}),
        "sft": _stage(40.0, {"examples": 40, "steps": 10, "seconds": 39.0}, workers=[{**worker, "peak_cuda_mb": 2500.0}], outputs=["sft/model"]),
        "iter_1/self_instruct": _stage(17.0, {"candidates": 8, "generation_tokens": 400, "seconds": 8.0}),
        "iter_1/respond": _stage(5.0, {"prompts": 4, "responses": 8, "tokens": 1000, "tokens_per_second": 250.0}),
        "iter_1/judge": _stage(10.0, {"judgments": 24, "judge_tokens": 1200, "seconds": 10.0}),
        "iter_1/pairs": _stage(0.01, {"prompts": 4, "pairs": 4}),
        "iter_1/dpo": _stage(20.0, {"pairs": 4, "steps": 2, "seconds": 19.9}, peak_cuda=12.0, workers=[worker], outputs=["iter_1/model"]),
        "iter_2/self_instruct": _stage(9.0, {"generation_tokens": 600, "seconds": 6.0}),
        "iter_2/respond": _stage(0.0, {}, status="pending"),
    }
    (run / "manifest.json").write_text(json.dumps({"format": 1, "stages": stages}))
    _dpo_model(run, "iter_1", pairs=4, epochs=2, eps=0.8, bf16=True)
    return run


def test_figures_of_a_run(run_dir, tmp_path):
    fig = figures.run_figures(run_dir)
    gen = fig["generation"]
    assert [s["stage"] for s in gen["stages"]] == ["iter_1/self_instruct", "iter_1/respond", "iter_1/judge", "iter_2/self_instruct"]
    by = {s["stage"]: s for s in gen["stages"]}
    assert by["iter_1/self_instruct"]["tokens_per_second"] == pytest.approx(50.0)  # the generation's own seconds
    assert by["iter_1/self_instruct"]["tokens_per_wall_second"] == pytest.approx(400 / 17)  # engine start-up included
    assert by["iter_1/respond"]["seconds"] == pytest.approx(4.0)  # from tokens_per_second
    assert gen["tokens"] == 3200 and gen["seconds"] == pytest.approx(8 + 4 + 10 + 6)
    assert gen["tokens_per_second"] == pytest.approx(3200 / 28)
    assert gen["tokens_per_wall_second"] == pytest.approx(3200 / (17 + 5 + 10 + 9))
    (dpo,) = fig["dpo"]["stages"]
    assert dpo["stage"] == "iter_1/dpo" and dpo["pairs"] == 4 and dpo["bf16"] is True
    assert dpo["pairs_per_second"] == 0.8 and dpo["pairs_per_wall_second"] == pytest.approx(4 * 2 / 20)
    assert fig["peak_cuda_allocated_mb"] == 2500.0  # the largest of the stages' and their workers' peaks
    assert fig["nvidia_smi"] is None

    smi = tmp_path / "smi.csv"
    smi.write_text("0, 1200, 81559\n0, 70500, 81559\n\n0, 3000, 81559\n")
    fig = figures.run_figures(run_dir, smi)
    assert fig["nvidia_smi"] == {"samples": 3, "peak_used_mb": {"0": 70500.0}, "total_mb": {"0": 81559.0}}
    text = "\n".join(figures.summary_lines(fig))
    assert "114.3 tok/s" in text and "0.80 pairs/s" in text and "2500 MiB" in text and "70500 of 81559 MiB" in text


def test_figures_main_prints_and_writes_json(run_dir, tmp_path, capsys):
    out = tmp_path / "fig.json"
    assert figures.main([str(run_dir), "--json", str(out)]) == 0
    assert "iter_1/respond" in capsys.readouterr().out
    assert json.loads(out.read_text())["generation"]["tokens"] == 3200


def test_figures_refuse_what_they_cannot_read(run_dir, tmp_path, capsys):
    assert figures.main([str(tmp_path / "nowhere")]) == 1
    assert "manifest.json: no such file" in capsys.readouterr().err
    shutil.rmtree(run_dir / "iter_1" / "model")
    with pytest.raises(figures.FiguresError, match=r"stage iter_1/dpo is done but .*training\.json is missing"):
        figures.run_figures(run_dir)
    bad = tmp_path / "bad.csv"
    bad.write_text("0, lots, 81559\n")
    _dpo_model(run_dir, "iter_1", pairs=4, epochs=2, eps=0.8, bf16=True)
    with pytest.raises(figures.FiguresError, match=r"bad\.csv:1: expected 'index, memory\.used, memory\.total'"):
        figures.run_figures(run_dir, bad)
    m = json.loads((run_dir / "manifest.json").read_text())
    m["stages"] = {k: v for k, v in m["stages"].items() if not k.endswith("/dpo")}
    (run_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(figures.FiguresError, match="no finished DPO stage"):
        figures.run_figures(run_dir)


# --------------------------------------------------------------------------- the shell script


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _run_script(tmp_path, fake_smi: str | None, extra_env: dict | None = None):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in ("bash", "date", "grep", "head", "dirname", "mkdir", "cat", "env"):
        path = shutil.which(tool)
        if path and not (bindir / tool).exists():
            (bindir / tool).symlink_to(path)
    smi = bindir / "nvidia-smi"
    smi.unlink(missing_ok=True)
    if fake_smi is not None:
        smi.write_text(fake_smi)
        smi.chmod(0o755)
    env = {"PATH": str(bindir), "HOME": str(tmp_path), "GPU_CHECK_RUNS": str(tmp_path / "runs"), **(extra_env or {})}
    return subprocess.run([shutil.which("bash"), str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)


def test_gpu_check_stops_at_once_without_cuda(tmp_path):
    res = _run_script(tmp_path, None)
    assert res.returncode == 2 and "no CUDA GPU here (nvidia-smi not found)" in res.stderr
    res = _run_script(tmp_path, "#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    assert res.returncode == 2 and "nvidia-smi lists no GPU: No devices were found" in res.stderr
    import torch

    if torch.cuda.is_available():
        pytest.skip("this Python's torch sees a CUDA device: the last case needs a CPU build")
    # a GPU listed, but a Python whose torch has no CUDA (this machine's CPU build)
    res = _run_script(tmp_path, "#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\n", {"SELFALIGN_GPU_PYTHON": sys.executable})
    assert res.returncode == 2, res.stderr
    assert "sees no CUDA device" in res.stderr and "cannot run this check" in res.stderr
    assert not (tmp_path / "runs").exists()  # stopped before the demo
