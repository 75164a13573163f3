"""SFT and DPO training on the tiny random Llama (real SmolLM2 tokenizer and chat template).

Each training run is a handful of optimizer steps on a few examples; the high learning rates
make the effects (loss down, preference margin up, weights changed) unmistakable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from selfalign.errors import DataError, RunError
from selfalign.training import DPOSettings, LoraSettings, SFTSettings, TrainResult

FAST = dict(bf16=False, per_device_batch_size=4, max_length=96, save_steps=1000, logging_steps=1)


def sft_examples(n: int = 4) -> list[dict]:
    return [
        {
            "id": f"ex{i}",
            "messages": [
                {"role": "user", "content": f"Name fruit number {i}."},
                {"role": "assistant", "content": f"Fruit {i} is banana {i}."},
            ],
        }
        for i in range(n)
    ]


def dpo_pairs(n: int = 8) -> list[dict]:
    return [
        {
            "id": f"p{i}",
            "score_chosen": 5,
            "score_rejected": 1,
            "prompt": [{"role": "user", "content": f"Question {i}: is the sky blue?"}],
            "chosen": [{"role": "assistant", "content": "My answer is yes"}],
            "rejected": [{"role": "assistant", "content": "My answer is no"}],
        }
        for i in range(n)
    ]


def state_dict(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reply_logprob(model, tok, prompt: list[dict], reply: str) -> float:
    """Sum of log p(reply tokens | prompt) under the chat template."""
    import torch

    p_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], return_dict=True)["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    return float(sum(logp[0, t - 1, full[t]] for t in range(len(p_ids), len(full))))


def assert_plain_model(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert (model_dir / "training.json").is_file()
    assert not (model_dir / "adapter_config.json").exists()
    cfg = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert not any("lora" in k or "base_layer" in k for k in state_dict(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert not hasattr(model, "peft_config")
    assert (model_dir / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (model_dir / "tokenizer_config.json").read_text()
    )


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_strictness():
    d = DPOSettings()
    assert d.learning_rate == 1e-6 and d.beta == 0.1 and d.precompute_ref_log_probs
    assert SFTSettings().lora is None
    s = SFTSettings.model_validate({"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "bf16": "auto"})
    assert s.lora == LoraSettings(r=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValidationError):
        SFTSettings.model_validate({"learning_rat": 1e-4})
    with pytest.raises(ValidationError):
        DPOSettings.model_validate({"lora": {"rank": 8}})
    with pytest.raises(ValidationError):
        SFTSettings(lr_scheduler="exponential")


def test_bf16_auto_only_for_lora_on_native_hardware():
    from selfalign.models import cpu_has_native_bf16
    from selfalign.training.common import cuda_available, resolve_bf16

    assert resolve_bf16("auto", lora=False) is False  # full fine-tuning: fp32 (see training/config.py)
    if not cuda_available():
        assert resolve_bf16("auto", lora=True) is cpu_has_native_bf16()
    assert resolve_bf16(True, lora=False) is True and resolve_bf16(False, lora=True) is False


def test_bad_records_are_data_errors(tmp_path, tiny_model_dir):
    from selfalign.training.dpo import train_dpo
    from selfalign.training.sft import train_sft

    bad = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError, match="last message must be the assistant"):
        train_sft(tiny_model_dir, bad, tmp_path / "m", SFTSettings(**FAST))
    with pytest.raises(DataError, match="pair 0.*'rejected'"):
        train_dpo(tiny_model_dir, [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a"}], tmp_path / "d", DPOSettings())
    assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- SFT


def test_sft_masks_everything_but_the_last_assistant_turn(tmp_path, tiny_model_dir):
    from selfalign.training.sft import build_sft_trainer, to_prompt_completion

    records = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "First question?"},
                {"role": "assistant", "content": "First answer."},
                {"role": "user", "content": "Second question?"},
                {"role": "assistant", "content": "Second answer."},
            ]
        },
        sft_examples(1)[0],
    ]
    trainer, tok, _ = build_sft_trainer(tiny_model_dir, to_prompt_completion(records), tmp_path / "ck", SFTSettings(**FAST))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, answer, question in ((0, "Second answer.", "Second question?"), (1, "Fruit 0 is banana 0.", "fruit number 0")):
        ids, labels, attn = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        trained = tok.decode(ids[labels != -100])
        assert trained == answer + "<|im_end|>\n"
        masked = tok.decode(ids[(labels == -100) & (attn == 1)])
        assert masked.endswith("<|im_start|>assistant\n")
        assert question in masked
        assert (labels[attn == 0] == -100).all()
    assert "First answer." in tok.decode(batch["input_ids"][0][batch["labels"][0] == -100])


def test_sft_overfits_and_saves_a_plain_model(tmp_path, tiny_model_dir):
    from selfalign.training.sft import train_sft

    out = tmp_path / "sft"
    lines: list[str] = []
    settings = SFTSettings(**FAST, learning_rate=3e-3, epochs=8, lr_scheduler="constant")
    result = train_sft(tiny_model_dir, sft_examples(4), out, settings, log=lines.append)
    losses = result.metric("loss")
    assert result.steps == 8 and len(losses) == 8
    assert losses[-1] < losses[0] - 1.0, losses
    assert result.final_loss == losses[-1] and result.examples_per_second > 0
    assert_plain_model(out)
    assert not (tmp_path / "sft.checkpoints").exists()
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged == result.history
    assert any(line.startswith("step 8/8") for line in lines)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    moved = tmp_path / "moved_model"  # the fingerprint is the model's content, not its path
    shutil.copytree(tiny_model_dir, moved)
    again = train_sft(moved, sft_examples(4), out, settings)  # finished: reused, not retrained
    assert again.reused and again.steps == 8 and again.history == result.history
    with pytest.raises(RunError, match="learning_rate"):
        train_sft(tiny_model_dir, sft_examples(4), out, settings.model_copy(update={"learning_rate": 1e-4}))


class _Interrupt(Exception):
    pass


def _interrupt_after_save(step: int):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Interrupt(step)

    return Stop()


def test_sft_resumes_from_the_last_checkpoint(tmp_path, tiny_model_dir):
    from selfalign.training.sft import train_sft

    out = tmp_path / "resumed"
    settings = SFTSettings(**{**FAST, "save_steps": 2, "per_device_batch_size": 2}, learning_rate=1e-3, max_steps=4)
    with pytest.raises(_Interrupt):
        train_sft(tiny_model_dir, sft_examples(4), out, settings, callbacks=[_interrupt_after_save(2)])
    assert not out.exists()
    assert (tmp_path / "resumed.checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    shutil.copytree(tmp_path / "resumed.checkpoints", tmp_path / "stale.checkpoints")

    lines: list[str] = []
    result = train_sft(tiny_model_dir, sft_examples(4), out, settings, log=lines.append)
    assert result.resumed_from_step == 2 and result.steps == 4
    assert [h["step"] for h in result.history if "loss" in h] == [1, 2, 3, 4]  # steps 1-2 from the first call
    assert lines[0].startswith("resuming from") and "checkpoint-2" in lines[0]
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["3/4", "4/4"]
    assert_plain_model(out)

    assert not (tmp_path / "resumed.checkpoints").exists()

    # checkpoints made with other settings are refused instead of mixed in
    with pytest.raises(RunError, match="max_steps"):
        train_sft(tiny_model_dir, sft_examples(4), tmp_path / "stale", settings.model_copy(update={"max_steps": 6}))


# --------------------------------------------------------------------------- DPO


def test_dpo_raises_the_margin_of_chosen_over_rejected(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.training.dpo import train_dpo

    out = tmp_path / "dpo"
    settings = DPOSettings(**FAST, learning_rate=2e-3, max_steps=4, lr_scheduler="constant")
    result = train_dpo(tiny_model_dir, dpo_pairs(8), out, settings)
    assert isinstance(result, TrainResult) and result.steps == 4
    margins = result.metric("rewards/margins")
    assert margins[0] == pytest.approx(0.0, abs=1e-4)  # step 1: policy == reference
    assert margins[-1] > 0.05 and result.metric("rewards/accuracies")[-1] == 1.0
    gap = [c - r for c, r in zip(result.metric("logps/chosen"), result.metric("logps/rejected"))]
    assert gap[-1] > gap[0]
    assert_plain_model(out)

    # the saved model itself prefers "yes" more than the starting model did
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt = [{"role": "user", "content": "Question 99: is the sky blue?"}]

    def pref(model_dir: Path) -> float:
        m = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        return reply_logprob(m, tok, prompt, "My answer is yes") - reply_logprob(m, tok, prompt, "My answer is no")

    assert pref(out) > pref(tiny_model_dir) + 0.05


def test_dpo_resumes_with_recomputed_reference_log_probs(tmp_path, tiny_model_dir):
    from selfalign.training.dpo import train_dpo

    out = tmp_path / "dpo_resumed"
    settings = DPOSettings(**{**FAST, "save_steps": 2, "per_device_batch_size": 2}, learning_rate=2e-3, max_steps=4)
    with pytest.raises(_Interrupt):
        train_dpo(tiny_model_dir, dpo_pairs(4), out, settings, callbacks=[_interrupt_after_save(2)])
    result = train_dpo(tiny_model_dir, dpo_pairs(4), out, settings)
    assert result.resumed_from_step == 2 and result.steps == 4
    margins = result.metric("rewards/margins")
    assert len(margins) == 4 and margins[0] == pytest.approx(0.0, abs=1e-4)
    # step 3 continues from the checkpoint's weights against the original reference
    assert margins[2] > margins[1] > 0


# --------------------------------------------------------------------------- LoRA


def test_lora_sft_then_dpo_save_merged_plain_models(tmp_path, tiny_model_dir):
    from selfalign.training.dpo import train_dpo
    from selfalign.training.sft import train_sft

    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    base = state_dict(tiny_model_dir)

    sft_out = tmp_path / "lora_sft"
    train_sft(tiny_model_dir, sft_examples(4), sft_out, SFTSettings(**FAST, learning_rate=1e-2, max_steps=2, lora=lora))
    assert_plain_model(sft_out)
    sft_w = state_dict(sft_out)
    assert set(sft_w) == set(base)
    changed = [k for k in base if not (base[k] == sft_w[k]).all()]
    assert any("q_proj" in k for k in changed) and not any("embed" in k or "norm" in k for k in changed)

    dpo_out = tmp_path / "lora_dpo"
    result = train_dpo(sft_out, dpo_pairs(4), dpo_out, DPOSettings(**FAST, learning_rate=1e-2, max_steps=2, lora=lora))
    assert result.metric("rewards/margins")[-1] > 0
    assert_plain_model(dpo_out)
    dpo_w = state_dict(dpo_out)
    assert any(not (sft_w[k] == dpo_w[k]).all() for k in sft_w)


# --------------------------------------------------------------------------- real model (slow)


@pytest.mark.slow
def test_dpo_on_the_embedded_model_with_bf16(tmp_path, embedded_model_dir):
    from selfalign.training.dpo import train_dpo

    settings = DPOSettings(bf16=True, per_device_batch_size=2, max_length=64, max_steps=2, learning_rate=1e-5, save_dtype="source")
    result = train_dpo(embedded_model_dir, dpo_pairs(4), tmp_path / "dpo", settings)
    assert result.steps == 2 and result.bf16
    assert all(abs(m) < 10 for m in result.metric("rewards/margins"))
    # "source" keeps the checkpoint's own dtype: resolve_model(dtype="auto") converts the GGUF to
    # bfloat16 only on a CPU with native bf16 (float32 elsewhere), so compare with the source.
    source_dtype = json.loads((embedded_model_dir / "config.json").read_text())["dtype"]
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["dtype"] == source_dtype
    assert_plain_model(tmp_path / "dpo")


def test_prompts_longer_than_max_length_are_refused(tmp_path, tiny_model_dir):
    from selfalign.training.dpo import train_dpo

    pairs = dpo_pairs(2)
    for p in pairs:
        p["prompt"][0]["content"] = "word " * 200
    with pytest.raises(DataError, match="max_length=96"):
        train_dpo(tiny_model_dir, pairs, tmp_path / "d", DPOSettings(**FAST))
