"""ROUGE-L: exact agreement with the rouge-score package, and RougeFilter decisions."""

from __future__ import annotations

import json
import random

import pytest

from selfalign.stages import rouge as rouge_mod
from selfalign.stages.rouge import RougeFilter, lcs_fmeasure, rouge_l, rouge_tokenize

# (reference, candidate, expected F) - worked out by hand, always run
HAND_PAIRS: list[tuple[str, str, float]] = [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat sat on the mat", "the cat on the mat", 10 / 11),  # lcs 5: P=1, R=5/6
    ("The Cat SAT!", "the cat sat", 1.0),  # case and punctuation do not matter
    ("a b c d", "d c b a", 2 * (1 / 4) * (1 / 4) / (1 / 4 + 1 / 4)),  # lcs 1
    ("", "", 0.0),
    ("", "anything at all", 0.0),
    ("some words", "", 0.0),
    ("?!... ---", "?!... ---", 0.0),  # punctuation only: no tokens
    ("alpha beta", "gamma delta", 0.0),
    ("café au lait", "caf au lait", 1.0),  # é separates tokens: caf, au, lait
    ("naïve", "na ve", 1.0),
    ("日本語のテキスト", "中文文本", 0.0),  # no [a-z0-9] at all
    ("pi is 3.14159", "pi is 3 14159", 1.0),
    ("version 2.0 released in 2024", "released 2024 version 2", 0.4),  # 6 vs 4 tokens, lcs 2
    ("snake_case and kebab-case", "snake case and kebab case", 1.0),
    ("tabs\tand\nnewlines", "tabs and newlines", 1.0),
]


