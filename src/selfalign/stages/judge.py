"""The ``judge`` stage: K judgments per candidate response, and the reward interface behind it.

A *reward* turns (instruction, response) pairs into judgment records. Three kinds:

- :class:`LLMJudge` (the Self-Rewarding default): the model itself grades each response
  with the additive 5-point rubric template, ``k`` sampled judgments per response sharing
  one prefill. Only the judge's own completion is parsed (last ``Score:`` line); a
  response that contains "Score: 5" cannot move its own score. ``scoring="direct"``
  generates no reasoning: the assistant turn is opened with ``Score: `` and the score is the
  probability-weighted mean of the digits (one deterministic judgment per response).
- :class:`FunctionReward`: any Python callable ``f(instruction, response) -> float``
  (tests, verifiable constraints, programmatic checks).
- :class:`ClassifierReward`: an HF sequence-classification reward model (scalar head).

Judgment record::

    {"id", "kind": "judgment", "response_id", "prompt_id", "sample_index", "judge_output",
     "score" (float | null), "parse_error" (str | null), "reward": <reward name>}

A response's reward is the mean of its parsable judgment scores (:func:`aggregate`); a
response with none has no reward and is left out of pair selection.
"""

from __future__ import annotations

import importlib
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from selfalign.config import config_hash
from selfalign.data.records import JsonlWriter, record_id
from selfalign.engines.base import Engine, GenerationRequest, SamplingParams
from selfalign.errors import EngineError
from selfalign.progress import generation_progress
from selfalign.prompts import judge_prompt, load_template
from selfalign.stages.parsing import parse_score

# score-like text inside a candidate response ("Score: 5", "**Score**: 5", "score = 4/5",
# "Score: [5]"): counted in the stats (responses_with_score_text), never trusted - the parser
# reads only the judge's completion
SCORE_LIKE = re.compile(r"score[\s*_`]*[:=][\s*_`]*[<\[(]?\s*[+-]?\d", re.IGNORECASE)


def has_score_text(text: str) -> bool:
    """Does ``text`` (a candidate response) hold something that looks like a judge's score?"""
    return bool(SCORE_LIKE.search(text))


def instruction_of(response: dict) -> str:
    """The user turn a response answers (the last user message of its prompt)."""
    users = [m["content"] for m in response["messages"] if m["role"] == "user"]
    return users[-1] if users else ""


class Reward:
    """Turns response records into judgment records (one list per response)."""

    name = "reward"

    def fingerprint(self) -> dict:
        return {"reward": self.name}

    @property
    def judgments_per_response(self) -> int:
        """How many judgment records :meth:`judge` writes for each response."""
        return 1

    def judge(self, responses: Sequence[dict]) -> Iterator[tuple[dict, list[dict], int]]:
        """Yield ``(response, judgments, tokens_generated)`` per response, in any order."""
        raise NotImplementedError


def _judgment(response: dict, index: int, output: str, score: float | None, error: str | None, name: str, fp: str) -> dict:
    return {
        "id": record_id("judgment", response["id"], index, fp),
        "kind": "judgment",
        "response_id": response["id"],
        "prompt_id": response.get("prompt_id"),
        "sample_index": index,
        "judge_output": output,
        "score": score,
        "parse_error": error,
        "reward": name,
    }


