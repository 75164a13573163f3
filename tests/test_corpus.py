"""Unlabeled corpus loading for instruction backtranslation: reading, segmenting, filtering."""

from __future__ import annotations

import json
import random
import string
import time

import pytest
from conftest import shared_file
from pydantic import ValidationError

from selfalign.data.corpus import (
    REASONS,
    CorpusSettings,
    count_words,
    detokenize,
    load_corpus,
    near_duplicates,
    normalize_text,
    split_segments,
)
from selfalign.errors import DataError

# 60 distinct-ish words of plain prose, written for these tests
BASE = (
    "The old lighthouse keeper climbed the narrow stairs every evening before sunset, carrying a small "
    "lamp and a notebook where he wrote down the colour of the sea, the direction of the wind and the "
    "names of the boats that passed close to the rocks. Over forty years his notes grew into a quiet "
    "record of weather, trade and patience."
)
OTHER = (
    "Sourdough bread needs three things: flour, water and time. Mix the starter with warm water, add the "
    "flour slowly and leave the dough covered overnight in a cool kitchen. In the morning fold it gently, "
    "shape a round loaf and bake it hot in a heavy pot until the crust sings when you tap it."
)


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(n))


def sentence(n: int, seed: int) -> str:
    return words(n, seed).capitalize() + "."


def settings(source, **kw) -> CorpusSettings:
    return CorpusSettings(source=str(source), **kw)


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def check_stats(stats) -> None:
    assert stats.segments == stats.kept + sum(stats.dropped.values())
    assert set(stats.dropped) <= set(REASONS)


# --------------------------------------------------------------------------- normalisation


def test_normalize_whitespace_and_unicode():
    raw = "\ufeff  Caf\u0065\u0301\tau  lait \u00a0 ok  \r\n   second\u200b line  \r\n\r\n\r\n\n  next   para \n\n\n"
    assert normalize_text(raw) == "Caf\u00e9 au lait ok\nsecond line\n\nnext para"
    assert normalize_text(" \n\t\n ") == ""
    assert count_words("Caf\u00e9 au lait ok\nsecond line\n\nnext para") == 8
    assert count_words("") == 0


def test_detokenize_fixes_tokenizer_spacing():
    assert detokenize("tampa bay , I will do n't go ( see it ) .") == "tampa bay, I will don't go (see it)."
    assert detokenize("Really ?! Yes !! it 's 90 % sure ; ok : fine ...") == "Really?! Yes!! it's 90% sure; ok: fine..."
    assert detokenize("I CA N'T [ x ]") == "I CAN'T [x]"


def test_detokenize_leaves_normal_text_alone():
    for text in (
        "sad :( but then happy :) and winking ;) at the end",
        "a value of .5 and 'quoted words' stay, as do $ 3 and - dashes",
        "Plain text, with normal punctuation. (Even brackets.) Fine!",
        "A list:\n- first\n- [ ] not done\n- [x] done ( )",
    ):
        assert detokenize(text) == text


def test_detokenize_setting():
    raw = "where can I get morcillas in tampa bay , I will like the argentinian type ."
    assert normalize_text(raw, detokenize_text=True).endswith("bay, I will like the argentinian type.")
    assert normalize_text(raw) == raw


# --------------------------------------------------------------------------- segmentation


def test_paragraphs_are_packed_up_to_max_words():
    paras = [words(30, seed=i) for i in range(5)]
    segs = split_segments("\n\n".join(paras), "paragraph", max_words=100)
    assert [count_words(s) for s in segs] == [90, 60]  # 150 words -> about equal halves
    assert segs[0] == "\n\n".join(paras[:3])
    assert segs[1] == "\n\n".join(paras[3:])


def test_small_tail_joins_the_previous_segment_when_it_fits():
    text = "\n\n".join([words(70, 1), words(75, 2), words(2, 3)])
    assert [count_words(s) for s in split_segments(text, "paragraph", 80)] == [70, 77]


