"""Training outside the recipe's process: the ``training:`` config section, the launch command,
the shipped accelerate configs, two-process SFT and DPO under ``accelerate launch`` on the CPU
(gloo) with the tiny model, an isolated child that is interrupted and resumed, a failing child,
and the per-stage peak memory in the run manifest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from selfalign import memory
from selfalign.config import EngineConfig, load_config
from selfalign.errors import ConfigError, TrainingError
from selfalign.training.config import SHIPPED_LAUNCHER_CONFIGS, DPOSettings, LaunchSettings, SFTSettings, shipped_launcher_config
from selfalign.training.launch import job_dir, launch_command, needs_child, train

sys.path.insert(0, str(Path(__file__).parent))
from test_training import FAST, assert_plain_model, dpo_pairs, sft_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- config


def test_training_section_is_validated(tmp_path):
    from selfalign.recipes.config import MetaRewardingConfig, SelfRewardingConfig
    from selfalign.recipes.humpback_config import HumpbackConfig

    for model in (SelfRewardingConfig, MetaRewardingConfig, HumpbackConfig):
        assert model().training == LaunchSettings()
    cfg = load_config(SelfRewardingConfig, None, ["training.num_processes=2", "training.launcher_config=deepspeed_zero3"])
    assert cfg.training.num_processes == 2 and cfg.training.uses_accelerate()
    assert cfg.training.config_file() == shipped_launcher_config("deepspeed_zero3")

    own = tmp_path / "my_accelerate.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert LaunchSettings(launcher_config=str(own)).config_file() == own.resolve()

    with pytest.raises(ConfigError, match=r"training\.num_proceses: unknown key"):
        load_config(SelfRewardingConfig, None, ["training.num_proceses=2"])
    with pytest.raises(ConfigError, match=r"training\.num_processes: Input should be greater than or equal to 1"):
        load_config(HumpbackConfig, None, ["training.num_processes=0"])
    with pytest.raises(ConfigError, match=r"training\.launcher_config: .*no accelerate config 'zero9'"):
        load_config(SelfRewardingConfig, None, ["training.launcher_config=zero9"])
    with pytest.raises(ValidationError, match="isolate: false cannot be combined"):
        LaunchSettings(num_processes=2, isolate=False)
    with pytest.raises(ValidationError, match="--num_processes=4 is set by training"):
        LaunchSettings(accelerate_args=["--num_processes=4"])


def test_when_training_leaves_the_process():
    cpu_hf = EngineConfig(kind="hf", device="cpu")
    assert not needs_child(LaunchSettings(), cpu_hf)  # a CPU with one process: in-process
    assert not needs_child(LaunchSettings(), EngineConfig(kind="openai"))  # generation is elsewhere
    assert needs_child(LaunchSettings(isolate=True), cpu_hf)
    assert needs_child(LaunchSettings(num_processes=2), cpu_hf)
    assert needs_child(LaunchSettings(launcher_config="fsdp"), cpu_hf)
    assert not needs_child(LaunchSettings(isolate=False), EngineConfig(kind="hf", device="auto"))


def test_launch_commands(tmp_path):
    job = tmp_path / "job.json"
    assert launch_command(job, LaunchSettings(isolate=True)) == [sys.executable, "-m", "selfalign.training.worker", str(job)]

    two = launch_command(job, LaunchSettings(num_processes=2, accelerate_args=["--gpu_ids", "0,1"]))
    assert two[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    assert "--multi_gpu" in two and two[two.index("--main_process_port") + 1] == "0"  # a free port
    assert two[-5:] == ["--gpu_ids", "0,1", "-m", "selfalign.training.worker", str(job)]

    zero3 = launch_command(job, LaunchSettings(num_processes=8, launcher_config="deepspeed_zero3", main_process_port=29555))
    assert zero3[zero3.index("--config_file") + 1] == str(shipped_launcher_config("deepspeed_zero3"))
    assert "--multi_gpu" not in zero3 and zero3[zero3.index("--main_process_port") + 1] == "29555"


def _launch_args(name: str, num_processes: int = 2):
    """accelerate's own parsing of ``accelerate launch --config_file <shipped> ...``."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(
        ["--config_file", str(shipped_launcher_config(name)), "--num_processes", str(num_processes), "-m", "selfalign.training.worker", "j"]
    )
    return _validate_launch_command(args)


