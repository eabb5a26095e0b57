"""Stage keys, run hashes, the stage directories' ``config.json`` and the training process's ``train.json`` of
representative specs stay byte-identical across versions of gptlab (pinned from the dict-config stage registry,
before the key configs became Pydantic models): a runs_root finished by an earlier version is found again, and
nothing a user finished is redone after an upgrade.

Everything a key reads from disk is made fixed: the corpus and the task file at a fixed path with a fixed mtime,
and file digests (``Facts.digest``) replaced by a digest of the file's name, so the Hugging Face folder (whose
weights and tokenizer files depend on the torch, transformers and tokenizers versions) keys the same everywhere.
The folder's content is covered by the tests of ``Facts.digest`` and ``tests/test_init_from.py``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import gpt2_folder

from workflows.planning import canonical_hash, plan
from workflows.spec import load_spec_tree
from workflows.stages import TRAIN_CONFIG, Facts, write_train_config

ROOT = Path("/tmp/gptlab-stage-keys-pinned")
MTIME = 1_700_000_000_000_000_000
TASK = "".join(json.dumps({"context": f"Question {i}:", "choices": [" yes", " no", " maybe"], "answer": i % 3}) + "\n"
               for i in range(6))  # fmt: skip


def _fixed(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(MTIME, MTIME))
    return path


@pytest.fixture(scope="module")
def root():
    shutil.rmtree(ROOT, ignore_errors=True)
    corpus = ROOT / "corpus"
    for i in range(3):
        _fixed(corpus / f"doc{i}.txt", f"the quick brown fox {i} jumps over the lazy dog\n" * 20)
    _fixed(ROOT / "task.jsonl", TASK)
    gpt2_folder(ROOT / "gpt2", corpus)
    return ROOT


@pytest.fixture(autouse=True)
def name_digests(monkeypatch):
    monkeypatch.setattr(Facts, "digest", lambda self, path: hashlib.sha256(Path(path).name.encode()).hexdigest())


def base(root: Path, **sections) -> dict:
    tree = {
        "name": "pinned", "seed": 7, "runs_root": str(root / "runs"),
        "data": {"sources": [{"type": "files", "path": str(root / "corpus")}], "split": "tail", "val_fraction": 0.2,
                 "num_workers": 1},
        "tokenizer": {"model_type": "char", "vocab_size": 64, "num_threads": 1},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "train": {"batch_size": 8, "max_steps": 30, "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 5,
                  "device": "cpu", "time_budget_s": 100},
        "eval": {"batches": 4, "prompts": ["The "], "max_new_tokens": 20},
    }  # fmt: skip
    for key, value in sections.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and key in tree else value
    return tree


def specs(root: Path) -> dict[str, dict]:
    gpt2 = str(root / "gpt2")
    return {
        "plain": base(root),
        "sweep": base(
            root,
            sweep={"model.pos_encoding": ["learned", "rope"], "train.seed": [None, 3], "data.val_fraction": [0.2, 0.3]},
        ),  # fmt: skip
        "added-later": base(
            root,
            model={"n_kv_head": 1, "mlp": "swiglu", "tie_embeddings": False, "dropout": 0.1},
            train={"lr_schedule": "constant", "freeze": ["wte.*"], "pause_at": 10},
            data={"mask_prompt": False},
        ),  # fmt: skip
        "pretrained": {
            **base(root, train={"lora": {"r": 4}, "seed": 5}),
            "tokenizer": {"type": "pretrained", "path": gpt2},
            "model": {
                "init_from": {"type": "huggingface", "path": gpt2},
                "block_size": 32,
                "dropout": 0.1,
                "attention": "plain",
            },
        },  # fmt: skip
        "pretrained-default-tokenizer": {
            **{k: v for k, v in base(root).items() if k != "tokenizer"},
            "model": {"init_from": {"type": "huggingface", "path": gpt2}, "block_size": 32},
        },
        "tasks-inspect": base(
            root,
            eval={
                "tasks": [
                    {"name": "file", "path": str(root / "task.jsonl"), "num_fewshot": 1},
                    {"name": "derived", "format": "next_line", "limit": 5},
                ],
                "inspect": {"prompts": ["The fox"], "passage_chars": 100},
            },
        ),  # fmt: skip
    }


def fingerprints(tree: dict) -> dict[str, dict[str, str]]:
    """Per run: each stage's key, its config.json's hash (sorted keys, as the file is written), and the train
    stage's train.json; the run hash."""
    p = plan(load_spec_tree(tree, "s.yaml"))
    out = {}
    for r in p.runs:
        row = {"run_hash": r.run_hash}
        for label, s in r.stages.items():
            row[label] = s.key
            row[f"{label}/config.json"] = canonical_hash(s.config)
        stage = r.training
        stage.dir.mkdir(parents=True, exist_ok=True)
        write_train_config(stage.dir, stage.config, {**stage.runtime, "pause_at": 10})
        row["train.json"] = hashlib.sha256((stage.dir / TRAIN_CONFIG).read_bytes()).hexdigest()[:16]
        out[r.name] = row
    return out


