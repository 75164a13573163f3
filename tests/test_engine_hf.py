"""The hf engine: batching, shared prefill, stop strings, lengths, seeds, streaming."""

from __future__ import annotations

import pytest
import torch

from selfalign.engines.base import GenerationRequest, SamplingParams
from selfalign.engines.hf import HFEngine

PROMPTS = [
    "Name a colour.",
    "Write one sentence about the sea, the wind and the long grey beaches of the north.",
    "What is two plus two?",
    "List three fruits that are red, and say which of them you like best and why.",
    "Say hello.",
]
# a long prefix every prompt shares, like a judge rubric
RUBRIC = "Grade the answer below with the five-point checklist: relevance, coverage, use, clarity, depth. " * 3


def _reqs(params: SamplingParams, prompts=PROMPTS):
    return [GenerationRequest.chat(f"r{i}", [{"role": "user", "content": p}], params) for i, p in enumerate(prompts)]


def _texts(engine, reqs):
    return {r.request.id: [s.text for s in r.samples] for r in engine.generate(reqs)}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return HFEngine(tiny_model_dir, dtype="float32", max_batch_size=16)


@pytest.fixture(scope="module")
def real_fp32(embedded_model_dir):
    return HFEngine(embedded_model_dir, dtype="float32", max_batch_size=16)


