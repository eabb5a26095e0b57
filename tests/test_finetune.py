"""Starting from pretrained weights, end to end: a tiny GPT-2 folder (built and saved by transformers, with a
tokenizer trained by `tokenizers`) fine-tuned through `gptlab submit`, continued from the run by a second spec
(`init_from: {type: run}`), exported back (`gptlab export`) and generated from (`gptlab sample --pretrained`); the
exported folder checked with transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import gpt2_folder, gptlab, make_corpus, records, tiny_spec, write_spec
from mlflow.tracking import MlflowClient

from workflows import submit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    corpus = make_corpus(tmp / "corpus")
    folder = gpt2_folder(tmp / "gpt2", corpus)
    tree = tiny_spec(corpus, tmp / "runs", train={"max_steps": 40, "lr": 3e-3, "eval_interval": 10,
                                                 "checkpoint_interval": 20})  # fmt: skip
    del tree["tokenizer"]  # the checkpoint's own
    tree["name"] = "finetune"
    tree["model"] = {"init_from": {"type": "huggingface", "path": str(folder)}, "block_size": 32, "dropout": 0.0}
    spec = write_spec(tmp / "ft.yaml", tree)
    result = submit(spec, quiet=True, poll_interval=0.3)
    stages = tmp / "runs" / "stages"
    (train,), (tok,) = stages.glob("train-*"), stages.glob("tokenizer-*")
    return {"tmp": tmp, "corpus": corpus, "folder": folder, "spec": spec, "tree": tree, "result": result,
            "train": train, "tokenizer": tok}  # fmt: skip


def test_fine_tuning_from_a_hugging_face_folder_lowers_validation_loss(finetuned):
    result, train = finetuned["result"], finetuned["train"]
    assert result.ok, [r.error for r in result.runs]
    evals = records(train, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # it learns from where GPT-2 (random here) stood
    config = json.loads((train / "train.json").read_text())["model"]
    assert (config["mlp"], config["bias"], config["n_layer"], config["block_size"]) == ("gelu_tanh", True, 2, 32)
    assert json.loads((finetuned["tokenizer"] / "stats.json").read_text())["type"] == "pretrained"
    again = submit(finetuned["spec"], quiet=True, poll_interval=0.3)  # the weights' content is in the key: cached
    assert {str(s) for s in again.runs[0].stages.values()} == {"cached"}


def test_init_from_a_run_starts_at_its_final_loss(finetuned):
    tmp, first = finetuned["tmp"], finetuned["train"]
    last_val = records(first, "eval")[-1]["val_loss"]
    tree = json.loads(json.dumps(finetuned["tree"]))
    tree["name"] = "continued"
    tree["model"] = {"init_from": {"type": "run", "run": "finetune"}}
    tree["train"].update(max_steps=1, lr=1e-9, min_lr=0.0, warmup_steps=0, eval_interval=1)
    result = submit(write_spec(tmp / "cont.yaml", tree), quiet=True, poll_interval=0.3)
    assert result.ok, [r.error for r in result.runs]
    second = next(d for d in (tmp / "runs" / "stages").glob("train-*") if d != first)
    assert records(second, "eval")[0]["val_loss"] == pytest.approx(last_val, abs=1e-4)
    assert json.loads((second / "train.json").read_text())["model"]["block_size"] == 32  # the earlier run's


def test_export_loads_in_transformers_with_the_same_logits_and_tokens(finetuned, tmp_path):
    tmp = finetuned["tmp"]
    r = gptlab("export", "finetune", "--runs-root", tmp / "runs", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    from llmcore.checkpoint import load_model
    from llmcore.tokenizer import load_tokenizer

    ours, _ = load_model(finetuned["train"])
    text = (finetuned["corpus"] / "doc001.txt").read_text() + " 你好 🙂\t\n  x"
    ids = load_tokenizer(finetuned["tokenizer"]).encode(text)
    assert tok(text)["input_ids"] == ids
    x = torch.tensor([ids[:32]])
    with torch.no_grad():
        assert (model(x).logits - ours(x, all_logits=True)[0]).abs().max().item() < 1e-4
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "final/val_loss" in card and finetuned["result"].runs[0].run_id in card
    run = MlflowClient(finetuned["result"].tracking_uri).get_run(finetuned["result"].runs[0].run_id)
    assert run.data.tags["gptlab.exported_to"] == str((tmp_path / "hf").resolve())
    # generation from the folder, as transformers' pipeline would: greedy is the same tokens
    out = gptlab("sample", "--pretrained", tmp_path / "hf", "--prompt", "The ", "--temperature", "0",
                 "--max-new-tokens", "12")  # fmt: skip
    assert out.returncode == 0, out.stderr
    prompt = tok("The ", return_tensors="pt").input_ids
    want = model.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    assert out.stdout.rstrip("\n") == "The " + tok.decode(want[0, prompt.shape[1] :], skip_special_tokens=True)


def test_bad_pretrained_input_is_exit_2_and_writes_nothing(finetuned, tmp_path):
    corpus, folder = finetuned["corpus"], finetuned["folder"]
    cases = {
        "no config.json": ({"init_from": {"type": "huggingface", "path": str(tmp_path)}}, "config.json is missing"),
        "too long a context": ({"init_from": {"type": "huggingface", "path": str(folder)}, "block_size": 128},
                               "model.block_size: 128 is beyond the checkpoint's 64 positions"),
        "conflicting architecture": ({"init_from": {"type": "huggingface", "path": str(folder)}, "n_layer": 5},
                                     "model.n_layer: 5 but"),
        "an unknown run": ({"init_from": {"type": "run", "run": "nothing-named-so"}}, "model.init_from.run:"),
    }  # fmt: skip
    for name, (model, message) in cases.items():
        tree = tiny_spec(corpus, tmp_path / "runs", model=model)
        del tree["tokenizer"]
        tree["model"] = model
        spec = write_spec(tmp_path / "s.yaml", tree)
        r = gptlab("submit", spec, "--lines")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
    assert not (tmp_path / "runs" / "stages").exists()  # nothing half-written
    other = gpt2_folder(tmp_path / "other", corpus)  # its tokenizer has another vocabulary than the model's
    (other / "tokenizer.json").write_text(
        (folder / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|end|>"')
    )
    tree = tiny_spec(corpus, tmp_path / "runs2", tokenizer={"type": "pretrained", "path": str(tmp_path / "tok")})
