"""Token shards: writing, verifying, reading and batch sampling (llmcore.shards)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llmcore.config import DataConfig, FilesSource, TokenizerConfig
from llmcore.corpus import CorpusError
from llmcore.shards import (
    BatchSampler,
    ShardError,
    TokenSplit,
    fixed_batches,
    iter_sequential,
    resolve_dtype,
    verify_shards,
    write_shards,
)
from llmcore.tokenizer import Tokenizer, train_tokenizer

N_DOCS = 40


def doc_text(i: int) -> str:
    """Small documents of varying length, with non-ASCII text so bytes differ from characters."""
    return f"# café {i}\n" + "".join(f"def f{j}(x):\n    return x * {j}  # — ok\n" for j in range(i % 6 + 1))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A corpus of N_DOCS files, a BPE tokenizer trained on it, and its shards (num_workers=1, small shards)."""
    root = tmp_path_factory.mktemp("shards")
    (root / "corpus").mkdir()
    for i in range(N_DOCS):
        (root / "corpus" / f"d{i:03d}.txt").write_text(doc_text(i))
    data = DataConfig(
        sources=[FilesSource(path=str(root / "corpus"))], val_fraction=0.2, shard_tokens=300, num_workers=1
    )
    train_tokenizer(data, TokenizerConfig(vocab_size=100), root / "tok", seed=0)
    model = root / "tok" / "tokenizer.model"
    manifest = write_shards(data, model, root / "s1", seed=7)
    return {"root": root, "data": data, "model": model, "tok": Tokenizer.load(model), "manifest": manifest}


def split_stream(shards_dir: Path, split: str) -> np.ndarray:
    s = TokenSplit(shards_dir, split)
    return s.read(0, s.tokens)


def documents_of(tok: Tokenizer, stream: np.ndarray) -> list[str]:
    """Decode a split's stream back into its documents (EOS ends each one)."""
    ends = np.flatnonzero(stream == tok.eos_id)
    assert len(ends) and ends[-1] == len(stream) - 1
    return [tok.decode(part) for part in np.split(stream, ends + 1)[:-1]]


def test_manifest_counts_equal_the_encoded_documents(env):
    m, tok = env["manifest"], env["tok"]
    texts = [doc_text(i) for i in range(N_DOCS)]
    train = documents_of(tok, split_stream(env["root"] / "s1", "train"))
    val = documents_of(tok, split_stream(env["root"] / "s1", "val"))
    assert Counter(train + val) == Counter(texts)  # every document exactly once, losslessly
    assert train == [t for t in texts if t in set(train)]  # in corpus order
    for split, docs in (("train", train), ("val", val)):
        info = m["splits"][split]
        assert info["documents"] == len(docs) > 0
        assert info["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        assert m["bytes_per_token"][split] == pytest.approx(info["bytes"] / info["tokens"])
        assert all(s["tokens"] <= 300 for s in info["shards"]) and len(info["shards"]) >= 2
    assert (m["dtype"], m["vocab_size"], m["eos_id"], m["seed"]) == ("uint16", 100, 2, 7)
    assert m["tokenizer_sha256"] == tok.sha256
    assert json.loads((env["root"] / "s1" / "manifest.json").read_text()) == m


def test_shard_file_format(env):
    first = env["manifest"]["splits"]["train"]["shards"][0]
    raw = (env["root"] / "s1" / first["file"]).read_bytes()
    assert first["file"] == "train-00000.bin"
    magic, version, code, count = struct.unpack_from("<8sIIQ", raw)
    assert (magic, version, code, count) == (b"GPTLTOK\x00", 1, 2, first["tokens"])
    assert raw[24:64] == bytes(40) and len(raw) == 64 + 2 * count
    assert verify_shards(env["root"] / "s1") == env["manifest"]


def test_output_is_identical_for_one_and_two_workers(env, monkeypatch):
    monkeypatch.setattr("llmcore.shards.CHUNK_TEXTS", 3)  # many small work units, interleaved across workers
    data = env["data"].model_copy(update={"num_workers": 2})
    assert write_shards(data, env["model"], env["root"] / "s2", seed=7) == env["manifest"]
    for f in sorted((env["root"] / "s1").glob("*.bin")):
        assert (env["root"] / "s2" / f.name).read_bytes() == f.read_bytes()


def test_document_split_depends_on_seed(env, tmp_path):
    other = write_shards(env["data"], env["model"], tmp_path, seed=8)
    assert other["splits"]["val"]["tokens"] != env["manifest"]["splits"]["val"]["tokens"]


def test_tail_split_holds_out_the_end_of_each_document(env, tmp_path):
    text = "".join(doc_text(i) for i in range(10))
    (tmp_path / "one.txt").write_text(text)
    data = DataConfig(sources=[FilesSource(path=str(tmp_path / "one.txt"))], split="tail", num_workers=1)
    m = write_shards(data, env["model"], tmp_path / "s", seed=0)
    cut = int(len(text) * 0.9)
    assert documents_of(env["tok"], split_stream(tmp_path / "s", "train")) == [text[:cut]]
    assert documents_of(env["tok"], split_stream(tmp_path / "s", "val")) == [text[cut:]]
    assert m["splits"]["val"]["bytes"] == len(text[cut:].encode())


def test_single_document_with_document_split_asks_for_tail(env, tmp_path):
    (tmp_path / "one.txt").write_text(doc_text(3))
    data = DataConfig(sources=[FilesSource(path=str(tmp_path / "one.txt"))], num_workers=1)
    with pytest.raises(CorpusError) as info:
        write_shards(data, env["model"], tmp_path / "s", seed=0)
    assert info.value.field == "data.split" and "data.split: tail" in info.value.message
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_token_dtype_choice(env, tmp_path):
    assert resolve_dtype(DataConfig(), 65536) == "uint16"
    assert resolve_dtype(DataConfig(), 65537) == "uint32"
    with pytest.raises(CorpusError, match="data.token_dtype"):
        resolve_dtype(DataConfig(token_dtype="uint16"), 70000)
    data = env["data"].model_copy(update={"token_dtype": "uint32"})
    m = write_shards(data, env["model"], tmp_path, seed=7)
    split = TokenSplit(tmp_path, "train")
    assert m["dtype"] == "uint32" and split.dtype == np.uint32
    assert np.array_equal(split.read(0, split.tokens), split_stream(env["root"] / "s1", "train"))


@pytest.fixture
def damaged(env, tmp_path) -> tuple[Path, Path]:
    """A copy of the shards directory and the path of its first train shard."""
    d = tmp_path / "copy"
    shutil.copytree(env["root"] / "s1", d)
    return d, d / "train-00000.bin"


def test_truncated_shard_is_named(damaged):
    d, shard = damaged
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"train-00000\.bin: size \d+ bytes, expected \d+ \(truncated"):
        verify_shards(d)