class ForwardSpy:
    """Records the (batch, length) of every forward call of a model."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self._h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))

    def remove(self):
        self._h.remove()


def test_every_request_gets_n_samples_with_indices(tiny):
    reqs = _reqs(SamplingParams(n=3, temperature=0.8, max_new_tokens=6, seed=1))
    results = list(tiny.generate(reqs))
    assert sorted(r.request.id for r in results) == sorted(r.id for r in reqs)
    for r in results:
        assert [s.index for s in r.samples] == [0, 1, 2]
        assert all(0 < s.completion_tokens <= 6 for s in r.samples if s.finish_reason == "length")
        assert r.prompt_tokens > 5


def test_n_samples_share_one_prefill(tiny):
    spy = ForwardSpy(tiny.model)
    try:
        list(tiny.generate(_reqs(SamplingParams(n=4, temperature=1.0, max_new_tokens=3, seed=0), PROMPTS[:2])))
    finally:
        spy.remove()
    prefills = [s for s in spy.shapes if s[1] > 1]
    decodes = [s for s in spy.shapes if s[1] == 1]
    # the chat template's shared prefix once for one row, then each prompt's rest: never a row per sample
    assert prefills[0][0] == 1 and sum(b for b, _ in prefills[1:]) == 2
    assert decodes[0] == (8, 1)  # then 2 x 4 sample rows decode one token at a time


def test_shared_prefix_and_length_chunks_give_the_one_by_one_text(tiny_model_dir, tiny):
    # prompts share the chat template's system turn; their other lengths differ enough to prefill in chunks
    prompts = ["Hi.", *PROMPTS, "Tell me, in detail and with examples, " * 6 + "why the sky is blue."]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    spy = ForwardSpy(tiny.model)
    try:
        together = _texts(tiny, _reqs(greedy, prompts))
    finally:
        spy.remove()
    prefills = [s for s in spy.shapes if s[1] > 1]
    assert prefills[0][0] == 1 and len(prefills) >= 3  # one shared prefix, then at least two suffix chunks
    assert sum(b for b, _ in prefills[1:]) == len(prompts)
    one_by_one = _texts(HFEngine(tiny_model_dir, dtype="float32", max_batch_size=1), _reqs(greedy, prompts))
    assert together == one_by_one


def test_prefill_with_shared_prefix_and_chunks_matches_each_prompt_alone(tiny):
    prompts = ["Hi.", *PROMPTS, "Tell me, in detail and with examples, " * 6 + "why the sky is blue."]
    reqs = _reqs(SamplingParams(max_new_tokens=4), prompts)
    (batch,) = tiny._plan([(i, r, tiny.encode(r)) for i, r in enumerate(reqs)])
    with torch.inference_mode():
        cache, logits, mask, next_pos, _layout = tiny._prefill([j.prompt_ids for j in batch], 4)
        step = logits.argmax(-1)  # then one decode step on the shared cache
        mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
        out = tiny.model(input_ids=step[:, None], attention_mask=mask, position_ids=next_pos[:, None], **{tiny.cache_kwarg: cache}, use_cache=True)
        for row, job in enumerate(batch):
            alone = tiny.model(input_ids=torch.tensor([[*job.prompt_ids, int(step[row])]])).logits[0, -2:]
            assert torch.allclose(logits[row], alone[0], atol=1e-4), job.request.id
            assert torch.allclose(out.logits[row, -1], alone[1], atol=1e-4), job.request.id
    assert next_pos.tolist() == [len(j.prompt_ids) for j in batch]


def _shared_decode_calls(monkeypatch):
    """Record every start_shared_decode call of the engine: (prompt rows kept, sample rows)."""
    import selfalign.engines.hf as hf_mod

    calls, real = [], hf_mod.start_shared_decode

    def spy(cache, shared, width, owner, capacity, suffix_valid):
        real(cache, shared, width, owner, capacity, suffix_valid)
        layer = cache.layers[0]
        calls.append({"prompts": layer.sk.shape[0], "rows": layer._k.shape[0], "prefix": shared,
                      "prefix_rows": None if layer.pk is None else layer.pk.dim()})

    monkeypatch.setattr(hf_mod, "start_shared_decode", spy)
    return calls


def test_shared_decode_keeps_prompts_once_and_gives_the_text_of_repeated_rows(tiny_model_dir, monkeypatch):
    # a long common prefix (like a judge rubric), prompts of different lengths, different n per request
    # (so prompts have different numbers of rows) and different max_new_tokens (rows finish at different
    # steps: pruning, and prompts whose samples are all done leave the batch). Greedy: the tiny random
    # model's next-token distributions are nearly flat, so a sampled token can flip on a rounding
    # difference; test_shared_decode_step_matches_attention_over_the_whole_row checks the logits.
    reqs = [
        GenerationRequest.chat(f"r{i}", [{"role": "user", "content": RUBRIC + p}],
                               SamplingParams(n=1 + i % 3, temperature=0.0, max_new_tokens=3 + 4 * i))
        for i, p in enumerate(PROMPTS)
    ]
    calls = _shared_decode_calls(monkeypatch)
    shared = _texts(HFEngine(tiny_model_dir, dtype="float32", max_batch_size=16), reqs)
    assert calls == [{"prompts": 5, "rows": 1 + 2 + 3 + 1 + 2, "prefix": calls[0]["prefix"], "prefix_rows": 3}]
    assert calls[0]["prefix"] > 60  # the rubric is read from one copy
    repeated = _texts(HFEngine(tiny_model_dir, dtype="float32", max_batch_size=16, shared_decode=False), reqs)
    assert shared == repeated
    assert [len(shared[f"r{i}"]) for i in range(5)] == [1, 2, 3, 1, 2]
    one_by_one = _texts(HFEngine(tiny_model_dir, dtype="float32", max_batch_size=1), reqs)  # no common prefix at all
    assert shared == one_by_one


@pytest.mark.parametrize("prefix_apart", [False, True])
def test_shared_decode_step_matches_attention_over_the_whole_row(tiny, prefix_apart):
    prompts = ["Hi.", *PROMPTS]
    reqs = _reqs(SamplingParams(n=2, max_new_tokens=4), prompts)
    (batch,) = tiny._plan([(i, r, tiny.encode(r)) for i, r in enumerate(reqs)])
    from selfalign.engines.kvcache import select_rows, start_shared_decode

    with torch.inference_mode():
        cache, logits, mask, next_pos, (shared, width) = tiny._prefill([j.prompt_ids for j in batch], 0, prefix_apart=prefix_apart)
        assert shared > 0 and (cache.layers[0].pk is not None) == prefix_apart
        if prefix_apart:  # the rows hold [gap | suffix] only
            assert cache.layers[0]._k.shape[2] == width
        for row, job in enumerate(batch):  # the prefill's last-token logits are those of the prompt alone
            alone = tiny.model(input_ids=torch.tensor([job.prompt_ids])).logits[0, -1]
            assert torch.allclose(logits[row], alone, atol=1e-4)
        owner = torch.arange(len(batch)).repeat_interleave(2)
        start_shared_decode(cache, shared, width, owner, 4, mask[:, shared:].bool())
        mask, next_pos = mask[owner], next_pos[owner]
        history = [[*batch[int(o)].prompt_ids] for o in owner]
        for step in range(3):
            tok = torch.arange(len(owner)) * 7 + 11 * step  # a different token per row
            mask = torch.cat([mask, mask.new_ones((len(owner), 1))], dim=1)
            out = tiny.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None], **{tiny.cache_kwarg: cache}, use_cache=True)
            next_pos = next_pos + 1
            for r in range(len(owner)):
                history[r].append(int(tok[r]))
                alone = tiny.model(input_ids=torch.tensor([history[r]])).logits[0, -1]
                assert torch.allclose(out.logits[r, -1], alone, atol=1e-4), (step, r)
            if step == 0:  # drop rows: prompt 0 entirely, one sample of prompt 2
                keep = torch.tensor([r for r in range(len(owner)) if owner[r] != 0 and r != 5])
                select_rows(cache, keep)
                owner, mask, next_pos = owner[keep], mask[keep], next_pos[keep]
                history = [history[int(r)] for r in keep]
                assert cache.layers[0].sk.shape[0] == len(batch) - 1  # prompt 0's suffix is gone


def test_shared_rows_layout():
    from selfalign.engines.kvcache import SharedRows

    owner = torch.tensor([0, 0, 2, 1, 2, 2])
    valid = torch.tensor([[True, True], [False, True], [True, True]])
    plan = SharedRows(owner, valid)
    assert plan.kmax == 3
    assert plan.slot.tolist() == [[0, 1, 6], [3, 6, 6], [2, 4, 5]]  # 6 = the padding row
    assert plan.slot.view(-1)[plan.rowpos].tolist() == list(range(6))
    assert plan.suffix_bias[3, 0, 0].tolist() == [float("-inf"), 0.0]


def test_batches_respect_max_batch_size_and_are_length_sorted(tiny_model_dir):
    eng = HFEngine(tiny_model_dir, dtype="float32", max_batch_size=4)
    spy = ForwardSpy(eng.model)
    try:
        results = list(eng.generate(_reqs(SamplingParams(n=2, temperature=0.0, max_new_tokens=2))))
    finally:
        spy.remove()
    assert len(results) == len(PROMPTS)
    prefills = [s for s in spy.shapes if s[1] > 1]
    assert all(b * 2 <= 4 for b, _ in prefills)
    decodes = [b for b, w in spy.shapes if w == 1]
    assert max(decodes) <= 4
    reqs = _reqs(SamplingParams(n=2, max_new_tokens=2))
    batches = eng._plan([(i, r, eng.encode(r)) for i, r in enumerate(reqs)])
    lengths = [len(j.prompt_ids) for b in batches for j in b]
    assert lengths == sorted(lengths, reverse=True)  # longest prompts first
    assert all(sum(len(j.sample_indices) for j in b) <= 4 for b in batches)


def test_results_stream_before_later_batches_run(tiny_model_dir):
    eng = HFEngine(tiny_model_dir, dtype="float32", max_batch_size=1)
    spy = ForwardSpy(eng.model)
    try:
        gen = eng.generate(_reqs(SamplingParams(temperature=0.0, max_new_tokens=2)))
        first = next(gen)
        prefills_so_far = sum(1 for s in spy.shapes if s[1] > 1)
        rest = list(gen)
    finally:
        spy.remove()
    assert first.samples and prefills_so_far == 1
    assert len(rest) == len(PROMPTS) - 1


def test_same_seed_same_text_and_other_seed_differs(tiny_model_dir, tiny):
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7)
    a = _texts(tiny, _reqs(params))
    b = _texts(HFEngine(tiny_model_dir, dtype="float32", max_batch_size=16), _reqs(params))
    assert a == b
    c = _texts(tiny, _reqs(SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=8)))
    assert c != a
    # the n samples of one request are different draws
    assert any(t[0] != t[1] for t in a.values())


def test_max_new_tokens_gives_length_finish(tiny):
    (res,) = tiny.generate(_reqs(SamplingParams(temperature=0.0, max_new_tokens=5), PROMPTS[:1]))
    s = res.samples[0]
    assert s.finish_reason in {"length", "stop"}
    if s.finish_reason == "length":
        assert s.completion_tokens == 5


def test_raw_prompt_requests(tiny):
    req = GenerationRequest(id="raw", prompt="Once upon a time", params=SamplingParams(temperature=0.0, max_new_tokens=4))
    (res,) = tiny.generate([req])
    assert res.prompt_tokens == len(tiny.tokenizer("Once upon a time", add_special_tokens=False)["input_ids"])


def test_prompt_longer_than_context_is_an_error_sample_not_a_crash(tiny):
    long = "word " * 3000
    reqs = _reqs(SamplingParams(temperature=0.0, max_new_tokens=4), [long, "Say hi."])
    results = {r.request.id: r for r in tiny.generate(reqs)}
    assert results["r0"].samples[0].finish_reason == "error"
    assert "context" in results["r0"].samples[0].error
    assert results["r1"].samples[0].finish_reason != "error"


def test_chat_without_template_is_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    from selfalign.errors import EngineError

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "chat_template.jinja").unlink()
    eng = HFEngine(d, dtype="float32")
    with pytest.raises(EngineError, match="no chat template"):
        list(eng.generate(_reqs(SamplingParams(max_new_tokens=2), PROMPTS[:1])))


# ---------------------------------------------------------------- real embedded model
@pytest.mark.slow
def test_stop_string_cuts_the_text_where_it_first_appears(real_fp32):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40)
    prompt = ["Write a short story about a cat who lives in a library."]
    (full,) = real_fp32.generate(_reqs(greedy, prompt))
    text = full.samples[0].text
    words = [w for w in text.replace(",", " ").split() if len(w) > 3]
    assert len(words) >= 3, text
    stop = words[2]
    cut = SamplingParams(temperature=0.0, max_new_tokens=40, stop=(stop,))
    (res,) = real_fp32.generate(_reqs(cut, prompt))
    s = res.samples[0]
    assert s.finish_reason == "stop"
    assert s.text == text[: text.find(stop)]
    assert s.completion_tokens < full.samples[0].completion_tokens


@pytest.mark.slow
def test_batching_does_not_change_greedy_text_in_fp32(real_fp32, embedded_model_dir):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    together = _texts(real_fp32, _reqs(greedy))
    one_by_one = _texts(HFEngine(embedded_model_dir, dtype="float32", max_batch_size=1), _reqs(greedy))
    assert together == one_by_one
    assert all(t[0].strip() for t in together.values())


@pytest.mark.slow
def test_real_model_answers_sensibly(real_fp32):
    (res,) = real_fp32.generate(_reqs(SamplingParams(temperature=0.0, max_new_tokens=12), ["What is the capital of France?"]))
    assert "Paris" in res.samples[0].text


def test_dtype_auto_follows_the_cpu(tiny_model_dir):
    from selfalign.models import cpu_has_native_bf16

    eng = HFEngine(tiny_model_dir, dtype="auto", device="cpu")
    assert eng.dtype == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert next(eng.model.parameters()).dtype == getattr(torch, eng.dtype)


def test_plan_bounds_kv_slots_and_counts_shared_prompts_once(tiny_model_dir):
    from selfalign.engines.kvcache import common_prefix

    reqs = [GenerationRequest.chat(f"r{i}", [{"role": "user", "content": RUBRIC + p}], SamplingParams(n=3, max_new_tokens=20))
            for i, p in enumerate(PROMPTS)]
    for shared in (True, False):
        eng = HFEngine(tiny_model_dir, dtype="float32", max_batch_size=64, max_batch_tokens=600, shared_decode=shared)
        assert eng._shares_prompts() is shared
        encoded = [(i, r, eng.encode(r)) for i, r in enumerate(reqs)]
        batches = eng._plan(encoded)
        assert sorted(j.req_pos for b in batches for j in b) == list(range(len(reqs)))
        for b in batches:
            longest, rows = max(len(j.prompt_ids) for j in b), sum(len(j.sample_indices) for j in b)
            if len(b) > 1:
                if shared:
                    s = common_prefix([j.prompt_ids for j in b])
                    assert s + len(b) * (longest - s) + rows * 20 <= 600
                else:
                    assert rows * (longest + 20) <= 600
        if shared:  # the rubric is held once and each prompt once for its 3 samples: everything fits in one batch
            assert len(batches) == 1
        else:  # each sample row holds its whole prompt (~110 tokens) and 20 new ones: one prompt's 3 rows a batch
            assert len(batches) == len(reqs)


@pytest.mark.parametrize("shared_decode", [True, False])
def test_next_token_probs_share_the_common_prefix_and_match_each_text_alone(tiny_model_dir, shared_decode):
    from selfalign.engines.base import Message
    from selfalign.engines.hf_inputs import assistant_prefix_text

    eng = HFEngine(tiny_model_dir, dtype="float32", max_batch_size=16, shared_decode=shared_decode)
    prompts = [((Message("user", RUBRIC + p),), f"Reasoning {i}. " * (1 + i) + "Score: ") for i, p in enumerate(PROMPTS)]
    digits = [str(d) for d in range(6)]
    spy = ForwardSpy(eng.model)
    try:
        got = eng.next_token_probs(prompts, digits)
    finally:
        spy.remove()
    assert spy.shapes[0][0] == 1 and spy.shapes[0][1] > 60  # the rubric once, for one row
    assert sum(b for b, _ in spy.shapes[1:]) == len(prompts)  # then each text's rest
    with torch.inference_mode():
        for (messages, prefix), probs in zip(prompts, got):
            enc, cand = eng._prefix_and_candidates(assistant_prefix_text(eng.tokenizer, messages, prefix), digits)
            alone = torch.softmax(eng.model(input_ids=torch.tensor([enc])).logits[0, -1].float(), -1)
            assert probs == pytest.approx([float(alone[c]) for c in cand], abs=1e-6)


def test_generation_and_next_token_probs_emit_no_future_warning(tiny):
    """transformers 5.x warns (FutureWarning) on every forward given ``past_key_values``; the engine
    passes its KV cache under the keyword the model's forward declares (``cache`` there)."""
    import warnings

    assert tiny.cache_kwarg == "cache"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # not deduplicated by an earlier test's warning
        texts = _texts(tiny, _reqs(SamplingParams(n=2, temperature=0.8, max_new_tokens=4, seed=0), PROMPTS[:3]))
        probs = tiny.next_token_probs([([{"role": "user", "content": "A or B?"}], "Winner: ")], ["A", "B"])
    assert len(texts) == 3 and len(probs[0]) == 2
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []


def test_cache_keyword_falls_back_for_models_without_a_cache_parameter():
    from selfalign.engines.hf import cache_keyword

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            return input_ids

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"
