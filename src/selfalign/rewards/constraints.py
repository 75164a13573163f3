"""Verifiable constraint rewards: ``fn(instruction, response) -> float`` for ``judge.kind: function``.

A word limit is the constraint here: the prompt says "Answer in at most N words." (the
respond stage's ``respond.system_prompt``, see :func:`word_limit_instruction`) and the reward
checks the response against N. Use it from any run config::

    respond:
      system_prompt: "Answer in at most 25 words."
    judge:
      kind: function
      function: selfalign.rewards.constraints:max_25_words

Any ``max_<N>_words`` name resolves (``max_40_words``, ``max_10_words``, ...), so the limit is
part of the function's name and therefore of the run's fingerprint. The limit cannot be read
from the prompt: :class:`~selfalign.stages.judge.FunctionReward` passes only the last user
message as ``instruction``, not the system prompt that states the limit.

Scoring (:func:`word_limit_score`), with ``w`` = words in the response:

- ``w < min_words`` (default 3): 0.0. An empty, whitespace-only or punctuation-only response
  has no words, so the cheapest way to satisfy a maximum length cannot score;
- ``min_words <= w <= limit``: 1.0 (the constraint holds; shorter is not better);
- ``w > limit``: ``limit / w``, strictly decreasing and never 0, so two over-long responses of
  different lengths are still ordered. A cut-off such as ``max(0, 1 - excess / limit)`` makes
  every response of twice the limit or more tie at 0, and best-vs-worst pairs drop ties.

A *word* is a whitespace-separated chunk holding at least one letter or digit in any script
(``str.isalnum``), so "**Note**:" is a word and a lone "-" or "..." is not. Scripts written
without spaces (Chinese, Japanese) count a whole run of characters as one word; this reward is
meant for English prompts.

What it does not check: whether the answer is any good. A model can satisfy it with a short
unhelpful reply; the learning check reports the share of responses under ``min_words`` and
the mean length so a collapse shows.
"""

from __future__ import annotations

import re
from collections.abc import Callable

DEFAULT_MIN_WORDS = 3

_NAME = re.compile(r"max_([1-9][0-9]*)_words")


def count_words(text: str | None) -> int:
    """Whitespace-separated chunks that contain at least one letter or digit (any script)."""
    if not text:
        return 0
    return sum(1 for chunk in text.split() if any(ch.isalnum() for ch in chunk))


def word_limit_score(response: str | None, limit: int, *, min_words: int = DEFAULT_MIN_WORDS) -> float:
    """1.0 within ``[min_words, limit]`` words, ``limit / words`` above, 0.0 below ``min_words``."""
    _check(limit, min_words)
    w = count_words(response)
    if w < min_words:
        return 0.0
    if w <= limit:
        return 1.0
    return limit / w


def satisfies_word_limit(response: str | None, limit: int, *, min_words: int = DEFAULT_MIN_WORDS) -> bool:
    """True when the response has between ``min_words`` and ``limit`` words (the reward is 1.0)."""
    _check(limit, min_words)
    return min_words <= count_words(response) <= limit


def word_limit_instruction(limit: int) -> str:
    """The sentence that states the constraint to the model (used as ``respond.system_prompt``)."""
    return f"Answer in at most {limit} words."


def word_limit(limit: int, *, min_words: int = DEFAULT_MIN_WORDS) -> Callable[[str, str], float]:
    """A reward ``fn(instruction, response)`` for a fixed word limit (the instruction is not read)."""
    _check(limit, min_words)

    def reward(instruction: str, response: str) -> float:
        return word_limit_score(response, limit, min_words=min_words)

    reward.__name__ = reward.__qualname__ = f"max_{limit}_words" if min_words == DEFAULT_MIN_WORDS else f"max_{limit}_words_min_{min_words}"
    reward.__doc__ = f"Word-limit reward: at most {limit} words, at least {min_words} (see word_limit_score)."
    reward.limit = limit  # type: ignore[attr-defined]
    reward.min_words = min_words  # type: ignore[attr-defined]
    return reward


def _check(limit: int, min_words: int) -> None:
    if int(limit) != limit or limit < 1:
        raise ValueError(f"word limit must be a positive integer, got {limit!r}")
    if int(min_words) != min_words or min_words < 1:
        raise ValueError(f"min_words must be a positive integer, got {min_words!r}")
    if min_words > limit:
        raise ValueError(f"min_words ({min_words}) must not exceed the word limit ({limit})")


max_25_words = word_limit(25)


def __getattr__(name: str):
    """``max_<N>_words`` for any N >= 3 (the default ``min_words``), made on first use."""
    m = _NAME.fullmatch(name)
    if m and int(m.group(1)) >= DEFAULT_MIN_WORDS:
        fn = word_limit(int(m.group(1)))
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
