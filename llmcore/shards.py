"""Token shards: the tokenized corpus on disk, verified, and sampled into training batches.

Shard file ``{split}-{index:05d}.bin``: a 64-byte little-endian header, then the raw tokens::

    magic b"GPTLTOK\\0" (8 bytes) | version u32 (= 1) | dtype code u32 (2: uint16, 4: uint32) | tokens u64 | zeros

Each split is one token stream (documents in corpus order, each followed by EOS) cut into shards of at most
``data.shard_tokens`` tokens. ``manifest.json`` records per split the tokens, documents and UTF-8 bytes of the
text that went in (for bits per byte: ``bpb = mean_token_loss / ln 2 * tokens / bytes``; EOS tokens count as
tokens), and each shard's token count and sha256 (of the whole file, so ``sha256sum`` agrees).

A corpus with task sources (``llmcore.sft``) also has a loss mask: beside each shard ``{split}-{index:05d}.mask.bin``,
one uint8 per token (no header; 1: the loss counts the token as a target, 0: it does not), recorded in the shard's
manifest entry as ``"mask": {"file", "sha256"}`` and verified like the shard. Text documents' tokens are all 1.
Batches turn the targets whose mask is 0 into ``IGNORE_INDEX``, which the loss skips. Without a mask every token
counts (shards written before masks existed read as before).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcore.config import DataConfig, TaskSource
from llmcore.corpus import CorpusError, resolve_files, split_pieces
from llmcore.io import atomic_open, atomic_write_json, read_json
from llmcore.sft import describe_source, encode_example, task_examples
from llmcore.tokenizer import encode_chunk, init_encode_worker, load_tokenizer

MAGIC = b"GPTLTOK\x00"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")
DTYPE_CODES = {"uint16": 2, "uint32": 4}
SPLITS = ("train", "val")
#: Work units sent to encoder processes: at most this many texts ...
CHUNK_TEXTS = 256
#: ... or this many characters (so memory stays bounded however large the corpus).
CHUNK_CHARS = 1 << 19
#: With ``num_workers: 0``, corpora smaller than this are encoded in-process: starting workers costs more.
SMALL_CORPUS_BYTES = 8 << 20
_READ_BYTES = 1 << 24
#: The target id the loss skips (``torch.nn.functional.cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX = -100


class ShardError(ValueError):
    """A shard directory that is missing, damaged or unusable; the message names the file."""


class ShardDamagedError(ShardError):
    """A shard or manifest that fails verification (missing, truncated, altered, out-of-vocabulary ids): the
    shards stage must be rebuilt, unlike a usable split that is merely too small for the settings."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def mask_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.mask.bin"


def pack_header(dtype: str, tokens: int) -> bytes:
    """The 64-byte header of a shard holding ``tokens`` tokens of ``dtype``."""
    return _HEADER.pack(MAGIC, FORMAT_VERSION, DTYPE_CODES[dtype], tokens).ljust(HEADER_BYTES, b"\x00")


# ------------------------------------------------------------------------------------------- writing


