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


# ------------------------------------------------------------------------------------- the stage and the commands


def test_inspect_is_a_stage_of_its_own_keyed_by_what_it_reads(tmp_path):
    from helpers import make_corpus, tiny_spec

    from workflows.planning import plan, spec_identity
    from workflows.spec import load_spec_tree

    corpus = make_corpus(tmp_path / "corpus", n_docs=4)
    tree = tiny_spec(corpus, tmp_path / "runs")
    planned = lambda *sets: plan(load_spec_tree(tree, "s.yaml", list(sets))).runs[0]
    plain = planned()
    looked = planned("eval.inspect={prompts: [a, b], passage_chars: 100}")
    assert "inspect" not in plain.stages and "inspect" in looked.stages
    assert all(looked.stages[k].key == s.key for k, s in plain.stages.items())  # eval, training... unchanged
    assert spec_identity(plain.spec) == spec_identity(looked.spec)  # the same MLflow runs get the report
    stage = looked.stages["inspect"]
    assert stage.config == {"inspect": {"prompts": ["a", "b"], "passage_chars": 100}}
    assert {k for k in stage.inputs} == {"train", "shards", "tokenizer"}
    other = planned("eval.inspect={prompts: [a, c], passage_chars: 100}").stages["inspect"]
    assert other.key != stage.key
    sampled = planned("eval.inspect={prompts: [a, b], passage_chars: 100}", "eval.temperature=0.1")
    assert sampled.stages["inspect"].key == stage.key  # sampling settings are not what it reads


def test_gptlab_inspect_a_hugging_face_folder_and_bad_input(tmp_path):
    from helpers import gpt2_folder, make_corpus
    from typer.testing import CliRunner

    from workflows.cli import app

    corpus = make_corpus(tmp_path / "corpus", n_docs=4)
    folder = gpt2_folder(tmp_path / "gpt2", corpus)
    (tmp_path / "passage.txt").write_text((corpus / "doc000.txt").read_text())
    out = tmp_path / "report"
    args = ["inspect", "--pretrained", str(folder), "--prompt", "The cat\\nsat", "--prompt", "on the mat", "--out",
            str(out), "--text", str(tmp_path / "passage.txt"), "--passage-chars", "300"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{out / 'report.html'}" in result.output
    summary = json.loads((out / SUMMARY).read_text())
    assert [p["prompt"] for p in summary["prompts"]] == ["The cat\nsat", "on the mat"]
    assert summary["passage"]["tokens"] > 50 and (out / "prompt1_layer1.png").is_file()
    bad = CliRunner().invoke(app, ["inspect", "--pretrained", str(tmp_path / "corpus")])
    assert bad.exit_code == 2 and "Bad input (gptlab inspect): --pretrained:" in bad.output
    assert "config.json is missing" in bad.output and "Traceback" not in bad.output
    (tmp_path / "file").write_text("x")
    bad = CliRunner().invoke(app, ["inspect", "--pretrained", str(folder), "--out", str(tmp_path / "file")])
    assert bad.exit_code == 2 and "--out:" in bad.output and "is a file" in bad.output
    bad = CliRunner().invoke(app, ["inspect", "some-run", "--pretrained", str(folder)])
    assert bad.exit_code == 2 and "give a run, or --pretrained DIR, not both" in bad.output


@pytest.mark.slow
def test_a_sweep_inspects_each_run_into_mlflow_and_compare_sets_them_side_by_side(tmp_path):
    from helpers import make_corpus, tiny_spec, write_spec
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from workflows import submit
    from workflows.cli import app

    corpus = make_corpus(tmp_path / "corpus", n_docs=12)
    tree = tiny_spec(corpus, tmp_path / "runs", sweep={"model.pos_encoding": ["learned", "rope"]})
    tree["eval"]["inspect"] = {"prompts": ["The cat sat"], "passage_chars": 200}
    spec = write_spec(tmp_path / "tiny.yaml", tree)
    result = submit(spec, quiet=True, poll_interval=0.5)
    assert result.ok, [r.error for r in result.runs]
    client = MlflowClient(result.tracking_uri)
    for r in result.runs:
        files = {a.path for a in client.list_artifacts(r.run_id, "inspect")}
        assert {"inspect/report.html", "inspect/attention.npz", "inspect/prompt0_layer0.png"} <= files
        assert "inspect/passage_loss" in r.metrics
    summary = {a.path for a in client.list_artifacts(result.parent_run_id, "summary")}
    assert "summary/inspect_attention.png" in summary
    out = CliRunner().invoke(app, ["compare", str(spec), "--layer", "0", "--head", "1"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "runs" / "reports" / "compare-tiny" / "inspect_attention.png").is_file()
    out = CliRunner().invoke(app, ["inspect", "pos_encoding=rope", "--spec", str(spec)])
    assert out.exit_code == 0, out.output
    report = tmp_path / "runs" / "reports" / "inspect-pos_encoding=rope" / REPORT
    assert report.is_file() and "position encoding <b>rope</b>" in report.read_text()
    assert json.loads((report.parent / SUMMARY).read_text())["prompts"][0]["prompt"] == "The cat sat"
    from matplotlib.figure import Figure

    from llmcore.inspect import attention_figure, logit_lens_figure
    from workflows.inspecting import load_model_of

    model, tok = load_model_of("pos_encoding=rope", spec=spec)  # the README's notebook lines
    tr = trace(model, tok, "The cat")
    views = [attention_figure(tr), attention_figure(tr, layer=0), logit_lens_figure(tr, tok), positions_figure(model)]
    assert all(isinstance(f, Figure) for f in views) and model.cfg.pos_encoding == "rope"
