"""The two sides of a win-rate comparison: what ``--a``/``--b`` name, and the outputs each side gives.

A side is a model spec (local dir, ``.gguf``, hub id, the embedded default), a run iteration
(``RUN:iter_N``, ``RUN:N`` or ``RUN:sft``: that iteration's trained model) or a JSON/JSONL file
of precomputed outputs (:func:`resolve_side`). :func:`load_outputs` reads such a file against a
prompt set; :func:`generate_outputs` has a model answer the prompts (resumable).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from selfalign.config import GenerationConfig
from selfalign.data.prompt_sets import Prompt
from selfalign.data.records import done_marker_path, is_done, read_json_list, read_jsonl, record_id
from selfalign.engines.base import Engine
from selfalign.errors import ConfigError, DataError, RunError

@dataclass(frozen=True)
class Side:
    """One side of the comparison: ``kind`` is ``"model"`` (``target`` is a model spec) or
    ``"outputs"`` (``target`` is a JSON/JSONL file of precomputed outputs)."""

    spec: str
    kind: str
    target: str
    slug: str

    @property
    def label(self) -> str:
        return self.spec


_RUN_SPEC = re.compile(r"^(?P<run>.+):(?P<stage>iter_\d+|\d+|sft)$")
_OUTPUT_SUFFIXES = (".json", ".jsonl")


def _slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "model"


def _run_models(run: Path) -> list[str]:
    names = [p.parent.name for p in run.glob("*/model") if p.is_dir()]
    return sorted(names, key=lambda n: (n != "sft", int(n[5:]) if n[5:].isdigit() else 0, n))


def resolve_side(spec: str) -> Side:
    """What a ``--a``/``--b`` value names.

    * ``*.json``/``*.jsonl``: precomputed outputs (the file must exist);
    * ``RUN:iter_N`` (or ``RUN:N``) and ``RUN:sft``: the model a recipe run trained,
      ``RUN/iter_N/model`` or ``RUN/sft/model`` (RunError naming the models the run has when it
      is missing);
    * anything else: a model spec (local dir, ``.gguf``, hub id, ``smollm2-135m-instruct``).
    """
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("empty model/outputs spec")
    path = Path(spec).expanduser()
    if spec.lower().endswith(_OUTPUT_SUFFIXES):
        if not path.is_file():
            raise DataError(f"outputs file not found: {path}")
        return Side(spec, "outputs", str(path), _slugify(path.stem))
    m = _RUN_SPEC.match(spec)
    if m and not path.exists():
        run = Path(m["run"]).expanduser()
        stage = m["stage"] if not m["stage"].isdigit() else f"iter_{m['stage']}"
        model = run / stage / "model"
        if not run.is_dir():
            raise RunError(f"{spec}: run directory {run} not found")
        if not model.is_dir():
            have = _run_models(run)
            listed = ", ".join(f"{spec.rsplit(':', 1)[0]}:{n}" for n in have) or "none yet"
            raise RunError(f"{spec}: {model} does not exist (trained models in {run}: {listed})")
        return Side(spec, "model", str(model), _slugify(f"{run.name}_{stage}"))
    if path.is_dir():
        parts = path.resolve().parts
        slug = "_".join(parts[-3:-1]) if path.name == "model" and len(parts) >= 3 else path.name
        return Side(spec, "model", spec, _slugify(slug))
    if path.suffix == ".gguf":
        return Side(spec, "model", spec, _slugify(path.stem))
    return Side(spec, "model", spec, _slugify(spec))


# ---------------------------------------------------------------- outputs
@dataclass
class Outputs:
    """One side's responses, aligned with the prompt list; ``tokens`` (completion tokens per
    response) only when generated here."""

    label: str
    texts: list[str]
    tokens: list[int] | None = None
    source: str | None = None


def as_outputs(x: Outputs | Sequence[str] | Mapping[str, str], prompts: Sequence[Prompt], default_label: str) -> Outputs:
    if isinstance(x, Outputs):
        out = x
    elif isinstance(x, Mapping):
        missing = [p.id for p in prompts if p.id not in x]
        if missing:
            raise DataError(f"{default_label}: no output for {len(missing)} of {len(prompts)} prompt ids (first: {missing[0]!r})")
        out = Outputs(default_label, [str(x[p.id]) for p in prompts])
    elif isinstance(x, (str, bytes)):
        raise TypeError("outputs must be an Outputs, a list of texts or a mapping prompt id -> text")
    else:
        out = Outputs(default_label, [str(t) for t in x])
    if len(out.texts) != len(prompts) or (out.tokens is not None and len(out.tokens) != len(prompts)):
        raise DataError(f"{out.label}: {len(out.texts)} outputs for {len(prompts)} prompts")
    return out


def _output_items(path: Path) -> Iterable[tuple[str, object]]:
    if path.suffix.lower() == ".json":
        data = read_json_list(path, "outputs")
        for i, item in enumerate(data):
            yield f"{path}: item {i}", item
        return
    for i, item in enumerate(read_jsonl(path, unique_ids=False), start=1):
        yield f"{path}: record {i}", item


def _record_text(item: dict) -> str | None:
    for key in ("instruction", "prompt"):
        if isinstance(item.get(key), str):
            return item[key]
    msgs = item.get("messages")
    if isinstance(msgs, list):
        users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    turns = item.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    return None


def load_outputs(path: str | Path, prompts: Sequence[Prompt], *, label: str | None = None) -> Outputs:
    """Precomputed outputs for ``prompts`` from a JSONL or JSON-list file.

    Each record holds the request (``instruction``, ``prompt``, ``messages`` - last user turn -
    or ``turns`` - first) and the response (``output`` or ``response``); AlpacaEval's
    ``[{dataset, instruction, output, generator}]`` and ``selfalign generate`` outputs both fit.
    Matched to prompts by request text, exact after stripping whitespace; the first record of a
    repeated text wins. DataError naming the file for a malformed record or a prompt without
    an output.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"outputs file not found: {path}")
    by_text: dict[str, str] = {}
    for where, item in _output_items(path):
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        text = _record_text(item)
        out = item.get("output", item.get("response"))
        if text is None:
            raise DataError(f"{where}: no request text (needs 'instruction', 'prompt', 'messages' or 'turns')")
        if not isinstance(out, str):
            got = "missing" if out is None else f"a {type(out).__name__}"
            raise DataError(f"{where}: 'output' (or 'response') must be a string, got {got}")
        by_text.setdefault(text.strip(), out)
    texts, missing = [], []
    for p in prompts:
        t = by_text.get(p.text.strip())
        if t is None:
            missing.append(p)
        texts.append(t or "")
    if missing:
        first = missing[0].text.strip().replace("\n", " ")
        first = first if len(first) <= 80 else first[:77] + "..."
        raise DataError(
            f"{path}: no output for {len(missing)} of {len(prompts)} prompts (matched by instruction text, "
            f"exact after stripping whitespace); first missing: {first!r} ({missing[0].source})"
        )
    return Outputs(label or str(path), texts, None, str(path))


def generate_outputs(
    engine: Engine,
    prompts: Sequence[Prompt],
    out_path: str | Path,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    label: str | None = None,
    show_progress: bool = True,
) -> Outputs:
    """One response per prompt with ``engine`` through the ``generate`` stage (resumable
    JSONL at ``out_path``), read back in prompt order with completion token counts."""
    from selfalign.stages.generate import run_generate

    out_path = Path(out_path)
    wanted = {p.id for p in prompts}
    if out_path.exists():
        have = {r.get("prompt_id") for r in read_jsonl(out_path, allow_torn_tail=True)}
        done = is_done(out_path)
        if have - wanted and not (done and wanted <= have):
            raise RunError(
                f"{out_path}: holds responses to other prompts (another --prompts or --limit, not finished or not "
                f"covering these); finish that run with its own prompts, or delete the file or choose another --out"
            )
        if done and not wanted <= have:
            done_marker_path(out_path).unlink()  # complete for a smaller prompt set: continue it
    gen = GenerationConfig(n=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    run_generate(engine, prompts, out_path, gen, show_progress=show_progress)
    by_prompt: dict[str, dict] = {}
    for r in read_jsonl(out_path):
        if r.get("prompt_id") in wanted:
            by_prompt[r["prompt_id"]] = r
    texts = [by_prompt[p.id]["response"] for p in prompts]
    tokens = [int(by_prompt[p.id].get("completion_tokens") or 0) for p in prompts]
    return Outputs(label or str(engine.describe().get("model", engine.name)), texts, tokens, str(out_path))


def write_outputs(path: Path, prompts: Sequence[Prompt], outs: Outputs) -> None:
    """A copy of precomputed outputs in the generate layout (for the record of what was judged)."""
    records = [
        json.dumps({"id": record_id("output", p.id, t), "kind": "response", "prompt_id": p.id, "messages": list(p.messages),
                    "response": t, "source": outs.source}, ensure_ascii=False)
        for p, t in zip(prompts, outs.texts)
    ]
    from selfalign.data.records import atomic_write_text

    atomic_write_text(path, "".join(r + "\n" for r in records))
