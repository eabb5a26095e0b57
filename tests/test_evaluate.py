"""Evaluation: loss, perplexity and bits per byte agree with each other and with the manifest; samples."""

from __future__ import annotations

import json
import math

import pytest

from llmcore.checkpoint import CheckpointError
from llmcore.config import EvalConfig, ModelConfig, TrainConfig
from llmcore.evaluate import evaluate, main
from llmcore.train import train

MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, pos_encoding="rope", norm="rmsnorm", mlp="swiglu")


@pytest.fixture(scope="module")
def llm_trained(llm_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train(
        MODEL,
        TrainConfig(
            batch_size=8,
            max_steps=30,
            warmup_steps=3,
            lr=3e-3,
            eval_interval=30,
            eval_batches=2,
            checkpoint_interval=30,
            device="cpu",
        ),
        llm_shards,
        out,
        seed=0,
    )
    return out


def test_evaluate_writes_consistent_eval_json(llm_trained, llm_shards, llm_tokenizer_model, tmp_path):
    cfg = EvalConfig(batches=4, batch_size=8, prompts=["the cat", ""], max_new_tokens=12, top_k=5, top_p=0.9)
    (llm_trained / "DONE.json").write_text("{}")  # a workflow's stage marker beside checkpoints/ is not one of them
    result = evaluate(llm_trained, llm_shards, llm_tokenizer_model, cfg, tmp_path, seed=1, device="cpu")
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk == result
    manifest = json.loads((llm_shards / "manifest.json").read_text())
    val = manifest["splits"]["val"]
    assert result["step"] == 30 and result["tokens_evaluated"] == 4 * 8 * 16
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2) * val["tokens"] / val["bytes"])
    assert 0 < result["val_loss"] < math.log(manifest["vocab_size"])  # it learned something
    assert [s["prompt"] for s in result["samples"]] == ["the cat", ""]
    assert all(isinstance(s["text"], str) and s["text"] for s in result["samples"])
    assert "the cat" in (tmp_path / "samples.txt").read_text()
    # seeded: the same call gives the same samples
    again = evaluate(llm_trained, llm_shards, llm_tokenizer_model, cfg, tmp_path / "again", seed=1, device="cpu")
    assert again["samples"] == result["samples"] and again["val_loss"] == result["val_loss"]


def test_evaluate_whole_split(llm_trained, llm_shards, llm_tokenizer_model, tmp_path):
    cfg = EvalConfig(batches=0, batch_size=64, prompts=["a"], max_new_tokens=3)
    result = evaluate(llm_trained, llm_shards, llm_tokenizer_model, cfg, tmp_path, seed=0, device="cpu")
    val_tokens = json.loads((llm_shards / "manifest.json").read_text())["splits"]["val"]["tokens"]
    assert result["tokens_evaluated"] == val_tokens - 1  # every token but the first is a target once
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))


def test_evaluate_without_checkpoint_is_an_error(llm_shards, llm_tokenizer_model, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        evaluate(tmp_path, llm_shards, llm_tokenizer_model, EvalConfig(), tmp_path / "e", seed=0, device="cpu")
    args = [
        "--train-dir",
        str(tmp_path),
        "--shards",
        str(llm_shards),
        "--tokenizer",
        str(llm_tokenizer_model),
        "--out",
        str(tmp_path / "e"),
        "--device",
        "cpu",
    ]
    assert main(args) == 2 and "no committed checkpoint" in capsys.readouterr().err  # bad input, as train says


def test_evaluate_cli(llm_trained, llm_shards, llm_tokenizer_model, tmp_path, capsys):
    (tmp_path / "eval.json").write_text(json.dumps({"batches": 2, "batch_size": 4, "max_new_tokens": 5}))
    args = [
        "--train-dir",
        str(llm_trained),
        "--shards",
        str(llm_shards),
        "--tokenizer",
        str(llm_tokenizer_model),
        "--out",
        str(tmp_path / "e"),
        "--config",
        str(tmp_path / "eval.json"),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tokens_evaluated"] == 2 * 4 * 16 and (tmp_path / "e" / "samples.txt").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"batches": -1}))
    assert main(args[:-4] + ["--config", str(tmp_path / "bad.json")]) == 2


def test_token_loss_is_the_summed_cross_entropy(llm_trained, llm_shards):
    """token_loss sums each batch's mean loss times its target count: the same as summing cross-entropy over
    every target token, also over the whole split's last, partial batch."""
    import torch
    import torch.nn.functional as F

    from llmcore.checkpoint import load_model
    from llmcore.evaluate import token_loss
    from llmcore.shards import TokenSplit, iter_sequential

    model, _ = load_model(llm_trained, torch.device("cpu"))
    val = TokenSplit(llm_shards, "val")
    nats, n = token_loss(model, iter_sequential(val, 7, 16), torch.device("cpu"), None)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in iter_sequential(val, 7, 16):
            logits, _ = model(x, y)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum").item()
            count += int((y != -1).sum())
    assert n == count == val.tokens - 1
    assert nats == pytest.approx(total, rel=1e-6)
