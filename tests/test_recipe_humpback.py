"""The Instruction Backtranslation recipe end to end on the real embedded model, at tiny sizes."""

from __future__ import annotations

import json

import pytest

from conftest import shared_file
from selfalign.config import load_config
from selfalign.data.records import is_done, read_jsonl
from selfalign.recipes.humpback import run_humpback
from selfalign.recipes.humpback_config import HumpbackConfig

TINY = [
    "rounds=1",
    "corpus.max_segments=24",
    "backward.settings.max_steps=2",
    "backward.settings.per_device_batch_size=2",
    "backward.settings.max_length=384",
    "augment.max_new_tokens=40",
    "curate.k=3",
    "curate.max_new_tokens=24",
    "sft.max_steps=2",
    "sft.per_device_batch_size=2",
    "sft.max_length=384",
]


def _cfg(tmp_path, corpus, *extra):
    from importlib import resources

    path = resources.files("selfalign").joinpath("configs/humpback_demo.yaml")
    return load_config(HumpbackConfig, str(path), [f"runs_dir={tmp_path}", "name=hb", f"corpus.source={corpus}", *TINY, *extra])


@pytest.mark.slow
def test_one_round_on_the_embedded_model(tmp_path, embedded_model_dir):
    corpus = shared_file("web_text/ud_english_ewt_web_docs.jsonl")
    cfg = _cfg(tmp_path, corpus)
    result = run_humpback(cfg, show_progress=False)
    run = tmp_path / "hb"

    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert list(manifest) == ["corpus", "backward", "augment", "sft", "iter_1/curate", "iter_1/curated", "iter_1/sft"]
    assert all(s["status"] == "done" for s in manifest.values()), manifest
    for name in ("corpus", "augment", "iter_1/curate", "iter_1/curated"):
        assert is_done(run / f"{name}.jsonl"), name

    segments = list(read_jsonl(run / "corpus.jsonl"))
    assert len(segments) == 24
    augmented = list(read_jsonl(run / "augment.jsonl"))
    assert sorted(a["segment_id"] for a in augmented) == sorted(s["id"] for s in segments)
    written = [a for a in augmented if a["instruction"]]
    assert written, "the backward model wrote no usable instruction"
    assert all(a["dropped"] is None for a in written) and all(a["dropped"] for a in augmented if not a["instruction"])

    # every pair with an instruction was rated by M0 with a 1-5 expected rating
    ratings = list(read_jsonl(run / "iter_1" / "curate.jsonl"))
    assert len(ratings) == len(written)
    assert all(r["score"] is None or 1.0 <= r["score"] <= 5.0 for r in ratings)

    m = result.iterations[0]
    assert m["iteration"] == 1 and m["pairs_rated"] == len(written)
    assert m["corpus_segments_kept"] == 24 and m["instructions_generated"] == len(written)
    assert sum(m["curation_score_histogram"].values()) == len(written) - m["unrated_pairs"]
    curated = list(read_jsonl(run / "iter_1" / "curated.jsonl"))
    assert m["curated"] == len(curated) == m["curated_by_k"][">=3"]
    assert m["sft_examples"] == manifest["iter_1/sft"]["counts"]["examples"] == 48 + len(curated)
    assert m["sft_loss_first"] is not None
    assert json.loads((run / "iter_1" / "metrics.json").read_text()) == m

    assert result.final_model == run / "iter_1" / "model" and (result.final_model / "config.json").is_file()
    assert (run / "backward" / "model" / "config.json").is_file() and (run / "sft" / "model" / "config.json").is_file()
    info = json.loads((run / "inference.json").read_text())
    assert info["system_prompt"] == cfg.tagging.seed_system

    # a rerun of the finished run does no work and reports the same round
    again = run_humpback(cfg, show_progress=False)
    assert again.iterations == result.iterations
