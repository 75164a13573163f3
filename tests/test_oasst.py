"""OpenAssistant loading (nested and flat layouts), IFT/EFT extraction, agreement filter, split."""

from __future__ import annotations

import json
import random
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from conftest import shared_file
from selfalign.data.oasst import (
    Message,
    Tree,
    agrees_with_human,
    build_ift,
    eft_groups,
    load_oasst,
    split_train_heldout,
)
from selfalign.errors import DataError

NESTED = "oasst/oasst_en_100_trees.jsonl"


# --------------------------------------------------------------------------- helpers


def nested_to_flat(nested_path: Path, *, float_ranks: bool = True) -> list[dict]:
    """The messages of a nested export as HF flat rows, depth first (children in order)."""
    rows = []
    for line in nested_path.read_text(encoding="utf-8").splitlines():
        tree = json.loads(line)
        stack = [(tree["prompt"], None)]
        while stack:
            msg, parent = stack.pop()
            rank = msg.get("rank")
            rows.append({
                "message_id": msg["message_id"],
                "parent_id": parent,
                "user_id": "u-" + msg["message_id"][:8],  # fields the loader must ignore
                "message_tree_id": tree["message_tree_id"],
                "tree_state": tree["tree_state"],
                "text": msg["text"],
                "role": msg["role"],
                "lang": msg["lang"],
                "review_count": msg["review_count"],
                "review_result": msg["review_result"],
                "deleted": msg["deleted"],
                "rank": float(rank) if (rank is not None and float_ranks) else rank,
                "synthetic": msg["synthetic"],
                "model_name": msg.get("model_name"),
                "emojis": msg.get("emojis"),
            })
            stack.extend((r, msg["message_id"]) for r in reversed(msg["replies"]))
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def msg(mid: str, parent: str | None, role: str = "assistant", rank: int | None = None, **kw) -> dict:
    return {"message_id": mid, "parent_id": parent, "role": role, "text": f"text of {mid}", "lang": "en",
            "rank": rank, "deleted": False, "synthetic": False, **kw}


def nested(root_id: str, replies: list[dict], **kw) -> dict:
    prompt = {"message_id": root_id, "role": "prompter", "text": "Why is the sky blue?", "lang": "en",
              "deleted": False, "synthetic": False, "replies": replies, **kw}
    return {"message_tree_id": root_id, "tree_state": "ready_for_export", "prompt": prompt}


def reply(mid: str, rank: int | None, **kw) -> dict:
    return {"message_id": mid, "role": "assistant", "text": f"answer {mid}", "lang": "en", "rank": rank,
            "deleted": False, "synthetic": False, "replies": [], **kw}


def canonical(m: Message) -> tuple:
    return (m.id, m.parent_id, m.role, m.text, m.lang, m.rank, m.synthetic, m.deleted,
            tuple(sorted(canonical(c) for c in m.children)))


# --------------------------------------------------------------------------- the shared file


def test_shared_file_counts():
    trees = load_oasst(shared_file(NESTED))
    assert len(trees) == 100
    assert sum(1 for t in trees for _ in t.root.walk()) == 1167
    assert all(isinstance(t, Tree) and t.root.role == "prompter" and t.root.parent_id is None for t in trees)

    examples, dropped = build_ift(trees)
    assert len(examples) == 94  # 5 synthetic prompts (model-written), 1 tree with no ranked reply
    assert dropped == Counter({"synthetic": 5, "no_ranked_reply": 1})
    ex = examples[0]
    assert set(ex) == {"id", "kind", "task", "messages", "source"}
    assert (ex["kind"], ex["task"]) == ("example", "ift")
    assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
    assert ex["source"].startswith("oasst:") and len({e["id"] for e in examples}) == 94

    with_synth = build_ift(trees, include_synthetic=True)
    assert len(with_synth.examples) == 99 and with_synth.dropped == Counter({"no_ranked_reply": 1})

    first = eft_groups(trees)
    assert len(first) == 94 and all(g["depth"] == 0 for g in first)
    assert first.dropped == Counter({"synthetic": 5, "too_few_ranked": 1})
    # SOURCES.md: 212 prompter turns with >= 2 ranked assistant replies (5 are synthetic roots)
    every = eft_groups(trees, first_turn_only=False, include_synthetic=True)
    assert len(every) == 212
    for g in every:
        assert len(g["replies"]) >= 2 and g["messages"][-1] == {"role": "user", "content": g["prompt"]}
        assert sorted(r["rank"] for r in g["replies"]) == list(range(len(g["replies"])))