def test_long_paragraph_is_split_at_sentence_ends():
    sentences = [sentence(15, seed=i) for i in range(10)]
    text = words(10, 99) + "\n\n" + " ".join(sentences)  # a short paragraph, then a 150-word one
    segs = split_segments(text, "paragraph", max_words=40)
    assert all(count_words(s) <= 40 for s in segs)
    assert all(s.endswith(".") for s in segs[1:])
    assert " ".join(" ".join(segs).split()) == " ".join(text.split())  # nothing lost or reordered


def test_single_overlong_sentence_stays_whole():
    segs = split_segments(words(50, 1), "paragraph", max_words=20)
    assert len(segs) == 1 and count_words(segs[0]) == 50


def test_document_mode_keeps_documents_whole(tmp_path):
    text = "\n\n".join(words(30, i) for i in range(5))
    assert split_segments(text, "document", 100) == [text]
    src = tmp_path / "c.jsonl"
    write_jsonl(src, [{"id": "a", "text": text}])
    segs, stats = load_corpus(settings(src, segment="document", max_words=100))
    assert (stats.segments, stats.kept, stats.dropped["too_long"]) == (1, 0, 1)
    segs, stats = load_corpus(settings(src, segment="paragraph", max_words=100))
    assert stats.kept == 2 and [s["segment_index"] for s in segs] == [0, 1]


# --------------------------------------------------------------------------- filters


def test_exact_duplicates_dropped_first_kept(tmp_path):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, [
        {"id": "a", "text": BASE},
        {"id": "b", "text": BASE.upper()},
        {"id": "c", "text": BASE.replace(" ", "   ").replace(", ", ",\n")},
        {"id": "d", "text": OTHER},
    ])
    segs, stats = load_corpus(settings(src, near_duplicate_threshold=None))
    assert [s["doc_id"] for s in segs] == ["a", "d"]
    assert stats.dropped["duplicate"] == 2
    check_stats(stats)


def test_near_duplicate_one_word_changed_is_dropped(tmp_path):
    assert count_words(BASE) == 60
    tokens = BASE.split()
    tokens[30] = "giant"  # one word in the middle: 5 of 56 shingles differ, Jaccard ~0.84
    near = " ".join(tokens)
    src = tmp_path / "c.jsonl"
    write_jsonl(src, [{"id": "a", "text": BASE}, {"id": "b", "text": near}, {"id": "c", "text": OTHER}])
    segs, stats = load_corpus(settings(src))
    assert [s["doc_id"] for s in segs] == ["a", "c"]
    assert stats.dropped["near_duplicate"] == 1
    segs, stats = load_corpus(settings(src, near_duplicate_threshold=None))
    assert stats.kept == 3
    segs, stats = load_corpus(settings(src, near_duplicate_threshold=1.0))
    assert stats.kept == 3


def test_near_duplicates_uses_exact_jaccard():
    base = words(60, 7).split()
    # change every 6th word: Jaccard of 5-word shingles far below 0.8
    far = [w if i % 6 else "zzz" for i, w in enumerate(base)]
    close = base[:-1] + ["changed"]  # only the last shingle differs
    mask = near_duplicates([" ".join(base), " ".join(far), " ".join(close), " ".join(base)])
    assert mask.tolist() == [False, False, True, True]
    assert near_duplicates([" ".join(base)]).tolist() == [False]


def test_near_duplicates_recall_at_scale():
    rng = random.Random(3)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(5000)]
    texts, planted, originals = [], set(), []
    for i in range(5000):
        if i >= 50 and i % 25 == 0:  # a copy of an earlier (100+ word) text with one word replaced
            toks = texts[rng.choice(originals)].split()
            toks[rng.randrange(len(toks))] = "replaced"
            texts.append(" ".join(toks))
            planted.add(i)
        else:
            texts.append(" ".join(rng.choices(vocab, k=rng.randint(100, 150))))
            originals.append(i)
    start = time.perf_counter()
    mask = near_duplicates(texts, 0.8)
    assert set(mask.nonzero()[0].tolist()) == planted
    assert time.perf_counter() - start < 30  # generous: well under a second on an idle machine


