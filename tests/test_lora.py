"""LoRA (issue 7, part 3): the merged model is exactly base + scale * B @ A, DPO with LoRA uses the
adapter-disabled base as its reference without loading a second model, and the rebuild used after
gathering sharded (FSDP / ZeRO-3) weights reproduces the adapter before merging."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from selfalign.training import DPOSettings, LoraSettings, SFTSettings

sys.path.insert(0, str(Path(__file__).parent))
from test_training import FAST, dpo_pairs, reply_logprob, sft_examples, state_dict  # noqa: E402


def _adapter_of(model, suffix: str) -> dict:
    for name, module in model.named_modules():
        if name.endswith(suffix) and hasattr(module, "lora_A"):
            return {
                "A": module.lora_A["default"].weight.detach().clone(),
                "B": module.lora_B["default"].weight.detach().clone(),
                "scale": module.scaling["default"],
            }
    raise AssertionError(f"no LoRA adapter on {suffix}")


def test_merged_model_is_base_plus_scaled_low_rank_update(tmp_path, tiny_model_dir):
    import torch
    from transformers import TrainerCallback

    from selfalign.training.sft import train_sft

    captured: dict = {}

    class CaptureAdapter(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            captured.update(_adapter_of(model, "layers.1.self_attn.q_proj"))

    lora = LoraSettings(r=4, alpha=12, dropout=0.0, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    train_sft(tiny_model_dir, sft_examples(4), out, SFTSettings(**FAST, learning_rate=1e-2, max_steps=3, lora=lora),
              callbacks=[CaptureAdapter()])
    base, merged = state_dict(tiny_model_dir), state_dict(out)
    key = "model.layers.1.self_attn.q_proj.weight"
    assert captured["scale"] == pytest.approx(12 / 4)
    delta = captured["scale"] * captured["B"] @ captured["A"]
    assert delta.abs().max() > 1e-4  # the adapter learned something
    torch.testing.assert_close(merged[key], base[key] + delta, rtol=0, atol=1e-6)
    for untouched in ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(merged[untouched], base[untouched]), untouched


def test_lora_dpo_references_the_adapter_disabled_base_without_a_second_model(tmp_path, tiny_model_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import selfalign.training.dpo as dpo
    from selfalign.training.dpo import build_dpo_trainer, to_preference_records

    loads: list[Path] = []
    real_load = dpo.load_model
    monkeypatch.setattr(dpo, "load_model", lambda d, **kw: loads.append(Path(d)) or real_load(d, **kw))
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    # the reference is scored at every step here (not precomputed), so it must exist throughout training
    settings = DPOSettings(**{**FAST, "per_device_batch_size": 2}, learning_rate=2e-2, max_steps=3, lr_scheduler="constant",
                           precompute_ref_log_probs=False, lora=lora)
    trainer, tok, _ = build_dpo_trainer(tiny_model_dir, to_preference_records(dpo_pairs(2)), tmp_path / "ck", settings)
    assert loads == [tiny_model_dir] and trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    trainer.train()

    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert margins[0] == pytest.approx(0.0, abs=1e-4)  # LoRA's B starts at zero: policy == base
    assert margins[-1] > 0.05  # the reference stayed behind while the policy moved

    model = trainer.model.eval()
    prompt = [{"role": "user", "content": "Question 7: is the sky blue?"}]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with model.disable_adapter():
        as_reference = reply_logprob(model, tok, prompt, "My answer is yes")
    assert as_reference == pytest.approx(reply_logprob(base, tok, prompt, "My answer is yes"), abs=1e-4)
    assert reply_logprob(model, tok, prompt, "My answer is yes") > as_reference + 0.05


def test_rebuild_from_gathered_weights_keeps_the_adapter(tiny_model_dir):
    """What rank 0 does after FSDP / ZeRO-3 gather the full state dict: a fresh CPU copy with
    the same adapter layout, merged like the original."""
    import torch
    from peft import get_peft_model

    from selfalign.training.common import load_model, peft_config
    from selfalign.training.outputs import _fresh_copy

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir), peft_config(LoraSettings(r=4, alpha=8, dropout=0.0)))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # a trained-looking adapter
    rebuilt = _fresh_copy(model, {k: v.clone() for k, v in model.state_dict().items()})
    assert rebuilt is not model
    expected = model.merge_and_unload().state_dict()
    got = rebuilt.merge_and_unload().state_dict()
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
