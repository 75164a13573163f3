"""Parsing model completions: judge scores and self-instruct requests.

Both parsers take only the model's *completion* - never the prompt that produced it - and
never raise: a completion that does not follow the format is a recorded failure, not a crash.

Judge scores (:func:`parse_score`)
----------------------------------
The score is read from the **last** line of the judgment that starts with a score label.
A score label, at the start of a line, is::

    [indent] [markdown: '#'s, '>' or a list bullet] [bold '**'/'__'] [final|total|overall] Score [bold] :

(case-insensitive), so ``Score: 4``, ``**Score:** 4``, ``**Score: 4**``, ``### Final score: 4``
and ``- score: 4`` are all labels. A dash or equals sign instead of the colon (``Score - 4``)
is *not* a label, and neither is a score mentioned in prose (``I'd give it a score of 4``):
we parse the format we asked for, not free text.

After the label the line must hold exactly one number, optionally:

* wrapped in markdown bold/italics/backticks or in ``<..>``, ``[..]``, ``(..)``;
* followed by a scale ``/5`` or ``out of 5`` (the denominator must equal ``max_score``);
* followed by ``point(s)`` and a final ``.`` or ``!``.

Anything else after the number (``Score: 4 or 5``, ``Score: 4 because ...``) makes the line
invalid. Only ASCII digits count (``Score: ４`` is invalid), and a number written in words
(``Score: five``) is invalid. Because only the last label line counts, an invalid last line
is a failure even if an earlier line held a valid score: the judge's final word is what we
grade by, and we do not second-guess it.

The value must lie in ``[min_score, max_score]`` (never clamped) and must be a whole number
(``4.0`` is fine) unless ``allow_fraction=True``.

Self-instruct requests (:func:`parse_instruction`)
--------------------------------------------------
See the function's docstring; the format matches ``prompts/self_instruct.jinja``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["ParsedScore", "parse_score", "parse_instruction"]

# A score label at the start of a line; group "rest" is what follows the colon.
_LABEL = re.compile(
    r"""^[ \t]*
        (?:\#{1,6}[ \t]*|>[ \t]*|[-*+][ \t]+)?      # heading / quote / bullet
        (?:\*\*|__|\*|_)?[ \t]*                      # opening bold / italics
        (?:(?:final|total|overall)[ \t]+)?
        score
        [ \t]*(?:\*\*|__|\*|_)?[ \t]*                # bold closed before the colon
        :
        (?P<rest>.*)$""",
    re.IGNORECASE | re.VERBOSE,
)
_NUM = r"[+-]?[0-9]+(?:\.[0-9]+)?"
_VALUE = re.compile(
    rf"""^(?:[<\[(][ \t]*)?(?P<num>{_NUM})
        (?:[ \t]*\(?[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<den>{_NUM})[ \t]*\)?)?
        (?:[ \t]*[>\])])?
        (?:[ \t]*points?)?
        [ \t]*[.!]?$""",
    re.IGNORECASE | re.VERBOSE,
)
_MARKUP = re.compile(r"[*_`]+")


@dataclass(frozen=True)
class ParsedScore:
    """Outcome of parsing one judgment: exactly one of ``score`` / ``error`` is set.

    ``line`` is the score line that was used (stripped), when one was found - useful when
    auditing failures.
    """

    score: float | None
    error: str | None
    line: str | None = None

    @property
    def ok(self) -> bool:
        return self.score is not None


def _fail(error: str, line: str | None = None) -> ParsedScore:
    return ParsedScore(None, error, line)


def parse_score(
    judgment: str,
    *,
    min_score: float = 0,
    max_score: float = 5,
    allow_fraction: bool = False,
) -> ParsedScore:
    """The score in a judge's completion (rules in the module docstring). Never raises.

    Errors: ``"empty judgment"``, ``"judgment is not a string"``, ``"no Score line"``,
    ``"no number in Score line"``, ``"unreadable score: <text>"``,
    ``"score on a different scale: <n>/<d>"``, ``"score out of range: <n>"``,
    ``"not an integer: <n>"``.
    """
    if not isinstance(judgment, str):
        return _fail("judgment is not a string")
    if not judgment.strip():
        return _fail("empty judgment")

    last: re.Match[str] | None = None
    for line in judgment.splitlines():
        # cheap pre-check keeps very long judgments linear and fast
        if "core" in line.lower():
            m = _LABEL.match(line)
            if m:
                last = m
    if last is None:
        return _fail("no Score line")

    line = last.group(0).strip()
    rest = _MARKUP.sub("", last.group("rest")).strip()
    if not rest:
        return _fail("no number in Score line", line)
    v = _VALUE.match(rest)
    if v is None:
        shown = rest if len(rest) <= 40 else rest[:37] + "..."
        return _fail(f"unreadable score: {shown}", line)

    num_text = v.group("num")
    value = float(num_text)
    if not math.isfinite(value):  # pragma: no cover - the regex only admits finite decimals
        return _fail(f"unreadable score: {num_text}", line)
    den_text = v.group("den")
    if den_text is not None and float(den_text) != float(max_score):
        return _fail(f"score on a different scale: {num_text}/{den_text}", line)
    if not (min_score <= value <= max_score):
        return _fail(f"score out of range: {num_text}", line)
    if not allow_fraction and value != int(value):
        return _fail(f"not an integer: {num_text}", line)
    return ParsedScore(value, None, line)


# "Task 9:" at the start of a line, tolerating markdown bold around the marker and the colon
# inside or outside the bold: "**Task 9:**", "**Task 9**:", "## Task 9:".
_TASK_MARKER = re.compile(
    r"^[ \t]*(?:\#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*task[ \t]*(?P<n>[0-9]+)[ \t]*(?:\*\*|__)?[ \t]*:[ \t]*(?:\*\*|__)?",
    re.IGNORECASE | re.MULTILINE,
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def _clean(text: str) -> str | None:
    text = text.strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text or None


def parse_instruction(completion: str, *, number: int | None = None) -> str | None:
    """The new request in a self-instruct completion, or None if there is none. Never raises.

    The prompt ends with the open marker ``Task K+1:``. The completion is cut into pieces at
    every line that starts with a ``Task <n>:`` marker (markdown bold allowed):

    * text *before* the first marker is the answer when it is non-empty (the model continued
      right after the prompt's marker and then went on to invent ``Task K+2:``) - unless
      ``number`` is given and the first marker is ``Task <number>:``, in which case that text
      is a preamble ("Sure, here is one:") and the answer is the first marked piece;
    * otherwise the answer is the text after the first marker, up to the next marker or end.

    The answer is stripped, one pair of matching surrounding quotes is removed, and an empty
    result is None. Pass ``number=len(examples) + 1``.
    """
    if not isinstance(completion, str):
        return None
    markers = list(_TASK_MARKER.finditer(completion))
    if not markers:
        return _clean(completion)
    head = _clean(completion[: markers[0].start()])
    first_is_ours = number is not None and int(markers[0].group("n")) == number
    if head is not None and not first_is_ours:
        return head
    end = markers[1].start() if len(markers) > 1 else len(completion)
    return _clean(completion[markers[0].end() : end])
