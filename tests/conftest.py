"""Shared fixtures. Fixtures for the llmcore model/train/eval tests are prefixed `llm_`."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

LLM_WORDS = (
    "the cat sat on a mat and the dog ran to the old red barn while birds sang in tall green trees near a quiet river"
).split()


def llm_make_text(n_lines: int = 1500, seed: int = 0) -> str:
    """Pseudo-English with a small alphabet: learnable by a tiny model in a few dozen steps."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(LLM_WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def llm_shards(tmp_path_factory) -> Path:
    """A real shards directory (char tokenizer, `tail` split) built once per session; tokenizer at
    `llm_shards.parent / "tokenizer" / "tokenizer.model"`."""
    from llmcore.config import DataConfig, FilesSource, TokenizerConfig
    from llmcore.shards import write_shards
    from llmcore.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("llm_data")
    corpus = root / "corpus.txt"
    corpus.write_text(llm_make_text(), encoding="utf-8")
    data = DataConfig(sources=[FilesSource(path=str(corpus))], split="tail", val_fraction=0.1, num_workers=1)
    train_tokenizer(data, TokenizerConfig(model_type="char", vocab_size=64, num_threads=1), root / "tokenizer", 0)
    write_shards(data, root / "tokenizer" / "tokenizer.model", root / "shards", 0)
    return root / "shards"


@pytest.fixture(scope="session")
def llm_tokenizer_model(llm_shards) -> Path:
    return llm_shards.parent / "tokenizer" / "tokenizer.model"
