"""Prompt files: what ``selfalign generate`` and the stages read as input.

Accepted layouts, one prompt per JSONL line (or per item of a ``.json`` list):

- a JSON string: the user prompt, e.g. ``"Can you tell me about GLaDOS?"``;
- an object with ``prompt`` (or ``instruction``, as in AlpacaEval) and optionally ``id``
  and ``system``;
- an object with ``messages``: a chat (``[{"role": "user", "content": ...}, ...]``) whose
  last message is from the user;
- an object with ``turns`` (MT-Bench): the first turn is used.

Every prompt gets a stable id: its own ``id`` field (or ``question_id``) when present, else a
hash of its messages. The whole file is validated before anything is generated, and a bad
line is reported with the file, line number and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from selfalign.data.records import read_json_list, record_id
from selfalign.errors import DataError


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class PromptInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | int | None = None
    question_id: str | int | None = None
    prompt: str | None = None
    instruction: str | None = None
    system: str | None = None
    messages: list[ChatMessage] | None = None
    turns: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> PromptInput:
        given = [k for k in ("prompt", "instruction", "messages", "turns") if getattr(self, k) is not None]
        if not given:
            raise ValueError("needs one of 'prompt', 'instruction', 'messages' or 'turns'")
        if len(given) > 1:
            raise ValueError(f"has more than one prompt field: {', '.join(given)}")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("'messages' is empty")
            if self.messages[-1].role != "user":
                raise ValueError("the last of 'messages' must have role 'user'")
        text = self.prompt or self.instruction
        if text is not None and not text.strip():
            raise ValueError("the prompt text is empty")
        return self


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[dict[str, str], ...]
    source: str  # "file:line" it came from

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def _to_prompt(item: Any, where: str, system: str | None) -> Prompt:
    if isinstance(item, str):
        if not item.strip():
            raise DataError(f"{where}: the prompt text is empty")
        item = {"prompt": item}
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON string or object, got {type(item).__name__}")
    try:
        p = PromptInput.model_validate(item)
    except ValidationError as e:
        raise DataError(f"{where}: {format_validation_error(e)}") from None
    if p.messages is not None:
        msgs = [m.model_dump() for m in p.messages]
    else:
        text = p.prompt or p.instruction or (p.turns[0] if p.turns else "")
        msgs = [{"role": "user", "content": text}]
    sys_text = p.system if p.system is not None else system
    if sys_text and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": sys_text})
    given_id = p.id if p.id is not None else p.question_id
    pid = str(given_id) if given_id is not None else record_id("prompt", msgs)
    return Prompt(id=pid, messages=tuple(msgs), source=where)


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            parts.append(f"field '{loc}': missing")
        elif loc:
            got = err.get("input")
            got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            parts.append(f"field '{loc}': {msg}{got_s}")
        else:
            parts.append(msg)
    return "; ".join(parts)


def _iter_items(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".json":
        data = read_json_list(path, "prompts")
        for i, item in enumerate(data):
            yield f"{path}: item {i}", item
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


class PromptSet(list):
    """The prompts of a file, plus how many repeated texts were skipped."""

    duplicates: int = 0


def load_prompts(path: str | Path, *, system: str | None = None, limit: int | None = None) -> PromptSet:
    """Read and validate a whole prompt file; raise :class:`DataError` on the first bad line.

    ``system`` is added as the system message of prompts that have none. A repeated explicit
    ``id`` is an error; a repeated prompt text without ids is skipped and counted in
    ``.duplicates`` (it would produce the same records twice).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    prompts = PromptSet()
    seen: dict[str, str] = {}
    for where, item in _iter_items(path):
        p = _to_prompt(item, where, system)
        if p.id in seen:
            if p.id == record_id("prompt", list(p.messages)):
                prompts.duplicates += 1
                continue
            raise DataError(f"{where}: duplicate prompt id {p.id!r} (first at {seen[p.id]})")
        seen[p.id] = where
        prompts.append(p)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts
