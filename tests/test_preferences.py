"""Judge training from human preferences: units, length balance, tree split, EFT records, direct scoring."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from conftest import shared_file
from selfalign.data.oasst import Message, Tree, TreeList
from selfalign.data.preferences import (
    PreferenceSet,
    balance_length,
    heldout_records,
    pairwise_examples,
    pointwise_records,
    split_trees,
    units_from_pairwise,
    units_from_trees,
)
from selfalign.data.judge_items import items_from_eft, items_from_pairwise
from selfalign.eval.judge_agreement import evaluate_judge
from selfalign.engines.base import Engine
from selfalign.stages.judge import LLMJudge


def unit(i: int, chosen: str, rejected: str) -> dict:
    return {"id": f"u{i}", "instruction": f"q{i}", "chosen": chosen, "rejected": rejected, "source": "test"}


def tree(i: int, ranked: list[str]) -> Tree:
    root = Message(id=f"t{i}", parent_id=None, role="prompter", text=f"question {i}", lang="en")
    root.children = [Message(id=f"t{i}-r{k}", role="assistant", text=t, lang="en", rank=k, parent_id=root.id)
                     for k, t in enumerate(ranked)]
    return Tree(root)


def test_balance_length_keeps_equal_numbers_of_longer_and_shorter_preferred_units():
    units = [unit(i, "long answer " * 3, "short") for i in range(7)] + [unit(10 + i, "ok", "much longer answer") for i in range(3)]
    units.append(unit(99, "same", "size"))
    prefs = PreferenceSet(units)
    assert prefs.longer_preferred_rate == 0.7
    out = balance_length(prefs, seed=1)
    assert out.longer_preferred_rate == 0.5
    assert len(out) == 3 + 3 + 1 and out.dropped["length_balance"] == 4
    assert {u["id"] for u in out.units} >= {"u10", "u11", "u12", "u99"}  # every minority and equal-length unit stays
    assert [u["id"] for u in out.units] == [u["id"] for u in units if u in out.units]  # input order kept
    assert out.units == balance_length(prefs, seed=1).units  # seeded


def test_units_from_trees_take_best_against_worst_and_split_by_tree():
    trees = TreeList([tree(i, [f"best {i}", f"middle {i}", f"worst {i}"]) for i in range(10)])
    train, held = split_trees(trees, 0.3, seed=0)
    assert len(held) == 3 and len(train) == 7 and not {t.id for t in train} & {t.id for t in held}
    assert split_trees(TreeList(list(reversed(trees))), 0.3, seed=0)[1][0].id in {t.id for t in held}  # order-free
    prefs = units_from_trees(train)
    assert len(prefs) == 7
    assert all(u["chosen"].startswith("best") and u["rejected"].startswith("worst") for u in prefs.units)
    records = heldout_records(held)
    assert len(records) == 9 and {r["prompt_id"] for r in records} == {t.id for t in held}
    items = items_from_eft(records)
    assert len(items) == 3 and sorted(r["rank"] for r in items[0]["replies"]) == [0, 1, 2]


def test_units_from_trees_can_take_every_ranked_pair_and_deeper_turns():
    t = tree(0, ["best", "middle", "worst", "also worst"])
    t.root.children[3].rank = 2  # tied with "worst": no unit between the two
    follow = Message(id="t0-p1", parent_id="t0-r0", role="prompter", text="and then?", lang="en")
    follow.children = [Message(id=f"t0-p1-r{k}", role="assistant", text=x, lang="en", rank=k, parent_id=follow.id)
                       for k, x in enumerate(["good follow-up", "bad follow-up"])]
    t.root.children[0].children = [follow]
    trees = TreeList([t])
    first = units_from_trees(trees, pairs="all")
    pairs = {(u["chosen"], u["rejected"]) for u in first.units}
    assert pairs == {("best", "middle"), ("best", "worst"), ("best", "also worst"), ("middle", "worst"), ("middle", "also worst")}
    assert len({u["id"] for u in first.units}) == 5
    deep = units_from_trees(trees, pairs="extremes", first_turn_only=False)
    assert {(u["instruction"], u["chosen"], u["rejected"]) for u in deep.units} == {
        ("question 0", "best", "also worst"), ("and then?", "good follow-up", "bad follow-up")}  # last of the tied worst
    assert len(units_from_trees(trees, pairs="all", first_turn_only=False)) == 6
    with pytest.raises(ValueError, match="pairs"):
        units_from_trees(trees, pairs="some")


def test_pointwise_and_pairwise_targets_follow_the_human_preference():
    u = unit(0, "the good one", "the bad one")
    recs = pointwise_records([u])
    assert [(r["response"], r["judgment"], r["human_rank"]) for r in recs] == [
        ("the good one", "Score: 4", 0), ("the bad one", "Score: 1", 1)]
    with pytest.raises(ValueError):
        pointwise_records([u], low=3, high=3)
    pw = pairwise_examples([u])
    assert [e["messages"][1]["content"] for e in pw] == ["Winner: A", "Winner: B"]
    first, second = (e["messages"][0]["content"] for e in pw)
    assert first.index("the good one") < first.index("the bad one") and second.index("the bad one") < second.index("the good one")


def test_units_from_pairwise_records_name_the_preferred_output():
    items = items_from_pairwise([{"input": "q", "output_1": "a", "output_2": "b", "label": 2},
                                 {"input": "q2", "output_1": "same", "output_2": "same", "label": 1}])
    prefs = units_from_pairwise(items, source="file")
    assert [(u["chosen"], u["rejected"]) for u in prefs.units] == [("b", "a")]
    assert prefs.dropped == Counter(identical=1)


class DigitEngine(Engine):
    """Puts its probability mass on the digit named by the response's first word (``"3 ..."``)."""

    name = "digits"

    def __init__(self):
        self.probes = []

    def generate(self, requests):
        raise AssertionError("direct scoring must not generate")

    def next_token_probs(self, prompts, candidates):
        out = []
        for messages, prefix in prompts:
            self.probes.append(prefix)
            text = messages[-1]["content"]
            m = re.search(r"<response>\s*(\d)", text)
            out.append([1.0 if m and c == m.group(1) else 0.0 for c in candidates])
        return out


def test_direct_scoring_reads_the_digit_after_an_opened_score_line(tmp_path):
    engine = DigitEngine()
    judge = LLMJudge(engine, template="judge_brief", scoring="direct", k=3)
    assert judge.judgments_per_response == 1
    responses = [{"id": f"r{i}", "messages": [{"role": "user", "content": "q"}], "response": f"{i} points"} for i in range(6)]
    got = {r["id"]: js for r, js, _ in judge.judge(responses)}
    assert [got[f"r{i}"][0]["score"] for i in range(6)] == [0, 1, 2, 3, 4, 5]
    assert set(engine.probes) == {"Score: "} and all(len(js) == 1 for js in got.values())
    with pytest.raises(ValueError, match="scoring must be one of"):
        LLMJudge(engine, scoring="guess")
    # eval judge with direct scoring: one judgment per reply, accuracy from the digits
    items = items_from_eft([{"prompt_id": "p", "instruction": "q", "response": "5 great", "judgment": "", "human_rank": 0},
                            {"prompt_id": "p", "instruction": "q", "response": "1 poor", "judgment": "", "human_rank": 1}])
    summary = evaluate_judge(engine, items, out_dir=tmp_path, template="judge_brief", scoring="direct", show_progress=False)
    assert summary["metrics"]["pairwise_accuracy"] == 1.0 and summary["judge"]["k"] == 1


def test_seed_data_with_rank_targets_holds_out_whole_trees():
    from selfalign.data.seeding import load_seed_data
    from selfalign.recipes.config import SeedDataConfig

    path = shared_file("oasst/oasst_en_100_trees.jsonl")
    pairwise = str(shared_file("preference/llmbar/LLMBar__Adversarial__Neighbor.json"))
    cfg = SeedDataConfig(ift=f"oasst:{path}", eft=f"oasst:{path}", eft_targets="ranks", eft_heldout_fraction=0.5,
                         eft_pairwise=[pairwise], eft_pairwise_examples=True)
    seed = load_seed_data(cfg)
    held_prompts = {r["instruction"] for r in seed.eft_heldout}
    assert held_prompts and not held_prompts & {r["instruction"] for r in seed.eft_train}
    assert not held_prompts & set(seed.prompts)  # held-out trees' replies are not IFT targets either
    assert seed.dropped["eft_heldout_tree"] > 0
    assert seed.eft_stats["trained"]["longer_preferred_rate"] == 0.5
    assert {r["judgment"] for r in seed.eft_train} == {"Score: 1", "Score: 4"}
    assert len(seed.judge_chat) == len(seed.eft_train)  # two pairwise examples per unit, as many as pointwise
    capped = load_seed_data(cfg.model_copy(update={"max_eft": 20}))
    assert len(capped.eft_train) == 20
    every = load_seed_data(cfg.model_copy(update={"eft_pairwise": [], "eft_pairwise_examples": False, "eft_length_balance": False,
                                                  "eft_oasst_pairs": "all", "eft_oasst_turns": "all"}))
    first = load_seed_data(cfg.model_copy(update={"eft_pairwise": [], "eft_pairwise_examples": False, "eft_length_balance": False}))
    assert every.eft_stats["trained"]["units"] > 2 * first.eft_stats["trained"]["units"]  # all pairs of every turn
    assert every.eft_heldout == first.eft_heldout  # held-out records stay first-turn, whatever trains
    assert not held_prompts & {r["instruction"] for r in every.eft_train}
