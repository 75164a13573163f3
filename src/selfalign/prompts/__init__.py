"""Prompt templates: built-in Jinja files shipped with the package, or the user's own files.

Contract
--------
``load_template(name_or_path)`` resolves its argument as follows:

* a *built-in name* (no path separator, no template suffix), e.g. ``"judge"`` or
  ``"self_instruct"``, loads ``selfalign/prompts/<name>.jinja`` from the installed package
  (``importlib.resources``, so it works from a wheel as well as a checkout);
* anything that contains a path separator or ends in ``.jinja``, ``.j2`` or ``.txt`` is a file
  path (``~`` is expanded) and is read as UTF-8.

Every problem a user can cause - unknown built-in name, missing or unreadable file, Jinja
syntax error, a variable the template uses but the caller did not pass - raises
:class:`selfalign.errors.ConfigError` whose message names the template and what is wrong.

Templates are compiled in one shared Jinja environment with ``StrictUndefined`` (using an
unset variable is an error, never an empty string), ``keep_trailing_newline=True``, no
autoescaping (prompts are plain text), and ``trim_blocks``/``lstrip_blocks`` so that
``{% for %}`` / ``{% if %}`` / ``{# comment #}`` lines leave no blank lines behind. A template
that must not end in a newline can close its last line with a ``{#- ... -#}`` comment.

Built-in templates and their variables
--------------------------------------
``judge``         ``instruction`` (str), ``response`` (str); completion ends ``Score: <0-5>``.
``self_instruct`` ``examples`` (list of str); completion is one new request (see the file).
``backtranslate`` ``output`` (str); completion is the request the text answers (Humpback).
``curate``        ``instruction``, ``response``; completion ends ``Score: <1-5>`` (Humpback).

Rendering helpers for the built-ins: :func:`judge_prompt` and :func:`self_instruct_prompt`.
Their outputs are prompts only; parsing the model's reply lives in
``selfalign.stages.parsing`` and never looks at the prompt.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from selfalign.errors import ConfigError

__all__ = [
    "TEMPLATE_SUFFIXES",
    "JUDGE_VARIABLES",
    "SELF_INSTRUCT_VARIABLES",
    "Template",
    "builtin_templates",
    "load_template",
    "validate_template",
    "judge_prompt",
    "self_instruct_prompt",
    "backtranslate_prompt",
]

TEMPLATE_SUFFIXES = (".jinja", ".j2", ".txt")
JUDGE_VARIABLES = frozenset({"instruction", "response"})
SELF_INSTRUCT_VARIABLES = frozenset({"examples"})
BACKTRANSLATE_VARIABLES = frozenset({"output"})

_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
)
_UNDEFINED_NAME = re.compile(r"^'([^']+)' is undefined")


class Template:
    """A compiled prompt template.

    ``name`` is the built-in name or the file path it was loaded from; ``source`` is the raw
    template text. Instances are immutable in practice and safe to share between threads
    (Jinja templates are).
    """

    def __init__(self, name: str, source: str, *, origin: str | None = None):
        self.name = name
        self.source = source
        self.origin = origin or name
        try:
            self._ast = _ENV.parse(source)
            self._compiled = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"prompt template {self.origin}: syntax error on line {e.lineno}: {e.message}") from None

    def __repr__(self) -> str:
        return f"Template({self.name!r})"

    def required_variables(self) -> frozenset[str]:
        """Names the template reads from its context (all branches, found statically)."""
        return frozenset(jinja2.meta.find_undeclared_variables(self._ast))

    def first_line(self, variable: str) -> int | None:
        """The template line where ``variable`` is first read (None if it never is)."""
        lines = [n.lineno for n in self._ast.find_all(jinja2.nodes.Name) if n.name == variable and n.ctx == "load"]
        return min(lines, default=None)

    def render(self, **variables: Any) -> str:
        """Render with ``variables``; unused extra variables are ignored.

        Raises ConfigError naming the template and the variable when the template uses one
        that was not given (or an attribute/key that does not exist).
        """
        try:
            return self._compiled.render(**variables)
        except jinja2.UndefinedError as e:
            m = _UNDEFINED_NAME.match(str(e))
            what = f"variable '{m.group(1)}' is undefined" if m else str(e)
            given = ", ".join(sorted(variables)) or "none"
            raise ConfigError(f"prompt template {self.origin}: {what} (variables given: {given})") from None
        except jinja2.TemplateError as e:
            raise ConfigError(f"prompt template {self.origin}: rendering failed: {e}") from None


def builtin_templates() -> list[str]:
    """Names of the templates shipped with the package."""
    root = resources.files(__name__)
    return sorted(p.name[: -len(".jinja")] for p in root.iterdir() if p.name.endswith(".jinja"))


def _is_path(name_or_path: str) -> bool:
    return (
        os.sep in name_or_path
        or (os.altsep is not None and os.altsep in name_or_path)
        or "/" in name_or_path
        or name_or_path.endswith(TEMPLATE_SUFFIXES)
    )


def load_template(name_or_path: str | os.PathLike[str]) -> Template:
    """Load a built-in template by name, or a template file by path (see module docstring)."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
        as_path = True
    else:
        if not isinstance(name_or_path, str) or not name_or_path.strip():
            raise ConfigError(f"prompt template must be a built-in name or a file path, got {name_or_path!r}")
        as_path = _is_path(name_or_path)
    if as_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt template file not found: {path}")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"prompt template file {path} cannot be read as UTF-8 text: {e}") from None
        return Template(str(path), source, origin=str(path))

    resource = resources.files(__name__).joinpath(f"{name_or_path}.jinja")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name_or_path) or not resource.is_file():
        known = ", ".join(builtin_templates())
        raise ConfigError(
            f"unknown built-in prompt template {name_or_path!r} (built-ins: {known}); "
            f"to use your own file give a path ending in {', '.join(TEMPLATE_SUFFIXES)}"
        )
    return Template(name_or_path, resource.read_text(encoding="utf-8"), origin=f"built-in '{name_or_path}'")


