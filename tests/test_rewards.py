"""Programmatic rewards (word limit) and the bootstrap helpers of the learning check; no model needed."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest

from selfalign.rewards import constraints
from selfalign.rewards.constraints import (
    count_words,
    max_25_words,
    satisfies_word_limit,
    word_limit,
    word_limit_instruction,
    word_limit_score,
)
from selfalign.rewards.stats import bootstrap_mean, paired_difference, per_prompt_means

ROOT = Path(__file__).resolve().parents[1]


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# ----------------------------------------------------------------------------- counting words
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        (None, 0),
        ("   \n\t  ", 0),
        ("... --- !!! ?", 0),  # punctuation only
        ("Hello, world!", 2),
        ("**Note**: see - below ...", 3),  # "-" and "..." are not words, "**Note**:" is
        ("don't stop-gap 42", 3),
        ("café naïve Ωmega", 3),  # letters of any script
        ("Привет мир", 2),
        ("a\u00a0b\u3000c", 3),  # no-break and ideographic spaces separate words
        ("日本語のテキスト", 1),  # no spaces: one chunk (documented limitation)
        ("😀 🎉 ok", 1),  # emoji are not letters
    ],
)
def test_count_words(text, expected):
    assert count_words(text) == expected


# ----------------------------------------------------------------------------- the score
def test_score_within_the_limit_is_one_and_exactly_at_the_limit_too():
    assert word_limit_score(words(3), 25) == 1.0
    assert word_limit_score(words(25), 25) == 1.0
    assert satisfies_word_limit(words(25), 25)


def test_score_above_the_limit_is_limit_over_words():
    assert word_limit_score(words(26), 25) == pytest.approx(25 / 26)
    assert word_limit_score(words(50), 25) == pytest.approx(0.5)
    assert word_limit_score(words(100), 25) == pytest.approx(0.25)
    assert not satisfies_word_limit(words(26), 25)


def test_longer_responses_are_strictly_worse_and_never_zero():
    scores = [word_limit_score(words(n), 25) for n in range(25, 300)]
    assert all(a > b for a, b in itertools.pairwise(scores))
    assert scores[-1] > 0


@pytest.mark.parametrize("response", ["", " ", "\n\n\t", "...", "- - -", "!!!", "Yes.", "Yes, sure!"])
def test_empty_whitespace_punctuation_or_under_three_words_scores_zero(response):
    assert word_limit_score(response, 25) == 0.0
    assert max_25_words("any instruction", response) == 0.0
    assert not satisfies_word_limit(response, 25)


def test_min_words_is_inclusive_and_configurable():
    assert word_limit_score("one two three", 25) == 1.0
    assert word_limit_score("one two", 25, min_words=2) == 1.0
    assert word_limit_score("one", 25, min_words=2) == 0.0


def test_unicode_response_counts_words_of_any_script():
    text = "Ceci est une réponse très brève — à peine huit mots."  # the dash is not a word
    assert count_words(text) == 10
    assert word_limit_score(text, 10) == 1.0
    assert word_limit_score(text, 5) == pytest.approx(0.5)


def test_punctuation_padding_does_not_change_the_score():
    assert word_limit_score(words(30) + " " + "." * 500, 25) == word_limit_score(words(30), 25)


def test_the_instruction_is_ignored():
    r = words(40)
    assert max_25_words("Write 500 words about cats", r) == max_25_words("", r) == pytest.approx(25 / 40)


# ----------------------------------------------------------------------------- factory and names
def test_factory_and_named_functions():
    f = word_limit(10)
    assert f.__name__ == "max_10_words" and f.limit == 10 and f.min_words == 3
    assert f("", words(20)) == pytest.approx(0.5)
    assert max_25_words.__name__ == "max_25_words"
    assert word_limit(10, min_words=5).__name__ == "max_10_words_min_5"


def test_any_max_n_words_name_resolves_from_the_module():
    f = constraints.max_40_words  # made by the module's __getattr__ on first use
    assert f("", words(80)) == pytest.approx(0.5)
    assert vars(constraints)["max_40_words"] is f  # and cached
    for bad in ("max_0_words", "max_2_words", "max_x_words", "max_05_words", "min_25_words"):
        with pytest.raises(AttributeError):
            getattr(constraints, bad)


def test_function_reward_loads_it_from_a_config_path():
    from selfalign.stages.judge import FunctionReward

    reward = FunctionReward.from_path("selfalign.rewards.constraints:max_30_words")
    responses = [
        {"id": f"r{i}", "prompt_id": "p", "sample_index": i, "response": text,
         "messages": [{"role": "system", "content": word_limit_instruction(30)}, {"role": "user", "content": "Hi"}]}
        for i, text in enumerate([words(10), words(60), "   "])
    ]
    scores = [js[0]["score"] for _, js, _ in reward.judge(responses)]
    assert scores == [1.0, 0.5, 0.0]


@pytest.mark.parametrize(("limit", "min_words"), [(0, 1), (-3, 1), (2.5, 1), (5, 0), (3, 4)])
def test_invalid_limits_are_refused(limit, min_words):
    with pytest.raises(ValueError):
        word_limit(limit, min_words=min_words)


def test_instruction_text():
    assert word_limit_instruction(25) == "Answer in at most 25 words."


# ----------------------------------------------------------------------------- statistics
def test_per_prompt_means_average_samples_of_a_prompt():
    got = per_prompt_means([("a", 1.0), ("b", 0.0), ("a", 0.0), ("b", 0.5), ("c", 1)])
    assert got == {"a": 0.5, "b": 0.25, "c": 1.0}
    assert list(got) == ["a", "b", "c"]


def test_bootstrap_mean_of_constant_values_has_a_zero_width_interval():
    e = bootstrap_mean([0.7] * 10, resamples=200)
    assert (e.mean, e.low, e.high, e.n) == (pytest.approx(0.7), pytest.approx(0.7), pytest.approx(0.7), 10)


def test_bootstrap_mean_interval_is_seeded_and_brackets_the_mean():
    import numpy as np

    x = np.random.default_rng(5).normal(0.3, 1.0, size=200)
    a = bootstrap_mean(x, resamples=4000, seed=1)
    b = bootstrap_mean(x, resamples=4000, seed=1)
    assert a == b
    assert a.low < a.mean < a.high
    # close to the normal-theory interval mean +- 1.96 sd / sqrt(n)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert a.high - a.low == pytest.approx(2 * half, rel=0.12)
    assert a.mean == pytest.approx(float(x.mean()))


def test_bootstrap_mean_hand_computed_case():
    # two values: every resample mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    e = bootstrap_mean([0.0, 1.0], resamples=20_000, seed=0)
    assert e.mean == 0.5 and e.low == 0.0 and e.high == 1.0
    assert e.as_dict() == {"mean": 0.5, "ci_low": 0.0, "ci_high": 1.0, "n": 2, "level": 0.95}
    assert e.fmt(2) == "0.50 [0.00, 1.00]" and e.fmt(1, signed=True) == "+0.5 [+0.0, +1.0]"
    assert not e.excludes_zero()


@pytest.mark.parametrize("bad", [[], [float("nan")], [[1.0, 2.0]]])
def test_bootstrap_mean_refuses_bad_input(bad):
    with pytest.raises(ValueError):
        bootstrap_mean(bad)


def test_paired_difference_removes_prompt_variance():
    import numpy as np

    rng = np.random.default_rng(0)
    base = {f"p{i}": float(v) for i, v in enumerate(rng.uniform(0, 1, size=40))}  # prompts differ a lot
    better = {k: v + 0.05 for k, v in base.items()}  # the same shift on every prompt
    d = paired_difference(better, base, resamples=1000)
    assert d.mean == pytest.approx(0.05) and d.low == pytest.approx(0.05) and d.high == pytest.approx(0.05)
    assert d.excludes_zero()
    # unpaired, the same shift is lost in the spread between prompts
    a, b = bootstrap_mean(list(better.values())), bootstrap_mean(list(base.values()))
    assert a.low < b.high


def test_paired_difference_hand_computed_and_order_free():
    a = {"x": 1.0, "y": 0.5, "z": 0.0}
    b = {"z": 0.0, "y": 0.25, "x": 0.5}  # same prompts, another order
    d = paired_difference(a, b, resamples=5000, seed=3)
    assert d.mean == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert d.low >= 0.0 and d.high <= 0.5 and d.n == 3


def test_paired_difference_refuses_different_prompt_sets():
    with pytest.raises(ValueError, match="prompts differ"):
        paired_difference({"a": 1.0, "b": 0.0}, {"a": 1.0, "c": 0.0})


# ----------------------------------------------------------------------------- the benchmark's configuration
def _benchmark():
    spec = importlib.util.spec_from_file_location("learning_benchmark", ROOT / "benchmarks" / "learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_overrides_load_into_a_valid_recipe_config(tmp_path):
    bench = _benchmark()
    args = bench.parse_args(["--out", str(tmp_path / "lc"), "--limit", "30", "--lr", "2e-5", "--epochs", "4"])
    cfg = bench.load_recipe_config(bench.recipe_overrides(args))
    assert cfg.name == "lc" and cfg.runs_dir == str(tmp_path)
    assert not cfg.sft.enabled and cfg.judge.kind == "function"
    assert cfg.judge.function == "selfalign.rewards.constraints:max_30_words"
    assert cfg.respond.system_prompt == "Answer in at most 30 words."
    assert cfg.dpo.learning_rate == 2e-5 and cfg.dpo.epochs == 4.0
    assert bench._yaml_float(1e-05) == "1.0e-05" and bench._yaml_float(5e-6) == "5.0e-06" and bench._yaml_float(0.1) == "0.1"
