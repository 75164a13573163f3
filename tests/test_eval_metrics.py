"""Judge-agreement metrics against values worked out by hand (see the comments)."""

from __future__ import annotations

import math
import warnings

import pytest

from selfalign.eval.metrics import (
    agreement_metrics,
    exact_match_best,
    exact_match_ranking,
    is_missing,
    length_scores,
    mean_scores,
    ordered_pairs,
    pair_outcome,
    pairwise_agreement,
    parse_failure_rate,
    random_baseline,
    rank_correlations,
    score_histogram,
    unscored_judgment_rate,
)

# Four items, aligned scores and ranks (rank 0 = best):
#   A: pairs (0,1) 4>2 correct, (0,2) 4>3 correct, (1,2) 2<3 wrong
#   B: pair (1,0) 3=3 tie
#   C: pair (0,1) unscored (reply 0 has no score)
#   D: ranks 0,0,1 -> pairs (0,2) 1<2 wrong, (1,2) 2=2 tie; (0,1) equal ranks, not a pair
A = ([4.0, 2.0, 3.0], [0, 1, 2])
B = ([3.0, 3.0], [1, 0])
C = ([None, 5.0], [0, 1])
D = ([1.0, 2.0, 2.0], [0, 0, 1])
SCORES = [A[0], B[0], C[0], D[0]]
RANKS = [A[1], B[1], C[1], D[1]]


def test_ordered_pairs_and_outcomes():
    assert ordered_pairs([0, 1, 2]) == [(0, 1), (0, 2), (1, 2)]
    assert ordered_pairs([1, 0]) == [(1, 0)]
    assert ordered_pairs([0, 0, 1]) == [(0, 2), (1, 2)]
    assert ordered_pairs([2, 2]) == []
    assert pair_outcome(4, 2) == "correct"
    assert pair_outcome(2, 4) == "wrong"
    assert pair_outcome(3, 3) == "tie"
    assert pair_outcome(3.0 + 1e-12, 3.0) == "tie"  # float noise is a tie
    assert pair_outcome((0.1 + 0.2 + 0.3) / 3, 0.2) == "tie"
    assert pair_outcome(None, 3) == "unscored"
    assert pair_outcome(3, float("nan")) == "unscored"
    assert is_missing(None) and is_missing(float("nan")) and not is_missing(0.0)


def test_pairwise_agreement_hand_computed():
    m = pairwise_agreement(SCORES, RANKS)
    # 7 pairs: correct 2, wrong 2, ties 2, unscored 1; 6 scored
    assert m["pairs"] == 7
    assert (m["correct"], m["wrong"], m["ties"], m["unscored_pairs"]) == (2, 2, 2, 1)
    assert m["pairwise_accuracy"] == pytest.approx(2 / 6)
    assert m["pairwise_accuracy_excluding_ties"] == pytest.approx(2 / 4)
    assert m["tie_rate"] == pytest.approx(2 / 6)


def test_pairwise_all_equal_and_all_unscored():
    eq = pairwise_agreement([[2, 2, 2], [1, 1]], [[0, 1, 2], [0, 1]])
    assert (eq["pairs"], eq["ties"], eq["pairwise_accuracy"], eq["tie_rate"]) == (4, 4, 0.0, 1.0)
    assert eq["pairwise_accuracy_excluding_ties"] is None  # no decided pair at all
    none = pairwise_agreement([[None, None]], [[0, 1]])
    assert none["unscored_pairs"] == 1 and none["pairs"] == 1
    assert none["pairwise_accuracy"] is None and none["tie_rate"] is None
    empty = pairwise_agreement([], [])
    assert empty["pairs"] == 0 and empty["pairwise_accuracy"] is None


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="item 0"):
        pairwise_agreement([[1.0]], [[0, 1]])
    with pytest.raises(ValueError):
        exact_match_best([[1.0, 2.0]], [])


def test_exact_match_best():
    # A: top 4 at reply 0 (rank 0) -> hit; B: tie at the top -> miss; C: unscored -> excluded;
    # D: 2 and 2 tie at the top -> miss  => 1 / 3
    m = exact_match_best(SCORES, RANKS)
    assert m["exact_match_best"] == pytest.approx(1 / 3)
    assert (m["items_evaluated"], m["unscored_items"], m["items_without_pairs"]) == (3, 1, 0)
    # top reply among several human-best ones counts; ranks with a gap (no rank 0) use the lowest
    assert exact_match_best([[1.0, 5.0, 0.0]], [[0, 0, 1]])["exact_match_best"] == 1.0
    assert exact_match_best([[1.0, 5.0]], [[3, 2]])["exact_match_best"] == 1.0
    assert exact_match_best([[1.0, 5.0]], [[2, 3]])["exact_match_best"] == 0.0
    # an item with one human rank only has nothing to match
    m = exact_match_best([[1.0, 2.0]], [[0, 0]])
    assert m["exact_match_best"] is None and m["items_without_pairs"] == 1


