"""`model.init_from` checked before anything runs: a Hugging Face folder whose config.json cannot be read or names an
architecture gptlab does not read, with no weights or a truncated safetensors file, is refused by `validate`, `plan`
and `submit` alike (exit code 2, the field named, no traceback, no stage started); `plan` counts the folder's model
with the folder's vocabulary; a `tokenizer.vocab_size` that disagrees with the folder is listed with the other
conflicts."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import gpt2_folder, gptlab, make_corpus, tiny_spec, write_spec
from typer.testing import CliRunner

from workflows.cli import app


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A good tiny GPT-2 folder and four broken copies of it."""
    tmp = tmp_path_factory.mktemp("init_from")
    corpus = make_corpus(tmp / "corpus", n_docs=8)
    good = gpt2_folder(tmp / "gpt2", corpus)

    def broken(name, damage):
        folder = tmp / name
        shutil.copytree(good, folder)
        damage(folder)
        return folder

    def truncate(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])

    bad = {
        "no weights": (broken("noweights", lambda f: (f / "model.safetensors").unlink()), "has no weights"),
        "truncated": (broken("truncated", truncate), "model.safetensors: truncated: its header describes"),
        "unknown model_type": (
            broken("bert", lambda f: (f / "config.json").write_text(json.dumps({"model_type": "bert"}))),
            "config.json: model_type 'bert' (architectures: none given) is not one gptlab reads (gpt2",
        ),
        "unreadable config.json": (
            broken("badjson", lambda f: (f / "config.json").write_text("{not json")),
            "config.json: cannot be read as JSON",
        ),
    }
    return {"tmp": tmp, "corpus": corpus, "good": good, "bad": bad}


def spec_for(folders, folder, name="s"):
    tree = tiny_spec(folders["corpus"], folders["tmp"] / f"runs-{name}", site={"name": "local-processes"})
    del tree["tokenizer"]  # the folder's own
    tree["model"] = {"init_from": {"type": "huggingface", "path": str(folder)}, "block_size": 32}
    return write_spec(folders["tmp"] / f"{name}.yaml", tree)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("case", ["no weights", "truncated", "unknown model_type", "unreadable config.json"])
def test_a_bad_folder_is_exit_2_naming_the_field_at_validate_plan_and_submit(folders, case):
    folder, message = folders["bad"][case]
    spec = spec_for(folders, folder, case.replace(" ", "-").replace(".", ""))
    for command in ("validate", "plan"):
        r = cli(command, spec)
        assert r.exit_code == 2, (command, r.output)
        assert f"model.init_from.path: {folder}" in r.output and message in r.output, (command, r.output)
        assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), (command, r.output)
    r = gptlab("submit", spec, "--lines", timeout=120)  # a real process, as a user runs it
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    runs_root = folders["tmp"] / f"runs-{case.replace(' ', '-').replace('.', '')}"
    assert not (runs_root / "stages").exists()  # refused before any stage ran (the tokenizer, the shards)


def test_plan_counts_the_folders_model_with_its_own_vocabulary(folders):
    from llmcore.hf import load_pretrained

    model, hf = load_pretrained(folders["good"])
    assert hf.vocab_size < 4096  # the spec's default vocabulary, which planning used to count with
    r = cli("plan", spec_for(folders, folders["good"], "good"))
    assert r.exit_code == 0, r.output
    row = next(x for x in r.output.splitlines() if "│ tiny " in x)
    assert f"│ {model.num_params() / 1e6:.2f}M " in row, row


def test_a_conflicting_tokenizer_vocab_size_is_listed_with_the_other_conflicts(folders):
    spec = spec_for(folders, folders["good"], "conflict")
    r = cli("validate", spec, "--set", "tokenizer.vocab_size=64", "--set", "model.n_layer=3")
    assert r.exit_code == 2, r.output
    assert "disagrees with the pretrained model (2)" in r.output, r.output
    assert "model.n_layer: 3 but" in r.output and "tokenizer.vocab_size: 64 but" in r.output, r.output
    assert cli("validate", spec, "--set", "tokenizer.vocab_size=320").exit_code == 0  # the folder's: no conflict


def test_weight_files_are_checked_by_their_headers_alone(folders, tmp_path):
    from llmcore.hf import SAFETENSORS, weights_problems

    good = folders["good"] / SAFETENSORS
    assert weights_problems(folders["good"]) == []
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(good, sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (problem,) = weights_problems(sharded)
    assert problem == f"{sharded / 'model-00002-of-00002.safetensors'}: missing (named by the folder's index)"
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / SAFETENSORS).write_bytes((10**9).to_bytes(8, "little") + b"{}")  # a header longer than the file
    assert "truncated or not a safetensors file" in weights_problems(garbage)[0]
    (garbage / SAFETENSORS).write_bytes((4).to_bytes(8, "little") + b"nope")  # not JSON
    assert "its header cannot be read" in weights_problems(garbage)[0]
    import torch

    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save({"x": torch.zeros(1000)}, binary / "pytorch_model.bin")
    assert weights_problems(binary) == []
    data = (binary / "pytorch_model.bin").read_bytes()
    (binary / "pytorch_model.bin").write_bytes(data[: len(data) - 200])  # the zip directory at its end is gone
    assert "truncated or damaged (not a readable zip archive" in weights_problems(binary)[0]