def test_tokenizer():
    assert rouge_tokenize("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]
    assert rouge_tokenize("") == [] and rouge_tokenize("  ...  ") == []
    assert rouge_tokenize("Ünïcödé") == ["n", "c", "d"]
    assert rouge_tokenize("\u212a") == ["k"]  # KELVIN SIGN lowercases to ASCII k, as in rouge-score


@pytest.mark.parametrize("ref,cand,expected", HAND_PAIRS)
def test_hand_pairs(ref, cand, expected):
    assert rouge_l(ref, cand) == pytest.approx(expected, abs=1e-12)
    assert rouge_l(cand, ref) == rouge_l(ref, cand)  # symmetric, bit for bit


def test_lcs_fmeasure_edges():
    assert lcs_fmeasure(0, 3, 4) == 0.0
    assert lcs_fmeasure(2, 0, 4) == 0.0
    assert lcs_fmeasure(3, 3, 3) == 1.0


# ---- agreement with rouge-score on real prompts --------------------------------------------


def _drop_words(text: str, rng: random.Random, keep: float) -> str:
    return " ".join(w for w in text.split() if rng.random() < keep)


@pytest.fixture(scope="module")
def real_prompts() -> list[str]:
    from conftest import shared_file

    oasst = [json.loads(line) for line in shared_file("oasst/oasst_prompt_lottery_en_250.jsonl").open(encoding="utf-8")]
    alpaca = [d["instruction"] for d in json.loads(shared_file("alpaca_eval/alpaca_eval_805_ref_gpt4_1106_preview.json").read_text(encoding="utf-8"))]
    return oasst + alpaca


@pytest.fixture(scope="module")
def real_pairs(real_prompts) -> list[tuple[str, str]]:
    oasst, alpaca = real_prompts[:250], real_prompts[250:]
    rng = random.Random(1234)
    pairs = list(zip(oasst, alpaca))  # unrelated prompts: low scores
    pairs += list(zip(alpaca[:-1:4], alpaca[1::4]))
    # near duplicates around the 0.7 threshold: the same prompt with some words dropped
    for text in rng.sample(real_prompts, 200):
        pairs.append((text, _drop_words(text, rng, rng.choice([0.5, 0.7, 0.8, 0.9]))))
    return pairs


def test_agrees_with_rouge_score(real_pairs):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed (pip install rouge-score)")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = real_pairs + [(r, c) for r, c, _ in HAND_PAIRS]
    assert len(pairs) >= 300
    above = below = 0
    for ref, cand in pairs:
        want = scorer.score(ref, cand)["rougeL"].fmeasure
        got = rouge_l(ref, cand)
        assert abs(got - want) <= 1e-9, (ref, cand, got, want)
        assert (got < 0.7) == (want < 0.7)
        above += want >= 0.7
        below += 0 < want < 0.7
    assert above >= 20 and below >= 20  # both sides of the threshold are exercised


def test_filter_decisions_match_rouge_score(real_prompts):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed (pip install rouge-score)")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(7)
    pool = real_prompts[:300]
    cands = real_prompts[300:400] + [_drop_words(t, rng, rng.choice([0.6, 0.8, 0.95])) for t in rng.sample(pool, 100)]
    flt = RougeFilter(0.7, pool)
    rejected = 0
    for cand in cands:
        scores = [scorer.score(p, cand)["rougeL"].fmeasure for p in pool]
        best = max(scores)
        score, idx = flt.max_score(cand)
        assert abs(score - best) <= 1e-9 and scores[idx] == best
        assert flt.accepts(cand) == (best < 0.7)
        rejected += best >= 0.7
    assert 20 <= rejected <= 180


def test_sequential_offer_matches_rouge_score(real_prompts):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed (pip install rouge-score)")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(3)
    stream = []
    for t in real_prompts[:150]:
        stream.append(t)
        if rng.random() < 0.5:
            stream.append(_drop_words(t, rng, 0.8))
    kept_ref: list[str] = []
    for t in stream:
        if all(scorer.score(p, t)["rougeL"].fmeasure < 0.7 for p in kept_ref):
            kept_ref.append(t)
    flt = RougeFilter(0.7)
    kept = [t for t in stream if flt.offer(t)]
    assert kept == kept_ref == flt.texts
    assert len(kept) < len(stream)


# ---- RougeFilter against brute force (always runs) ----------------------------------------


def _random_texts(rng: random.Random, n: int) -> list[str]:
    words = ["a", "b", "c", "d", "e", "A", "b!", "c,", "..."]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(n)]


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("wide", [False, True])
def test_filter_matches_brute_force(threshold, wide, monkeypatch):
    if wide:  # force the tuple-of-ints encoding used past ~1.1M distinct tokens
        monkeypatch.setattr(rouge_mod, "_MAX_CODE_IDS", 3)
    rng = random.Random(int(threshold * 100) + wide)
    pool = _random_texts(rng, 120)
    flt = RougeFilter(threshold, pool)
    assert flt._wide is wide
    for cand in _random_texts(rng, 150) + ["", "zzz unknown words", pool[5]]:
        scores = [rouge_l(p, cand) for p in pool]
        best = max(scores)
        score, idx = flt.max_score(cand)
        assert score == best and idx == scores.index(best)
        first = next((i for i, s in enumerate(scores) if s >= threshold), None)
        match = flt.first_match(cand)
        if first is None:
            assert match is None and flt.accepts(cand)
        else:
            assert match == (scores[first], first) and not flt.accepts(cand)


def test_exact_threshold_is_rejected():
    flt = RougeFilter(0.5, ["x y"])
    assert rouge_l("x y", "x z") == 0.5
    assert not flt.accepts("x z")  # F >= threshold rejects
    assert flt.accepts("x z w")  # F = 0.4


def test_filter_basics():
    flt = RougeFilter()
    assert flt.threshold == 0.7 and len(flt) == 0
    assert flt.max_score("anything") == (0.0, None)
    assert flt.accepts("anything")
    assert flt.add("Write a poem about the sea.") == 0
    assert flt.add("Explain quantum tunnelling to a child.") == 1
    assert flt.max_score("write a POEM about the sea") == (1.0, 0)
    assert not flt.accepts("Write a poem about the sea!")
    assert flt.accepts("Write a limerick about a cat.")
    assert flt.max_score("") == (0.0, 0)
    assert flt.accepts("")  # no tokens scores 0, as in rouge-score
    n_vocab = len(flt._vocab)
    flt.accepts("entirely novel vocabulary here")
    assert len(flt._vocab) == n_vocab  # queries do not grow the vocabulary
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            RougeFilter(bad)