class _SplitWriter:
    """Appends token arrays to one split's shards, rolling to a new shard file every ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, dtype: str, shard_tokens: int, masked: bool = False):
        self.out_dir, self.split, self.dtype, self.cap = out_dir, split, dtype, shard_tokens
        self.np_dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict] = []
        self.tokens = self.bytes = self.documents = 0
        self.masked = masked  # write a loss mask beside each shard
        self._cm = self._f = self._mask_cm = self._mask_f = None
        self._mask_digest = hashlib.sha256()
        self._count = 0

    def add(self, ids: np.ndarray, nbytes: int, mask: np.ndarray | None = None) -> None:
        """Append one document's tokens (EOS included) and count its text bytes; ``mask``: its loss mask (None:
        every token counts)."""
        self.tokens += len(ids)
        self.bytes += nbytes
        self.documents += 1
        ids = ids.astype(self.np_dtype, copy=False)
        if self.masked:
            mask = np.ones(len(ids), np.uint8) if mask is None else mask.astype(np.uint8, copy=False)
        while len(ids):
            if self._f is None:
                self._open()
            take = ids[: self.cap - self._count]
            self._f.write(take.tobytes())
            if self.masked:
                self._mask_f.write(mask[: len(take)].tobytes())
                self._mask_digest.update(mask[: len(take)].tobytes())
                mask = mask[len(take) :]
            self._count += len(take)
            ids = ids[len(take) :]
            if self._count == self.cap:
                self._finish()

    def _open(self) -> None:
        path = self.out_dir / shard_name(self.split, len(self.shards))
        self._cm = atomic_open(path, "w+b")
        self._f = self._cm.__enter__()
        self._f.write(bytes(HEADER_BYTES))
        self._count = 0
        if self.masked:
            self._mask_cm = atomic_open(self.out_dir / mask_name(self.split, len(self.shards)), "wb")
            self._mask_f = self._mask_cm.__enter__()
            self._mask_digest = hashlib.sha256()

    def _finish(self) -> None:
        """Write the header, hash the file, and move it into place."""
        f = self._f
        f.seek(0)
        f.write(pack_header(self.dtype, self._count))
        f.seek(0)
        digest = hashlib.sha256()
        while block := f.read(_READ_BYTES):
            digest.update(block)
        self._cm.__exit__(None, None, None)
        entry = {"file": shard_name(self.split, len(self.shards)), "tokens": self._count, "sha256": digest.hexdigest()}
        if self.masked:
            self._mask_cm.__exit__(None, None, None)
            entry["mask"] = {"file": mask_name(self.split, len(self.shards)), "sha256": self._mask_digest.hexdigest()}
        self.shards.append(entry)
        self._cm = self._f = self._mask_cm = self._mask_f = None

    def close(self) -> None:
        if self._f is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written (its temporary files are removed)."""
        for cm in (self._cm, self._mask_cm):
            if cm is not None:
                try:
                    cm.__exit__(RuntimeError, RuntimeError("aborted"), None)
                except RuntimeError:
                    pass
        self._cm = self._f = self._mask_cm = self._mask_f = None

    def summary(self) -> dict:
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents, "shards": self.shards}


def resolve_dtype(data: DataConfig, vocab_size: int) -> str:
    """The shard token dtype: ``auto`` picks uint16 when every id fits; an explicit uint16 must fit."""
    if data.token_dtype == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if data.token_dtype == "uint16" and vocab_size > 2**16:
        raise CorpusError(
            "data.token_dtype", f"uint16 cannot hold ids of a {vocab_size}-token vocabulary; use uint32 or auto"
        )
    return data.token_dtype


def _chunks(pieces: Iterable[tuple[str, str]]) -> Iterator[tuple[list[str], list[str]]]:
    """Group ``(split, text)`` pairs into ``(splits, texts)`` work units bounded by count and characters."""
    splits: list[str] = []
    texts: list[str] = []
    chars = 0
    for split, text in pieces:
        splits.append(split)
        texts.append(text)
        chars += len(text)
        if len(texts) >= CHUNK_TEXTS or chars >= CHUNK_CHARS:
            yield splits, texts
            splits, texts, chars = [], [], 0
    if texts:
        yield splits, texts


def _worker_count(data: DataConfig) -> int:
    """Encoder processes: ``data.num_workers``, or for 0 one per usable core (1 for a small corpus)."""
    if data.num_workers:
        return data.num_workers
    if sum(path.stat().st_size for _, path, _ in resolve_files(data)) < SMALL_CORPUS_BYTES:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _encoded(
    chunks: Iterable[tuple[list[str], list[str]]], model: Path, workers: int
) -> Iterator[tuple[list[str], list[tuple[np.ndarray, int]]]]:
    """Yield ``(splits, [(ids, nbytes)])`` per chunk, in order.

    With several workers, spawned processes encode ahead with at most ``2 * workers`` chunks in flight
    (``Pool.imap`` would read the whole corpus into its queue). Spawn, not fork: forking a threaded driver can
    deadlock; like any spawn user, a calling script needs the ``if __name__ == "__main__":`` guard. A worker that
    dies raises ``BrokenProcessPool`` instead of hanging.
    """
    if workers <= 1:
        tok = load_tokenizer(model)
        for splits, texts in chunks:
            yield splits, encode_chunk(texts, tok)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_encode_worker, initargs=(str(model),)) as pool:
        pending: deque = deque()
        try:
            for splits, texts in chunks:
                pending.append((splits, pool.submit(encode_chunk, texts)))
                if len(pending) >= 2 * workers:
                    s, fut = pending.popleft()
                    yield s, fut.result()
            while pending:
                s, fut = pending.popleft()
                yield s, fut.result()
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "a tokenizer worker process died. If write_shards is called from a script, put the call under "
                '`if __name__ == "__main__":` (spawned workers re-import the main module), or set '
                "data.num_workers: 1"
            ) from exc
        finally:
            for _, fut in pending:
                fut.cancel()