@dataclass
class LLMJudge(Reward):
    """The model as its own judge: ``k`` sampled judgments of each response with a rubric template."""

    engine: Engine
    template: str = "judge"
    k: int = 3
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0
    min_score: int = 0
    max_score: int = 5
    # "sampled": the last "Score:" line; "expected": reasoning, then the probability-weighted digit
    # after a forced "Score: "; "direct": no reasoning, the digit right after an opened "Score: "
    scoring: str = "sampled"
    probe_batch: int = 4  # responses whose judgments are probed (and then written) together
    name: str = field(default="llm_judge")

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        self._template = load_template(self.template)

    @property
    def judgments_per_response(self) -> int:
        return 1 if self.scoring == "direct" else self.k

    def fingerprint(self) -> dict:
        if self.scoring == "direct":  # nothing is sampled: only the template and the model matter
            return {"reward": self.name, "template": config_hash(self._template.source), "scoring": "direct",
                    "min_score": self.min_score, "max_score": self.max_score, "generator": self.engine.describe()}
        return {
            "reward": self.name,
            "template": config_hash(self._template.source),
            "k": self.k,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "scoring": self.scoring,
            "generator": self.engine.describe(),
        }

    def judge(self, responses: Sequence[dict]) -> Iterator[tuple[dict, list[dict], int]]:
        if self.scoring == "direct":
            yield from self._judge_direct(responses)
            return
        fp = config_hash(self.fingerprint())
        params = SamplingParams(
            n=self.k, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=self.seed
        )
        by_id = {r["id"]: r for r in responses}
        requests = (
            GenerationRequest.chat(
                r["id"], [{"role": "user", "content": judge_prompt(self._template, instruction_of(r), r["response"])}], params
            )
            for r in responses
        )
        buffer: list = []
        for result in self.engine.generate(list(requests)):
            buffer.append(result)
            if self.scoring == "sampled" or len(buffer) >= self.probe_batch:
                yield from self._score(buffer, by_id, fp)
                buffer = []
        if buffer:
            yield from self._score(buffer, by_id, fp)

    def messages(self, response: dict) -> list[dict]:
        """The judge's chat prompt for one response record."""
        return [{"role": "user", "content": judge_prompt(self._template, instruction_of(response), response["response"])}]

    def _judge_direct(self, responses: Sequence[dict]) -> Iterator[tuple[dict, list[dict], int]]:
        fp = config_hash(self.fingerprint())
        digits = [str(d) for d in range(self.min_score, self.max_score + 1)]
        step = max(self.probe_batch, DIRECT_BATCH)
        for start in range(0, len(responses), step):
            chunk = responses[start : start + step]
            try:
                all_probs = self.engine.next_token_probs([(self.messages(r), "Score: ") for r in chunk], digits)
            except NotImplementedError as e:
                raise EngineError(f"judge.scoring 'direct' needs token probabilities: {e}; use judge.scoring: sampled") from None
            for r, probs in zip(chunk, all_probs):
                value, error = expected_digit(probs, digits)
                j = _judgment(r, 0, "", value, error, self.name, fp)
                j["score_probs"] = [round(x, 5) for x in probs]
                yield r, [j], 0

    def _score(self, results, by_id: dict, fp: str) -> Iterator[tuple[dict, list[dict], int]]:
        parsed = {(r.request.id, s.index): parse_score(s.text, min_score=self.min_score, max_score=self.max_score)
                  for r in results for s in r.samples if s.finish_reason != "error"}
        expected: dict = {}
        if self.scoring == "expected":
            keys = list(parsed)
            digits = [str(d) for d in range(self.min_score, self.max_score + 1)]
            texts = {(r.request.id, s.index): s.text for r in results for s in r.samples}
            reqs = {r.request.id: r.request for r in results}
            probes = [(reqs[k[0]].messages, _reasoning(texts[k], parsed[k]) + "Score: ") for k in keys]
            try:
                all_probs = self.engine.next_token_probs(probes, digits)
            except NotImplementedError as e:
                raise EngineError(f"judge.scoring 'expected' needs token probabilities: {e}; use judge.scoring: sampled") from None
            for k, probs in zip(keys, all_probs):
                expected[k] = (expected_digit(probs, digits)[0], probs)
        for result in results:
            resp = by_id[result.request.id]
            out = []
            for s in result.samples:
                if s.finish_reason == "error":
                    out.append(_judgment(resp, s.index, "", None, f"generation failed: {s.error}", self.name, fp))
                    continue
                p = parsed[(result.request.id, s.index)]
                if self.scoring == "expected":
                    value, probs = expected[(result.request.id, s.index)]
                    j = _judgment(resp, s.index, s.text, None if value is None else round(value, 4), p.error, self.name, fp)
                    j["parsed_score"] = p.score
                    j["score_probs"] = [round(x, 5) for x in probs]
                else:
                    j = _judgment(resp, s.index, s.text, p.score, p.error, self.name, fp)
                out.append(j)
            yield resp, out, result.completion_tokens


SCORINGS = ("sampled", "expected", "direct")
DIRECT_BATCH = 16  # responses probed per engine call with scoring "direct" (written as each call returns)


def expected_digit(probs: Sequence[float], digits: Sequence[str]) -> tuple[float | None, str | None]:
    """The probability-weighted mean of ``digits`` (renormalised over them), rounded to 4 places;
    ``(None, reason)`` when the model puts no probability on any of them."""
    total = sum(probs)
    if not total > 0:
        return None, "no probability on any score digit"
    return round(sum(p * int(d) for p, d in zip(probs, digits)) / total, 4), None


def _reasoning(text: str, parsed) -> str:
    """The judgment up to (not including) its score line, ending with a newline."""
    if parsed.line:
        cut = text.rfind(parsed.line)
        if cut >= 0:
            text = text[:cut]
    text = text.rstrip()
    return text + "\n" if text else ""


@dataclass
class FunctionReward(Reward):
    """A Python callable ``fn(instruction, response) -> float`` (or ``None`` for 'cannot score')."""

    fn: Callable[[str, str], float | None]
    name: str = field(default="function")

    @classmethod
    def from_path(cls, path: str) -> FunctionReward:
        """``"package.module:function"`` -> FunctionReward."""
        mod, _, attr = path.partition(":")
        if not mod or not attr:
            raise ValueError(f"reward function must be 'module:function', got {path!r}")
        fn = getattr(importlib.import_module(mod), attr)
        return cls(fn=fn, name=f"function:{path}")

    def judge(self, responses: Sequence[dict]) -> Iterator[tuple[dict, list[dict], int]]:
        fp = config_hash(self.fingerprint())
        for r in responses:
            try:
                value = self.fn(instruction_of(r), r["response"])
                err = None if value is not None and math.isfinite(float(value)) else "no score"
            except Exception as e:  # a user function failing on one response must not stop the run
                value, err = None, f"{type(e).__name__}: {e}"
            score = float(value) if err is None else None
            yield r, [_judgment(r, 0, "", score, err, self.name, fp)], 0


