"""`selfalign eval judge`: data loading, the judging run on a scripted engine, summary, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import shared_file
from scripted import ScriptedEngine
from typer.testing import CliRunner

from selfalign.cli import app
from selfalign.errors import DataError, RunError
from selfalign.data.judge_items import ItemList, items_from_eft, items_from_oasst, items_from_pairwise, load_items
from selfalign.eval.judge_agreement import evaluate_judge, responses_for, summarize

# --------------------------------------------------------------------------- data


PAIRS = [
    # label 1: output_1 preferred
    {"input": "Name a fruit.", "output_1": "R-apple", "output_2": "R-rock", "label": 1},
    {"input": "Name a colour.", "output_1": "R-soup", "output_2": "R-blue", "label": 2},
    {"input": "Name a planet.", "output_1": "R-mars", "output_2": "R-a-long-wrong-answer", "label": 1},
    {"input": "Name a metal.", "output_1": "R-cheese", "output_2": "R-iron", "label": 2},
]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_pairwise_json_and_jsonl_give_the_same_items(tmp_path):
    a = load_items(write_json(tmp_path / "p.json", PAIRS))
    b = load_items(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    assert a.kind == b.kind == "pairwise" and not a.ranked
    assert a == b
    assert [[r["rank"] for r in it["replies"]] for it in a] == [[0, 1], [1, 0], [0, 1], [1, 0]]
    assert a[0]["instruction"] == "Name a fruit." and a[0]["replies"][0]["text"] == "R-apple"
    assert len(load_items(tmp_path / "p.json", limit=2)) == 2


def test_pairwise_repeated_records_get_distinct_ids():
    items = items_from_pairwise([PAIRS[0], PAIRS[0], PAIRS[1]])
    ids = [it["id"] for it in items]
    assert len(set(ids)) == 3 and ids[1] == ids[0] + "-2"


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"input": "q", "output_1": "a", "output_2": "b", "label": 3}, "label"),
        ({"input": "q", "output_1": "a", "output_2": "b", "label": "1"}, "label"),
        ({"input": "q", "output_1": "a", "label": 1}, "output_2"),
        ({"input": 5, "output_1": "a", "output_2": "b", "label": 1}, "input"),
    ],
)
def test_bad_pairwise_records_name_file_item_and_field(tmp_path, record, field):
    good = PAIRS[0]
    with pytest.raises(DataError) as e:
        load_items(write_json(tmp_path / "bad.json", [good, record]))
    msg = str(e.value)
    assert "bad.json" in msg and "item 1" in msg and f"'{field}'" in msg
    with pytest.raises(DataError) as e:
        load_items(write_jsonl(tmp_path / "bad.jsonl", [good, record]))
    msg = str(e.value)
    assert "bad.jsonl:2" in msg and f"'{field}'" in msg


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_items(tmp_path / "missing.json")
    with pytest.raises(DataError, match="invalid JSON"):
        load_items(write_text(tmp_path / "x.json", "[{"))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_items(write_json(tmp_path / "d.json", {"input": "q"}))
    with pytest.raises(DataError, match="empty"):
        load_items(write_json(tmp_path / "e.json", []))
    with pytest.raises(DataError, match="item 0: expected a JSON object"):
        load_items(write_json(tmp_path / "s.json", ["just text"]))
    with pytest.raises(DataError, match=r"other\.jsonl:2: unrecognised record \(fields: foo\)"):
        load_items(write_text(tmp_path / "other.jsonl", '\n{"foo": 1}\n'))
    with pytest.raises(DataError, match="empty"):
        load_items(write_text(tmp_path / "empty.jsonl", ""))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_items(bad)


def _tree(root_id: str, text: str, replies: list[tuple[str, int | None]]) -> dict:
    return {"message_tree_id": root_id, "prompt": {
        "message_id": root_id, "role": "prompter", "text": text, "lang": "en",
        "replies": [{"message_id": f"{root_id}-{i}", "role": "assistant", "text": t, "lang": "en", "rank": rank, "replies": []}
                    for i, (t, rank) in enumerate(replies)],
    }}


TREES = [
    _tree("t1", "Explain tides.", [("R-moon", 0), ("R-wind", 2), ("R-sun", 1)]),
    _tree("t2", "Only one ranked reply.", [("R-only", 0), ("R-unranked", None)]),
    _tree("t3", "Tied ranks.", [("R-x", 0), ("R-y", 0)]),
    _tree("t4", "Say hi.", [("R-hello", 1), ("R-hi", 0)]),
]


def _flat(trees: list[dict]) -> list[dict]:
    rows = []
    for t in trees:
        p = t["prompt"]
        rows.append({"message_id": p["message_id"], "parent_id": None, "role": "prompter", "text": p["text"], "lang": "en"})
        rows += [{"message_id": r["message_id"], "parent_id": p["message_id"], "role": "assistant", "text": r["text"],
                  "lang": "en", "rank": None if r["rank"] is None else float(r["rank"])} for r in p["replies"]]
    return rows


def test_oasst_nested_and_flat(tmp_path):
    nested = load_items(write_jsonl(tmp_path / "trees.jsonl", TREES))
    flat = load_items(write_jsonl(tmp_path / "flat.jsonl", _flat(TREES)))
    assert nested.kind == "oasst" and nested.ranked
    assert nested == flat
    assert [it["id"] for it in nested] == ["t1", "t4"]
    assert nested.dropped == {"too_few_ranked": 1, "no_ordered_pair": 1}
    assert [(r["text"], r["rank"]) for r in nested[0]["replies"]] == [("R-moon", 0), ("R-wind", 2), ("R-sun", 1)]


def test_oasst_bad_record_is_a_data_error(tmp_path):
    bad = _tree("t9", "Explain tides.", [("R-moon", 0), ("R-sun", 1)])
    bad["prompt"]["replies"][1]["rank"] = -1
    with pytest.raises(DataError, match=r"t.jsonl:2: .*rank"):
        load_items(write_jsonl(tmp_path / "t.jsonl", [TREES[0], bad]))


def test_real_oasst_file():
    items = load_items(shared_file("oasst/oasst_en_100_trees.jsonl"))
    assert len(items) > 50 and all(len({r["rank"] for r in it["replies"]}) >= 2 for it in items)


def test_real_llmbar_file():
    items = load_items(shared_file("preference/llmbar/LLMBar__Natural.json"))
    assert len(items) == 100 and items.kind == "pairwise"
    assert all(sorted(r["rank"] for r in it["replies"]) == [0, 1] for it in items)


def test_items_from_eft_with_human_ranks_and_with_scores():
    records = [
        {"id": "e1", "prompt_id": "p1", "instruction": "Q1", "response": "a", "judgment": "...", "score": 2, "human_rank": 1},
        {"id": "e2", "prompt_id": "p1", "instruction": "Q1", "response": "b", "judgment": "...", "score": 4, "human_rank": 0},
        # no prompt_id, no human_rank: grouped by instruction, ranked by score (dense, highest first)
        {"id": "e3", "instruction": "Q2", "response": "c", "judgment": "...", "score": 5},
        {"id": "e4", "instruction": "Q2", "response": "d", "judgment": "...", "score": 1},
        {"id": "e5", "instruction": "Q2", "response": "e", "judgment": "...", "score": 5},
        # one distinct score: nothing to order
        {"id": "e6", "instruction": "Q3", "response": "f", "judgment": "...", "score": 3},
        {"id": "e7", "instruction": "Q3", "response": "g", "judgment": "...", "score": 3},
        # neither rank nor score on one record
        {"id": "e8", "instruction": "Q4", "response": "h", "judgment": "...", "score": 3},
        {"id": "e9", "instruction": "Q4", "response": "i", "judgment": "..."},
    ]
    items = items_from_eft(records)
    assert items.kind == "eft" and items.ranked
    assert [it["instruction"] for it in items] == ["Q1", "Q2"]
    assert [(r["id"], r["rank"]) for r in items[0]["replies"]] == [("e1", 1), ("e2", 0)]
    assert [(r["id"], r["rank"]) for r in items[1]["replies"]] == [("e3", 0), ("e4", 1), ("e5", 0)]
    assert items[0]["id"] == "p1"
    assert items.dropped == {"no_ordered_pair": 1, "no_ranks": 1}


def test_items_from_eft_bad_record():
    with pytest.raises(DataError, match=r"record 1: field 'instruction'"):
        items_from_eft([{"instruction": "Q", "response": "a"}, {"instruction": 3, "response": "b"}])
    with pytest.raises(DataError, match=r"field 'human_rank'"):
        items_from_eft([{"instruction": "Q", "response": "a", "human_rank": -1}])


def test_eft_file(tmp_path):
    recs = [{"id": f"e{i}", "instruction": "Q", "response": f"r{i}", "judgment": "j", "score": s} for i, s in enumerate([1, 4])]
    items = load_items(write_jsonl(tmp_path / "eft.jsonl", recs))
    assert items.kind == "eft" and [r["rank"] for r in items[0]["replies"]] == [1, 0]


def test_responses_are_judged_once_per_distinct_text():
    items = items_from_pairwise([PAIRS[0], PAIRS[0], {**PAIRS[0], "output_2": "R-pear"}])
    resp = responses_for(items)
    assert [r["response"] for r in resp] == ["R-apple", "R-rock", "R-pear"]
    assert resp[0]["messages"] == [{"role": "user", "content": "Name a fruit."}]


# --------------------------------------------------------------------------- judging


def scripted_judge(table: dict[str, list[str]]) -> ScriptedEngine:
    """A judge whose i-th judgment of the reply containing token ``R-x`` is ``table["R-x"][i]``."""

    def reply(req, i):
        prompt = req.messages[-1].content
        found = [tok for tok in table if re.search(re.escape(tok) + r"(?![\w-])", prompt)]
        assert len(found) == 1, (found, prompt[-200:])
        return table[found[0]][i]

    return ScriptedEngine(reply)


def s(n) -> str:
    return f"The reply is relevant and clear.\nScore: {n}"


GARBAGE = "I cannot decide."

# PAIRS judged twice each (k=2):
#   fruit:  apple (better) 5,5  vs rock 1,1            -> correct
#   colour: blue (better)  3,<garbage> = 3 vs soup 3,3  -> tie
#   planet: mars (better)  2,2 vs long-wrong 4,4        -> wrong
#   metal:  iron (better)  4,4 vs cheese garbage x2     -> unscored
TABLE = {
    "R-apple": [s(5), s(5)], "R-rock": [s(1), s(1)],
    "R-blue": [s(3), GARBAGE], "R-soup": [s(3), s(3)],
    "R-mars": [s(2), s(2)], "R-a-long-wrong-answer": [s(4), s(4)],
    "R-iron": [s(4), s(4)], "R-cheese": [GARBAGE, GARBAGE],
}


def test_end_to_end_scripted_pairwise(tmp_path):
    items = items_from_pairwise(PAIRS)
    eng = scripted_judge(TABLE)
    summary = evaluate_judge(eng, items, out_dir=tmp_path / "ev", k=2, show_progress=False, data="pairs.json", model="scripted")
    m = summary["metrics"]
    assert summary["kind"] == "judge_agreement" and summary["data"] == "pairs.json"
    assert summary["judge"]["model"] == "scripted" and summary["judge"]["k"] == 2
    assert (summary["items"], summary["pairs"]) == (4, 4)
    assert (m["correct"], m["wrong"], m["ties"], m["unscored_pairs"]) == (1, 1, 1, 1)
    assert m["pairwise_accuracy"] == pytest.approx(round(1 / 3, 4))
    assert m["pairwise_accuracy_excluding_ties"] == 0.5
    assert m["tie_rate"] == pytest.approx(round(1 / 3, 4))
    assert m["parse_failure_rate"] == pytest.approx(3 / 16)  # 8 replies x 2; blue #2, cheese #1 and #2
    assert m["unscored_judgment_rate"] == pytest.approx(3 / 16)
    assert m["score_histogram"] == {"0": 0, "1": 2, "2": 2, "3": 3, "4": 4, "5": 2}
    assert m["exact_match_best"] is None and m["spearman"] is None  # pairwise data: one pair per item
    rnd, longer = summary["baselines"]["random"], summary["baselines"]["longer_wins"]
    assert rnd["pairwise_accuracy"] == 0.5 and rnd["tie_rate"] == 0.0
    # lengths: apple 7 > rock 6 correct; blue 6 = soup 6 tie; mars 6 < long 21 wrong; iron 6 < cheese 8 wrong
    assert (longer["correct"], longer["wrong"], longer["ties"]) == (1, 2, 1)
    assert longer["pairwise_accuracy"] == 0.25
    saved = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert saved["metrics"] == m and saved["baselines"] == summary["baselines"]
    rows = [json.loads(x) for x in (tmp_path / "ev" / "items.jsonl").read_text().splitlines()]
    assert rows[0]["replies"][0] == {"id": "output_1", "rank": 0, "score": 5.0, "scored_judgments": 2, "length": 7}
    assert len((tmp_path / "ev" / "judgments.jsonl").read_text().splitlines()) == 16


def test_rerun_resumes_and_other_settings_refuse(tmp_path):
    items = items_from_pairwise(PAIRS)
    first = evaluate_judge(scripted_judge(TABLE), items, out_dir=tmp_path / "ev", k=2, show_progress=False)
    again_eng = scripted_judge(TABLE)
    again = evaluate_judge(again_eng, items, out_dir=tmp_path / "ev", k=2, show_progress=False)
    assert again_eng.requests == [] and again["metrics"] == first["metrics"]
    # a partial file (a killed run) is completed, not redone
    path = tmp_path / "ev" / "judgments.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:6]))
    part_eng = scripted_judge(TABLE)
    resumed = evaluate_judge(part_eng, items, out_dir=tmp_path / "ev", k=2, show_progress=False)
    assert 0 < len(part_eng.requests) < 8 and resumed["metrics"] == first["metrics"]
    with pytest.raises(RunError, match="k"):
        evaluate_judge(scripted_judge(TABLE), items, out_dir=tmp_path / "ev", k=1, show_progress=False)


def test_limit_reuses_a_larger_run_and_counts_only_its_items(tmp_path):
    items = items_from_pairwise(PAIRS)
    evaluate_judge(scripted_judge(TABLE), items, out_dir=tmp_path / "ev", k=2, show_progress=False)
    eng = scripted_judge(TABLE)
    small = evaluate_judge(eng, ItemList(items[:1], "pairwise"), out_dir=tmp_path / "ev", k=2, show_progress=False)
    assert eng.requests == []
    assert small["items"] == 1 and small["metrics"]["judgments"] == 4 and small["metrics"]["pairwise_accuracy"] == 1.0


def test_end_to_end_scripted_ranked_groups(tmp_path):
    items = items_from_oasst(
        __import__("selfalign.data.oasst", fromlist=["load_oasst"]).load_oasst(write_jsonl(tmp_path / "t.jsonl", TREES))
    )
    # t1: moon(0) 5, sun(1) 3, wind(2) 4  -> pairs: moon>sun ok, moon>wind ok, sun<wind wrong; best = moon
    # t4: hi(0) 2, hello(1) 2            -> tie; top tie, constant scores
    table = {"R-moon": [s(5)], "R-sun": [s(3)], "R-wind": [s(4)], "R-hi": [s(2)], "R-hello": [s(2)]}
    summary = evaluate_judge(scripted_judge(table), items, out_dir=tmp_path / "ev", k=1, show_progress=False)
    m = summary["metrics"]
    assert summary["source"] == "oasst" and summary["dropped"] == {"no_ordered_pair": 1, "too_few_ranked": 1}
    assert (summary["pairs"], m["correct"], m["wrong"], m["ties"]) == (4, 2, 1, 1)
    assert m["pairwise_accuracy"] == 0.5 and m["pairwise_accuracy_excluding_ties"] == pytest.approx(round(2 / 3, 4))
    assert m["exact_match_best"] == 0.5  # t1 hit, t4 top tie
    assert m["exact_match_ranking"] == 0.0
    # t1: score ranks [3,1,2] vs [3,2,1] -> rho 0.5, tau 1/3; t4 constant -> excluded
    assert m["spearman"] == 0.5 and m["kendall_tau"] == pytest.approx(round(1 / 3, 4))
    assert m["constant_score_items"] == 1
    rnd = summary["baselines"]["random"]
    assert rnd["exact_match_best"] == pytest.approx(round((1 / 3 + 1 / 2) / 2, 4))
    assert rnd["spearman"] == 0.0


class ProbsEngine(ScriptedEngine):
    """A scripted judge that also reports score-digit probabilities (for expected scoring)."""

    def __init__(self, reply, probs):
        super().__init__(reply)
        self.probs = probs

    def next_token_probs(self, prompts, candidates):
        out = []
        for messages, _prefix in prompts:
            prompt = messages[-1].content if hasattr(messages[-1], "content") else messages[-1]["content"]
            tok = next(t for t in self.probs if t in prompt)
            out.append(self.probs[tok])
        return out


def test_expected_scoring_uses_digit_probabilities(tmp_path):
    items = items_from_pairwise(PAIRS[:2])
    six = lambda *p: list(p) + [0.0] * (6 - len(p))
    probs = {"R-apple": six(0, 0, 0, 0.5, 0.5), "R-rock": six(0, 0.5, 0.5),  # 3.5 vs 1.5: correct
             "R-blue": six(0, 0, 1.0), "R-soup": six(0, 0, 1.0)}  # 2.0 vs 2.0: tie
    eng = ProbsEngine(lambda req, i: GARBAGE, probs)  # the text never has a score line
    summary = evaluate_judge(eng, items, out_dir=tmp_path / "ev", k=1, scoring="expected", show_progress=False)
    m = summary["metrics"]
    assert (m["correct"], m["ties"]) == (1, 1)
    assert m["parse_failure_rate"] == 1.0 and m["unscored_judgment_rate"] == 0.0
    assert m["score_histogram"]["2"] == 3 and m["score_histogram"]["4"] == 1  # 1.5 and 3.5 round half up


def test_summarize_with_plain_lists():
    items = [{"id": "i", "instruction": "Q", "replies": [{"id": "a", "text": "aa", "rank": 0}, {"id": "b", "text": "b", "rank": 1}]}]
    from selfalign.eval.judge_agreement import _response_id

    judgments = [{"response_id": _response_id("Q", "aa"), "score": 1.0, "parse_error": None},
                 {"response_id": _response_id("Q", "b"), "score": 2.0, "parse_error": None}]
    out = summarize(items, judgments)
    assert out["metrics"]["pairwise_accuracy"] == 0.0 and out["metrics"]["spearman"] == -1.0
    assert out["baselines"]["longer_wins"]["pairwise_accuracy"] == 1.0


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_with_a_scripted_judge(tmp_path, monkeypatch):
    import selfalign.engines

    data = write_json(tmp_path / "pairs.json", PAIRS)
    made = {}

    def fake_engine(model_cfg, engine_cfg):
        made["model"], made["engine"] = model_cfg, engine_cfg
        return scripted_judge(TABLE)

    monkeypatch.setattr(selfalign.engines, "create_engine", fake_engine)
    out = tmp_path / "out"
    args = ["eval", "judge", str(data), "--model", "some-model", "-k", "2", "--out", str(out), "--no-progress",
            "--temperature", "0.5", "--set", "engine.threads=1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert made["model"].spec == "some-model" and made["engine"].threads == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge"]["model"] == "some-model" and summary["judge"]["temperature"] == 0.5
    assert summary["metrics"]["pairwise_accuracy"] == pytest.approx(round(1 / 3, 4))
    assert "pairwise accuracy" in res.output and "longer wins" in res.output and "score histogram" in res.output
    # rerun: nothing left to judge, same numbers
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and json.loads((out / "summary.json").read_text())["metrics"] == summary["metrics"]


def test_cli_default_out_dir_and_limit(tmp_path, monkeypatch):
    import selfalign.engines

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(selfalign.engines, "create_engine", lambda m, e: scripted_judge(TABLE))
    write_jsonl(tmp_path / "my pairs.jsonl", PAIRS)
    res = runner.invoke(app, ["eval", "judge", "my pairs.jsonl", "--limit", "1", "-k", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "runs" / "eval_judge_my_pairs" / "summary.json").read_text())
    assert summary["items"] == 1 and "--limit 1" in res.output


def test_cli_reports_bad_input_without_a_traceback(tmp_path, monkeypatch):
    import selfalign.engines

    def no_engine(*a):
        raise AssertionError("the engine must not load for bad input")

    monkeypatch.setattr(selfalign.engines, "create_engine", no_engine)
    bad = write_json(tmp_path / "bad.json", [PAIRS[0], {**PAIRS[1], "label": 0}])
    res = runner.invoke(app, ["eval", "judge", str(bad), "--no-progress", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "bad.json: item 1: field 'label'" in " ".join(res.output.split())
    res = runner.invoke(app, ["eval", "judge", str(tmp_path / "nope.json"), "--no-progress"])
    assert res.exit_code == 2 and "file not found" in res.output
    res = runner.invoke(app, ["eval", "judge", str(bad), "--scoring", "best", "--no-progress"])
    assert res.exit_code == 2 and "judge.scoring" in res.output
    res = runner.invoke(app, ["eval", "judge", str(bad), "--template", str(tmp_path / "no.jinja"), "--no-progress"])
    assert res.exit_code == 2 and "no.jinja" in res.output


def test_cli_with_the_tiny_random_model_reports_parse_failures(tmp_path, tiny_model_dir):
    """Garbage judgments: the run completes and says how many failed to parse."""
    data = write_json(tmp_path / "pairs.json", PAIRS[:2])
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "judge", str(data), "--model", str(tiny_model_dir), "-k", "2",
                              "--max-new-tokens", "8", "--out", str(out), "--no-progress", "--set", "model.dtype=float32"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "summary.json").read_text())["metrics"]
    assert m["judgments"] == 8 and m["parse_failure_rate"] == 1.0
    assert m["unscored_pairs"] == 2 and m["pairwise_accuracy"] is None
    assert "parse failure rate" in res.output


@pytest.mark.slow
def test_real_embedded_judge_on_llmbar(tmp_path):
    data = shared_file("preference/llmbar/LLMBar__Natural.json")
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "judge", str(data), "--model", "smollm2-135m-instruct", "-k", "1", "--limit", "5",
                              "--max-new-tokens", "24", "--scoring", "expected", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["items"] == 5 and summary["pairs"] == 5 and m["judgments"] == 10
    assert m["unscored_judgment_rate"] == 0.0 and m["unscored_pairs"] == 0  # expected scores always exist
    assert 0.0 <= m["pairwise_accuracy"] <= 1.0
    assert sum(m["score_histogram"].values()) == 10
