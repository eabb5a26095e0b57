"""Hugging Face model folders both ways, checked against transformers itself (a test-only dependency: llmcore reads
and writes the files with its own code). The tests build tiny random models with transformers and save_pretrained
them: no download."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import Evil

from llmcore.config import ModelConfig
from llmcore.hf import HFError, export_model, load_pretrained, merge_config, read_model, weight_files
from llmcore.model import GPT

VOCAB = 211


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.1,
                                  embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=1)  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    out = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(out)
    return out, model


def llama(tmp_path_factory, tied: bool, **save):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=173, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, rms_norm_eps=1e-6, rope_theta=5000.0, bos_token_id=1,
                                   eos_token_id=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("llama")
    model.save_pretrained(out, **save)
    return out, model


def max_diff(ours, theirs, vocab: int, T: int = 40) -> float:
    idx = torch.randint(0, vocab, (3, T))
    with torch.no_grad():
        return (ours(idx, all_logits=True)[0] - theirs(idx).logits).abs().max().item()


def test_gpt2_logits_and_greedy_generation_equal_transformers(gpt2_dir):
    folder, theirs = gpt2_dir
    ours, hf = load_pretrained(folder)
    ours.eval()
    cfg = ours.cfg
    assert (cfg.mlp, cfg.pos_encoding, cfg.norm, cfg.bias, cfg.tie_embeddings) == ("gelu_tanh", "learned", "layernorm",
                                                                                    True, True)  # fmt: skip
    assert cfg.block_size == 64 and cfg.dropout == 0.1 and hf.eos_id == 1
    assert max_diff(ours, theirs, VOCAB) < 1e-5
    prompt = torch.randint(2, VOCAB, (1, 7))
    with torch.no_grad():
        want = theirs.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20, pad_token_id=1)
        got = ours.generate(prompt, 20, temperature=0)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("save", [{}, {"safe_serialization": False}, {"max_shard_size": "20KB"}],
                         ids=["safetensors", "bin", "sharded"])  # fmt: skip
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_with_gqa_equals_transformers_from_every_file_layout(tmp_path_factory, tied, save):
    folder, theirs = llama(tmp_path_factory, tied, **save)
    if save.get("max_shard_size"):
        assert len(weight_files(folder)) > 1
    ours, _ = load_pretrained(folder)
    assert (ours.cfg.n_kv_head, ours.cfg.tie_embeddings, ours.cfg.mlp_hidden, ours.cfg.norm_eps) == (2, tied, 80, 1e-6)
    assert max_diff(ours.eval(), theirs, 173) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "gpt2-tanh-nobias-untied", "llama", "neox-quickstart", "neox-bias-untied"])
def test_export_round_trip_loads_in_transformers_with_the_same_logits(tmp_path, arch):
    model_cfg = {
        "gpt2": dict(n_layer=2, n_head=4, n_embd=32, block_size=48, bias=True),
        "gpt2-tanh-nobias-untied": dict(n_layer=2, n_head=4, n_embd=32, block_size=48, mlp="gelu_tanh",
                                        tie_embeddings=False),
        "llama": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=48, pos_encoding="rope",
                      norm="rmsnorm", mlp="swiglu", rope_theta=5000.0),
        # the quickstart's rope model: LayerNorm, exact GELU, no biases, tied embeddings
        "neox-quickstart": dict(n_layer=2, n_head=4, n_embd=32, block_size=48, pos_encoding="rope"),
        "neox-bias-untied": dict(n_layer=2, n_head=4, n_embd=32, block_size=48, pos_encoding="rope", bias=True,
                                 mlp="gelu_tanh", tie_embeddings=False, rope_theta=500.0, norm_eps=1e-6),
    }[arch]  # fmt: skip
    torch.manual_seed(2)
    model = GPT(ModelConfig(**model_cfg), 97)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # away from the initial weights (biases and norms no longer zero and one)
        idx = torch.randint(0, 97, (4, 48))
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    export_model(model, tmp_path / "out", bos_id=1, eos_id=2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want = {"llama": "LlamaForCausalLM", "neox": "GPTNeoXForCausalLM"}.get(arch.split("-")[0], "GPT2LMHeadModel")
    assert type(theirs).__name__ == want
    assert max_diff(model.eval(), theirs, 97, T=48) < 1e-4
    back, _ = load_pretrained(tmp_path / "out")  # and read back by llmcore itself
    assert max_diff(back.eval(), theirs, 97, T=48) < 1e-5


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_gpt_neox_folder_saved_by_transformers_reads_with_equal_logits(tmp_path, tied):
    torch.manual_seed(3)
    cfg = transformers.GPTNeoXConfig(vocab_size=131, hidden_size=48, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=6, max_position_embeddings=64, rotary_pct=1.0,
                                     rotary_emb_base=2000, use_parallel_residual=False, layer_norm_eps=1e-6,
                                     tie_word_embeddings=tied, hidden_act="gelu")  # fmt: skip
    theirs = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # biases and norms away from zeros and ones
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    ours, hf = load_pretrained(tmp_path)
    assert (hf.family, ours.cfg.mlp_hidden, ours.cfg.rope_theta, ours.cfg.tie_embeddings) == ("neox", 160, 2000, tied)
    assert max_diff(ours.eval(), theirs, 131) < 1e-5


def test_gpt_neox_variants_without_an_equivalent_are_refused_naming_the_field(tmp_path):
    base = {"model_type": "gpt_neox", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(base))  # Pythia's defaults: parallel residual, a quarter rotary
    with pytest.raises(HFError) as info:
        read_model(tmp_path)
    assert "use_parallel_residual: only the sequential residual" in str(info.value)
    assert "rotary_pct / partial_rotary_factor: 0.25" in str(info.value)


def test_a_model_without_a_hugging_face_equivalent_is_refused_naming_the_fields(tmp_path):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, pos_encoding="sinusoidal"), 50)
    with pytest.raises(HFError) as info:
        export_model(model, tmp_path, bos_id=None, eos_id=None)
    text = str(info.value)
    assert "as GPT2LMHeadModel: pos_encoding='sinusoidal'" in text and "as LlamaForCausalLM: pos_encoding=" in text
    assert "as GPTNeoXForCausalLM: pos_encoding='sinusoidal'" in text
    assert "rope + rmsnorm + swiglu without biases -> LlamaForCausalLM" in text and not list(tmp_path.iterdir())
    gqa = GPT(ModelConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, pos_encoding="rope"), 50)
    with pytest.raises(HFError, match=r"as GPTNeoXForCausalLM: n_kv_head=1"):
        export_model(gqa, tmp_path, bos_id=None, eos_id=None)


def test_spec_fields_must_agree_with_the_checkpoint_and_unset_ones_take_its(gpt2_dir):
    folder, theirs = gpt2_dir
    hf = read_model(folder)
    merged = merge_config(ModelConfig.model_validate({"block_size": 16, "dropout": 0.0}), hf)
    assert (merged.n_layer, merged.n_embd, merged.block_size, merged.dropout, merged.mlp) == (
        2,
        32,
        16,
        0.0,
        "gelu_tanh",
    )
    with pytest.raises(HFError) as info:
        merge_config(ModelConfig.model_validate({"n_layer": 4, "n_embd": 64, "n_head": 4, "block_size": 128}), hf)
    text = str(info.value)
    assert "(3)" in text and "model.n_layer: 4 but" in text and "model.n_embd: 64 but" in text
    assert "model.block_size: 128 is beyond the checkpoint's 64 positions" in text and "n_head" not in text
    cropped, _ = load_pretrained(folder, merged)  # a smaller block size crops the position table
    assert cropped.wpe.weight.shape == (16, 32)
    assert max_diff(cropped.eval(), theirs, VOCAB, T=16) < 1e-5


def test_bad_folders_are_errors_naming_the_file_and_field(tmp_path, gpt2_dir):
    with pytest.raises(HFError, match=r"model.init_from.path: .*config.json is missing"):
        read_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(
        HFError, match=r"config.json: model_type 'bert' \(architectures: BertModel\) is not one gptlab reads"
    ):
        read_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HFError, match="config.json: cannot be read as JSON"):
        read_model(tmp_path)
    folder, _ = gpt2_dir
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(HFError, match="has no weights"):
        load_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"x": Evil(str(marker))}, tmp_path / "pytorch_model.bin")  # a pickle that would run code
    with pytest.raises(HFError, match=r"pytorch_model.bin: not plain weights: torch.load\(weights_only=True\)"):
        load_pretrained(tmp_path)
    assert not marker.exists()
    (tmp_path / "pytorch_model.bin").unlink()
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(HFError, match=r"blocks.0.attn.c_attn.weight has shape \(3, 3\)"):
        load_pretrained(tmp_path)
