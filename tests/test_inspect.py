"""Inside the model (llmcore.inspect), checked against transformers itself: the attention probabilities gptlab
recomputes from each block's input equal transformers' ``output_attentions`` on the same model exported with
``llmcore.hf`` (GPT-2 shape, and Llama shape with grouped-query attention), and the logit lens equals transformers'
``output_hidden_states`` through the final norm and the output head. Tiny models built here: no download."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from llmcore.config import ModelConfig
from llmcore.hf import export_model
from llmcore.inspect import (
    REPORT,
    SUMMARY,
    compute,
    position_similarity,
    positions_figure,
    rope_scores,
    token_losses,
    trace,
    write_report,
)
from llmcore.model import GPT

VOCAB = 97
SHAPES = {
    "gpt2": dict(n_layer=3, n_head=4, n_embd=32, block_size=48, bias=True, mlp="gelu_tanh"),
    "llama-gqa": dict(n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=48, pos_encoding="rope",
                      norm="rmsnorm", mlp="swiglu", rope_theta=5000.0, tie_embeddings=False),
}  # fmt: skip


class Chars:
    """A character tokenizer over VOCAB ids (a stand-in with encode, decode and eos_id: what inspect reads)."""

    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % (VOCAB - 1) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 1) if 32 <= i - 1 < 127 else "?" for i in ids)


def trained(cfg: dict, seed: int = 2, steps: int = 5) -> GPT:
    """A tiny model a few steps away from its initial weights (biases and norms no longer zero and one)."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**cfg), VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (4, 48))
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request, tmp_path_factory):
    model = trained(SHAPES[request.param])
    out = tmp_path_factory.mktemp(request.param)
    export_model(model, out, bos_id=1, eos_id=2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    return request.param, model, theirs


PROMPT = "def attention(q, k): return softmax(q @ k.T)"


def test_attention_probabilities_equal_transformers_output_attentions(exported):
    name, model, theirs = exported
    tr = trace(model, Chars(), PROMPT)
    with torch.no_grad():
        out = theirs(torch.tensor([tr.ids]), output_attentions=True)
    want = torch.cat(out.attentions)  # (L, H, T, T)
    assert tr.attention.shape == want.shape == (3, 4, len(PROMPT), len(PROMPT))
    diff = (tr.attention - want).abs().max().item()
    print(f"{name}: attention max abs difference {diff:.2e}")
    assert diff < 1e-5
    assert torch.allclose(tr.attention.sum(-1), torch.ones(3, 4, len(PROMPT)))
    assert tr.attention.triu(1).abs().max() == 0  # causal: no query looks ahead


def test_logit_lens_equals_hidden_states_through_the_final_norm_and_the_head(exported):
    name, model, theirs = exported
    tr = trace(model, Chars(), PROMPT)
    with torch.no_grad():
        out = theirs(torch.tensor([tr.ids]), output_hidden_states=True)
        base = theirs.transformer if name == "gpt2" else theirs.model
        final_norm = base.ln_f if name == "gpt2" else base.norm
        hidden = out.hidden_states  # embeddings, after each block but the last, then the last after the final norm
        want = [theirs.lm_head(final_norm(h[0])) for h in hidden[:-1]] + [theirs.lm_head(hidden[-1][0])]
    want = torch.log_softmax(torch.stack(want), dim=-1)  # (L + 1, T, V)
    diff = (tr.lens - want).abs().max().item()
    print(f"{name}: logit lens max abs difference (log-probabilities) {diff:.2e}")
    assert diff < 1e-5
    assert (tr.lens[-1] - torch.log_softmax(out.logits[0], -1)).abs().max() < 1e-5  # the last layer: the output


def test_sdpa_and_plain_models_give_the_same_maps_and_inspecting_leaves_no_hook():
    sdpa = trained({**SHAPES["llama-gqa"], "attention": "sdpa"})
    plain = GPT(sdpa.cfg.model_copy(update={"attention": "plain"}), VOCAB).eval()
    plain.load_state_dict(sdpa.state_dict())
    a, b = trace(sdpa, Chars(), PROMPT), trace(plain, Chars(), PROMPT)
    assert (a.attention - b.attention).abs().max() < 1e-6
    modules = list(sdpa.modules())
    assert not any(m._forward_hooks for m in modules)  # training never runs a hook of inspect's
    sdpa.train()
    trace(sdpa, Chars(), PROMPT)
    assert sdpa.training  # the model's mode is restored


def test_position_views_show_how_the_three_encodings_differ():
    base = dict(n_layer=1, n_head=2, n_embd=32, block_size=64)
    sinusoidal = GPT(ModelConfig(**base, pos_encoding="sinusoidal"), VOCAB)
    sim = position_similarity(sinusoidal)
    assert torch.allclose(sim.diagonal(), torch.ones(64), atol=1e-6)
    assert sim[0, 1] > sim[0, 10] > sim[0, 40] - 0.5  # nearby positions are alike
    rope = GPT(ModelConfig(**base, pos_encoding="rope"), VOCAB)
    scores = rope_scores(rope)  # distance 0 first: q . q / sqrt(D) = sqrt(D) for the all-ones vector
    assert scores[0].item() == pytest.approx(16**0.5, rel=1e-5) and scores[1:].max() < scores[0]
    learned = GPT(ModelConfig(**base), VOCAB)
    assert position_similarity(learned).shape == (64, 64)
    for model in (sinusoidal, rope, learned):
        fig = positions_figure(model)
        assert len(fig.axes) == 3  # the matrix, its colour bar, the curve against distance


def test_token_losses_equal_the_models_loss_and_windows_keep_half_a_context():
    model = trained(SHAPES["gpt2"])
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (48,))
    losses = token_losses(model, ids.tolist())
    with torch.no_grad():
        _, loss = model(ids[None, :-1], ids[None, 1:])
    assert losses.shape == (47,) and losses.mean().item() == pytest.approx(loss.item(), abs=1e-5)
    long = torch.randint(0, VOCAB, (130,)).tolist()  # beyond block_size 48: windows advance 24 tokens
    got = token_losses(model, long)
    with torch.no_grad():
        # windows score targets 0-47 (inputs 0-47), 48-71 (inputs 24-71), 72-95 (inputs 48-95), ...
        logits, _ = model(torch.tensor([long[48:96]]), all_logits=True)
    want = torch.nn.functional.cross_entropy(logits[0, 24:], torch.tensor(long[73:97]), reduction="none")
    assert got.shape == (129,) and torch.allclose(got[72:96], want, atol=1e-5)


def test_report_is_one_self_contained_page_with_the_pngs_beside_it(tmp_path):
    model = trained(SHAPES["llama-gqa"])
    tok = Chars()
    views = compute(model, tok, ["def f(x):", ""], tok.encode("print('hello world')\n" * 6))
    summary = write_report(model, tok, views, tmp_path, "tiny: inside the model")
    page = (tmp_path / REPORT).read_text()
    assert "<title>tiny: inside the model</title>" in page and "http" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") == 2 * (1 + 3 + 1) + 2  # per prompt: grid, 3 layers, lens
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "prompt1_layer2.png" in pngs and "positions.png" in pngs and "token_loss.png" in pngs
    assert json.loads((tmp_path / SUMMARY).read_text()) == json.loads(json.dumps(summary))
    assert summary["prompts"][1]["ids"] == [0]  # an empty prompt starts from EOS, as sampling does
    assert summary["passage"]["tokens"] == len("print('hello world')\n") * 6 - 1
    assert len(summary["prompts"][0]["lens_last"]) == 4  # embed + 3 blocks
