"""The DPO speed work: length-grouped batches and the completion-only LM head (see training/dpo.py).

Both must leave what is computed unchanged: every pair trained once per epoch in a random
order, and the same log-probabilities and gradients as TRL's head scoring every position.
"""

from __future__ import annotations

import pytest

from selfalign.training.dpo import LengthGroupedPairs, completion_only_lm_head, pair_length


def test_length_grouped_pairs_is_a_shuffled_permutation_of_similar_length_batches():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 400) for _ in range(70)]
    s = LengthGroupedPairs(lengths, batch_size=4, seed=3, window_batches=8)
    seen_orders = set()
    for epoch in range(3):
        s.set_epoch(epoch)
        order = list(s)
        assert sorted(order) == list(range(70)) and len(s) == 70
        assert order == list(s)  # deterministic for (seed, epoch)
        seen_orders.add(tuple(order))
        batches = s.batches()
        assert [len(b) for b in batches] == [4] * 17 + [2]  # the short batch last
        # padding: each batch is padded to its longest pair; grouped batches waste far less than random ones
        grouped = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        shuffled = list(range(70))
        rng.shuffle(shuffled)
        rand = sum(len(shuffled[i : i + 4]) * max(lengths[j] for j in shuffled[i : i + 4]) for i in range(0, 70, 4))
        assert grouped < 0.8 * rand
    assert len(seen_orders) == 3  # a new order every epoch
    # the batch order is random, not longest- or shortest-first
    s.set_epoch(0)
    widths = [max(lengths[i] for i in b) for b in s.batches()[:-1]]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_pair_length_is_the_wider_row_cut_at_max_length():
    assert pair_length([1] * 10, [1] * 5, [1] * 8, None) == 18
    assert pair_length([1] * 10, [1] * 5, [1] * 8, 12) == 12


def test_completion_only_head_gives_the_same_log_probs_and_gradients(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    attn = torch.ones_like(ids)
    attn[2, 15:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :8] = -100  # prompt
    labels[attn == 0] = -100

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.log_probs.detach(), out.entropy.detach(), grads

    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    full_lp, full_ent, full_g = run()
    with completion_only_lm_head():
        assert trl_utils._use_triton is not original and trl_utils._use_triton(ids.device)
        lp, ent, g = run()
    assert trl_utils._use_triton is original  # restored
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(lp, full_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[mask], full_ent[mask], rtol=1e-5, atol=1e-5)
    assert (lp[~mask] == 0).all()
    assert full_g.keys() == g.keys() and len(g) > 0
    for name in g:
        torch.testing.assert_close(g[name], full_g[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dpo_trains_through_the_grouped_sampler(tiny_model_dir, tmp_path):
    """A real (tiny) DPO run uses LengthGroupedPairs and sees every pair each epoch."""
    from transformers import TrainerCallback

    from selfalign.training import DPOSettings
    from selfalign.training.dpo import train_dpo

    pairs = [
        {
            "prompt": [{"role": "user", "content": "Say something" + " really" * (i % 5)}],
            "chosen": [{"role": "assistant", "content": "Yes" + " indeed" * i}],
            "rejected": [{"role": "assistant", "content": "No"}],
        }
        for i in range(10)
    ]
    samplers = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            samplers.append(train_dataloader)

    settings = DPOSettings(bf16=False, per_device_batch_size=4, max_length=96, epochs=2, learning_rate=1e-3, save_steps=1000)
    result = train_dpo(tiny_model_dir, pairs, tmp_path / "m", settings, callbacks=[Spy()])
    assert result.steps == 6  # ceil(10 / 4) x 2 epochs
    loader = samplers[0]
    inner = getattr(loader, "base_dataloader", loader)
    sampler = getattr(getattr(inner, "batch_sampler", None), "sampler", None) or getattr(inner, "sampler", None)
    assert isinstance(sampler, LengthGroupedPairs)
    assert sorted(sampler) == list(range(10))
    margins = [h["rewards/margins"] for h in result.history if "rewards/margins" in h]
    assert margins and margins[-1] > 0  # it learned the preference