def test_ift_max_examples_and_lang_filter():
    trees = load_oasst(shared_file(NESTED))
    a = build_ift(trees, max_examples=10, seed=3)
    b = build_ift(trees, max_examples=10, seed=3)
    assert a == b and len(a.examples) == 10 and a.dropped["max_examples"] == 84
    assert build_ift(trees, max_examples=10, seed=4).examples != a.examples
    none, dropped = build_ift(trees, lang=("de",))
    assert none == [] and dropped["lang"] == 100
    assert len(build_ift(trees, lang=None).examples) == 94


# --------------------------------------------------------------------------- both layouts agree


def test_flat_and_nested_layouts_give_identical_trees(tmp_path):
    src = shared_file(NESTED)
    flat = write_jsonl(tmp_path / "flat.jsonl", nested_to_flat(src))
    t_nested, t_flat = load_oasst(src), load_oasst(flat)
    assert t_flat == t_nested
    assert build_ift(t_flat) == build_ift(t_nested)
    assert eft_groups(t_flat, first_turn_only=False) == eft_groups(t_nested, first_turn_only=False)


def test_flat_layout_in_any_order(tmp_path):
    src = shared_file(NESTED)
    rows = nested_to_flat(src, float_ranks=False)
    random.Random(7).shuffle(rows)  # children before parents, trees interleaved
    t_flat = load_oasst(write_jsonl(tmp_path / "shuffled.jsonl", rows))
    t_nested = load_oasst(src)
    assert sorted(canonical(t.root) for t in t_flat) == sorted(canonical(t.root) for t in t_nested)
    assert len(build_ift(t_flat).examples) == 94


def test_gzipped_flat_file(tmp_path):
    import gzip

    rows = [msg("r", None, role="prompter"), msg("a", "r", rank=0), msg("b", "r", rank=1)]
    gz = tmp_path / "msgs.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    (tree,) = load_oasst(gz)
    assert [(c.id, c.rank) for c in tree.root.children] == [("a", 0), ("b", 1)]
    assert build_ift([tree]).examples[0]["messages"][1]["content"] == "text of a"


def _lang_filtered_export() -> list[dict]:
    """A flat export filtered to English: a Spanish prompt's English replies (one with a follow-up
    turn under it) and a follow-up prompt whose assistant parent was Spanish lost their parents."""
    return [
        msg("x2", "x", role="prompter"),  # below an orphan, listed before it
        msg("r", None, role="prompter"),
        msg("x", "es-root", rank=0),  # orphan: its Spanish prompt was filtered out
        msg("a", "r", rank=0),
        msg("y", "es-root", rank=1),  # orphan
        msg("x3", "x2", rank=0),
        msg("b", "r", rank=1),
        msg("r2", "a", role="prompter"),
        msg("c", "r2", rank=0),
        msg("d", "r2", rank=1),
        msg("p", "es-reply", role="prompter"),  # orphan: a follow-up to a Spanish reply
        msg("p1", "p", rank=0),
        msg("p2", "p", rank=1),
    ]


def test_flat_orphan_subtrees_are_dropped_and_counted(tmp_path):
    trees = load_oasst(write_jsonl(tmp_path / "en.jsonl", _lang_filtered_export()))
    assert [t.id for t in trees] == ["r"]
    assert {m.id for m in trees[0].root.walk()} == {"r", "a", "b", "r2", "c", "d"}
    assert trees.dropped == Counter({"orphan": 3})  # x (with x2, x3), y, p (with p1, p2)
    examples, dropped = build_ift(trees)
    assert [e["source"] for e in examples] == ["oasst:r"] and dropped == Counter({"orphan": 3})
    groups = eft_groups(trees, first_turn_only=False)
    assert [g["prompt_id"] for g in groups] == ["r", "r2"] and groups.dropped == Counter({"orphan": 3})
    # the loader's counts add to the builders' own reasons
    fr = write_jsonl(tmp_path / "mixed.jsonl", _lang_filtered_export() + [msg("f", None, role="prompter", lang="fr"),
                                                                            msg("f1", "f", rank=0, lang="fr")])
    assert build_ift(load_oasst(fr)).dropped == Counter({"orphan": 3, "lang": 1})
    assert eft_groups(load_oasst(fr)).dropped == Counter({"orphan": 3, "lang": 1})
    # a plain list of trees (no loader counts) still works
    assert build_ift(list(trees)).dropped == Counter()
    # a file without orphans, nested or flat, drops nothing
    ok = load_oasst(write_jsonl(tmp_path / "ok.jsonl", [msg("r", None, role="prompter"), msg("a", "r", rank=0)]))
    assert ok.dropped == Counter() and build_ift(ok).dropped == Counter()
    assert load_oasst(write_jsonl(tmp_path / "n.jsonl", [nested("t1", [reply("a", 0)])])).dropped == Counter()