def _check_splits(data: DataConfig, writers: dict[str, _SplitWriter]) -> None:
    """Both splits must hold at least one document."""
    empty = [s for s in SPLITS if writers[s].documents == 0]
    if not empty:
        return
    docs = sum(w.documents for w in writers.values())
    if docs == 0:
        raise CorpusError("data.sources", "corpus is empty: no document has any text")
    if data.split == "document":
        raise CorpusError(
            "data.split",
            f"the {' and '.join(empty)} split got no document ({docs} documents, val_fraction "
            f"{data.val_fraction}); use `data.split: tail` to hold out the end of every document instead",
        )
    raise CorpusError(
        "data.val_fraction",
        f"the {' and '.join(empty)} split is empty: documents too short for val_fraction {data.val_fraction}",
    )


def _manifest(data: DataConfig, tok: Any, dtype: str, seed: int, writers: dict[str, _SplitWriter]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer_sha256": tok.sha256,
        "encoder": tok.encoder,  # which library encoded (the ids are the same)
        "seed": seed,
        "split_method": data.split,
        "val_fraction": data.val_fraction,
        "splits": {s: w.summary() for s, w in writers.items()},
        "bytes_per_token": {s: w.bytes / w.tokens for s, w in writers.items()},
    }


def write_shards(data: DataConfig, tokenizer: Path, out_dir: Path, seed: int) -> dict:
    """Tokenize the corpus into train/val shards in ``out_dir`` and write ``manifest.json`` last.

    Documents stream from the corpus (never all in memory) and are encoded by ``data.num_workers`` processes
    (0: one per core, or in this process for a corpus under ``SMALL_CORPUS_BYTES``; 1: in this process); the
    output is identical for any worker count. EOS follows every document. Returns the manifest.
    """
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer)
    dtype = resolve_dtype(data, tok.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    masked = any(isinstance(src, TaskSource) for src in data.sources)
    writers = {s: _SplitWriter(out_dir, s, dtype, data.shard_tokens, masked) for s in SPLITS}
    eos = np.array([tok.eos_id], dtype=np.uint32)
    longest: tuple[int, int] = (0, -1)  # (answer tokens, source) of the longest answer of the task sources
    try:
        for splits, encoded in _encoded(_chunks(split_pieces(data, seed)), Path(tokenizer), _worker_count(data)):
            for split, (ids, nbytes) in zip(splits, encoded):
                writers[split].add(np.concatenate([ids, eos]), nbytes)
        for split, i, prompt, answer in task_examples(data, seed):  # after the text: packed, masked examples
            ids, mask, answer_tokens = encode_example(tok, prompt, answer, data.mask_prompt)
            writers[split].add(ids, len((prompt + answer).encode("utf-8")), mask)
            longest = max(longest, (answer_tokens, i))
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    _check_splits(data, writers)
    manifest = _manifest(data, tok, dtype, seed, writers)
    if masked:  # what training checks against its block size
        manifest["longest_answer"] = {"tokens": longest[0], "source": describe_source(data, longest[1])
                                      if longest[1] >= 0 else None}  # fmt: skip
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


# ------------------------------------------------------------------------------------------ verifying


def _load_manifest(shards_dir: Path) -> dict:
    path = Path(shards_dir) / "manifest.json"
    if not path.is_file():
        raise ShardDamagedError(f"{path}: missing; the shards stage did not finish")
    manifest = read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("dtype") not in DTYPE_CODES:
        raise ShardDamagedError(f"{path}: unsupported format_version or dtype")
    return manifest


def _check_header(path: Path, head: bytes, dtype: str, tokens: int) -> None:
    if len(head) < HEADER_BYTES:
        raise ShardDamagedError(f"{path}: truncated header ({len(head)} of {HEADER_BYTES} bytes)")
    magic, version, code, count = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise ShardDamagedError(f"{path}: bad magic {magic!r}, not a gptlab token shard")
    if version != FORMAT_VERSION or code != DTYPE_CODES[dtype]:
        raise ShardDamagedError(
            f"{path}: header version {version} / dtype code {code}, expected {FORMAT_VERSION} / "
            f"{DTYPE_CODES[dtype]} ({dtype})"
        )
    if count != tokens:
        raise ShardDamagedError(f"{path}: header says {count} tokens, manifest says {tokens}")


def _verify_shard(path: Path, entry: dict, dtype: str, vocab_size: int) -> None:
    """Check one shard's presence, header, size, sha256 and token ids (one chunked pass over the file)."""
    if not path.is_file():
        raise ShardDamagedError(f"{path}: missing")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    expected = HEADER_BYTES + entry["tokens"] * np_dtype.itemsize
    if path.stat().st_size != expected:
        raise ShardDamagedError(f"{path}: size {path.stat().st_size} bytes, expected {expected} (truncated or padded)")
    digest = hashlib.sha256()
    top = 0
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        _check_header(path, head, dtype, entry["tokens"])
        digest.update(head)
        while block := f.read(_READ_BYTES):
            digest.update(block)
            top = max(top, int(np.frombuffer(block, dtype=np_dtype).max(initial=0)))
    if digest.hexdigest() != entry["sha256"]:
        raise ShardDamagedError(f"{path}: sha256 {digest.hexdigest()} does not match the manifest (file altered)")
    if top >= vocab_size:
        raise ShardDamagedError(f"{path}: token id {top} is out of range for vocab_size {vocab_size}")
    if "mask" in entry:
        _verify_mask(path.parent / entry["mask"]["file"], entry)


def _verify_mask(path: Path, entry: dict) -> None:
    """Check a shard's loss mask: present, one byte per token, its sha256."""
    if not path.is_file():
        raise ShardDamagedError(f"{path}: missing (the loss mask of {entry['file']})")
    if path.stat().st_size != entry["tokens"]:
        raise ShardDamagedError(f"{path}: size {path.stat().st_size} bytes, expected {entry['tokens']} (one per token)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            digest.update(block)
    if digest.hexdigest() != entry["mask"]["sha256"]:
        raise ShardDamagedError(f"{path}: sha256 {digest.hexdigest()} does not match the manifest (file altered)")


def _verify_split(shards_dir: Path, manifest: dict, split: str) -> None:
    info = manifest["splits"][split]
    for entry in info["shards"]:
        _verify_shard(Path(shards_dir) / entry["file"], entry, manifest["dtype"], manifest["vocab_size"])
    if sum(e["tokens"] for e in info["shards"]) != info["tokens"]:
        raise ShardDamagedError(f"{Path(shards_dir) / 'manifest.json'}: {split} shard token counts do not add up")


def verify_shards(shards_dir: Path) -> dict:
    """Check every shard against ``manifest.json`` (raising ShardError naming the file); return the manifest."""
    manifest = _load_manifest(shards_dir)
    for split in manifest["splits"]:
        _verify_split(shards_dir, manifest, split)
    return manifest


# ------------------------------------------------------------------------------------------- reading


class TokenSplit:
    """One split's shards, memory-mapped read-only. ``tokens``/``bytes`` are the split totals."""

    def __init__(self, shards_dir: Path, split: str, verify: bool = True):
        self.dir = Path(shards_dir)
        manifest = _load_manifest(self.dir)
        if split not in manifest["splits"]:
            raise ShardError(f"{self.dir / 'manifest.json'}: no split {split!r}")
        if verify:
            _verify_split(self.dir, manifest, split)
        info = manifest["splits"][split]
        self.split = split
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.vocab_size: int = manifest["vocab_size"]
        self.eos_id: int = manifest["eos_id"]
        self.tokens: int = info["tokens"]
        self.bytes: int = info["bytes"]
        self.documents: int = info["documents"]
        self.shards = [self._map(e) for e in info["shards"]]
        #: per shard its loss mask (uint8, 1: the token counts as a target), or None: every token counts
        self.masks = [self._map_mask(e) for e in info["shards"]] if all("mask" in e for e in info["shards"]) else None
        self.longest_answer: dict | None = manifest.get("longest_answer")
        self.shard_tokens = [len(m) for m in self.shards]
        self._starts = np.cumsum([0] + self.shard_tokens)

    def _map(self, entry: dict) -> np.memmap:
        """One shard, memory-mapped; without verification a missing or short file is still a ShardDamagedError
        naming it (not numpy's error)."""
        path = self.dir / entry["file"]
        try:
            return np.memmap(path, dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(entry["tokens"],))
        except (OSError, ValueError) as exc:
            raise ShardDamagedError(f"{path}: cannot be mapped ({exc})") from None

    def _map_mask(self, entry: dict) -> np.memmap:
        path = self.dir / entry["mask"]["file"]
        try:
            return np.memmap(path, dtype=np.uint8, mode="r", shape=(entry["tokens"],))
        except (OSError, ValueError) as exc:
            raise ShardDamagedError(f"{path}: cannot be mapped ({exc})") from None

    def window(self, shard: int, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of one shard (a read-only view)."""
        if start < 0 or start + length > self.shard_tokens[shard]:
            raise IndexError(f"window [{start}, {start + length}) outside shard {shard} of {self.shard_tokens[shard]}")
        return self.shards[shard][start : start + length]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the whole split (a copy; may span shards)."""
        if start < 0 or start + length > self.tokens:
            raise IndexError(f"range [{start}, {start + length}) outside split of {self.tokens} tokens")
        parts, pos, end = [], start, start + length
        while pos < end:
            k = int(np.searchsorted(self._starts, pos, side="right")) - 1
            stop = min(end, int(self._starts[k + 1]))
            parts.append(self.shards[k][pos - self._starts[k] : stop - self._starts[k]])
            pos = stop
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)


def _to_xy(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T+1]`` tokens to int64 inputs ``x = rows[:, :-1]`` and targets ``y = rows[:, 1:]``."""
    rows = rows.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(rows[:, :-1])), torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))


class BatchSampler:
    """nanoGPT-style random windows: each row is ``block_size + 1`` consecutive tokens from one shard, uniform
    over every valid window (so a shard is chosen in proportion to its usable length).

    Each DDP rank has its own PCG64 stream seeded from ``(seed, rank)``. ``state_dict`` / ``load_state_dict``
    save and restore the stream, so a resumed run draws exactly the batches it would have drawn.
    """

    def __init__(
        self, split: TokenSplit, batch_size: int, block_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._usable = np.array([max(0, n - block_size) for n in split.shard_tokens], dtype=np.int64)
        if self._usable.sum() == 0:
            raise ShardError(
                f"{split.dir}: split {split.split!r} has too few tokens for block_size {block_size} "
                f"(longest shard {max(split.shard_tokens, default=0)} tokens, need {block_size + 1})"
            )
        self._cum = np.cumsum(self._usable)
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank])))
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, int64 tensors of shape ``[batch_size, block_size]``; ``y`` is ``x`` shifted by one, with
        ``IGNORE_INDEX`` where the split's loss mask is 0."""
        pos = self.rng.integers(0, int(self._cum[-1]), size=self.batch_size)
        shard = np.searchsorted(self._cum, pos, side="right")
        start = pos - (self._cum[shard] - self._usable[shard])
        rows = np.stack([self.split.window(int(k), int(s), self.block_size + 1) for k, s in zip(shard, start)])
        self.batches_drawn += 1
        x, y = _to_xy(rows)
        if self.split.masks is not None:  # targets the loss does not count become IGNORE_INDEX
            T1 = self.block_size + 1
            mask = np.stack([self.split.masks[int(k)][int(s) : int(s) + T1] for k, s in zip(shard, start)])
            counted = torch.from_numpy(np.ascontiguousarray(mask[:, 1:])) != 0
            y = torch.where(counted, y, IGNORE_INDEX)  # a new tensor: with one row, x and y share memory
        return x, y

    def state_dict(self) -> dict:
        """JSON-serialisable position of the stream (the 128-bit PCG64 words as decimal strings)."""
        state = self.rng.bit_generator.state
        return {
            "bit_generator": state["bit_generator"],
            "state": {k: str(v) for k, v in state["state"].items()},
            "has_uint32": state["has_uint32"],
            "uinteger": state["uinteger"],
            "batches_drawn": self.batches_drawn,
            "seed": self.seed,
            "rank": self.rank,
        }

    def load_state_dict(self, d: dict) -> None:
        """Continue the stream from ``state_dict()`` output."""
        self.rng.bit_generator.state = {
            "bit_generator": d["bit_generator"],
            "state": {k: int(v) for k, v in d["state"].items()},
            "has_uint32": d["has_uint32"],
            "uinteger": d["uinteger"],
        }
        self.batches_drawn = d["batches_drawn"]


def iter_sequential(split: TokenSplit, batch_size: int, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping ``(x, y)`` batches over the whole split in order (windows may span shards).

    Every token but the first is a target exactly once: full windows of ``block_size`` come in batches of
    ``batch_size`` (the last batch may have fewer rows), then the leftover ``r < block_size`` targets come as
    one ``[1, r]`` batch. Weight losses by ``y.numel()`` to average over the split.
    """
    targets = split.tokens - 1
    full = max(0, targets) // block_size
    for first in range(0, full, batch_size):
        rows = [split.read(i * block_size, block_size + 1) for i in range(first, min(first + batch_size, full))]
        yield _to_xy(np.stack(rows))
    rest = targets - full * block_size
    if rest > 0:
        yield _to_xy(split.read(full * block_size, rest + 1)[None, :])


def fixed_batches(
    split: TokenSplit, n: int, batch_size: int, block_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` random batches that depend only on the split and ``seed`` (for comparable evaluations)."""
    sampler = BatchSampler(split, batch_size, block_size, seed)
    return [sampler.next_batch() for _ in range(n)]