def test_altered_byte_is_named(damaged):
    d, shard = damaged
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"train-00000\.bin: sha256 .* does not match"):
        verify_shards(d)
    with pytest.raises(ShardError, match="train-00000.bin"):
        TokenSplit(d, "train")  # reading verifies by default
    assert TokenSplit(d, "val").tokens > 0  # other splits stay usable


def test_out_of_vocab_token_is_named(damaged):
    d, shard = damaged
    raw = bytearray(shard.read_bytes())
    raw[64:66] = struct.pack("<H", 100)  # vocab_size is 100: ids must be < 100
    shard.write_bytes(bytes(raw))
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"train-00000\.bin: token id 100 is out of range for vocab_size 100"):
        verify_shards(d)


def test_missing_manifest_or_shard(damaged, tmp_path):
    d, shard = damaged
    shard.unlink()
    with pytest.raises(ShardError, match=r"train-00000\.bin: missing"):
        verify_shards(d)
    with pytest.raises(ShardError, match="manifest.json: missing"):
        verify_shards(tmp_path)


# ------------------------------------------------------------------------------------------- sampling


def test_batches_are_shifted_windows_of_the_split(env):
    split = TokenSplit(env["root"] / "s1", "train")
    stream = split.read(0, split.tokens)
    x, y = BatchSampler(split, batch_size=5, block_size=16, seed=0).next_batch()
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = {tuple(stream[i : i + 17]) for i in range(len(stream) - 16)}
    assert all(tuple(x[r].tolist()) + (int(y[r, -1]),) in windows for r in range(5))


def test_sampler_state_round_trip_resumes_the_same_batches(env):
    split = TokenSplit(env["root"] / "s1", "train")
    a = BatchSampler(split, 4, 8, seed=3, rank=1, world_size=2)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    expected = [a.next_batch() for _ in range(2)]
    b = BatchSampler(split, 4, 8, seed=3, rank=1, world_size=2)
    b.load_state_dict(state)
    assert b.batches_drawn == 3
    for (x1, y1), (x2, y2) in zip(expected, [b.next_batch() for _ in range(2)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_ranks_draw_different_batches_and_seeds_repeat(env):
    split = TokenSplit(env["root"] / "s1", "train")
    r0, r1, r0again = (BatchSampler(split, 4, 8, seed=0, rank=r, world_size=2) for r in (0, 1, 0))
    x0, x1 = r0.next_batch()[0], r1.next_batch()[0]
    assert not torch.equal(x0, x1)
    assert torch.equal(x0, r0again.next_batch()[0])


def test_block_size_longer_than_every_shard_is_an_error(env):
    split = TokenSplit(env["root"] / "s1", "val", verify=False)
    with pytest.raises(ShardError, match="too few tokens for block_size 300"):
        BatchSampler(split, 2, 300, seed=0)


def test_iter_sequential_targets_every_token_once_in_order(env):
    split = TokenSplit(env["root"] / "s1", "train")
    stream = torch.from_numpy(split.read(0, split.tokens).astype(np.int64))
    batches = list(iter_sequential(split, batch_size=3, block_size=32))
    assert all(x.shape == y.shape and x.shape[1] <= 32 for x, y in batches)
    assert torch.equal(torch.cat([y.reshape(-1) for _, y in batches]), stream[1:])  # spans shard boundaries
    assert torch.equal(torch.cat([x.reshape(-1) for x, _ in batches]), stream[:-1])


def test_fixed_batches_are_deterministic(env):
    split = TokenSplit(env["root"] / "s1", "val")
    a, b, c = (fixed_batches(split, 3, 2, 8, seed=s) for s in (5, 5, 6))
    assert len(a) == 3
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