@dataclass
class ClassifierReward(Reward):
    """A sequence-classification reward model (one logit) scoring the chat-formatted exchange."""

    model_dir: str | Path
    batch_size: int = 8
    max_length: int = 2048
    name: str = field(default="classifier")

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, use_safetensors=True).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def fingerprint(self) -> dict:
        return {"reward": self.name, "model": str(self.model_dir)}

    def _text(self, r: dict) -> str:
        msgs = [*r["messages"], {"role": "assistant", "content": r["response"]}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return "\n\n".join(m["content"] for m in msgs)

    def judge(self, responses: Sequence[dict]) -> Iterator[tuple[dict, list[dict], int]]:
        fp = config_hash(self.fingerprint())
        for start in range(0, len(responses), self.batch_size):
            chunk = responses[start : start + self.batch_size]
            enc = self.tokenizer(
                [self._text(r) for r in chunk], return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
            )
            with self._torch.inference_mode():
                logits = self.model(**enc).logits[:, 0].float().tolist()
            for r, v in zip(chunk, logits):
                yield r, [_judgment(r, 0, "", float(v), None, self.name, fp)], 0


@dataclass
class JudgeStats:
    responses: int = 0
    judgments: int = 0
    parsed: int = 0
    parse_errors: Counter = field(default_factory=Counter)
    score_histogram: Counter = field(default_factory=Counter)
    responses_with_score_text: int = 0
    unscored_responses: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "responses": self.responses,
            "judgments": self.judgments,
            "parsed": self.parsed,
            "parse_failure_rate": round(1 - self.parsed / self.judgments, 4) if self.judgments else None,
            "parse_errors": dict(self.parse_errors.most_common()),
            "score_histogram": {str(k): v for k, v in sorted(self.score_histogram.items())},
            "responses_with_score_text": self.responses_with_score_text,
            "unscored_responses": self.unscored_responses,
            "judge_tokens": self.tokens,
            "seconds": round(self.seconds, 2),
        }


def run_judge(
    reward: Reward, responses: Sequence[dict], writer: JsonlWriter, *, expected: int, show_progress: bool = True
) -> JudgeStats:
    """Judge every response whose judgments are not all in ``writer`` yet; stats cover the whole file.

    ``expected`` is the number of judgments per response (``k`` for an LLM judge, else 1).
    """
    t0 = time.monotonic()
    fp = config_hash(reward.fingerprint())
    todo = [r for r in responses if any(record_id("judgment", r["id"], i, fp) not in writer for i in range(expected))]
    with generation_progress("judge", len(responses), enabled=show_progress) as bar:
        bar.advance(len(responses) - len(todo))
        tokens_total = 0
        for _resp, judgments, tokens in reward.judge(todo):
            for j in judgments:
                writer.write(j)
            writer.flush()  # a response's judgments reach the disk together, as soon as they exist
            tokens_total += tokens
            bar.advance(1, tokens)
    writer.flush()
    stats = judge_stats(responses, writer.path)
    stats.seconds = time.monotonic() - t0
    stats.tokens = tokens_total
    return stats


def judge_stats(responses: Iterable[dict], judgments_path: str | Path) -> JudgeStats:
    from selfalign.data.records import read_jsonl

    stats = JudgeStats()
    scores: dict[str, list[float]] = {}
    for j in read_jsonl(judgments_path):
        stats.judgments += 1
        if j.get("parse_error"):
            stats.parse_errors[_error_kind(j["parse_error"])] += 1
        else:
            stats.parsed += 1
        if j["score"] is not None:
            stats.score_histogram[_bucket(j["score"])] += 1
            scores.setdefault(j["response_id"], []).append(j["score"])
    for r in responses:
        stats.responses += 1
        if has_score_text(r["response"]):
            stats.responses_with_score_text += 1
        if r["id"] not in scores:
            stats.unscored_responses += 1
    return stats


def _error_kind(err: str | None) -> str:
    err = err or "unknown"
    return err.split(":")[0]


def _bucket(score: float) -> str:
    """Histogram bucket: the nearest whole score (expected scores are fractional)."""
    return str(int(math.floor(float(score) + 0.5)))


def aggregate(judgments_path: str | Path) -> dict[str, float]:
    """``response_id -> mean parsable score``; responses with no parsable judgment are absent."""
    from selfalign.data.records import read_jsonl

    sums: dict[str, list[float]] = {}
    for j in read_jsonl(judgments_path):
        if j["score"] is not None:
            sums.setdefault(j["response_id"], []).append(float(j["score"]))
    return {rid: sum(v) / len(v) for rid, v in sums.items()}