def validate_template(tpl: Template, allowed: Iterable[str], required: Iterable[str] = ()) -> None:
    """Check a template against what its caller provides and needs, before any rendering.

    ``allowed``: every variable the caller will pass; a template using anything else is rejected
    (it would fail at render time). ``required``: variables the template must use (a judge
    template that never shows the response is a configuration mistake).
    """
    used = tpl.required_variables()
    allowed_set, required_set = set(allowed), set(required)
    problems = []
    unknown = sorted(used - allowed_set)
    missing = sorted(required_set - used)
    if unknown:
        problems.append(
            f"uses unknown variable(s) {', '.join(f'{u} (line {tpl.first_line(u)})' for u in unknown)} "
            f"(available: {', '.join(sorted(allowed_set)) or 'none'})"
        )
    if missing:
        problems.append(f"does not use required variable(s) {', '.join(missing)}")
    if problems:
        raise ConfigError(f"prompt template {tpl.origin}: " + "; ".join(problems))


def _as_template(template: Template | str | os.PathLike[str]) -> Template:
    return template if isinstance(template, Template) else load_template(template)


# The judge template fences the question and the response in these tags. A candidate response
# that contains the tags itself could pretend to close its block and write text that looks
# like it comes from outside; such tags are defused (angle brackets swapped for look-alike
# single guillemets) before rendering, so the only real fences are the template's own.
_FENCE_TAG = re.compile(r"<(\s*/?\s*)(question|response|text)(\s*)>", re.IGNORECASE)


def _defuse(text: str) -> str:
    return _FENCE_TAG.sub(lambda m: f"\u2039{m.group(1)}{m.group(2)}{m.group(3)}\u203a", text)


def judge_prompt(template: Template | str | os.PathLike[str], instruction: str, response: str) -> str:
    """The judge prompt for one (instruction, response) pair.

    ``template`` is a Template, a built-in name (``"judge"``) or a file path; it must use
    exactly ``instruction`` and ``response``. Fence tags inside the two texts are defused
    (see ``_defuse``). Score the judge's *completion* with
    ``selfalign.stages.parsing.parse_score`` - never this prompt.
    """
    tpl = _as_template(template)
    validate_template(tpl, JUDGE_VARIABLES, JUDGE_VARIABLES)
    return tpl.render(instruction=_defuse(instruction), response=_defuse(response))


def self_instruct_prompt(template: Template | str | os.PathLike[str], examples: Sequence[str]) -> str:
    """The few-shot prompt asking for one new request, given example requests.

    The built-in template numbers the examples ``Task 1:`` .. ``Task N:`` and ends with
    ``Task N+1:``; parse the completion with
    ``selfalign.stages.parsing.parse_instruction(completion, number=len(examples) + 1)``.
    """
    if isinstance(examples, (str, bytes)) or isinstance(examples, Mapping):
        raise TypeError("examples must be a sequence of strings")
    tpl = _as_template(template)
    validate_template(tpl, SELF_INSTRUCT_VARIABLES, SELF_INSTRUCT_VARIABLES)
    return tpl.render(examples=[str(e).strip() for e in examples])


def backtranslate_prompt(template: Template | str | os.PathLike[str], output: str) -> str:
    """The backward model's prompt for one text: "which request does this text answer?".

    Used both to build the backward model's training data (seed answer in the prompt, seed
    instruction as the completion) and to ask it for instructions for unlabeled segments.
    """
    tpl = _as_template(template)
    validate_template(tpl, BACKTRANSLATE_VARIABLES, BACKTRANSLATE_VARIABLES)
    return tpl.render(output=_defuse(str(output).strip()))


# the pairwise judge (``pairwise``, ``pairwise_brief``): selfalign eval winrate and pairwise EFT units
PAIRWISE_VARIABLES = frozenset({"instruction", "response_a", "response_b"})
_PAIRWISE_FENCE = re.compile(r"<(\s*/?\s*)(question|instruction|response(?:[ _-]?[ab12])?|answer(?:[ _-]?[ab12])?)(\s*)>", re.IGNORECASE)


def _defuse_pairwise(text: str) -> str:
    """Swap the angle brackets of fence-like tags in a text for look-alikes, so a response
    cannot close its own block and pose as the template."""
    return _PAIRWISE_FENCE.sub(lambda m: f"\u2039{m.group(1)}{m.group(2)}{m.group(3)}\u203a", text)


def pairwise_template(template: Template | str) -> Template:
    """The pairwise judge template (built-in name, file or Template), checked to use exactly its three variables."""
    tpl = template if isinstance(template, Template) else load_template(template)
    validate_template(tpl, PAIRWISE_VARIABLES, PAIRWISE_VARIABLES)
    return tpl


def pairwise_prompt(template: Template | str, instruction: str, response_a: str, response_b: str) -> str:
    """The judge prompt showing ``response_a`` first (as A) and ``response_b`` second (as B).

    ``template``: a Template, a built-in name (``"pairwise"``) or a file path; it must use
    exactly ``instruction``, ``response_a`` and ``response_b``."""
    return pairwise_template(template).render(
        instruction=_defuse_pairwise(instruction), response_a=_defuse_pairwise(response_a),
        response_b=_defuse_pairwise(response_b)
    )
