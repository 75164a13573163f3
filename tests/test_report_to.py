"""training.report_to: transformers' own tensorboard / wandb integrations, their files in <model>/logs/.

TensorBoard runs for real (the tiny random Llama, a few steps): the event files are read back
with tensorboard's EventAccumulator. wandb is not installed here (nor a dependency): what is
tested is the clear error before anything is trained.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from selfalign.errors import ConfigError
from selfalign.training import DPOSettings, SFTSettings
from selfalign.training.config import REPORT_TO, LaunchSettings
from selfalign.training.launch import job_dir, train

sys.path.insert(0, str(Path(__file__).parent))
from test_training import FAST, _Interrupt, _interrupt_after_save, dpo_pairs, sft_examples  # noqa: E402


def _scalars(logs: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``logs``: tag -> [(step, value)] in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(logs.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.fixture()
def no_wandb(monkeypatch):
    """Make ``import wandb`` fail (and find_spec say so) whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "wandb", None)


# --------------------------------------------------------------------------- the setting


def test_report_to_is_validated_and_not_fingerprinted(tmp_path):
    from selfalign.config import load_config
    from selfalign.recipes.config import SelfRewardingConfig

    assert LaunchSettings().report_to == "none"
    assert typing.get_args(LaunchSettings.model_fields["report_to"].annotation) == REPORT_TO
    with pytest.raises(ValidationError, match="report_to"):
        LaunchSettings(report_to="mlflow")
    cfg = load_config(SelfRewardingConfig, overrides=["training.report_to=tensorboard"])
    assert cfg.training.report_to == "tensorboard"
    with pytest.raises(ConfigError, match=r"training\.report_to"):
        load_config(SelfRewardingConfig, overrides=["training.report_to=all"])
    # logging is not part of what is trained: the trainers' settings do not carry it
    assert "report_to" not in SFTSettings.model_fields and "report_to" not in DPOSettings.model_fields


def test_missing_wandb_fails_before_anything_is_trained(tmp_path, tiny_model_dir, no_wandb):
    from selfalign.training.common import check_report_to
    from selfalign.training.sft import train_sft

    with pytest.raises(ConfigError, match=r"training\.report_to: wandb needs the wandb package.*pip install wandb"):
        check_report_to("wandb")
    with pytest.raises(ConfigError, match="expected one of none, tensorboard, wandb"):
        check_report_to("mlflow")
    check_report_to("none")
    check_report_to("tensorboard")  # a dev dependency: installed in .venv
    for launch in (LaunchSettings(report_to="wandb"), LaunchSettings(report_to="wandb", isolate=True)):
        with pytest.raises(ConfigError, match="pip install wandb"):
            train("sft", tiny_model_dir, sft_examples(2), tmp_path / "m", SFTSettings(**FAST), launch=launch)
    with pytest.raises(ConfigError, match="pip install wandb"):
        train_sft(tiny_model_dir, sft_examples(2), tmp_path / "m", SFTSettings(**FAST), report_to="wandb")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.checkpoints").exists()
    assert not job_dir(tmp_path / "m").exists()  # no child process was started


def test_cli_run_refuses_wandb_without_the_package_at_once(tmp_path, no_wandb):
    from typer.testing import CliRunner

    from selfalign.cli import app

    res = CliRunner().invoke(app, ["run", "--set", f"runs_dir={tmp_path}", "--set", "training.report_to=wandb", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "training.report_to: wandb needs the wandb package" in res.output and "pip install wandb" in res.output
    assert list(tmp_path.iterdir()) == []  # refused before the run directory was made


# --------------------------------------------------------------------------- tensorboard, for real


def test_tensorboard_sft_event_files_in_the_model_dir_across_a_resume(tmp_path, tiny_model_dir):
    from selfalign.training.sft import train_sft

    out = tmp_path / "sft"
    settings = SFTSettings(**{**FAST, "save_steps": 2, "per_device_batch_size": 2}, learning_rate=1e-3, max_steps=4)
    with pytest.raises(_Interrupt):
        train_sft(tiny_model_dir, sft_examples(4), out, settings, report_to="tensorboard", callbacks=[_interrupt_after_save(2)])
    ckpt_logs = tmp_path / "sft.checkpoints" / "logs"
    assert len(list(ckpt_logs.glob("events.out.tfevents.*"))) == 1  # written while training, next to the checkpoints
    assert not (tmp_path / "sft.checkpoints" / "runs").exists()  # not transformers' default place

    result = train_sft(tiny_model_dir, sft_examples(4), out, settings, report_to="tensorboard")
    assert result.resumed_from_step == 2 and result.steps == 4
    assert not (tmp_path / "sft.checkpoints").exists()
    logs = out / "logs"
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2  # the first attempt's and the resumed run's
    scalars = _scalars(logs)
    assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(scalars)
    loss = dict(scalars["train/loss"])  # the resumed run logs steps 3-4 again after the first run's 1-2
    assert sorted(loss) == [1, 2, 3, 4]
    resumed = {h["step"]: h["loss"] for h in result.history if "loss" in h}
    for step in (3, 4):
        assert loss[step] == pytest.approx(resumed[step], rel=1e-5)


def test_tensorboard_dpo_in_a_child_process_through_the_recipe_entry_point(tmp_path, tiny_model_dir):
    out = tmp_path / "iter_1" / "model"
    settings = DPOSettings(**FAST, learning_rate=1e-3, epochs=1)
    result = train("dpo", tiny_model_dir, dpo_pairs(8), out, settings, launch=LaunchSettings(isolate=True, report_to="tensorboard"))
    assert result.steps == 2
    scalars = _scalars(out / "logs")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    margins = [v for _, v in scalars["train/rewards/margins"]]
    assert margins == pytest.approx(result.metric("rewards/margins"), rel=1e-5)
    assert "train/rewards/accuracies" in scalars and "train/logps/chosen" in scalars

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "logs").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    # TensorBoardCallback also records the trainer's arguments; the run name is the model's place in the run
    assert any(t.startswith("args") for t in acc.Tags()["tensors"])
    args_text = acc.Tensors([t for t in acc.Tags()["tensors"] if t.startswith("args")][0])[0].tensor_proto.string_val[0].decode()
    assert '"run_name": "' + "/".join(out.resolve().parts[-3:]) + '"' in args_text