def test_length_bounds_and_not_text(tmp_path):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, [
        {"id": "short", "text": words(19, 1)},
        {"id": "edge_low", "text": words(20, 2)},
        {"id": "edge_high", "text": words(40, 3)},
        {"id": "long", "text": words(41, 4)},  # one sentence: cannot be split, too long
        {"id": "table", "text": "Feb-02 P 6,363,217 -$ 250,393 " * 5},
        {"id": "empty", "text": " \n\n \t "},
    ])
    segs, stats = load_corpus(settings(src, min_words=20, max_words=40))
    assert [s["doc_id"] for s in segs] == ["edge_low", "edge_high"]
    assert all(20 <= s["words"] <= 40 and s["words"] == count_words(s["text"]) for s in segs)
    assert {k: v for k, v in stats.dropped.items() if v} == {"too_short": 1, "too_long": 1, "not_text": 1, "empty": 1}
    assert (stats.documents, stats.segments, stats.kept) == (6, 6, 2)
    check_stats(stats)
    assert stats.as_dict() == {
        "documents": 6, "segments": 6, "kept": 2,
        "dropped": {"empty": 1, "not_text": 1, "too_short": 1, "too_long": 1, "duplicate": 0,
                    "near_duplicate": 0, "max_segments": 0},
    }
    assert "kept 2" in stats.summary()


def test_max_segments_keeps_the_first(tmp_path):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, [{"id": str(i), "text": words(30, i)} for i in range(10)])
    segs, stats = load_corpus(settings(src, max_segments=4))
    assert [s["doc_id"] for s in segs] == ["0", "1", "2", "3"]
    assert stats.dropped["max_segments"] == 6
    check_stats(stats)


# --------------------------------------------------------------------------- input formats


