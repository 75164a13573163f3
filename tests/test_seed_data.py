"""The packaged demo seed set: schema, unique ids, judgment/score consistency, score spread."""

from __future__ import annotations

import re
from collections import Counter

from selfalign.data.seed import load_seed_eft, load_seed_ift


def test_seed_ift_schema():
    ift = load_seed_ift()
    assert len(ift) == 48
    ids = [r["id"] for r in ift]
    assert len(set(ids)) == len(ids)
    for i, rec in enumerate(ift, start=1):
        assert set(rec) == {"id", "messages"}, rec["id"]
        assert rec["id"] == f"ift-{i:03d}"
        msgs = rec["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"], rec["id"]
        for m in msgs:
            assert set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip()
        words = len(msgs[1]["content"].split())
        assert 40 <= words <= 150, (rec["id"], words)
    assert len({r["messages"][0]["content"] for r in ift}) == 48  # no repeated instruction


def test_seed_eft_schema_and_scores():
    eft = load_seed_eft()
    assert len(eft) == 48
    ids = [r["id"] for r in eft]
    assert len(set(ids)) == len(ids)
    for i, rec in enumerate(eft, start=1):
        assert set(rec) == {"id", "instruction", "response", "judgment", "score"}, rec["id"]
        assert rec["id"] == f"eft-{i:03d}"
        assert all(isinstance(rec[k], str) and rec[k].strip() for k in ("instruction", "response", "judgment"))
        assert type(rec["score"]) is int and 0 <= rec["score"] <= 5
        body, last = rec["judgment"].rsplit("\n", 1)
        assert re.fullmatch(r"Score: [0-5]", last), (rec["id"], last)
        assert int(last.removeprefix("Score: ")) == rec["score"], rec["id"]
        assert "Score:" not in body, rec["id"]  # exactly one score line, at the end
    spread = Counter(r["score"] for r in eft)
    assert set(spread) == set(range(6)), spread
    assert min(spread.values()) >= 5, spread  # roughly even


def test_seed_eft_teaches_ranking():
    """Several responses per instruction, of different quality, so the set also shows ranking."""
    by_instruction: dict[str, list[int]] = {}
    for rec in load_seed_eft():
        by_instruction.setdefault(rec["instruction"], []).append(rec["score"])
    assert len(by_instruction) == 16
    for scores in by_instruction.values():
        assert len(scores) == 3 and len(set(scores)) == 3


def test_loaders_return_fresh_copies():
    a = load_seed_ift()
    a[0]["id"] = "changed"
    assert load_seed_ift()[0]["id"] == "ift-001"
