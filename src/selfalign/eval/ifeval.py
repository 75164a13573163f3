"""IFEval (Zhou et al., 2023): does the policy follow verifiable instructions? No judge involved.

Each of the 541 prompts carries one or more instructions a program can check ("answer in
fewer than 40 words", "no commas", "wrap the answer in JSON", ...). The checkers are lm-eval's
copy of the reference code (:mod:`selfalign.eval.ifeval_checkers`). Four numbers, as the paper
defines them:

- **prompt-level strict**: share of prompts whose response follows *all* their instructions;
- **instruction-level strict**: share of all instructions (pooled over prompts) followed;
- **loose** variants: the same, where a response also counts as following an instruction if
  it does after dropping its first and/or last line and/or every ``*`` (markdown noise).

Each comes with a 95% percentile-bootstrap interval over prompts (10,000 resamples, seeded):
prompts are resampled and the instruction-level figure is recomputed as a pooled ratio, so
its interval reflects that instructions of one prompt are not independent.

**Matching responses to prompts** follows the reference implementation: a response belongs to
the input prompt with exactly the same text. An input prompt no response matches is left out
of every denominator and listed (``missing`` in the summary); a response whose prompt is not
in the input set is ignored and counted (``unmatched_responses``). In the published GPT-4
responses one prompt (key 2785, the Shinto shrines lecture) was answered in an earlier wording
("at least one placeholder" where input_data.jsonl now says "at least 3"), so the reference
scored 540 of the 541 prompts and so does this module.

Subsets for quick runs (``--limit N``): the first N prompts of the input file, or with
``sample`` a seeded random N (numpy ``default_rng(seed)``, kept in file order).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfalign.data.prompt_sets import Prompt
from selfalign.data.records import atomic_write_json, atomic_write_text, record_id
from selfalign.errors import DataError

DEFAULT_INPUT = "../shared/data/ifeval/input_data.jsonl"
RESAMPLES = 10_000
METRICS = ("prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose")
METRIC_LABELS = {
    "prompt_level_strict": "prompt-level strict",
    "instruction_level_strict": "instruction-level strict",
    "prompt_level_loose": "prompt-level loose",
    "instruction_level_loose": "instruction-level loose",
}


@dataclass(frozen=True)
class IFEvalItem:
    """One IFEval prompt: its key, text, instruction ids and their arguments."""

    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict, ...]
    source: str  # "file:line"

    def as_prompt(self, system: str | None = None) -> Prompt:
        """The prompt for generation, with the id ``selfalign generate`` gives the same text
        (a hash of the messages), so either command's responses file serves the other."""
        msgs = [{"role": "user", "content": self.prompt}]
        if system:
            msgs.insert(0, {"role": "system", "content": system})
        return Prompt(id=record_id("prompt", msgs), messages=tuple(msgs), source=self.source)


@dataclass
class IFEvalResult:
    key: int
    prompt: str
    response: str
    instruction_id_list: list[str]
    followed_strict: list[bool]
    followed_loose: list[bool]
    extra: dict = field(default_factory=dict)

    def as_record(self) -> dict:
        return {
            "key": self.key, "prompt": self.prompt, "response": self.response,
            "instruction_id_list": self.instruction_id_list,
            "followed_strict": self.followed_strict, "followed_loose": self.followed_loose,
            "prompt_strict": all(self.followed_strict), "prompt_loose": all(self.followed_loose),
            **self.extra,
        }