PINNED: dict[str, dict] = {
    "plain": {
        "pinned": {
            "run_hash": "a65fc5d230bed354",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "3b643ae1cf1163b4",
            "shards/config.json": "d2aee12cd2f91536",
            "train": "ac01b3ec875719a4",
            "train/config.json": "a6f6fa13b42c3941",
            "eval": "34fafc576165ca5d",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "0f05baa8af9b7d8c",
        }
    },
    "sweep": {
        "pos_encoding=learned,seed=None,val_fraction=0.2": {
            "run_hash": "b7d891bd90ec8e0f",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "3b643ae1cf1163b4",
            "shards/config.json": "d2aee12cd2f91536",
            "train": "ac01b3ec875719a4",
            "train/config.json": "a6f6fa13b42c3941",
            "eval": "34fafc576165ca5d",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "0f05baa8af9b7d8c",
        },
        "pos_encoding=learned,seed=None,val_fraction=0.3": {
            "run_hash": "38bc05d627e71c6d",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "543f2bef3af2eac3",
            "shards/config.json": "a157479dfc9ad907",
            "train": "6a9d867c7efa4a2a",
            "train/config.json": "a6f6fa13b42c3941",
            "eval": "e5050a9a2d03087d",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "0f05baa8af9b7d8c",
        },
        "pos_encoding=learned,seed=3,val_fraction=0.2": {
            "run_hash": "97fe9af8a058af79",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "3b643ae1cf1163b4",
            "shards/config.json": "d2aee12cd2f91536",
            "train": "1960f09f8f1ee0f9",
            "train/config.json": "0050356a28ae4432",
            "eval": "5b3f70d17d092c6a",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "4ee8f181251545fa",
        },
        "pos_encoding=learned,seed=3,val_fraction=0.3": {
            "run_hash": "337c6b1f9fd7fd51",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "543f2bef3af2eac3",
            "shards/config.json": "a157479dfc9ad907",
            "train": "6d628197bdb01287",
            "train/config.json": "0050356a28ae4432",
            "eval": "2bfad9cbd096b9b6",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "4ee8f181251545fa",
        },
        "pos_encoding=rope,seed=None,val_fraction=0.2": {
            "run_hash": "2cc503a7d718584e",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "3b643ae1cf1163b4",
            "shards/config.json": "d2aee12cd2f91536",
            "train": "4e5babc05c5d5c7d",
            "train/config.json": "e5c97c7ac77147bd",
            "eval": "29c4b1540616e89b",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "dfbf46244f794c77",
        },
        "pos_encoding=rope,seed=None,val_fraction=0.3": {
            "run_hash": "d484ea709aa07754",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "543f2bef3af2eac3",
            "shards/config.json": "a157479dfc9ad907",
            "train": "09917d85810d72dd",
            "train/config.json": "e5c97c7ac77147bd",
            "eval": "369b8cc8e8122f7e",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "dfbf46244f794c77",
        },
        "pos_encoding=rope,seed=3,val_fraction=0.2": {
            "run_hash": "0d74d3e2fb72bfac",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "3b643ae1cf1163b4",
            "shards/config.json": "d2aee12cd2f91536",
            "train": "944f85c167a09f99",
            "train/config.json": "446a6bcf1383c83f",
            "eval": "5a5e33bf2efc7ee1",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "7372a24780fc5d73",
        },
        "pos_encoding=rope,seed=3,val_fraction=0.3": {
            "run_hash": "660b9df340c15ccb",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "543f2bef3af2eac3",
            "shards/config.json": "a157479dfc9ad907",
            "train": "1c059e2d4cec7455",
            "train/config.json": "446a6bcf1383c83f",
            "eval": "81ab72af9079f121",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "7372a24780fc5d73",
        },
    },
    "added-later": {
        "pinned": {
            "run_hash": "8a44153792062d6e",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "896e6f849ad49b56",
            "shards/config.json": "5dcc4c1c803fdbd4",
            "train": "802da1aaf6a2cb3b",
            "train/config.json": "2a8187a8d5e28eac",
            "eval": "9136674494c2ce8f",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "8ca00e9e1f19c0c4",
        }
    },
    "pretrained": {
        "pinned": {
            "run_hash": "6e052fc2383403bc",
            "tokenizer": "54af13eecd6cf57d",
            "tokenizer/config.json": "88d1aa32642a7224",
            "shards": "fd0e4631364568ca",
            "shards/config.json": "d2aee12cd2f91536",
            "init": "1debf9c0b771f758",
            "init/config.json": "95e42e0d26d547b3",
            "train": "d4c438b2c037ecd8",
            "train/config.json": "b933b370c5eeb808",
            "eval": "546f3f49e21fa878",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "4d83a79ae3925e48",
        }
    },
    "pretrained-default-tokenizer": {
        "pinned": {
            "run_hash": "950bf1e857633022",
            "tokenizer": "54af13eecd6cf57d",
            "tokenizer/config.json": "88d1aa32642a7224",
            "shards": "fd0e4631364568ca",
            "shards/config.json": "d2aee12cd2f91536",
            "init": "1debf9c0b771f758",
            "init/config.json": "95e42e0d26d547b3",
            "train": "ef5ba58034cb7454",
            "train/config.json": "ae47ecec6c2c9582",
            "eval": "4d2360354ed81d01",
            "eval/config.json": "bd6adf6b232416d8",
            "train.json": "213216905942a2c4",
        }
    },
    "tasks-inspect": {
        "pinned": {
            "run_hash": "a65fc5d230bed354",
            "tokenizer": "984168afe6ca59e9",
            "tokenizer/config.json": "4e57a35f454492d2",
            "shards": "3b643ae1cf1163b4",
            "shards/config.json": "d2aee12cd2f91536",
            "train": "ac01b3ec875719a4",
            "train/config.json": "a6f6fa13b42c3941",
            "eval": "34fafc576165ca5d",
            "eval/config.json": "bd6adf6b232416d8",
            "task:file": "4964695606b7134a",
            "task:file/config.json": "0681fef91a91d334",
            "task:derived": "0ae560e1f110dfa0",
            "task:derived/config.json": "7c649eb9efffda6f",
            "inspect": "9320b1c91b75c0c6",
            "inspect/config.json": "83d232b01155ca51",
            "train.json": "0f05baa8af9b7d8c",
        }
    },
}


@pytest.mark.parametrize("name", ["plain", "sweep", "added-later", "pretrained", "pretrained-default-tokenizer",
                                  "tasks-inspect"])  # fmt: skip
def test_stage_keys_config_json_and_train_json_are_pinned(root, name):
    got = fingerprints(specs(root)[name])
    assert got == PINNED[name]
