"""Pairwise win rate: is model A's output preferred over model B's on a prompt set?

A judge model compares the two responses to each prompt. Every pair is judged **twice**, once
with A's response shown first (``order = "a_first"``) and once with B's shown first
(``"b_first"``), because LLM judges tend to prefer whatever is shown in one position.

How the two orders of an item combine into a win, tie or loss, the rates, the bootstrap interval
and the position-bias figures are in :mod:`selfalign.eval.winrate_stats`; the two sides (model
specs, run iterations, outputs files) in :mod:`selfalign.eval.winrate_sides`.

Unparsed items are ties rather than being dropped so that ``n`` is always the number of
prompts, and two win rates on the same prompt set have the same denominator whatever the judge
managed to parse; ``win_rate_parsed`` gives the rate over fully parsed items as well.

Win rate = ``(wins + 0.5 * ties) / n``; the strict rate is ``wins / n``.

Verdicts: ``"sampled"`` reads the judge's last ``Winner: A|B`` line with
:func:`selfalign.stages.meta_judge.parse_verdict` (no tie verdict exists; ``Winner: Tie`` is a
parse failure). ``"forced"`` lets the judge write its reasoning (``max_new_tokens`` tokens; 0
skips it), cuts any ``Winner`` line it wrote, appends ``Winner: `` and takes the more probable
of the next tokens ``A`` and ``B`` (:meth:`Engine.next_token_probs`); it fails only when both
probabilities are equal or the response generation errored. ``"auto"`` (the default,
:func:`choose_verdict`) is ``forced`` when the judge engine reports token probabilities
(:attr:`Engine.reports_token_probs`: ``hf``, ``vllm``) and ``sampled`` otherwise (``openai``),
with a note. When more than half of the single judgments have no verdict the summary's
``warnings`` says so (and it is logged): such a win rate is mostly ties by construction.

Files in ``out_dir``: ``judgments.jsonl`` (one record per item and order, resumable with
:class:`JsonlWriter`, ids from :func:`record_id` over the prompt, both texts in shown order
and the judge fingerprint) and ``summary.json``. Public API: :func:`winrate`,
:func:`generate_outputs`, :func:`load_outputs`, :func:`resolve_side` and
:func:`run_winrate` (what ``selfalign eval winrate`` runs).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple


from selfalign.config import EngineConfig, ModelConfig, config_hash
from selfalign.data.prompt_sets import Prompt, load_prompts
from selfalign.data.records import JsonlWriter, atomic_write_json, read_jsonl, record_id
from selfalign.engines.base import Engine, GenerationRequest, SamplingParams
from selfalign.errors import ConfigError, DataError, EngineError, RunError
from selfalign.eval.winrate_sides import Outputs, Side, as_outputs, generate_outputs, load_outputs, resolve_side, write_outputs
from selfalign.eval.winrate_stats import (
    CONVENTION,
    ORDERS,
    ItemResult,
    bootstrap_ci,
    combine_orders,
    first_position_share,
    item_scores,
    order_disagreement,
    position_to_model,
    strict_win_rate,
    win_rate,
)
from selfalign.progress import generation_progress
from selfalign.prompts import PAIRWISE_VARIABLES, Template, pairwise_prompt, pairwise_template
from selfalign.stages.meta_judge import ParsedVerdict, parse_verdict

__all__ = [
    "PAIRWISE_VARIABLES",
    "ItemResult",
    "Outputs",
    "Side",
    "bootstrap_ci",
    "choose_verdict",
    "combine_orders",
    "first_position_share",
    "generate_outputs",
    "item_scores",
    "load_outputs",
    "order_disagreement",
    "pairwise_prompt",
    "position_to_model",
    "resolve_side",
    "run_winrate",
    "strict_win_rate",
    "win_rate",
    "winrate",
]

VERDICTS = ("sampled", "forced")  # how a verdict is read
VERDICT_CHOICES = ("auto", *VERDICTS)  # what a caller may ask for: auto = forced where the judge has token probabilities
UNPARSED_WARN_SHARE = 0.5  # warn when more than this share of the single judgments has no verdict

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------- judging
class _Planned(NamedTuple):
    id: str
    index: int
    order: str
    text: str


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def choose_verdict(verdict: str, engine: Engine) -> tuple[str, str | None]:
    """The verdict (``"sampled"`` or ``"forced"``) to read for the requested ``verdict``, and a
    note when ``"auto"`` had to fall back to ``"sampled"``.

    ``"auto"`` is ``"forced"`` when ``engine`` reports next-token probabilities
    (:attr:`Engine.reports_token_probs`), else ``"sampled"``; ``"sampled"`` and ``"forced"``
    are kept as asked (:func:`winrate` refuses ``"forced"`` on an engine without probabilities).
    """
    if verdict not in VERDICT_CHOICES:
        raise ConfigError(f"verdict must be one of {', '.join(VERDICT_CHOICES)}, got {verdict!r}")
    if verdict != "auto":
        return verdict, None
    if engine.reports_token_probs:
        return "forced", None
    return "sampled", (
        f"note: the {engine.name} judge engine reports no token probabilities, so the verdict is read from its "
        f"'Winner: A|B' line (--verdict sampled) instead of the forced verdict; judges that seldom write that line "
        f"leave items unparsed (ties)"
    )


def unparsed_warning(unparsed: int, judgments: int, items_unparsed: int, n: int, verdict: str,
                     errors: Mapping[str, int]) -> str | None:
    """The warning for a judge that gave no verdict in more than half of its ``judgments`` (else None)."""
    if not judgments or unparsed <= UNPARSED_WARN_SHARE * judgments:
        return None
    kinds = ", ".join(f"{k} {v}" for k, v in list(errors.items())[:3])
    if verdict == "sampled":
        hint = ("the judge seldom ends with a 'Winner: A' or 'Winner: B' line: use --verdict forced (verdict: forced; "
                "needs a judge engine with token probabilities, hf or vllm) or a stronger judge")
    else:
        hint = "forced verdicts fail only on generation errors or equal P(A) and P(B): check the judge's outputs"
    return (f"warning: {unparsed} of {judgments} judgments ({100 * unparsed / judgments:.0f}%) gave no verdict"
            f"{f' ({kinds})' if kinds else ''}; {items_unparsed} of {n} items count as ties for that reason, so the "
            f"win rate is pulled towards 50% and says little; {hint}")


def judge_fingerprint(tpl: Template, verdict: str, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                      engine: Engine) -> dict:
    """What defines a verdict (the judgments file's fingerprint)."""
    return {"template": config_hash(tpl.source), "verdict": verdict, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed, "judge": engine.describe()}


def _decide(batch: list[tuple[_Planned, object | None]], verdict: str, engine: Engine, prompt_msgs) -> list[tuple[_Planned, str, int, ParsedVerdict, dict]]:
    """``(planned, judge text, tokens, verdict, extra fields)`` for a batch, sampled or forced."""
    rows = []
    for p, s in batch:
        if s is None:  # forced verdict without reasoning
            rows.append((p, "", 0, ParsedVerdict(None, "not asked"), {}))
        elif s.finish_reason == "error":
            rows.append((p, s.text, s.completion_tokens, ParsedVerdict(None, f"generation failed: {s.error}"), {}))
        else:
            rows.append((p, s.text, s.completion_tokens, parse_verdict(s.text), {}))
    if verdict == "sampled" or not rows:
        return rows
    probes, idx = [], []
    for i, (p, text, _, v, _) in enumerate(rows):
        if v.error and v.error.startswith("generation failed"):
            continue
        if v.line:
            cut = text.rfind(v.line)
            text = text[:cut] if cut >= 0 else text
        text = text.rstrip()
        probes.append((prompt_msgs(p), (text + "\n" if text else "") + "Winner: "))
        idx.append(i)
    try:
        probs = engine.next_token_probs(probes, ["A", "B"]) if probes else []
    except NotImplementedError as e:
        raise EngineError(f"--verdict forced needs next-token probabilities from the judge: {e}; use --verdict sampled (or auto)") from None
    for i, (pa, pb) in zip(idx, probs):
        p, text, tokens, v, _ = rows[i]
        extra = {"sampled_verdict": v.winner, "sampled_parse_error": None if v.error == "not asked" else v.error,
                 "verdict_probs": [round(pa, 5), round(pb, 5)]}
        forced = ParsedVerdict("A" if pa > pb else "B", None) if pa != pb else ParsedVerdict(None, "equal probabilities for A and B")
        rows[i] = (p, text, tokens, forced, extra)
    return rows


def winrate(
    prompts: Sequence[Prompt],
    a_outputs: Outputs | Sequence[str] | Mapping[str, str],
    b_outputs: Outputs | Sequence[str] | Mapping[str, str],
    judge_engine: Engine,
    *,
    template: Template | str = "pairwise",
    verdict: str = "auto",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    out_dir: str | Path,
    show_progress: bool = True,
    prompts_label: str | None = None,
    judge_label: str | None = None,
    resamples: int = 2000,
    batch_size: int = 8,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Judge A's against B's response to every prompt in both orders; write ``judgments.jsonl``
    and ``summary.json`` in ``out_dir`` and return the summary (see the module docstring).

    ``a_outputs``/``b_outputs``: :class:`Outputs` (from :func:`generate_outputs` or
    :func:`load_outputs`), texts aligned with ``prompts``, or a mapping prompt id -> text.
    ``verdict``: ``"auto"`` (forced where the judge engine reports token probabilities, else
    sampled: :func:`choose_verdict`), ``"sampled"`` or ``"forced"``.
    ``max_new_tokens``/``temperature``/``top_p``/``seed``: the judge's sampling (0 tokens only
    with the forced verdict). Judgments already in the file are reused, so a rerun continues
    and a finished one asks the judge nothing. ``log`` receives the auto-verdict note and the
    warnings (default: this module's logger); the warnings are also in the summary's ``warnings``.
    """
    t0 = time.monotonic()
    say = log or _log.warning
    requested = verdict
    verdict, note = choose_verdict(verdict, judge_engine)
    if max_new_tokens < 0 or (max_new_tokens == 0 and verdict != "forced"):
        why = f" (auto chose sampled: the {judge_engine.name} judge engine reports no token probabilities)" if note else ""
        raise ConfigError(f"the judge's max_new_tokens must be >= 1 (0, no reasoning, only with the forced verdict){why}")
    if note:
        say(note)
    if verdict == "forced" and not judge_engine.reports_token_probs:
        raise EngineError(f"--verdict forced needs next-token probabilities from the judge: the {judge_engine.name} "
                          f"engine cannot report them; use --verdict sampled (or auto)")
    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts to compare on")
    a = as_outputs(a_outputs, prompts, "A")
    b = as_outputs(b_outputs, prompts, "B")
    tpl = pairwise_template(template)
    fp = judge_fingerprint(tpl, verdict, max_new_tokens, temperature, top_p, seed, judge_engine)
    fph = config_hash(fp)
    out_dir = Path(out_dir)
    path = out_dir / "judgments.jsonl"

    plan: list[_Planned] = []
    for i, p in enumerate(prompts):
        for order in ORDERS:
            first, second = (a.texts[i], b.texts[i]) if order == "a_first" else (b.texts[i], a.texts[i])
            text = pairwise_prompt(tpl, p.text, first, second)
            plan.append(_Planned(record_id("winrate_judgment", p.id, p.text, order, first, second, fph), i, order, text))
    by_id = {q.id: q for q in plan}

    def msgs(q: _Planned) -> list[dict]:
        return [{"role": "user", "content": q.text}]

    asked = tokens_now = 0
    with JsonlWriter(path, batch_size=batch_size, fingerprint=fp) as writer:
        todo = [q for q in plan if q.id not in writer]
        reused = len(plan) - len(todo)
        with generation_progress("judge", len(plan), enabled=show_progress) as bar:
            bar.advance(reused)

            def record(rows) -> None:
                nonlocal asked, tokens_now
                for q, text, ntok, v, extra in rows:
                    writer.write({
                        "id": q.id, "kind": "winrate_judgment", "prompt_id": prompts[q.index].id, "order": q.order,
                        "shown_first": "a" if q.order == "a_first" else "b", "judge_output": text,
                        "verdict": v.winner, "winner": position_to_model(v.winner, q.order),
                        "parse_error": v.error, "tokens": ntok, **extra,
                    })
                    asked += 1
                    tokens_now += ntok
                    bar.advance(1, ntok)
                writer.flush()

            if max_new_tokens == 0:
                for k in range(0, len(todo), batch_size):
                    record(_decide([(q, None) for q in todo[k : k + batch_size]], verdict, judge_engine, msgs))
            elif todo:
                params = SamplingParams(n=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
                batch: list = []
                for res in judge_engine.generate(GenerationRequest.chat(q.id, msgs(q), params) for q in todo):
                    batch.append((by_id[res.request.id], res.samples[0]))
                    if verdict == "sampled" or len(batch) >= batch_size:
                        record(_decide(batch, verdict, judge_engine, msgs))
                        batch = []
                record(_decide(batch, verdict, judge_engine, msgs))

    done = {r["id"]: r for r in read_jsonl(path) if r.get("id") in by_id}
    missing = len(plan) - len(done)
    if missing:  # only if the engine dropped requests
        raise RunError(f"{path}: {missing} of {len(plan)} judgments missing; rerun to complete")
    per_item: list[dict[str, dict]] = [{} for _ in prompts]
    for q in plan:
        per_item[q.index][q.order] = done[q.id]
    results = [combine_orders(d["a_first"]["winner"], d["b_first"]["winner"]) for d in per_item]
    judgments = [r for d in per_item for r in d.values()]
    outcome = Counter(r.outcome for r in results)
    status = Counter(r.status for r in results)
    scores = item_scores(results)
    ci = bootstrap_ci(scores, resamples=resamples, seed=seed)
    parsed = [r for r in results if r.status != "unparsed"]
    errors = Counter(j["parse_error"].split(":")[0] for j in judgments if j.get("parse_error"))

    summary = {
        "kind": "winrate",
        "a": a.label,
        "b": b.label,
        "prompts": prompts_label,
        "judge": {
            "model": judge_label or str(judge_engine.describe().get("model", judge_engine.name)),
            "template": template if isinstance(template, str) else tpl.origin,
            "verdict": verdict, "verdict_requested": requested, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed,
        },
        "n": len(prompts),
        "wins": outcome["win"],
        "ties": outcome["tie"],
        "losses": outcome["loss"],
        "unparsed": status["unparsed"],
        "disagreements": status["disagree"],
        "win_rate": _r(win_rate(results)),
        "ci95": [_r(ci[0]), _r(ci[1])] if ci else None,
        "strict_win_rate": _r(strict_win_rate(results)),
        "win_rate_parsed": _r(win_rate(parsed)),
        "n_parsed": len(parsed),
        "mean_words_a": _r(_mean([len(t.split()) for t in a.texts]), 2),
        "mean_words_b": _r(_mean([len(t.split()) for t in b.texts]), 2),
        "mean_tokens_a": _r(_mean(a.tokens), 2) if a.tokens is not None else None,
        "mean_tokens_b": _r(_mean(b.tokens), 2) if b.tokens is not None else None,
        "first_position_share": _r(first_position_share(j["verdict"] for j in judgments)),
        "order_disagreement": _r(order_disagreement(results)),
        "judgments": len(judgments),
        "unparsed_judgments": sum(1 for j in judgments if j["verdict"] is None),
        "parse_errors": dict(errors.most_common()),
        "convention": CONVENTION,
        "bootstrap": {"method": "percentile", "resamples": resamples, "seed": seed, "level": 0.95},
        "judged_now": asked,
        "reused": len(plan) - asked,
        "judge_tokens_now": tokens_now,
        "seconds": round(time.monotonic() - t0, 2),
        "warnings": [],
    }
    warn = unparsed_warning(summary["unparsed_judgments"], len(judgments), status["unparsed"], len(prompts), verdict,
                            dict(errors.most_common()))
    if warn:
        summary["warnings"].append(warn)
        say(warn)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


# ---------------------------------------------------------------- the whole command
EngineFactory = Callable[[ModelConfig, EngineConfig], Engine]


def default_out_dir(a: Side, b: Side) -> Path:
    return Path("runs") / f"eval_winrate_{a.slug}_vs_{b.slug}"


def run_winrate(
    a: str,
    b: str,
    prompts_path: str | Path,
    *,
    judge_model: str = "smollm2-135m-instruct",
    judge_engine: str = "hf",
    judge_base_url: str | None = None,
    engine: str = "hf",
    base_url: str | None = None,
    dtype: str = "auto",
    template: str = "pairwise",
    verdict: str = "auto",
    limit: int | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    judge_max_new_tokens: int = 256,
    judge_temperature: float = 0.0,
    seed: int = 0,
    resamples: int = 2000,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
    engine_factory: EngineFactory | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Resolve both sides, generate what must be generated (``outputs_a.jsonl``,
    ``outputs_b.jsonl``), judge and summarise: what ``selfalign eval winrate`` does.

    One engine per distinct model (generation engines use ``engine``/``base_url``, the judge
    ``judge_engine``/``judge_base_url``); each is closed as soon as no later step needs it.
    """
    if engine_factory is None:
        from selfalign.engines import create_engine as engine_factory
    notes = log  # the auto-verdict note and the warnings: the caller's log, else this module's logger
    log = log or (lambda _msg: None)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if verdict not in VERDICT_CHOICES:
        raise ConfigError(f"--verdict must be one of {', '.join(VERDICT_CHOICES)}, got {verdict!r}")
    for name, kind in (("--engine", engine), ("--judge-engine", judge_engine)):
        if kind not in ("hf", "openai"):
            raise ConfigError(f"{name} must be hf or openai, got {kind!r}")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(f"--dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
    pairwise_template(template)  # fail on a bad template before any generation
    sa, sb = resolve_side(a), resolve_side(b)
    prompts = load_prompts(prompts_path, limit=limit)
    out = Path(out_dir) if out_dir is not None else default_out_dir(sa, sb)
    out.mkdir(parents=True, exist_ok=True)

    wanted: list[tuple[str, tuple]] = []  # (role, (model spec, engine kind, base url)) in order of use
    for role, side in (("a", sa), ("b", sb)):
        if side.kind == "model":
            wanted.append((role, (side.target, engine, base_url)))
    wanted.append(("judge", (judge_model, judge_engine, judge_base_url)))
    engines: dict[tuple, Engine] = {}

    def get(key: tuple) -> Engine:
        if key not in engines:
            spec, kind, url = key
            log(f"loading {spec} ({kind})")
            engines[key] = engine_factory(ModelConfig(spec=spec, dtype=dtype), EngineConfig(kind=kind, base_url=url))
        return engines[key]

    def release(done_role: str) -> None:
        later = {k for r, k in wanted[[r for r, _ in wanted].index(done_role) + 1 :]}
        for key in [k for k in engines if k not in later]:
            engines.pop(key).close()

    try:
        outs: dict[str, Outputs] = {}
        for role, side in (("a", sa), ("b", sb)):
            path = out / f"outputs_{role}.jsonl"
            if side.kind == "outputs":
                outs[role] = load_outputs(side.target, prompts, label=side.label)
                write_outputs(path, prompts, outs[role])
            else:
                key = (side.target, engine, base_url)
                log(f"generating {role.upper()} = {side.label} on {len(prompts)} prompts -> {path}")
                outs[role] = generate_outputs(
                    get(key), prompts, path, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=seed, label=side.label, show_progress=show_progress,
                )
                release(role)
        judge = get((judge_model, judge_engine, judge_base_url))
        chosen, _ = choose_verdict(verdict, judge)
        how = f"{chosen} verdict" + (" (auto)" if verdict == "auto" else "")
        log(f"judging {len(prompts)} pairs in both orders with {judge_model} ({how}) -> {out / 'judgments.jsonl'}")
        summary = winrate(
            prompts, outs["a"], outs["b"], judge, template=template, verdict=verdict,
            max_new_tokens=judge_max_new_tokens, temperature=judge_temperature, seed=seed, out_dir=out,
            show_progress=show_progress, prompts_label=str(prompts_path), judge_label=judge_model, resamples=resamples,
            log=notes,
        )
    finally:
        for e in engines.values():
            e.close()
    summary["out_dir"] = str(out)
    if limit is not None:
        summary["limit"] = limit
    atomic_write_json(out / "summary.json", summary)
    return summary