def test_shipped_accelerate_configs_are_what_accelerate_expects(monkeypatch):
    """Each shipped YAML loads into accelerate's ClusterConfig (unknown keys are errors there), every
    plugin key is an `accelerate launch` option, and the environment accelerate derives from it
    builds the DeepSpeed / FSDP plugin with the intended settings (DeepSpeed itself is not needed)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    options = {a.dest for a in launch_command_parser()._actions}
    assert set(SHIPPED_LAUNCHER_CONFIGS) == {p.stem for p in shipped_launcher_config("fsdp").parent.glob("*.yaml")}
    for name in SHIPPED_LAUNCHER_CONFIGS:
        cfg = load_config_from_file(str(shipped_launcher_config(name)))
        assert cfg.num_machines == 1 and cfg.use_cpu is False and cfg.mixed_precision is None  # bf16: the sft/dpo settings
        plugin_keys = cfg.deepspeed_config.keys() | cfg.fsdp_config.keys()
        assert plugin_keys and plugin_keys <= options, plugin_keys - options

    for name, stage, gather in (("deepspeed_zero3", 3, True), ("deepspeed_zero2", 2, False)):
        args, defaults, _ = _launch_args(name)
        assert args.use_deepspeed and defaults.distributed_type == DistributedType.DEEPSPEED
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        with monkeypatch.context() as m:
            for k, v in env.items():
                if k.startswith("ACCELERATE_"):
                    m.setenv(k, v)
            ds = DeepSpeedPlugin().deepspeed_config
        zero = ds["zero_optimization"]
        assert zero["stage"] == stage and zero["stage3_gather_16bit_weights_on_model_save"] is gather
        assert ds["gradient_accumulation_steps"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"

    args, defaults, _ = _launch_args("fsdp")
    assert args.use_fsdp and defaults.distributed_type == DistributedType.FSDP
    env = prepare_multi_gpu_env(args)
    with monkeypatch.context() as m:
        for k, v in env.items():
            if k.startswith(("FSDP_", "ACCELERATE_")):
                m.setenv(k, v)
        fsdp = FullyShardedDataParallelPlugin()
    assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward is True
    assert fsdp.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert fsdp.state_dict_type.name == "SHARDED_STATE_DICT"


# --------------------------------------------------------------------------- two processes (gloo)


def test_two_processes_sft_then_dpo_under_accelerate(tmp_path, tiny_model_dir):
    launch = LaunchSettings(num_processes=2)
    lines: list[str] = []

    sft_out = tmp_path / "sft" / "model"
    memory.start()
    settings = SFTSettings(**{**FAST, "per_device_batch_size": 2}, learning_rate=3e-3, epochs=2, lr_scheduler="constant")
    sft = train("sft", tiny_model_dir, sft_examples(8), sft_out, settings, launch=launch, log=lines.append)
    # 8 examples, 2 per process and step, 2 processes: 2 steps an epoch -- each rank saw its half
    assert sft.world_size == 2 and sft.steps == 4 and not sft.reused
    losses = sft.metric("loss")
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert_plain_model(sft_out)
    assert json.loads((sft_out / "training.json").read_text())["result"]["world_size"] == 2
    assert [json.loads(x) for x in (sft_out / "train_log.jsonl").read_text().splitlines()] == sft.history
    assert not (tmp_path / "sft" / "model.checkpoints").exists()
    workers = memory.stage_peak()["workers"]
    assert [w["rank"] for w in workers] == [0, 1] and len({w["pid"] for w in workers}) == 2
    assert all(w["world_size"] == 2 and w["peak_rss_mb"] > 100 and w["distributed"] == "MULTI_CPU" for w in workers)
    assert any(line.startswith("step 4/4") for line in lines)
    assert (job_dir(sft_out) / "train.log").read_text().count("step 4/4") == 1  # rank 0 logs, rank 1 does not

    dpo_out = tmp_path / "iter_1" / "model"
    dpo_settings = DPOSettings(**{**FAST, "per_device_batch_size": 2}, learning_rate=2e-3, max_steps=3, lr_scheduler="constant")
    dpo = train("dpo", sft_out, dpo_pairs(8), dpo_out, dpo_settings, launch=launch, ref_model_dir=sft_out, log=lines.append)
    assert dpo.world_size == 2 and dpo.steps == 3
    margins = dpo.metric("rewards/margins")
    assert margins[0] == pytest.approx(0.0, abs=1e-4) and margins[-1] > 0.02  # reference = the SFT model
    assert_plain_model(dpo_out)

    n = len(lines)  # the same call again: the finished output is reused, no process is started
    again = train("dpo", sft_out, dpo_pairs(8), dpo_out, dpo_settings, launch=launch, ref_model_dir=sft_out, log=lines.append)
    assert again.reused and again.history == dpo.history and lines[n:] == [f"{dpo_out} is already trained; nothing to do"]


# --------------------------------------------------------------------------- isolated child


class _Stop(Exception):
    pass


def _running_workers(out: Path) -> list[int]:
    """Live processes whose command line names the job of ``out``."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if str(job_dir(out.resolve())) in p.joinpath("cmdline").read_bytes().decode(errors="replace") and (
                "zombie" not in p.joinpath("status").read_text()
            ):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def test_isolated_child_is_stopped_with_the_parent_and_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "model"
    launch = LaunchSettings(isolate=True)
    settings = SFTSettings(**{**FAST, "save_steps": 2, "per_device_batch_size": 2}, learning_rate=1e-3, max_steps=6)

    def stop_at_step_3(line: str) -> None:
        if line.startswith("step 3/6"):  # checkpoint-2 was complete before step 3 began
            raise _Stop

    with pytest.raises(_Stop):
        train("sft", tiny_model_dir, sft_examples(4), out, settings, launch=launch, log=stop_at_step_3)
    assert _running_workers(out) == []  # the interrupted parent stopped its child
    assert not out.exists()
    assert (tmp_path / "model.checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()

    lines: list[str] = []
    result = train("sft", tiny_model_dir, sft_examples(4), out, settings, launch=launch, log=lines.append)
    assert result.resumed_from_step in (2, 4) and result.steps == 6 and result.world_size == 1
    assert any(line.startswith("resuming from") for line in lines)
    assert [h["step"] for h in result.history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert_plain_model(out)


def test_a_failing_child_is_a_training_error_with_its_log(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken_model"  # a config.json but no weights: the worker cannot load it
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(TrainingError) as err:
        train("sft", broken, sft_examples(2), tmp_path / "m", SFTSettings(**FAST), launch=LaunchSettings(isolate=True))
    msg = str(err.value)
    assert "exit status 1" in msg and "could not load the model" in msg
    assert f"full log: {job_dir((tmp_path / 'm').resolve()) / 'train.log'}" in msg
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- memory per stage


def test_each_stage_records_its_own_peak_memory(tmp_path):
    from selfalign import memory
    from selfalign.run import Run

    run = Run.open(tmp_path / "run", {"a": 1})
    with run.stage("big", depends_on=["a"]) as st:
        block = bytearray(200 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page: 200 MiB resident
        st.finish({"n": 1})
    del block
    with run.stage("small", depends_on=["a"]) as st:
        st.finish({"n": 1})
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    big, small = manifest["stages"]["big"]["memory"], manifest["stages"]["small"]["memory"]
    assert big["peak_rss_mb"] >= 200
    if memory.rss_reset_supported():
        assert "rss_scope" not in big and "rss_scope" not in small
        assert big["peak_rss_mb"] > small["peak_rss_mb"] + 150  # the mark was reset when "small" began
    else:  # /proc/self/clear_refs refused or ignored here: both report the lifetime peak, and say so
        assert big["rss_scope"] == small["rss_scope"] == "process"
    assert "workers" not in small and small["peak_cuda_mb"] is None


# --------------------------------------------------------------------------- docs/scaling.md


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_scaling_doc_snippets_validate(tmp_path):
    """Every YAML block of docs/scaling.md: run-config snippets merged into the demo config load
    into the recipe's model with the values they show; accelerate configs load into accelerate's."""
    import re

    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    from selfalign.config import flatten
    from selfalign.recipes.config import SelfRewardingConfig

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8"), re.S)
    accelerate_files, snippets = {}, []
    options = {a.dest for a in launch_command_parser()._actions}
    for block in blocks:
        first = block.splitlines()[0]
        if first.startswith("# accelerate config:"):
            path = tmp_path / first.split(":", 1)[1].strip()
            path.write_text(block, encoding="utf-8")
            cfg = load_config_from_file(str(path))
            assert set(cfg.deepspeed_config) <= options and cfg.num_machines > 1
            accelerate_files[path.name] = path
        else:
            snippets.append(yaml.safe_load(block))
    assert len(snippets) == 4 and accelerate_files

    base = yaml.safe_load((ROOT / "configs" / "self_rewarding_demo.yaml").read_text(encoding="utf-8"))
    for snippet in snippets:
        launcher = snippet.get("training", {}).get("launcher_config")
        if launcher and launcher not in SHIPPED_LAUNCHER_CONFIGS:
            snippet["training"]["launcher_config"] = str(accelerate_files[Path(launcher).name])
        cfg = SelfRewardingConfig.model_validate(_merge(base, snippet))
        held = flatten(cfg.model_dump(mode="json"))
        for key, value in flatten(snippet).items():
            assert held[key] == value, key