# ----------------------------------------------------------------------------- reading
def _jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _field(obj: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if name not in obj:
        raise DataError(f"{where}: field '{name}': missing")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{name}': expected {want}, got {type(value).__name__}")
    return value


def load_items(path: str | Path = DEFAULT_INPUT, *, limit: int | None = None, sample: bool = False,
               seed: int = 0) -> list[IFEvalItem]:
    """The IFEval prompts of ``path`` (``{key, prompt, instruction_id_list, kwargs}`` lines), all
    validated (file, line and field named on error) and checked against the checkers' registry.
    ``limit``: the first N, or with ``sample`` a seeded random N in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IFEval input file not found: {path} (the 541-prompt set is {DEFAULT_INPUT}, relative to the "
                        f"project root)")
    from selfalign.eval.ifeval_checkers import instruction_ids

    known = set(instruction_ids())
    items: list[IFEvalItem] = []
    seen: dict[Any, str] = {}
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        key = _field(obj, "key", int, where)
        prompt = _field(obj, "prompt", str, where)
        ids = _field(obj, "instruction_id_list", list, where)
        kwargs = _field(obj, "kwargs", list, where)
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt': empty")
        if not ids:
            raise DataError(f"{where}: field 'instruction_id_list': empty")
        if len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise DataError(f"{where}: field 'kwargs': expected one object per instruction ({len(ids)}), got {kwargs!r:.80}")
        if not all(isinstance(i, str) for i in ids):
            raise DataError(f"{where}: field 'instruction_id_list': expected a list of strings")
        bad = [i for i in ids if i not in known]
        if bad:
            raise DataError(f"{where}: field 'instruction_id_list': unknown instruction id(s) {', '.join(map(str, bad))}")
        for label, value in (("key", key), ("prompt", prompt)):
            if (label, value) in seen:
                raise DataError(f"{where}: field '{label}': repeats line {seen[(label, value)]}")
            seen[(label, value)] = str(lineno)
        items.append(IFEvalItem(key, prompt, tuple(ids), tuple(kwargs), where))
    if not items:
        raise DataError(f"{path}: no IFEval prompts (the file is empty)")
    if limit is not None and limit < len(items):
        if sample:
            import numpy as np

            picked = sorted(np.random.default_rng(seed).choice(len(items), size=limit, replace=False).tolist())
            items = [items[i] for i in picked]
        else:
            items = items[:limit]
    return items


def subset_label(limit: int | None, sample: bool, seed: int, path: str | Path) -> str:
    """How :func:`load_items` picked its prompts, in words (``"all"`` when nothing was left out)."""
    if limit is None:
        return "all"
    total = sum(1 for line in Path(path).open("rb") if line.strip())
    if limit >= total:
        return "all"
    return f"seeded sample of {limit} (seed {seed})" if sample else f"first {limit}"


def load_responses(path: str | Path) -> dict[str, tuple[str, str]]:
    """``prompt text -> (response, "file:line")`` from a responses file: ``{prompt, response}``
    lines (the reference layout), or ``selfalign generate`` records (``messages`` + ``response``,
    the prompt being the last user message). A repeated prompt is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"responses file not found: {path}")
    out: dict[str, tuple[str, str]] = {}
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        if isinstance(obj, dict) and "prompt" not in obj and "messages" in obj:
            msgs = _field(obj, "messages", list, where)
            users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
            if not users or not isinstance(users[-1], str):
                raise DataError(f"{where}: field 'messages': no user message with text content")
            prompt = users[-1]
        else:
            prompt = _field(obj, "prompt", str, where)
        response = _field(obj, "response", str, where)
        if prompt in out:
            raise DataError(f"{where}: field 'prompt': the same prompt already has a response at {out[prompt][1]} "
                            f"(one response per prompt)")
        out[prompt] = (response, where)
    if not out:
        raise DataError(f"{path}: no responses (the file is empty)")
    return out


# ----------------------------------------------------------------------------- scoring
def score(items: Sequence[IFEvalItem], responses: dict[str, tuple[str, str]], *,
          progress: Callable[[int], None] | None = None) -> tuple[list[IFEvalResult], dict]:
    """Check every item that has a response; returns the results (input order) and what did
    not match (``missing``: keys of items without a response; ``unmatched_responses``)."""
    from selfalign.eval.ifeval_checkers import check_response

    results, missing = [], []
    for it in items:
        got = responses.get(it.prompt)
        if got is None:
            missing.append(it.key)
        else:
            try:
                strict, loose = check_response(it.key, it.prompt, list(it.instruction_id_list), list(it.kwargs), got[0])
            except (TypeError, ValueError, KeyError) as e:  # arguments the checker cannot use
                raise DataError(f"{it.source}: field 'kwargs': the checkers of {', '.join(it.instruction_id_list)} "
                                f"reject these arguments ({type(e).__name__}: {e})") from None
            results.append(IFEvalResult(it.key, it.prompt, got[0], list(it.instruction_id_list), strict, loose))
        if progress is not None:
            progress(1)
    wanted = {it.prompt for it in items}
    return results, {"missing": missing, "unmatched_responses": sum(1 for p in responses if p not in wanted)}


def _interval(num: "Any", den: "Any", resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap over prompts of ``sum(num) / sum(den)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(resamples, len(num)))
    ratios = num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1)
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    return float(lo), float(hi)


def metrics(results: Sequence[IFEvalResult], *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The four IFEval figures, each ``{value, ci95: [low, high], n}`` (``n``: prompts for the
    prompt level, instructions for the instruction level); empty when nothing was scored."""
    import numpy as np

    if not results:
        return {}
    n_inst = np.array([len(r.followed_strict) for r in results], dtype=float)
    ones = np.ones(len(results))
    out = {}
    for level in ("strict", "loose"):
        flags = [getattr(r, f"followed_{level}") for r in results]
        prompt_ok = np.array([float(all(f)) for f in flags])
        inst_ok = np.array([float(sum(f)) for f in flags])
        for name, num, den in ((f"prompt_level_{level}", prompt_ok, ones), (f"instruction_level_{level}", inst_ok, n_inst)):
            lo, hi = _interval(num, den, resamples, seed)
            out[name] = {"value": float(num.sum() / den.sum()), "ci95": [lo, hi], "n": int(den.sum())}
    return {k: out[k] for k in METRICS}


def by_instruction(results: Sequence[IFEvalResult]) -> dict[str, dict]:
    """Per instruction group (the id's part before ':'): how many, strict and loose accuracy."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in results:
        for iid, s, lo in zip(r.instruction_id_list, r.followed_strict, r.followed_loose):
            a = acc[iid.split(":")[0]]
            a[0] += 1
            a[1] += int(s)
            a[2] += int(lo)
    return {k: {"n": n, "strict": s / n, "loose": lo / n} for k, (n, s, lo) in sorted(acc.items())}


def summarize(results: Sequence[IFEvalResult], unmatched: dict, *, items: int, input_path: str, source: dict,
              subset: str, seed: int = 0) -> dict:
    """The summary JSON of one IFEval evaluation."""
    return {
        "input": input_path,
        "subset": subset,
        "prompts": items,
        "scored": len(results),
        "missing": unmatched.get("missing", []),
        "unmatched_responses": unmatched.get("unmatched_responses", 0),
        "instructions": sum(len(r.followed_strict) for r in results),
        "empty_responses": sum(1 for r in results if not r.response.strip()),
        "metrics": metrics(results, seed=seed),
        "by_instruction_group": by_instruction(results),
        "interval": f"95% percentile bootstrap over prompts, {RESAMPLES} resamples, seed {seed}",
        "checkers": _checkers_version(),
        **source,
    }


def _checkers_version() -> str:
    import importlib.metadata

    try:
        return f"lm-eval {importlib.metadata.version('lm-eval')} (lm_eval.tasks.ifeval)"
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "lm_eval.tasks.ifeval"


def write_results(out_dir: str | Path, results: Sequence[IFEvalResult], summary: dict) -> tuple[Path, Path]:
    """``results.jsonl`` (one line per scored prompt) and ``summary.json``, each replaced whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rpath, spath = out_dir / "results.jsonl", out_dir / "summary.json"
    atomic_write_text(rpath, "".join(json.dumps(r.as_record(), ensure_ascii=False) + "\n" for r in results))
    atomic_write_json(spath, summary)
    return rpath, spath


def headline(summary: dict) -> dict:
    """The flat keys an iteration's metrics.json carries: ``ifeval_<metric>`` and its interval
    (rounded to 4 decimals), and ``ifeval_prompts``, the prompts scored."""
    out: dict = {}
    for name, m in summary.get("metrics", {}).items():
        out[f"ifeval_{name}"] = round(m["value"], 4)
        out[f"ifeval_{name}_ci95"] = [round(c, 4) for c in m["ci95"]]
    out["ifeval_prompts"] = summary.get("scored")
    return out


def summary_lines(summary: dict) -> list[str]:
    """The four figures as text lines (``value [low, high]``, percent)."""
    lines = []
    for name in METRICS:
        m = summary.get("metrics", {}).get(name)
        if m:
            lo, hi = m["ci95"]
            lines.append(f"{METRIC_LABELS[name]:<26} {m['value']:7.2%}  [{lo:.2%}, {hi:.2%}]  n={m['n']}")
    return lines


# ----------------------------------------------------------------------------- running
def generation_config(max_new_tokens: int, seed: int = 0, system_prompt: str | None = None):
    """IFEval answers are greedy (temperature 0), one per prompt."""
    from selfalign.config import GenerationConfig

    return GenerationConfig(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed,
                            system_prompt=system_prompt)


def generate_responses(engine, items: Sequence[IFEvalItem], out_path: str | Path, *, max_new_tokens: int, seed: int = 0,
                       system_prompt: str | None = None, show_progress: bool = True) -> tuple[dict[str, tuple[str, str]], dict, dict]:
    """Greedy answers to ``items`` through the ``generate`` stage (resumable JSONL at
    ``out_path``, the layout of ``selfalign generate``). Returns ``prompt -> (response, where)``,
    generation statistics, and ``key -> {completion_tokens, finish_reason}``."""
    from selfalign.data.records import read_jsonl
    from selfalign.stages.generate import run_generate

    out_path = Path(out_path)
    prompts = [it.as_prompt(system_prompt) for it in items]
    res = run_generate(engine, prompts, out_path, generation_config(max_new_tokens, seed, system_prompt),
                       show_progress=show_progress)
    by_id = {p.id: it for p, it in zip(prompts, items)}
    out: dict[str, tuple[str, str]] = {}
    extra: dict[int, dict] = {}
    for r in read_jsonl(out_path):
        it = by_id.get(r.get("prompt_id"))
        if it is None:
            continue
        out[it.prompt] = (r["response"], f"{out_path} ({r['id']})")
        extra[it.key] = {"completion_tokens": r.get("completion_tokens"), "finish_reason": r.get("finish_reason")}
    tokens = [int(e["completion_tokens"] or 0) for e in extra.values()]
    stats = {
        "responses": str(out_path),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "system_prompt": system_prompt,
        "generator": engine.describe(),
        "mean_completion_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None,
        "truncated": sum(1 for e in extra.values() if e["finish_reason"] == "length"),
        "failed": res.errors,
        "generation_seconds": round(res.seconds, 1),
    }
    return out, stats, extra


def evaluate_ifeval(items: Sequence[IFEvalItem], out_dir: str | Path, *, engine=None, responses_path: str | Path | None = None,
                    max_new_tokens: int = 512, system_prompt: str | None = None, seed: int = 0, show_progress: bool = True,
                    input_path: str = DEFAULT_INPUT, subset: str = "all", model: str | None = None) -> dict:
    """Answer ``items`` with ``engine`` (into ``out_dir/responses.jsonl``, resumable) or read
    ``responses_path``; check every response; write ``results.jsonl`` and ``summary.json``
    into ``out_dir``; return the summary."""
    import time

    from selfalign.progress import generation_progress

    if (engine is None) == (responses_path is None):
        raise ValueError("evaluate_ifeval: pass exactly one of engine and responses_path")
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    extra: dict[int, dict] = {}
    if responses_path is not None:
        responses = load_responses(responses_path)
        source: dict = {"responses": str(responses_path)}
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        responses, source, extra = generate_responses(
            engine, items, out_dir / "responses.jsonl", max_new_tokens=max_new_tokens, seed=seed,
            system_prompt=system_prompt, show_progress=show_progress)
    if model is not None:
        source["model"] = model
    with generation_progress("ifeval check", len(items), enabled=show_progress) as bar:
        results, unmatched = score(items, responses, progress=lambda k: bar.advance(k))
    for r in results:
        r.extra = extra.get(r.key, {})
    summary = summarize(results, unmatched, items=len(items), input_path=str(input_path), source=source,
                        subset=subset, seed=seed)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    write_results(out_dir, results, summary)
    return summary