def test_txt_file_is_one_document(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text(BASE + "\n\n" + OTHER + "\n", encoding="utf-8")
    segs, stats = load_corpus(settings(src))
    assert stats.documents == 1 and stats.kept == 1
    assert segs[0]["doc_id"] == "notes.txt" and segs[0]["meta"] == {"source_file": "notes.txt"}
    assert segs[0]["text"] == BASE + "\n\n" + OTHER
    segs, stats = load_corpus(settings(src, max_words=80))
    assert [s["text"] for s in segs] == [BASE, OTHER]


def test_txt_blank_line_and_line_documents(tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text(f"{BASE}\n\n\n{OTHER}\n", encoding="utf-8")
    segs, stats = load_corpus(settings(src, txt_documents="blank_line"))
    assert [s["doc_id"] for s in segs] == ["docs.txt:1", "docs.txt:4"]
    assert segs[1]["meta"] == {"source_file": "docs.txt", "line": 4}
    segs, stats = load_corpus(settings(src, txt_documents="line"))
    assert stats.documents == 2 and [s["doc_id"] for s in segs] == ["docs.txt:1", "docs.txt:4"]


def test_txt_directory_read_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text(OTHER, encoding="utf-8")
    (tmp_path / "a.txt").write_text(BASE, encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text(words(30, 5), encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    segs, stats = load_corpus(settings(tmp_path))
    assert [s["doc_id"] for s in segs] == ["a.txt", "b.txt", "sub/c.txt"]
    assert stats.documents == 3


def test_jsonl_custom_field_and_metadata(tmp_path):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, [
        {"id": 7, "body": BASE, "genre": "blog", "text": "not this one"},
        {"body": OTHER, "genre": "recipe"},
    ])
    segs, _ = load_corpus({"source": str(src), "text_field": "body"})
    assert [s["doc_id"] for s in segs] == ["7", "c.jsonl#2"]
    assert segs[0]["meta"] == {"genre": "blog", "text": "not this one"}
    assert segs[0]["text"] == BASE
    rec = segs[1]
    assert set(rec) == {"id", "kind", "doc_id", "segment_index", "text", "words", "meta"}
    assert rec["kind"] == "segment" and rec["words"] == count_words(OTHER)


def test_hf_dataset_dir_and_object(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "id": ["x1", "x2", "x3"],
        "content": [BASE, OTHER, BASE],
        "genre": ["a", "b", "c"],
    })
    ds.save_to_disk(str(tmp_path / "ds"))
    segs, stats = load_corpus(settings(f"hf:{tmp_path / 'ds'}", text_field="content"))
    assert [s["doc_id"] for s in segs] == ["x1", "x2"]
    assert segs[1]["meta"] == {"genre": "b"}
    assert stats.dropped["duplicate"] == 1
    with pytest.raises(DataError, match="needs the prefix hf:"):
        load_corpus(settings(tmp_path / "ds", text_field="content"))
    segs, _ = load_corpus(settings("in-memory", text_field="content"), dataset=ds)
    assert [s["doc_id"] for s in segs] == ["x1", "x2"]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    segs, _ = load_corpus(settings(f"hf:{tmp_path / 'dd'}", text_field="content", hf_split="test"))
    assert [s["doc_id"] for s in segs] == ["x2"]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_corpus(settings(f"hf:{tmp_path / 'dd'}", text_field="content", hf_split="validation"))


def test_hf_bad_input(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [BASE, None, OTHER]})
    with pytest.raises(DataError, match=r"row 1: field 'text': expected a string, got NoneType"):
        load_corpus(settings("mem"), dataset=ds)
    with pytest.raises(DataError, match=r"field 'body' is missing \(columns: text\)"):
        load_corpus(settings("mem", text_field="body"), dataset=ds)
    with pytest.raises(DataError, match="not found"):
        load_corpus(settings(f"hf:{tmp_path / 'nope'}"))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "x", "body": "hello"}', r"c\.jsonl:2: field 'text': missing"),
        ('{"id": "x", "text": 5}', r"c\.jsonl:2: field 'text': Input should be a valid string \(got 5\)"),
        ('{"id": "x", "text": null}', r"c\.jsonl:2: field 'text': Input should be a valid string"),
        ('{"id": "x", "text": "unterminated}', r"c\.jsonl:2: invalid JSON"),
        ('["not", "an", "object"]', r"c\.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, line, message):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"id": "ok", "text": BASE}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_corpus(settings(src))


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        load_corpus(settings(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported corpus file type '.csv'"):
        load_corpus(settings(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        load_corpus(settings(tmp_path / "empty"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        load_corpus(settings(tmp_path / "latin1.txt"))


def test_settings_validation():
    with pytest.raises(ValidationError, match="min_words"):
        CorpusSettings(source="x.txt", min_words=50, max_words=40)
    with pytest.raises(ValidationError, match="extra"):
        CorpusSettings(source="x.txt", min_word=5)
    with pytest.raises(ValidationError):
        CorpusSettings(source="x.txt", segment="sentence")
    s = CorpusSettings(source="x.txt")
    assert (s.segment, s.min_words, s.max_words, s.near_duplicate_threshold, s.detokenize) == (
        "paragraph", 20, 400, 0.8, True
    )


# --------------------------------------------------------------------------- ids


def test_ids_are_stable_and_unique(tmp_path):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, [{"id": f"d{i}", "text": "\n\n".join(words(25, 10 * i + j) for j in range(4))} for i in range(5)])
    first, _ = load_corpus(settings(src, max_words=60))
    again, _ = load_corpus(settings(src, max_words=60))
    assert [s["id"] for s in first] == [s["id"] for s in again]
    assert len({s["id"] for s in first}) == len(first) == 10
    other, _ = load_corpus(settings(src, max_words=120))  # other segments, other ids
    assert not {s["id"] for s in other} & {s["id"] for s in first}


# --------------------------------------------------------------------------- the real corpus


def test_real_web_corpus():
    src = shared_file("web_text/ud_english_ewt_web_docs.jsonl")
    start = time.perf_counter()
    segs, stats = load_corpus(settings(src))
    seconds = time.perf_counter() - start
    print(f"\n{stats.summary()} in {seconds:.2f}s\n{json.dumps(stats.as_dict())}")
    assert stats.documents == 1174
    check_stats(stats)
    assert stats.kept > 500
    assert all(20 <= s["words"] <= 400 for s in segs)
    assert len({" ".join(s["text"].lower().split()) for s in segs}) == len(segs)
    assert len({s["id"] for s in segs}) == len(segs)
    assert {"genre", "source_file"} <= set(segs[0]["meta"])
    assert not any(" , " in s["text"] for s in segs)  # detokenized
    assert seconds < 20  # well under a second on an idle machine
