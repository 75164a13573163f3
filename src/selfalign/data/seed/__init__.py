"""The demo seed set shipped with selfalign (see README.md in this folder).

* ``ift.jsonl``: 48 instruction-following examples, ``{"id", "messages": [user, assistant]}``.
* ``eft.jsonl``: 48 judge demonstrations, ``{"id", "instruction", "response", "judgment",
  "score"}``; every judgment walks the additive 5-point rubric and ends with the line
  ``Score: N`` where N equals ``score`` (0-5).

Both files are package data, read with :mod:`importlib.resources`, so they work from an
installed wheel as well as a checkout.  Each call returns fresh lists of fresh dicts, so a
caller may modify them freely.
"""

from __future__ import annotations

import json
from importlib import resources

from selfalign.errors import DataError

IFT_FILE = "ift.jsonl"
EFT_FILE = "eft.jsonl"


def _load(name: str) -> list[dict]:
    """Parse one packaged JSONL file; a broken line raises DataError naming ``seed/<name>:<line>``."""
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"selfalign/data/seed/{name}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(value, dict):
            raise DataError(f"selfalign/data/seed/{name}:{lineno}: expected a JSON object")
        records.append(value)
    return records


def load_seed_ift() -> list[dict]:
    """The 48 seed IFT examples, in file order: ``{"id": "ift-001", "messages": [...]}``."""
    return _load(IFT_FILE)


def load_seed_eft() -> list[dict]:
    """The 48 seed EFT (judge) examples, in file order; 16 instructions with 3 responses each."""
    return _load(EFT_FILE)


__all__ = ["EFT_FILE", "IFT_FILE", "load_seed_eft", "load_seed_ift"]
