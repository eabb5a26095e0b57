"""The GPT model: attention implementations agree, encodings train, the KV cache is exact, counts are right."""

from __future__ import annotations

import math

import pytest
import torch

from llmcore.config import ModelConfig
from llmcore.model import GPT, KVCache, sample_next

ENCODINGS = ["learned", "sinusoidal", "rope"]


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def make(vocab: int = 50, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw), vocab)


@pytest.mark.parametrize("pos", ENCODINGS)
def test_plain_attention_equals_sdpa(pos):
    sdpa = make(pos_encoding=pos, attention="sdpa", norm="rmsnorm", mlp="swiglu", bias=True)
    plain = GPT(tiny(pos_encoding=pos, attention="plain", norm="rmsnorm", mlp="swiglu", bias=True), 50)
    plain.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    logits_s, loss_s = sdpa(idx, idx)
    logits_p, loss_p = plain(idx, idx)
    torch.testing.assert_close(logits_p, logits_s, atol=1e-5, rtol=0)
    assert abs(loss_p.item() - loss_s.item()) < 1e-5
    # and through the cache: prefill 5 tokens, then 1, then a chunk of 4 (the bottom-right-aligned mask)
    outs = []
    for model in (sdpa, plain):
        cache = KVCache(2)
        outs.append(
            [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:6], cache=cache)[0], model(idx[:, 6:10], cache=cache)[0]]
        )
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0][2][:, -1], logits_s[:, 9], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos", ENCODINGS)
def test_each_position_encoding_trains(pos):
    """A repeated pattern whose next token depends on position within the period: loss must fall a lot."""
    torch.manual_seed(0)
    model = make(vocab=12, pos_encoding=pos)
    pattern = torch.tensor([1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 7, 8])  # "1 2" is followed by 3, 5 or 7 in turn
    stream = pattern.repeat(20)
    opt = model.configure_optimizer(0.0, 1e-2, (0.9, 0.99), "cpu")
    losses = []
    for _step in range(60):
        starts = torch.randint(0, len(stream) - 17, (8,))
        x = torch.stack([stream[s : s + 16] for s in starts])
        y = torch.stack([stream[s + 1 : s + 17] for s in starts])
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 2.0
    assert sum(losses[-5:]) / 5 < 0.35, losses[-5:]


@pytest.mark.parametrize("pos", ENCODINGS)
def test_kv_cache_generation_equals_recomputation(pos):
    model = make(pos_encoding=pos).eval()
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    # 20 new tokens from a 5-token prompt: passes block_size 16, so the crop fallback is exercised too
    greedy = [model.generate(prompt, 20, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [
        model.generate(
            prompt, 20, temperature=1.0, top_k=10, top_p=0.9, use_cache=c, generator=torch.Generator().manual_seed(7)
        )
        for c in (True, False)
    ]
    assert torch.equal(sampled[0], sampled[1])
    assert sampled[0].shape == (2, 25) and torch.equal(sampled[0][:, :5], prompt)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(sample_next(logits, top_p=0.01, generator=g).item() == 1 for _ in range(20))
    assert {sample_next(logits, top_k=2, generator=g).item() for _ in range(200)} == {1, 3}
    assert sample_next(logits, temperature=0).item() == 1


def test_weight_tying_and_inference_shape():
    model = make()
    assert model.wte.weight is model.lm_head.weight
    assert sum(p is model.lm_head.weight for p in model.parameters()) == 1
    logits, loss = model(torch.zeros(2, 7, dtype=torch.long))
    assert logits.shape == (2, 1, 50) and loss is None


def test_param_count_by_hand():
    V, C, L, T = 50, 32, 2, 16
    per_block = C + 3 * C * C + C * C + C + C * 4 * C + 4 * C * C  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj
    model = make(vocab=V)
    assert model.num_params(non_embedding=False) == V * C + T * C + L * per_block + C
    assert model.num_params() == V * C + L * per_block + C  # position table dropped, tied wte kept
    # with biases, RMSNorm (weight only), SwiGLU (hidden = 128 for C=32) and RoPE (no parameters)
    H = 128
    per_block = C + (3 * C * C + 3 * C) + (C * C + C) + C + (C * 2 * H + 2 * H) + (H * C + C)
    model = make(vocab=V, bias=True, norm="rmsnorm", mlp="swiglu", pos_encoding="rope")
    assert model.num_params() == model.num_params(non_embedding=False) == V * C + L * per_block + C


def test_flops_per_token_and_optimizer_groups():
    model = make()
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 2 * 16 * 16
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gpt2_init_scales_residual_projections():
    model = make(n_layer=8, n_embd=128, n_head=4)
    assert abs(model.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="n_head"):
        GPT(tiny(n_head=3), 50)
    with pytest.raises(ValueError, match="rope"):
        GPT(tiny(n_head=32, pos_encoding="rope"), 50)  # head size 1
    with pytest.raises(ValueError, match="block_size"):
        make()(torch.zeros(1, 17, dtype=torch.long))
