"""Config loading: YAML + --set overrides, and errors that name the key and the file."""

from __future__ import annotations

import pytest

from selfalign.config import GenerateConfig, apply_override, changed_keys, config_hash, load_config
from selfalign.errors import ConfigError


def test_defaults_load_without_a_file():
    cfg = load_config(GenerateConfig)
    assert cfg.model.spec == "smollm2-135m-instruct" and cfg.engine.kind == "hf"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generation:\n  temperature: 0.3\n  stop: ['###']\nengine:\n  kind: openai\n")
    cfg = load_config(GenerateConfig, p, ["generation.n=4", "engine.base_url=http://127.0.0.1:9/v1", "generation.stop=[a, b]"])
    assert cfg.generation.temperature == 0.3 and cfg.generation.n == 4
    assert cfg.engine.base_url == "http://127.0.0.1:9/v1"
    assert cfg.generation.stop == ["a", "b"]


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generation:\n  temprature: 0.3\n")
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, p)
    assert str(p) in str(e.value) and "generation.temprature: unknown key" in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("generation.temperature=-1", "generation.temperature"),
        ("generation.top_p=1.5", "generation.top_p"),
        ("generation.n=abc", "generation.n"),
        ("engine.kind=llamafile", "engine.kind"),
        ("model.dtype=int3", "model.dtype"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(GenerateConfig, None, [override])


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generation:\n  n: 2\n  stop: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: not valid YAML"):
        load_config(GenerateConfig, p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(GenerateConfig, tmp_path / "nope.yaml")


def test_override_needs_key_equals_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "generation.n")


def test_changed_keys_and_hash():
    a = {"generation": {"n": 1, "stop": ["x"]}, "model": {"spec": "m"}}
    b = {"generation": {"n": 2, "stop": ["x"]}, "model": {"spec": "m"}, "extra": {"k": 1}}
    assert changed_keys(a, b) == ["extra.k", "generation.n"]
    assert config_hash(a) == config_hash({"model": {"spec": "m"}, "generation": {"stop": ["x"], "n": 1}})
    assert config_hash(a) != config_hash(b)