def test_orphans_in_a_language_filtered_real_export(tmp_path):
    rows = nested_to_flat(shared_file(NESTED))
    roots = [r["message_id"] for r in rows if r["parent_id"] is None]
    gone = set(roots[:5])  # as if these five prompts were in another language
    children = sum(1 for r in rows if r["parent_id"] in gone)
    kept = [r for r in rows if r["message_id"] not in gone]
    trees = load_oasst(write_jsonl(tmp_path / "filtered.jsonl", kept))
    assert len(trees) == len(roots) - 5 and trees.dropped == Counter({"orphan": children}) and children >= 5
    full = build_ift(load_oasst(shared_file(NESTED)))
    res = build_ift(trees)
    assert res.dropped["orphan"] == children
    assert {e["id"] for e in res.examples} <= {e["id"] for e in full.examples}


def test_orphans_reach_the_seed_loader_and_eval_judge_summary(tmp_path, monkeypatch):
    import selfalign.engines
    from typer.testing import CliRunner

    from scripted import ScriptedEngine
    from selfalign.cli import app
    from selfalign.data.seeding import load_ift

    data = write_jsonl(tmp_path / "en.jsonl", _lang_filtered_export())
    ift, dropped = load_ift(f"oasst:{data}", lang=["en"], max_examples=None, seed=0)
    assert len(ift) == 1 and dropped == {"orphan": 3}

    def judge(req, i):  # the rank-0 reply "a" scores higher than "b"
        return "Score: 4" if "text of a" in req.messages[-1].content else "Score: 2"

    monkeypatch.setattr(selfalign.engines, "create_engine", lambda m, e: ScriptedEngine(judge))
    out = tmp_path / "ev"
    res = CliRunner().invoke(app, ["eval", "judge", str(data), "-k", "1", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == 1 and summary["dropped"] == {"orphan": 3}
    assert summary["metrics"]["pairwise_accuracy"] == 1.0


def test_hub_dataset_path(monkeypatch):
    rows = [msg("r", None, role="prompter", message_tree_id="r"), msg("a", "r", rank=0.0), msg("b", "r", rank=1.0)]
    fake = types.ModuleType("datasets")
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "OpenAssistant/oasst1":
            return rows
        raise ConnectionError("offline")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    trees = load_oasst("OpenAssistant/oasst1", split="validation")
    assert calls == [("OpenAssistant/oasst1", "validation")]
    assert [c.rank for c in trees[0].root.children] == [0, 1]
    with pytest.raises(DataError, match=r"OpenAssistant/nope: not a local file.*ConnectionError: offline"):
        load_oasst("OpenAssistant/nope")


# --------------------------------------------------------------------------- errors


def expect(path: Path, line: int, *fragments: str):
    with pytest.raises(DataError) as ei:
        load_oasst(path)
    text = str(ei.value)
    assert text.startswith(f"{path}:{line}: "), text
    for frag in fragments:
        assert frag in text, text
    return text


def test_nested_errors(tmp_path):
    good = nested("t1", [reply("a", 0), reply("b", 1)])
    p = tmp_path / "bad_json.jsonl"
    p.write_text(json.dumps(good) + "\n{not json\n")
    expect(p, 2, "invalid JSON")

    missing = nested("t2", [reply("c", 0)])
    del missing["prompt"]["replies"][0]["text"]
    expect(write_jsonl(tmp_path / "missing.jsonl", [good, missing]), 2, "field 'prompt.replies[0].text': missing")

    wrong = nested("t2", [reply("c", "zero")])
    expect(write_jsonl(tmp_path / "type.jsonl", [good, wrong]), 2, "field 'prompt.replies[0].rank'", "'zero'")
    wrong = nested("t2", [reply("c", 0, synthetic="yes")])
    expect(write_jsonl(tmp_path / "type2.jsonl", [good, wrong]), 2, "field 'prompt.replies[0].synthetic'", "bool")
    wrong = nested("t2", [reply("c", 1.5)])
    expect(write_jsonl(tmp_path / "rank.jsonl", [wrong]), 1, "field 'prompt.replies[0].rank'", "whole number")

    robot = nested("t2", [reply("c", 0, replies=[{**reply("d", None), "role": "robot"}])])
    expect(write_jsonl(tmp_path / "role.jsonl", [good, robot]), 2,
           "field 'prompt.replies[0].replies[0].role'", "unknown role 'robot'")

    dup = nested("t2", [reply("a", 0)])  # "a" is already a reply in tree t1
    expect(write_jsonl(tmp_path / "dup.jsonl", [good, dup]), 2, "field 'prompt.replies[0].message_id'",
           "duplicate message id 'a'", f"{tmp_path / 'dup.jsonl'}:1")

    wrong_parent = nested("t2", [reply("c", 0, parent_id="elsewhere")])
    expect(write_jsonl(tmp_path / "parent.jsonl", [wrong_parent]), 1, "field 'prompt.replies[0].parent_id'")

    no_prompt = {"message_tree_id": "x", "prompt": None}
    expect(write_jsonl(tmp_path / "prompt.jsonl", [good, no_prompt]), 2, "field 'prompt'")


def test_flat_errors(tmp_path):
    root = msg("r", None, role="prompter")
    ok = [root, msg("a", "r", rank=0), msg("b", "r", rank=1)]

    p = tmp_path / "bad_json.jsonl"
    p.write_text(json.dumps(root) + "\n" + '{"message_id": "a",\n')
    expect(p, 2, "invalid JSON")

    no_parent_field = {k: v for k, v in msg("c", "r").items() if k != "parent_id"}
    expect(write_jsonl(tmp_path / "missing.jsonl", ok + [no_parent_field]), 4, "field 'parent_id': missing")
    no_text = {k: v for k, v in msg("c", "r").items() if k != "text"}
    expect(write_jsonl(tmp_path / "missing2.jsonl", ok + [no_text]), 4, "field 'text': missing")

    expect(write_jsonl(tmp_path / "type.jsonl", ok + [msg("c", "r", rank=True)]), 4, "field 'rank'", "True")
    expect(write_jsonl(tmp_path / "type2.jsonl", ok + [{**msg("c", "r"), "text": 5}]), 4, "field 'text'", "str")
    expect(write_jsonl(tmp_path / "role.jsonl", ok + [msg("c", "r", role="robot")]), 4,
           "field 'role'", "unknown role 'robot'")

    # a reply to a message that is not in the file is no error (test_flat_orphan_subtrees_are_dropped_and_counted),
    # but a cycle or a duplicate id still is, even next to orphans
    orphan = msg("c", "ghost")
    cycle = ok + [orphan, msg("x", "y", role="prompter"), msg("y", "x")]
    text = expect(write_jsonl(tmp_path / "cycle.jsonl", cycle), 5, "field 'parent_id'", "cycle")
    assert "x -> y -> x" in text
    expect(write_jsonl(tmp_path / "self.jsonl", ok + [msg("s", "s")]), 4, "field 'parent_id'", "s -> s")

    expect(write_jsonl(tmp_path / "dup.jsonl", ok + [orphan, msg("a", "r", rank=2)]), 5, "field 'message_id'",
           "duplicate message id 'a'", f"{tmp_path / 'dup.jsonl'}:2")
    expect(write_jsonl(tmp_path / "dup_orphan.jsonl", ok + [orphan, msg("c", "ghost2")]), 5, "field 'message_id'",
           "duplicate message id 'c'", f"{tmp_path / 'dup_orphan.jsonl'}:4")

    expect(write_jsonl(tmp_path / "root.jsonl", [msg("q", None)]), 1, "field 'role'", "prompter")


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no records \(the file is empty\)"):
        load_oasst(empty)
    with pytest.raises(DataError, match="file not found"):
        load_oasst(tmp_path / "absent.jsonl")
    expect(write_jsonl(tmp_path / "layout.jsonl", [{"id": 1}]), 1, "cannot tell the layout")
    expect(write_jsonl(tmp_path / "list.jsonl", [[1, 2]]), 1, "expected a JSON object")


def test_ift_reply_filters_and_no_promotion(tmp_path):
    rows = [
        nested("t1", [reply("a", 1), reply("b", 0, synthetic=True)]),  # best reply is synthetic
        nested("t2", [reply("c", None), reply("d", None)]),  # nothing ranked
        nested("t3", [reply("e", 1), reply("f", 0)], lang="fr"),
        nested("t4", [reply("g", 0, deleted=True), reply("h", 1)]),
        nested("t5", [reply("i", 1), reply("j", 0)]),
    ]
    trees = load_oasst(write_jsonl(tmp_path / "t.jsonl", rows))
    examples, dropped = build_ift(trees)
    assert [e["source"] for e in examples] == ["oasst:t5"]
    assert examples[0]["messages"][1]["content"] == "answer j"
    assert dropped == Counter({"reply_synthetic": 1, "no_ranked_reply": 1, "lang": 1, "reply_deleted": 1})
    assert len(build_ift(trees, include_synthetic=True, include_deleted=True, lang=["en", "fr"]).examples) == 4
    groups = eft_groups(trees, include_synthetic=True)
    assert [g["prompt_id"] for g in groups] == ["t1", "t5"]  # t4 keeps 1 ranked reply once "g" is dropped
    assert groups[0]["replies"] == [{"id": "a", "text": "answer a", "rank": 1}, {"id": "b", "text": "answer b", "rank": 0}]


# --------------------------------------------------------------------------- agreement filter


@pytest.mark.parametrize(
    ("scores", "ranks", "drop", "allow"),
    [
        ([5, 3, 1], [0, 1, 2], True, True),
        ([1, 3, 5], [2, 1, 0], True, True),  # order of the lists does not matter
        ([3, 5, 1], [0, 1, 2], False, False),  # inversion
        ([4, 4, 1], [0, 1, 2], False, True),  # tie between different human ranks
        ([4, 4, 4], [0, 1, 2], False, True),
        ([5, 2, 2], [0, 1, 2], False, True),
        ([2, 4, 4], [0, 1, 2], False, False),  # tie plus an inversion
        ([5, None, 1], [0, 1, 2], False, False),  # unparsable judgment
        ([float("nan"), 1.0], [0, 1], False, False),
        ([4.5, 4.0], [0, 1], True, True),
        ([3, 3], [0, 0], True, True),  # equal human ranks are not compared
        ([2], [0], True, True),
    ],
)
def test_agrees_with_human(scores, ranks, drop, allow):
    assert agrees_with_human(scores, ranks) is drop
    assert agrees_with_human(scores, ranks, ties="drop") is drop
    assert agrees_with_human(scores, ranks, ties="allow") is allow


def test_agrees_with_human_bad_arguments():
    with pytest.raises(ValueError, match="ties"):
        agrees_with_human([1, 2], [0, 1], ties="maybe")
    with pytest.raises(ValueError, match="2 scores for 3"):
        agrees_with_human([1, 2], [0, 1, 2])


# --------------------------------------------------------------------------- split


def test_split_is_stable_and_order_independent():
    items = [{"id": f"ex-{i}", "n": i} for i in range(200)]
    train, held = split_train_heldout(items, 0.1, seed=0)
    assert len(held) == 20 and len(train) == 180
    assert {x["id"] for x in train}.isdisjoint(x["id"] for x in held)
    assert [x["n"] for x in train] == sorted(x["n"] for x in train)  # input order kept
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    train2, held2 = split_train_heldout(shuffled, 0.1, seed=0)
    assert {x["id"] for x in held2} == {x["id"] for x in held}
    assert split_train_heldout(items, 0.1, seed=0) == (train, held)  # same call, same answer
    assert {x["id"] for x in split_train_heldout(items, 0.1, seed=1)[1]} != {x["id"] for x in held}
    groups = [{"prompt_id": f"p{i}"} for i in range(5)]
    assert len(split_train_heldout(groups, 0.01, seed=0)[1]) == 1  # at least one held out
    assert split_train_heldout(groups, 0.0, seed=0) == (groups, [])
    with pytest.raises(ValueError, match="duplicate id"):
        split_train_heldout([{"id": "a"}, {"id": "a"}], 0.5)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_train_heldout(items, 1.5)
