"""The ``meta_judge`` stage: the model judges its own judgments (Meta-Rewarding, judge side).

For the responses whose ``k`` judgments disagree most, the model (as meta-judge) compares pairs
of judgments, a Bradley-Terry (Elo) rating per judgment is fitted to the outcomes, and the best
vs worst rated judgment becomes a DPO pair that trains the *judge* skill. :func:`run_meta_judge`:

1. **Select** responses by score variance (:func:`select_for_meta`).
2. **Compare** every unordered pair (m, n) of a selected response's parsable judgments (ordered
   by sample index) twice: m shown as A (``order="forward"``), then n shown as A (``"reverse"``).
   One record per comparison, written as soon as it exists::

       {"id", "kind": "meta_comparison", "response_id", "prompt_id", "judgment_a_id",
        "judgment_b_id", "order", "meta_output", "winner" (judgment id | null),
        "winner_position" ("A" | "B" | null), "parse_error" (str | null), "tokens"}

   The id covers the response, both judgment ids in shown order and :func:`meta_fingerprint`
   (templates, rubric, sampling, engine): a rerun skips finished comparisons and reads them back.
3. **Position weights** over the whole batch (:func:`position_weights`), then per response a
   **battle matrix** (:func:`battle_matrix`) and **Elo** ratings (:func:`elo_scores`).
4. **Judge pairs**: chosen = highest Elo, rejected = lowest (ties within 1e-6: lower sample
   index). Dropped: ``elo_tie`` (max - min < 1e-6), ``same_score`` (both judgments give the same
   score), ``too_long`` (either judgment over ``max_judgment_chars`` characters or
   ``max_judgment_tokens`` tokens, counted with the ``count_tokens`` callable). Records
   (``kind: "judge_pair"``) are TRL conversational: ``prompt`` = [user: the JUDGE prompt of the
   response], ``chosen``/``rejected`` = [assistant: judgment text], plus ids, scores and Elo.

Rubric: the meta prompt shows the rubric the judge was given, by default cut out of the judge
template (:func:`rubric_from_template`); ``MetaJudgeSettings.rubric`` overrides it. Judgment
lengths in stats are in characters (and tokens when ``count_tokens`` is given).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from selfalign.config import config_hash
from selfalign.data.records import JsonlWriter, read_jsonl, record_id
from selfalign.engines.base import Engine, GenerationRequest, SamplingParams
from selfalign.errors import ConfigError, EngineError
from selfalign.progress import generation_progress
from selfalign.prompts import Template, _as_template, _defuse, judge_prompt, load_template, validate_template
from selfalign.stages.judge import instruction_of

META_VARIABLES = frozenset({"instruction", "response", "rubric", "judgment_a", "judgment_b"})
META_REQUIRED = frozenset({"instruction", "response", "judgment_a", "judgment_b"})
ELO_TIE = 1e-6
VAR_EPS = 1e-12

# fences of the meta template beyond <question>/<response> (which prompts._defuse handles)
_JUDGMENT_TAG = re.compile(r"<(\s*/?\s*)(judge?ment(?:[ _-]?[ab])?)(\s*)>", re.IGNORECASE)
_SENTINEL = "\u0000rubric-cut\u0000"
_NUMBERED = re.compile(r"^[ \t]*\d+[.)][ \t]")


def _defuse_all(text: str) -> str:
    return _JUDGMENT_TAG.sub(lambda m: f"\u2039{m.group(1)}{m.group(2)}{m.group(3)}\u203a", _defuse(text))


def rubric_from_template(judge_template: Template | str | os.PathLike[str] = "judge") -> str:
    """The rubric part of a judge template: its rendered text up to the last numbered line
    (``1.``/``1)``) that comes before the question. ConfigError if it has no numbered list."""
    text = judge_prompt(judge_template, _SENTINEL, _SENTINEL)
    lines = text[: text.index(_SENTINEL)].splitlines()
    numbered = [i for i, line in enumerate(lines) if _NUMBERED.match(line)]
    if not numbered:
        name = getattr(judge_template, "origin", judge_template)
        raise ConfigError(f"judge template {name}: no numbered rubric found; set the meta-judge rubric explicitly")
    return "\n".join(lines[: numbered[-1] + 1]).strip()


def meta_judge_prompt(template, instruction: str, response: str, rubric: str, judgment_a: str, judgment_b: str) -> str:
    """The meta-judge prompt comparing two judgments of one response.

    ``template``: a Template, built-in name (``"meta_judge"``) or path; it may use only
    :data:`META_VARIABLES` and must use all but ``rubric``. Fence tags (question, response,
    judgment, judgment_a/b) inside the texts are defused. Parse the completion with
    :func:`parse_verdict`.
    """
    tpl = _as_template(template)
    validate_template(tpl, META_VARIABLES, META_REQUIRED)
    return tpl.render(instruction=_defuse_all(instruction), response=_defuse_all(response), rubric=rubric,
                      judgment_a=_defuse_all(judgment_a), judgment_b=_defuse_all(judgment_b))


# ---------------------------------------------------------------- verdict parsing
_LABEL = re.compile(
    r"""^[ \t]*(?:\#{1,6}[ \t]*|>[ \t]*|[-*+][ \t]+)?(?:\*\*|__|\*|_)?[ \t]*
        (?:final[ \t]+)?winner[ \t]*(?:\*\*|__|\*|_)?[ \t]*:(?P<rest>.*)$""",
    re.IGNORECASE | re.VERBOSE,
)
_VALUE = re.compile(r"^(?:[<\[(][ \t]*)?(?:judge?ment[ \t]*)?(?P<w>[ab])(?:[ \t]*[>\])])?[ \t]*[.!]?$", re.IGNORECASE)
_MARKUP = re.compile(r"[*_`]+")


@dataclass(frozen=True)
class ParsedVerdict:
    """``winner`` is ``"A"``/``"B"``, or None with ``error`` set; ``line`` is the label line used."""

    winner: str | None
    error: str | None
    line: str | None = None


def parse_verdict(text: str) -> ParsedVerdict:
    """The verdict of a meta-judge completion. Never raises, never guesses.

    The **last** line starting with a ``Winner:`` label counts (markdown heading/bullet/quote and
    bold allowed around the label, optional ``Final``, any case). After the colon it must hold
    exactly ``A`` or ``B``, optionally as ``Judgment A``, in bold/backticks or brackets, with a
    final ``.``/``!``. Errors: ``"output is not a string"``, ``"empty output"``, ``"no Winner
    line"``, ``"no verdict in Winner line"``, ``"unreadable verdict: <text>"``.
    """
    if not isinstance(text, str):
        return ParsedVerdict(None, "output is not a string")
    if not text.strip():
        return ParsedVerdict(None, "empty output")
    last = None
    for line in text.splitlines():
        if "inner" in line.lower():
            m = _LABEL.match(line)
            if m:
                last = m
    if last is None:
        return ParsedVerdict(None, "no Winner line")
    line = last.group(0).strip()
    rest = _MARKUP.sub("", last.group("rest")).strip()
    if not rest:
        return ParsedVerdict(None, "no verdict in Winner line", line)
    v = _VALUE.match(rest)
    if v is None:
        return ParsedVerdict(None, f"unreadable verdict: {rest if len(rest) <= 40 else rest[:37] + '...'}", line)
    return ParsedVerdict(v.group("w").upper(), None, line)


# ---------------------------------------------------------------- selection, weights, Elo
def select_for_meta(
    judgments_by_response: Mapping[str, Sequence[dict]], *, top_k: int | None = None, min_variance: float | None = None,
    per_prompt: int | None = None, prompt_of: Mapping[str, str] | None = None,
) -> list[str]:
    """Response ids to meta-judge, highest judgment-score variance first.

    Per response: population variance of its parsable scores (``score`` not None); eligible
    with >= 2 of them and variance > 1e-12. Ranked by variance (desc), then response id;
    ``min_variance`` keeps variance >= the threshold, ``per_prompt`` keeps the first n of each
    prompt (``prompt_of`` maps response id -> prompt id; Meta-Rewarding: 1, the response whose
    judgments disagree most), then ``top_k`` keeps the first k; all None keeps every eligible response.
    """
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if per_prompt is not None and (per_prompt < 1 or prompt_of is None):
        raise ValueError("per_prompt must be >= 1 and comes with prompt_of")
    ranked = []
    for rid, js in judgments_by_response.items():
        s = [float(j["score"]) for j in js if j.get("score") is not None]
        if len(s) < 2:
            continue
        mean = sum(s) / len(s)
        var = sum((x - mean) ** 2 for x in s) / len(s)
        if var > VAR_EPS and (min_variance is None or var >= min_variance):
            ranked.append((-var, rid))
    ranked.sort()
    if per_prompt is not None:
        taken: Counter = Counter()
        kept = []
        for item in ranked:
            pid = prompt_of[item[1]]
            if taken[pid] < per_prompt:
                taken[pid] += 1
                kept.append(item)
        ranked = kept
    return [rid for _, rid in ranked[: top_k if top_k is not None else None]]


@dataclass(frozen=True)
class PositionWeights:
    omega_a: float
    omega_b: float
    wins_a: int
    wins_b: int

    @property
    def first_position_share(self) -> float | None:
        """``w_A / (w_A + w_B)`` before weighting (None without verdicts)."""
        total = self.wins_a + self.wins_b
        return self.wins_a / total if total else None


def position_weights(comparisons: Iterable[dict]) -> PositionWeights:
    """Position weights from the batch's verdicts.

    ``w_A``/``w_B`` = parsed verdicts won by the judgment shown first/second. A win from position
    A weighs ``omega_A = w_B / (w_A + w_B)`` and one from position B ``omega_B = w_A / (w_A + w_B)``:
    each position's wins are scaled by the *other* position's share, so the position the
    meta-judge favours counts less (a judge that always says A gets ``omega_A = 0``). Both are
    0.5 when no verdict parsed.
    """
    pos = Counter(c.get("winner_position") for c in comparisons)
    w_a, w_b = pos["A"], pos["B"]
    if w_a + w_b == 0:
        return PositionWeights(0.5, 0.5, 0, 0)
    return PositionWeights(w_b / (w_a + w_b), w_a / (w_a + w_b), w_a, w_b)


def battle_matrix(comparisons: Iterable[dict], judgment_ids: Sequence[str], weights: PositionWeights) -> np.ndarray:
    """``B[m][n]``: summed weights of the wins of ``judgment_ids[m]`` over ``judgment_ids[n]``.

    Comparisons without a verdict are skipped; ones naming other judgments raise ValueError."""
    index = {jid: i for i, jid in enumerate(judgment_ids)}
    B = np.zeros((len(judgment_ids), len(judgment_ids)))
    for c in comparisons:
        pos = c.get("winner_position")
        if pos is None:
            continue
        a, b = c["judgment_a_id"], c["judgment_b_id"]
        if a not in index or b not in index:
            raise ValueError(f"comparison {c.get('id')!r} names a judgment outside {list(judgment_ids)}")
        win, lose = (a, b) if pos == "A" else (b, a)
        B[index[win], index[lose]] += weights.omega_a if pos == "A" else weights.omega_b
    return B


def elo_scores(B: np.ndarray | Sequence[Sequence[float]], l2: float = 0.01) -> np.ndarray:
    """Bradley-Terry ratings ``e`` (natural logit units, mean zero) maximising

        ``sum_{m,n} B[m][n] * log(sigmoid(e_m - e_n)) - l2 * sum_m e_m**2``

    (L-BFGS-B with the analytic gradient). ``l2 > 0`` keeps ``e`` finite when one judgment wins
    every comparison; with ``l2 = 0`` such a table has no maximum.
    """
    B = np.asarray(B, dtype=float)
    if B.ndim != 2 or B.shape[0] != B.shape[1]:
        raise ValueError(f"battle matrix must be square, got shape {B.shape}")
    if l2 < 0 or (B < 0).any():
        raise ValueError("l2 and battle counts must be >= 0")
    n = B.shape[0]
    if n == 0:
        return np.zeros(0)

    def loss(e: np.ndarray) -> tuple[float, np.ndarray]:
        d = e[:, None] - e[None, :]
        s = B * expit(-d)  # -d/d(e_m) of B_mn * log(sigmoid(e_m - e_n))
        return float(np.sum(B * np.logaddexp(0.0, -d)) + l2 * e @ e), s.sum(0) - s.sum(1) + 2 * l2 * e

    res = minimize(loss, np.zeros(n), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 1000})
    return res.x - res.x.mean()


# ---------------------------------------------------------------- the stage
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


@dataclass
class MetaJudgeSettings:
    template: str = "meta_judge"
    judge_template: str = "judge"  # the judge prompt of the pairs, and where the rubric comes from
    rubric: str | None = None  # None: rubric_from_template(judge_template)
    top_k: int | None = None  # responses to meta-judge (highest variance first); None: all eligible
    min_variance: float | None = None
    per_prompt: int | None = None  # responses meta-judged per prompt (the paper: 1); None: no limit
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 384
    seed: int = 0
    elo_l2: float = 0.01
    max_judgment_chars: int | None = None
    max_judgment_tokens: int | None = None  # needs run_meta_judge(count_tokens=...)
    iteration: int | None = None
    # "sampled": the verdict on the output's last "Winner:" line (a failure when missing);
    # "forced": after the comparison's reasoning, "Winner: " is forced and the more probable of
    # A and B wins (never fails; needs an engine with next_token_probs). See docs/meta_rewarding.md.
    verdict: str = "sampled"


@dataclass
class MetaJudgeStats:
    responses: int = 0
    responses_selected: int = 0
    comparisons: int = 0
    asked: int = 0
    reused: int = 0
    parse_errors: Counter = field(default_factory=Counter)
    weights: PositionWeights = field(default_factory=lambda: PositionWeights(0.5, 0.5, 0, 0))
    elo_spread: float | None = None
    judge_pairs: int = 0
    dropped: Counter = field(default_factory=Counter)
    mean_judgment_chars: float | None = None
    mean_judgment_tokens: float | None = None
    mean_chosen_chars: float | None = None
    mean_rejected_chars: float | None = None
    tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        share, r = self.weights.first_position_share, _round
        return {
            "responses": self.responses, "responses_selected": self.responses_selected,
            "comparisons": self.comparisons, "asked": self.asked, "reused": self.reused,
            "parse_failures": sum(self.parse_errors.values()), "parse_errors": dict(self.parse_errors.most_common()),
            "first_position_win_share": r(share), "omega_a": r(self.weights.omega_a), "omega_b": r(self.weights.omega_b),
            "elo_spread": r(self.elo_spread), "judge_pairs": self.judge_pairs, "dropped": dict(sorted(self.dropped.items())),
            "mean_judgment_chars": r(self.mean_judgment_chars), "mean_judgment_tokens": r(self.mean_judgment_tokens),
            "mean_chosen_chars": r(self.mean_chosen_chars), "mean_rejected_chars": r(self.mean_rejected_chars),
            "meta_tokens": self.tokens, "seconds": round(self.seconds, 2),
        }


class _Planned(NamedTuple):
    id: str
    response_id: str
    a: dict
    b: dict
    order: str


def meta_fingerprint(settings: MetaJudgeSettings, engine: Engine) -> dict:
    """What defines a verdict (pass it to the comparisons' JsonlWriter as ``fingerprint``)."""
    rubric = settings.rubric if settings.rubric is not None else rubric_from_template(settings.judge_template)
    return {
        "template": config_hash(load_template(settings.template).source), "rubric": config_hash(rubric),
        "temperature": settings.temperature, "top_p": settings.top_p, "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed, "verdict": settings.verdict, "generator": engine.describe(),
    }


def _pick_pair(r: dict, js: list[dict], elo: np.ndarray, judge_tpl: Template, settings: MetaJudgeSettings,
               count_tokens: Callable[[str], int] | None) -> dict | str:
    """The judge pair of one response (highest vs lowest Elo), or why there is none."""
    hi, lo = float(elo.max()), float(elo.min())
    if hi - lo < ELO_TIE:
        return "elo_tie"
    ci = next(i for i, e in enumerate(elo) if e >= hi - ELO_TIE)  # ties: lower sample index
    ri = next(i for i, e in enumerate(elo) if e <= lo + ELO_TIE)
    cj, rj = js[ci], js[ri]
    texts = (cj["judge_output"], rj["judge_output"])
    if float(cj["score"]) == float(rj["score"]):
        return "same_score"
    if (settings.max_judgment_chars is not None and max(map(len, texts)) > settings.max_judgment_chars) or (
        settings.max_judgment_tokens is not None and max(map(count_tokens, texts)) > settings.max_judgment_tokens
    ):
        return "too_long"
    return {
        "id": record_id("judge_pair", cj["id"], rj["id"]), "kind": "judge_pair", "prompt_id": r.get("prompt_id"),
        "prompt": [{"role": "user", "content": judge_prompt(judge_tpl, instruction_of(r), r["response"])}],
        "chosen": [{"role": "assistant", "content": texts[0]}],
        "rejected": [{"role": "assistant", "content": texts[1]}],
        "response_id": r["id"], "chosen_judgment_id": cj["id"], "rejected_judgment_id": rj["id"],
        "chosen_score": cj["score"], "rejected_score": rj["score"],
        "chosen_elo": round(float(elo[ci]), 6), "rejected_elo": round(float(elo[ri]), 6),
        "iteration": settings.iteration,
    }


def _verdicts(batch, settings: MetaJudgeSettings, engine: Engine):
    """``(planned, sample, verdict, extra fields)`` for a batch of results, sampled or forced."""
    out = []
    for p, res in batch:
        s = res.samples[0]
        v = parse_verdict(s.text) if s.finish_reason != "error" else ParsedVerdict(None, f"generation failed: {s.error}")
        out.append((p, s, v, {}))
    if settings.verdict != "forced" or not out:
        return out
    probes = []
    for (p, res), (_, s, v, _) in zip(batch, out):
        text = s.text
        if v.line:
            cut = text.rfind(v.line)
            text = text[:cut] if cut >= 0 else text
        text = text.rstrip()
        probes.append((res.request.messages, (text + "\n" if text else "") + "Winner: "))
    forced = []
    try:
        all_probs = engine.next_token_probs(probes, ["A", "B"])
    except NotImplementedError as e:
        raise EngineError(f"meta_judge.verdict 'forced' needs token probabilities: {e}; use meta_judge.verdict: sampled") from None
    for (p, s, v, _), probs in zip(out, all_probs):
        winner = "A" if probs[0] >= probs[1] else "B"
        extra = {"sampled_winner": v.winner, "sampled_parse_error": v.error, "verdict_probs": [round(x, 5) for x in probs]}
        forced.append((p, s, ParsedVerdict(winner, None), extra))
    return forced


def run_meta_judge(
    engine: Engine, responses: Sequence[dict], judgments: Sequence[dict], writer: JsonlWriter, settings: MetaJudgeSettings,
    *, count_tokens: Callable[[str], int] | None = None, show_progress: bool = True,
) -> tuple[list[dict], MetaJudgeStats]:
    """Meta-judge the selected responses' judgments; returns ``(judge pair records, stats)``.

    ``responses``: response records (``id``, ``messages``, ``response``); ``judgments``: judgment
    records (``judge.py`` layout); judgments of responses not listed are ignored. Comparisons
    already in ``writer`` are not asked again; every planned comparison is read back from the
    file for the matrices, so the result does not depend on how many runs it took.
    """
    t0 = time.monotonic()
    if settings.max_judgment_tokens is not None and count_tokens is None:
        raise ValueError("max_judgment_tokens needs a count_tokens function")
    tpl = load_template(settings.template)
    validate_template(tpl, META_VARIABLES, META_REQUIRED)
    judge_tpl = load_template(settings.judge_template)
    rubric = settings.rubric if settings.rubric is not None else rubric_from_template(judge_tpl)
    fp = config_hash(meta_fingerprint(settings, engine))
    by_id = {r["id"]: r for r in responses}
    groups: dict[str, list[dict]] = defaultdict(list)
    for j in judgments:
        if j["response_id"] in by_id and j.get("score") is not None:
            groups[j["response_id"]].append(j)
    for js in groups.values():
        js.sort(key=lambda j: (j.get("sample_index", 0), j["id"]))
    stats = MetaJudgeStats(responses=len(responses))
    selected = select_for_meta(groups, top_k=settings.top_k, min_variance=settings.min_variance, per_prompt=settings.per_prompt,
                               prompt_of={rid: r["prompt_id"] for rid, r in by_id.items()})
    stats.responses_selected = len(selected)

    plan: list[_Planned] = []
    for rid in selected:
        for m, n in combinations(groups[rid], 2):
            for a, b, order in ((m, n, "forward"), (n, m, "reverse")):
                plan.append(_Planned(record_id("meta_comparison", rid, a["id"], b["id"], fp), rid, a, b, order))
    stats.comparisons = len(plan)
    todo = {p.id: p for p in plan if p.id not in writer}
    stats.reused = len(plan) - len(todo)
    params = SamplingParams(n=1, temperature=settings.temperature, top_p=settings.top_p,
                            max_new_tokens=settings.max_new_tokens, seed=settings.seed)

    def request(p: _Planned) -> GenerationRequest:
        r = by_id[p.response_id]
        text = meta_judge_prompt(tpl, instruction_of(r), r["response"], rubric, p.a["judge_output"], p.b["judge_output"])
        return GenerationRequest.chat(p.id, [{"role": "user", "content": text}], params)

    with generation_progress("meta_judge", len(plan), enabled=show_progress) as bar:
        bar.advance(stats.reused)
        def record(p: _Planned, s, v: ParsedVerdict, extra: dict) -> None:
            winner = {"A": p.a["id"], "B": p.b["id"]}.get(v.winner or "")
            writer.write({
                "id": p.id, "kind": "meta_comparison", "response_id": p.response_id,
                "prompt_id": by_id[p.response_id].get("prompt_id"), "judgment_a_id": p.a["id"],
                "judgment_b_id": p.b["id"], "order": p.order, "meta_output": s.text, "winner": winner,
                "winner_position": v.winner, "parse_error": v.error, "tokens": s.completion_tokens, **extra,
            })
            stats.asked += 1
            stats.tokens += s.completion_tokens
            bar.advance(1, s.completion_tokens)

        batch: list = []
        for res in engine.generate([request(p) for p in todo.values()]):
            batch.append((todo[res.request.id], res))
            if settings.verdict == "sampled" or len(batch) >= 8:
                for p, s, v, extra in _verdicts(batch, settings, engine):
                    record(p, s, v, extra)
                writer.flush()
                batch = []
        for p, s, v, extra in _verdicts(batch, settings, engine):
            record(p, s, v, extra)
    writer.flush()

    wanted = {p.id for p in plan}
    done = [c for c in read_jsonl(writer.path) if c.get("id") in wanted] if writer.path.exists() else []
    per_response: dict[str, list[dict]] = defaultdict(list)
    for c in done:
        per_response[c["response_id"]].append(c)
        if c.get("parse_error"):
            stats.parse_errors[c["parse_error"].split(":")[0]] += 1
    stats.weights = position_weights(done)

    pairs: list[dict] = []
    spreads: list[float] = []
    for rid in selected:
        js = groups[rid]
        elo = elo_scores(battle_matrix(per_response[rid], [j["id"] for j in js], stats.weights), settings.elo_l2)
        spreads.append(float(elo.max() - elo.min()))
        got = _pick_pair(by_id[rid], js, elo, judge_tpl, settings, count_tokens)
        if isinstance(got, str):
            stats.dropped[got] += 1
        else:
            pairs.append(got)
    all_texts = [j["judge_output"] for rid in selected for j in groups[rid]]
    stats.judge_pairs = len(pairs)
    stats.elo_spread = _mean(spreads)
    stats.mean_judgment_chars = _mean([len(t) for t in all_texts])
    stats.mean_judgment_tokens = _mean([count_tokens(t) for t in all_texts]) if count_tokens else None
    stats.mean_chosen_chars = _mean([len(p["chosen"][0]["content"]) for p in pairs])
    stats.mean_rejected_chars = _mean([len(p["rejected"][0]["content"]) for p in pairs])
    stats.seconds = time.monotonic() - t0
    return pairs, stats
