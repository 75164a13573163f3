"""Length-split judge accuracy (selfalign.eval.length_balance) and its place in eval judge's summary."""

from __future__ import annotations

import pytest

from selfalign.eval.judge_agreement import summarize
from selfalign.report.eval_tables import judge_table as summary_table
from selfalign.eval.length_balance import five_best, length_balanced_metrics, per_item_counts

# item A: three replies, lengths 10 / 5 / 20 for ranks 0 / 1 / 2; item B: two replies of equal length
RANKS = [[0, 1, 2], [0, 1]]
LENGTHS = [[10.0, 5.0, 20.0], [8.0, 8.0]]


def test_counts_split_pairs_by_which_reply_is_longer():
    # pairs of A: (r0, r1) longer preferred, (r0, r2) and (r1, r2) shorter preferred; B: equal length, a judge tie
    m = length_balanced_metrics([[3.0, 1.0, 2.0], [2.0, 2.0]], RANKS, LENGTHS, resamples=0)
    assert m["pairwise_accuracy"] == 0.5  # 2 of 4 scored pairs (the tie is a miss)
    assert m["longer_preferred_accuracy"] == 1.0 and m["longer_preferred_pairs"] == 1
    assert m["shorter_preferred_accuracy"] == 0.5 and m["shorter_preferred_pairs"] == 2
    assert m["length_balanced_accuracy"] == 0.75
    assert m["equal_length_pairs"] == 1
    assert m["longer_wins_agreement"] == round(2 / 3, 4)  # the judge scores the longer reply higher on 2 of 3
    assert m["tie_rate"] == 0.25
    assert m["ci95"]["pairwise_accuracy"] is None  # no resamples asked for


def test_baselines_score_half_length_balanced():
    longer = length_balanced_metrics(LENGTHS, RANKS, LENGTHS)
    assert longer["longer_preferred_accuracy"] == 1.0 and longer["shorter_preferred_accuracy"] == 0.0
    assert longer["length_balanced_accuracy"] == 0.5 and longer["longer_wins_agreement"] == 1.0
    shorter = length_balanced_metrics([[-x for x in ls] for ls in LENGTHS], RANKS, LENGTHS)
    assert shorter["length_balanced_accuracy"] == 0.5 and shorter["longer_wins_agreement"] == 0.0


def test_unscored_pairs_are_left_out():
    c = per_item_counts([3.0, None, 2.0], [0, 1, 2], [10.0, 5.0, 20.0])
    assert c["scored"] == 1 and c["scored_shorter"] == 1 and c["correct"] == 1 and c["scored_longer"] == 0
    m = length_balanced_metrics([[None, None]], [[0, 1]], [[1.0, 2.0]])
    assert m["pairwise_accuracy"] is None and m["length_balanced_accuracy"] is None and m["ci95"]["pairwise_accuracy"] is None


def test_intervals_resample_prompts_not_pairs():
    # one prompt whose 10 pairs the judge gets all right, one where it gets all wrong: 50% overall, but a
    # resample of prompts can hold either prompt twice, so the interval spans 0..1 (pairs resampled one by
    # one would give a narrow interval around 0.5)
    ranks = [list(range(5)), list(range(5))]
    lengths = [[1.0, 2.0, 3.0, 4.0, 5.0]] * 2
    scores = [[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]]
    m = length_balanced_metrics(scores, ranks, lengths, resamples=500, seed=1)
    assert m["pairwise_accuracy"] == 0.5
    assert m["ci95"]["pairwise_accuracy"] == [0.0, 1.0]
    assert m["ci95"]["longer_preferred_accuracy"] is None  # every pair here prefers the shorter reply
    assert m["longer_preferred_accuracy"] is None and m["length_balanced_accuracy"] is None


def test_interval_brackets_the_estimate_and_is_reproducible():
    import random

    rng = random.Random(0)
    ranks, lengths, scores = [], [], []
    for _ in range(60):
        ranks.append([0, 1])
        lengths.append([float(rng.randint(1, 100)), float(rng.randint(1, 100))])
        scores.append([rng.random() + 0.3, rng.random()])  # right about 70% of the time
    a = length_balanced_metrics(scores, ranks, lengths, seed=3)
    b = length_balanced_metrics(scores, ranks, lengths, seed=3)
    assert a == b
    for key in ("pairwise_accuracy", "length_balanced_accuracy", "longer_wins_agreement"):
        lo, hi = a["ci95"][key]
        assert lo < a[key] < hi and hi - lo < 0.5


def test_five_best_counts_items_whose_human_best_reply_gets_the_top_score():
    scores = [[5.0, 3.0], [4.4, 5.0], [4.6, 1.0], [None, 2.0], [3.0, 3.0, 5.0]]
    ranks = [[0, 1], [0, 1], [0, 1], [0, 1], [0, 0, 1]]
    out = five_best(scores, ranks)
    assert out == {"five_best": round(2 / 4, 4), "five_best_items": 4}  # 5.0 and 4.6 round to 5; 4.4 does not
    assert five_best([[1.0, 1.0]], [[0, 0]]) == {"five_best": None, "five_best_items": 0}


def test_summary_reports_length_split_for_judge_and_baselines():
    items = [
        {"id": "a", "instruction": "q1", "replies": [{"id": "x", "text": "a" * 10, "rank": 0}, {"id": "y", "text": "b" * 5, "rank": 1},
                                                   {"id": "z", "text": "c" * 20, "rank": 2}]},
        {"id": "b", "instruction": "q2", "replies": [{"id": "u", "text": "d" * 8, "rank": 0}, {"id": "v", "text": "e" * 8, "rank": 1}]},
    ]
    from selfalign.eval.judge_agreement import _response_id

    scores = {("q1", "a" * 10): 5.0, ("q1", "b" * 5): 1.0, ("q1", "c" * 20): 2.0, ("q2", "d" * 8): 2.0, ("q2", "e" * 8): 2.0}
    judgments = [{"response_id": _response_id(q, t), "score": s} for (q, t), s in scores.items()]
    s = summarize(items, judgments, score_range=(0, 5))
    m = s["metrics"]
    assert m["length_balanced_accuracy"] == 0.75 and m["longer_wins_agreement"] == round(2 / 3, 4)
    assert m["five_best"] == 0.5 and m["five_best_items"] == 2
    assert set(m["ci95"]) >= {"pairwise_accuracy", "length_balanced_accuracy", "longer_wins_agreement", "tie_rate"}
    lo, hi = m["ci95"]["pairwise_accuracy"]
    assert lo <= m["pairwise_accuracy"] <= hi
    assert s["baselines"]["longer_wins"]["length_balanced_accuracy"] == 0.5
    assert s["baselines"]["longer_wins"]["longer_wins_agreement"] == 1.0
    rand = s["baselines"]["random"]
    assert rand["length_balanced_accuracy"] == rand["longer_preferred_accuracy"] == rand["shorter_preferred_accuracy"] == 0.5
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(summary_table(s))
    text = console.export_text()
    assert "length-balanced accuracy" in text and "0.750 [" in text and "1 longer preferred, 2 shorter preferred" in text


@pytest.mark.parametrize("bad", [([[1.0]], [[0], [1]], [[1.0]])])
def test_mismatched_inputs_are_refused(bad):
    with pytest.raises(ValueError, match="one entry per item"):
        length_balanced_metrics(*bad)