def test_exact_match_ranking():
    # A has a wrong pair, B a tie, D a wrong pair and a tie -> 0 of 3; E is fully right
    assert exact_match_ranking(SCORES, RANKS)["exact_match_ranking"] == 0.0
    e = ([5.0, 1.0], [0, 1])
    m = exact_match_ranking(SCORES + [e[0]], RANKS + [e[1]])
    assert m["exact_match_ranking"] == pytest.approx(1 / 4) and m["items_evaluated"] == 4
    # equally ranked replies may score anything, even tie
    assert exact_match_ranking([[3.0, 3.0, 1.0]], [[0, 0, 1]])["exact_match_ranking"] == 1.0


def test_rank_correlations_single_items():
    # A: score ranks [3,1,2] vs negated-rank ranks [3,2,1]: d^2 sum 2 -> rho = 1 - 12/24 = 0.5;
    #    Kendall: 2 concordant, 1 discordant of 3 -> 1/3
    a = rank_correlations([A[0]], [A[1]])
    assert a["spearman"] == pytest.approx(0.5) and a["kendall_tau"] == pytest.approx(1 / 3)
    # D (ties on both sides): x=[1,2.5,2.5], y=[2.5,2.5,1] -> cov -0.75 / var 1.5 -> rho = -0.5;
    #    tau-b: P=0, Q=1, n0=3, one tie in x, one in y -> -1 / sqrt(2*2) = -0.5
    d = rank_correlations([D[0]], [D[1]])
    assert d["spearman"] == pytest.approx(-0.5) and d["kendall_tau"] == pytest.approx(-0.5)
    # two replies: the correlation is just the pair's sign
    two = rank_correlations([[5.0, 1.0]], [[0, 1]])
    assert two["spearman"] == pytest.approx(1.0) and two["kendall_tau"] == pytest.approx(1.0)
    inv = rank_correlations([[1.0, 5.0]], [[0, 1]])
    assert inv["spearman"] == pytest.approx(-1.0) and inv["kendall_tau"] == pytest.approx(-1.0)


def test_rank_correlations_average_and_exclusions():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constant items never reach scipy (no ConstantInputWarning)
        m = rank_correlations(SCORES, RANKS)
    # A (0.5, 1/3) and D (-0.5, -0.5) averaged; B constant; C unscored
    assert m["spearman"] == pytest.approx(0.0)
    assert m["kendall_tau"] == pytest.approx((1 / 3 - 0.5) / 2)
    assert (m["correlation_items"], m["constant_score_items"], m["unscored_items"]) == (2, 1, 1)
    # all scores constant everywhere: no correlation at all
    allc = rank_correlations([[2.0, 2.0, 2.0], [4.0, 4.0]], [[0, 1, 2], [1, 0]])
    assert allc["spearman"] is None and allc["kendall_tau"] is None and allc["constant_score_items"] == 2
    # near-equal scores are ties for the correlation as well (3 vs 3+1e-12 -> same as D-like tie)
    near = rank_correlations([[1.0, 2.0, 2.0 + 1e-12]], [[0, 0, 1]])
    assert near["spearman"] == pytest.approx(-0.5)


def test_parse_failure_and_unscored_rates():
    judgments = [
        {"score": 3, "parse_error": None},
        {"score": None, "parse_error": "no score line"},  # sampled scoring: no score
        {"score": 2.7, "parse_error": "no score line"},  # expected scoring: probabilities still give one
        {"score": 4.0, "parse_error": None},
    ]
    assert parse_failure_rate(judgments) == pytest.approx(2 / 4)
    assert unscored_judgment_rate(judgments) == pytest.approx(1 / 4)
    assert parse_failure_rate([]) is None and unscored_judgment_rate([]) is None


def test_score_histogram():
    # half-up rounding: 1.49 -> 1, 1.5 -> 2, 2.5 -> 3, 4.4999 -> 4; None is not counted
    h = score_histogram([0, 1.49, 1.5, 2.5, None, 5, 4.4999, float("nan")])
    assert h == {"0": 1, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1}
    assert list(h) == ["0", "1", "2", "3", "4", "5"]
    full = score_histogram([3, 3.2, 7], 0, 5)
    assert full == {"0": 0, "1": 0, "2": 0, "3": 2, "4": 0, "5": 0, "7": 1}
    assert score_histogram([]) == {}
    assert list(score_histogram([10, 2])) == ["2", "10"]  # numeric, not string, order


def test_mean_scores_and_lengths():
    assert mean_scores([3, None, 5]) == 4.0
    assert mean_scores([None, float("nan")]) is None
    assert mean_scores([]) is None
    assert length_scores(["  abc ", "", "xy"]) == [3.0, 0.0, 2.0]


def test_agreement_metrics_layout_and_pairwise_only():
    m = agreement_metrics(SCORES, RANKS)
    assert m["pairwise_accuracy"] == pytest.approx(2 / 6)
    assert m["exact_match_best"] == pytest.approx(1 / 3)
    assert m["exact_match_ranking"] == 0.0
    assert m["spearman"] == pytest.approx(0.0)
    assert (m["constant_score_items"], m["unscored_items"]) == (1, 1)
    p = agreement_metrics(SCORES, RANKS, ranked=False)
    assert p["pairwise_accuracy"] == pytest.approx(2 / 6)
    assert all(p[k] is None for k in ("exact_match_best", "exact_match_ranking", "spearman", "kendall_tau"))


def test_longer_wins_baseline_through_the_same_metrics():
    texts = [["aaaa", "bb", "ccc"], ["xx", "yy"], ["long answer", "short"]]
    ranks = [[0, 1, 2], [0, 1], [1, 0]]
    m = agreement_metrics([length_scores(t) for t in texts], ranks)
    # item 1 = A's pattern (4,2,3): 2 correct, 1 wrong; item 2 equal lengths: tie;
    # item 3: the better reply is shorter: wrong  => 2 correct, 2 wrong, 1 tie of 5
    assert (m["correct"], m["wrong"], m["ties"]) == (2, 2, 1)
    assert m["pairwise_accuracy"] == pytest.approx(2 / 5)
    assert m["pairwise_accuracy_excluding_ties"] == pytest.approx(0.5)
    assert m["tie_rate"] == pytest.approx(1 / 5)
    assert m["constant_score_items"] == 1  # the equal-length item


def test_random_baseline_exact():
    ranks = [[0, 1, 2], [1, 0], [0, 0, 1]]
    r = random_baseline(ranks)
    assert r["pairs"] == 6 and r["correct"] == 3.0
    assert (r["pairwise_accuracy"], r["pairwise_accuracy_excluding_ties"], r["tie_rate"]) == (0.5, 0.5, 0.0)
    # best reply: 1/3, 1/2, 2/3 -> mean 0.5; whole ranking: 1/3!, 1/2!, 2!/3! -> (1/6 + 1/2 + 1/3) / 3
    assert r["exact_match_best"] == pytest.approx(0.5)
    assert r["exact_match_ranking"] == pytest.approx((1 / 6 + 1 / 2 + 1 / 3) / 3)
    assert (r["spearman"], r["kendall_tau"], r["constant_score_items"]) == (0.0, 0.0, 0)
    p = random_baseline(ranks, ranked=False)
    assert p["pairwise_accuracy"] == 0.5 and p["exact_match_best"] is None and p["spearman"] is None
    e = random_baseline([])
    assert e["pairs"] == 0 and e["pairwise_accuracy"] is None and e["exact_match_best"] is None


def test_random_baseline_matches_a_simulation():
    """The exact expectations agree with a seeded simulation of random judges."""
    import random

    ranks = [[0, 1, 2, 2], [1, 0], [0, 0, 1]]
    rng = random.Random(0)
    draws = 4000
    best = whole = 0.0
    for _ in range(draws):
        scores = [[rng.random() for _ in r] for r in ranks]
        best += exact_match_best(scores, ranks)["exact_match_best"]
        whole += exact_match_ranking(scores, ranks)["exact_match_ranking"]
    exact = random_baseline(ranks)
    assert best / draws == pytest.approx(exact["exact_match_best"], abs=0.02)
    assert whole / draws == pytest.approx(exact["exact_match_ranking"], abs=0.02)
    assert math.isclose(exact["exact_match_ranking"], (2 / 24 + 1 / 2 + 1 / 3) / 3)
