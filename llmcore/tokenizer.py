"""SentencePiece tokenizer: training on a corpus, and a small wrapper for encoding and decoding.

Tokenizers here are lossless: ``decode(encode(text)) == text`` for any text made of characters seen in training
(with ``byte_fallback``, for any text at all). Code corpora need that, so training uses

* the ``identity`` normalisation (no NFKC), no dummy prefix and no collapsing of whitespace;
* whitespace-only pieces (``"▁▁▁▁"`` for an indent);
* the newline as a user-defined symbol: the trainer reads the corpus line by line and would otherwise never see
  a newline, and an encoded newline is always its own token.

Special ids are fixed: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 (appended after every document), ``<pad>`` = 3.
Like every SentencePiece model, the character U+2581 (``▁``) in input text decodes as a space.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from llmcore.config import DataConfig, FieldError, TokenizerConfig
from llmcore.corpus import CorpusError, iter_documents
from llmcore.io import atomic_write_bytes, atomic_write_json

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NEWLINE = "\n"
#: Lines are cut into pieces of at most this many characters before training ...
MAX_LINE_CHARS = 4096
#: ... so no training sentence exceeds SentencePiece's byte limit (a character is at most 4 UTF-8 bytes).
MAX_SENTENCE_BYTES = 4 * MAX_LINE_CHARS
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


class TokenizerError(FieldError):
    """A tokenizer problem, reported against the spec field it comes from (``tokenizer.vocab_size``)."""


# ------------------------------------------------------------------------------------------- training


class _TrainingLines:
    """Iterate the corpus as SentencePiece training sentences (lines, newline kept), counting what it yields.

    Stops after ``max_bytes`` UTF-8 bytes. Long lines are cut into ``MAX_LINE_CHARS`` pieces.
    """

    def __init__(self, data: DataConfig, max_bytes: int, count_chars: bool = False):
        self.data, self.max_bytes, self.count_chars = data, max_bytes, count_chars
        self.lines = self.bytes = 0
        self.chars: set[str] = set()
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        # SentencePiece turns an exception raised inside the iterator into a RuntimeError; keep the original
        # (a CorpusError naming a bad JSONL line) so the caller can re-raise it.
        try:
            yield from self._pieces()
        except Exception as exc:
            self.error = exc

    def _pieces(self) -> Iterator[str]:
        for doc in iter_documents(self.data):
            for line in _lines(doc):
                for start in range(0, len(line), MAX_LINE_CHARS):
                    piece = line[start : start + MAX_LINE_CHARS]
                    if self.bytes >= self.max_bytes:
                        return
                    self.lines += 1
                    self.bytes += len(piece.encode("utf-8"))
                    if self.count_chars:
                        self.chars.update(piece)
                    yield piece


def _lines(doc: str) -> list[str]:
    """``doc`` cut after each newline, newlines kept (only ``\n`` counts, unlike ``str.splitlines``)."""
    parts = doc.split(NEWLINE)
    return [p + NEWLINE for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _symbols(cfg: TokenizerConfig) -> list[str]:
    """User-defined symbols: the newline first, then the configured ones (deduplicated, order kept)."""
    return list(dict.fromkeys([NEWLINE, *cfg.user_defined_symbols]))


def _trainer_options(cfg: TokenizerConfig) -> dict:
    """Keyword options for ``SentencePieceTrainer.train`` that make the tokenizer lossless."""
    return dict(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        user_defined_symbols=_symbols(cfg),
        input_sentence_size=cfg.input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=cfg.num_threads or os.cpu_count() or 1,
        max_sentence_length=MAX_SENTENCE_BYTES,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=cfg.model_type in ("bpe", "unigram"),
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        minloglevel=2,
    )


def _translate_error(exc: RuntimeError, cfg: TokenizerConfig) -> TokenizerError:
    """Turn a SentencePiece trainer failure into a TokenizerError naming the field to change."""
    msg = str(exc)
    if m := re.search(r"set it to a value <= (\d+)", msg):
        return TokenizerError(
            "tokenizer.vocab_size",
            f"{cfg.vocab_size} is too large for this corpus: a {cfg.model_type} vocabulary built from it has at "
            f"most {m.group(1)} entries; use a smaller vocab_size or more text",
        )
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return TokenizerError(
            "tokenizer.vocab_size",
            f"{cfg.vocab_size} is too small: the corpus needs {m.group(2)} entries for its characters, special "
            "tokens and byte pieces; raise vocab_size or lower character_coverage",
        )
    return TokenizerError("tokenizer", f"SentencePiece training failed: {msg}")


def _check_char_vocab(cfg: TokenizerConfig, lines: _TrainingLines) -> None:
    """A `char` vocabulary must hold every character seen (at full coverage without byte fallback)."""
    if cfg.model_type != "char" or cfg.character_coverage < 1.0 or cfg.byte_fallback:
        return
    needed = len(lines.chars - set(_symbols(cfg))) + cfg.reserved()
    if needed > cfg.vocab_size:
        raise TokenizerError(
            "tokenizer.vocab_size",
            f"{cfg.vocab_size} is too small for a char tokenizer: the corpus has {len(lines.chars)} distinct "
            f"characters, {needed} entries with special tokens; raise vocab_size (for char it is an upper bound)",
        )


def _run_trainer(lines: _TrainingLines, cfg: TokenizerConfig, seed: int) -> bytes:
    """Train on ``lines``; the serialized model, or the corpus / tokenizer error that stopped training."""
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **_trainer_options(cfg))
    except RuntimeError as exc:
        if lines.error is not None:
            raise lines.error from None
        if lines.bytes == 0:
            raise CorpusError("data.sources", "corpus is empty: no text to train the tokenizer on") from None
        raise _translate_error(exc, cfg) from None
    if lines.error is not None:
        raise lines.error
    return model.getvalue()


def train_tokenizer(data: DataConfig, cfg: TokenizerConfig, out_dir: Path, seed: int) -> dict:
    """Train a lossless SentencePiece model on the corpus and write ``tokenizer.model``, ``tokenizer.vocab``
    and ``stats.json`` into ``out_dir``. Returns the stats (vocab_size, model_type, training_bytes,
    training_lines, seconds).

    ``seed`` seeds SentencePiece's global random generator (sentence sampling and shuffling).
    Raises TokenizerError for a vocab_size the corpus cannot support, CorpusError for an empty corpus.
    """
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    lines = _TrainingLines(data, cfg.max_training_bytes, count_chars=cfg.model_type == "char")
    model = _run_trainer(lines, cfg, seed)
    _check_char_vocab(cfg, lines)
    tok = Tokenizer.from_bytes(model)
    atomic_write_bytes(out_dir / "tokenizer.model", model)
    atomic_write_bytes(out_dir / "tokenizer.vocab", tok.vocab_text().encode("utf-8"))
    stats = {
        "vocab_size": tok.vocab_size,
        "model_type": cfg.model_type,
        "training_bytes": lines.bytes,
        "training_lines": lines.lines,
        "seconds": round(time.perf_counter() - t0, 3),
        "seed": seed,
        "sha256": tok.sha256,
    }
    atomic_write_json(out_dir / "stats.json", stats)
    return stats


# ------------------------------------------------------------------------------------------- the model


class Tokenizer:
    """A loaded SentencePiece model. ``decode(encode(text)) == text`` for text within its alphabet."""

    kind = "sentencepiece"
    encoder = "sentencepiece"  # the library that encodes batches

    def __init__(self, model_bytes: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.proto = proto = sp_pb2.ModelProto.FromString(model_bytes)
        self.model_type: str = _MODEL_TYPES[proto.trainer_spec.model_type]
        self._byte_fallback = proto.trainer_spec.byte_fallback
        self._newline_id = self._sp.piece_to_id(NEWLINE)
        self.sha256: str = hashlib.sha256(model_bytes).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.model`` from disk."""
        return cls(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Tokenizer:
        return cls(model_bytes)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        if self.model_type == "word" and NEWLINE in text:
            return self._encode_by_line(text)
        return self._sp.encode(text, out_type=int)

    def _encode_by_line(self, text: str) -> list[int]:
        # SentencePiece's word model only splits at spaces when encoding, so "x\n" would be one unknown word
        # although training learned "x" and "\n" apart; encode line by line and join with the newline id.
        ids: list[int] = []
        for k, line in enumerate(self._sp.encode(text.split(NEWLINE), out_type=int)):
            if k:
                ids.append(self._newline_id)
            ids.extend(line)
        return ids

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text, encoded by ``num_threads`` SentencePiece threads (-1: all cores)."""
        texts = list(texts)
        if self.model_type == "word":
            return [self.encode(t) for t in texts]
        return self._sp.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; specials (BOS, EOS, PAD) decode to nothing."""
        text = self._sp.decode([int(i) for i in ids])
        if self.model_type == "word" and self._byte_fallback:
            # The word model falls back to the bytes of the escaped word, so spaces come back as U+2581.
            text = text.replace("\u2581", " ")
        return text

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def vocab_text(self) -> str:
        """``piece<TAB>score`` per line, like ``spm_train``'s ``.vocab`` file (newline piece written as ``\\n``)."""
        rows = []
        for i in range(self.vocab_size):
            piece = self._sp.id_to_piece(i).replace("\n", "\\n")
            rows.append(f"{piece}\t{self._sp.get_score(i):g}\n")
        return "".join(rows)


# ---------------------------------------------------------------------------------- pretrained tokenizers

TOKENIZER_JSON, SP_MODEL = "tokenizer.json", "tokenizer.model"
#: Files of a Hugging Face tokenizer folder gptlab reads (and copies when it imports or exports one).
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
#: EOS tokens of well-known families, tried in order when a folder does not name its own.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def tokenizers_module() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(
            "tokenizer.type", "pretrained tokenizers need the `tokenizers` package: pip install 'gptlab[hf]'"
        ) from None
    return tokenizers


def _special(folder: Path, name: str) -> str | None:
    """A special token named in a folder's tokenizer_config.json or special_tokens_map.json (``eos_token``)."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((folder / file).read_text(encoding="utf-8")).get(name)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


#: The split of GPT-2's ByteLevel pre-tokenizer (``use_regex``), as the ``tokenizers`` library and tiktoken write it.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's table of a printable character per byte (the ByteLevel alphabet), as character -> byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


class TiktokenBPE:
    """GPT-2's kind of tokenizer (byte-level BPE) encoded by ``tiktoken`` instead of the ``tokenizers`` library:
    the same ids at about 2.8x less CPU a byte (bench/shards.py), which is what makes sharding with a pretrained
    tokenizer as fast as with a trained SentencePiece one.

    Only for a ``tokenizer.json`` that is exactly that kind (no normaliser; a ByteLevel pre-tokenizer with GPT-2's
    split and no prefix space; a BPE model without dropout, affixes or byte fallback, each merge making a token of
    its own) and where ``tiktoken`` is installed (the ``hf`` extra); ``of`` gives None otherwise. Merge ``i``
    becomes tiktoken rank ``256 + i`` (the 256 bytes first) and ranks map back to the file's ids. Texts holding an
    added token's text (``<|endoftext|>``), which the ``tokenizers`` library matches before splitting, are left
    to it: ``encode_batch`` gives None for them."""

    def __init__(self, encoding: Any, ids: np.ndarray, added: list[str]):
        self._encoding, self._ids, self._added = encoding, ids, added

    @classmethod
    def of(cls, spec: dict) -> TiktokenBPE | None:
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        plain = (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True)
            and not pre.get("add_prefix_space")
            and model.get("type") == "BPE"
            and model.get("dropout") is None
            and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix")
            and not model.get("byte_fallback")
        )
        if not plain:
            return None
        try:
            import tiktoken
        except ImportError:
            return None
        chars, vocab = _byte_level_chars(), model.get("vocab") or {}
        ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
        ids = [vocab.get(c) for c in sorted(chars, key=chars.get)]
        for merge in model.get("merges") or []:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            try:
                token = bytes(chars[c] for c in left + right)
            except KeyError:
                return None
            if token in ranks:  # two merges making one token: tiktoken cannot tell them apart
                return None
            ranks[token] = len(ranks)
            ids.append(vocab.get(left + right))
        if any(i is None for i in ids):
            return None
        encoding = tiktoken.Encoding("gptlab", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})
        added = [t["content"] for t in spec.get("added_tokens") or []]
        return cls(encoding, np.asarray(ids, dtype=np.uint32), added)

    def encode_batch(self, texts: list[str], num_threads: int) -> list[np.ndarray | None]:
        plain = [not any(a in t for a in self._added) for t in texts]
        ranks = self._encoding.encode_ordinary_batch([t for t, ok in zip(texts, plain) if ok], num_threads=num_threads)
        found = iter(ranks)
        return [self._ids[np.asarray(next(found), dtype=np.int64)] if ok else None for ok in plain]


class HFTokenizer:
    """A Hugging Face tokenizer (``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt``), read with the
    ``tokenizers`` library: the same ids as ``transformers.AutoTokenizer`` for the same files, no special tokens
    added (``add_special_tokens=False``); batches of GPT-2's kind are encoded by tiktoken (``TiktokenBPE``)."""

    kind = "huggingface"

    def __init__(self, folder: Path):
        tokenizers = tokenizers_module()
        self.folder = folder
        if (folder / TOKENIZER_JSON).is_file():
            data = (folder / TOKENIZER_JSON).read_bytes()
            try:
                self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
            except Exception as e:  # tokenizers raises its own Exception type
                raise TokenizerError("tokenizer.path", f"{folder / TOKENIZER_JSON} cannot be read ({e})") from None
        else:  # GPT-2's original files: byte-level BPE
            data = (folder / "vocab.json").read_bytes() + (folder / "merges.txt").read_bytes()
            model = tokenizers.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
            self._tok = tokenizers.Tokenizer(model)
            self._tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            self._tok.decoder = tokenizers.decoders.ByteLevel()
        self.sha256: str = hashlib.sha256(data).hexdigest()
        self.model_type = type(self._tok.model).__name__.lower()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eos = _special(folder, "eos_token") or next((t for t in EOS_CANDIDATES if t in vocab), None)
        bos = _special(folder, "bos_token") or eos
        self._eos = vocab.get(eos) if eos else None
        self._bos = vocab.get(bos) if bos else None
        self.eos_token = eos

    @functools.cached_property
    def _fast(self) -> TiktokenBPE | None:
        """Built at the first batch (sampling and evaluation encode one text at a time with the library)."""
        return TiktokenBPE.of(json.loads(self._tok.to_str()))

    @property
    def encoder(self) -> str:
        """The library that encodes batches: ``tiktoken`` or ``tokenizers``."""
        return "tiktoken" if self._fast is not None else "tokenizers"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        if self._eos is None:
            raise TokenizerError("tokenizer.path", f"{self.folder}: no end-of-text token known (name eos_token in "
                                 "tokenizer_config.json)")  # fmt: skip
        return self._eos

    @property
    def bos_id(self) -> int | None:
        return self._bos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int] | np.ndarray]:
        """Token ids of each text, on ``num_threads`` threads (-1: every core): tiktoken where it applies, else the
        ``tokenizers`` library (its ``encode_batch_fast``, tokenizers >= 0.20: the same ids without character
        offsets, a quarter less CPU; its own threads, which its ``TOKENIZERS_PARALLELISM`` turns off)."""
        texts = list(texts)
        threads = num_threads if num_threads > 0 else os.cpu_count() or 1
        out = self._fast.encode_batch(texts, threads) if self._fast is not None else [None] * len(texts)
        rest = [t for t, ids in zip(texts, out) if ids is None]
        if rest:
            encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
            slow = iter(e.ids for e in encode(rest, add_special_tokens=False))
            out = [next(slow) if ids is None else ids for ids in out]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer in a tokenizer stage directory, a Hugging Face folder, or one of their files: a SentencePiece
    ``tokenizer.model`` or a Hugging Face ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``)."""
    path = Path(path).expanduser()
    if path.is_file():
        return Tokenizer.load(path) if path.suffix == ".model" else HFTokenizer(path.parent)
    if (path / TOKENIZER_JSON).is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        return HFTokenizer(path)
    if (path / SP_MODEL).is_file():
        return Tokenizer.load(path / SP_MODEL)
    what = (
        "no such file or directory"
        if not path.exists()
        else "no tokenizer.json, vocab.json + merges.txt or tokenizer.model"
    )
    raise TokenizerError("tokenizer.path", f"{path}: {what}")


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The files a pretrained tokenizer is read from (what an import copies and hashes)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if (path / TOKENIZER_JSON).is_file() or (path / "vocab.json").is_file():
        return [path / f for f in HF_FILES if (path / f).is_file()]
    return [path / SP_MODEL] if (path / SP_MODEL).is_file() else []


def import_tokenizer(cfg: TokenizerConfig, out_dir: Path, expected_vocab: int | None = None) -> dict:
    """A pretrained tokenizer's stage: check it and copy its files into ``out_dir`` (atomically); the stats.

    It must load, know its end-of-text token (appended after every document), and, when it goes with a pretrained
    model, have that model's vocabulary size."""
    out_dir = Path(out_dir)
    tok = load_tokenizer(cfg.path)
    eos = tok.eos_id
    if expected_vocab is not None and tok.vocab_size != expected_vocab:
        raise TokenizerError("tokenizer.path", f"{cfg.path}: {tok.vocab_size} tokens, but the model's vocabulary has "
                             f"{expected_vocab}: a tokenizer and a model must match")  # fmt: skip
    for f in tokenizer_files(cfg.path):
        atomic_write_bytes(out_dir / f.name, f.read_bytes())
    stats = {"vocab_size": tok.vocab_size, "type": "pretrained", "format": tok.kind, "model_type": tok.model_type,
             "eos_id": eos, "sha256": tok.sha256, "source": str(Path(cfg.path).expanduser().resolve())}  # fmt: skip
    atomic_write_json(out_dir / "stats.json", stats)
    return stats


def export_tokenizer(
    tokenizer: str | os.PathLike, out_dir: str | os.PathLike, model_max_length: int | None = None
) -> list[Path]:
    """Write a tokenizer as Hugging Face files (``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads and that give
    exactly llmcore's ids on any text (unigram: or, where two segmentations of a word tie, the other one of the same
    pieces in another order, as ``a|cc|c`` for ``a|c|cc``: the libraries' lattices break ties differently); returns
    the files. A pretrained Hugging Face tokenizer is copied as it is.

    A SentencePiece model becomes the ``tokenizers`` equivalent of how SentencePiece encodes with gptlab's training
    options: spaces become U+2581 (identity normalisation otherwise, no dummy prefix); text is split where
    SentencePiece splits it into words (a run of whitespace goes with the word after it: whitespace-only pieces);
    BPE merges in the order of the merged pieces' scores (unknown characters fused, as SentencePiece does), or the
    unigram lattice with the same scores; byte fallback; the newline and user symbols as added tokens. Control
    tokens (``<s>``, ``</s>``, ``<pad>``) and byte pieces stay plain vocabulary entries that text never matches, and
    ``split_special_tokens`` keeps transformers from matching them in text either. Word models are refused:
    SentencePiece's word segmentation has no exact ``tokenizers`` equivalent."""
    out = Path(out_dir)
    tok = load_tokenizer(tokenizer)
    if isinstance(tok, HFTokenizer):
        for f in tokenizer_files(tokenizer):
            atomic_write_bytes(out / f.name, f.read_bytes())
        return [out / f.name for f in tokenizer_files(tokenizer)]
    if tok.model_type == "word":
        raise TokenizerError("tokenizer.model_type", "a SentencePiece word model has no exact Hugging Face tokenizer "
                             "equivalent; export a bpe, unigram or char tokenizer")  # fmt: skip
    hf = _sentencepiece_to_hf(tok.proto)
    atomic_write_bytes(out / TOKENIZER_JSON, hf.to_str(pretty=True).encode("utf-8"))
    specials = {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id),
                "unk_token": tok.id_to_piece(tok.unk_id), "pad_token": tok.id_to_piece(tok.pad_id)}  # fmt: skip
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}  # fmt: skip
    if model_max_length:
        config["model_max_length"] = model_max_length
    atomic_write_json(out / "tokenizer_config.json", config)
    atomic_write_json(out / "special_tokens_map.json", specials)
    return [out / TOKENIZER_JSON, out / "tokenizer_config.json", out / "special_tokens_map.json"]


# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER, _BYTE = 1, 2, 3, 4, 6


def _sentencepiece_to_hf(proto: Any) -> Any:
    tokenizers = tokenizers_module()
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == 2:  # bpe: a merge for every split of a piece into two pieces, by its score
        merges = []
        for piece, score, kind in pieces:
            if kind == _NORMAL and len(piece) > 1:
                local = [
                    (piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
                ]
                merges += [(a, b, score) for a, b in sorted(local, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))]
        merges.sort(key=lambda m: -m[2])
        model = models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token=pieces[0][0], fuse_unk=True,
                           byte_fallback=byte_fallback)  # fmt: skip
    else:  # unigram and char: the same lattice; control and byte pieces kept out of it by their score
        out_of_lattice = (_UNKNOWN, _CONTROL, _BYTE)
        model = models.Unigram([(p, -1e9 if kind in out_of_lattice else score) for p, score, kind in pieces], unk_id=0,
                               byte_fallback=byte_fallback)  # fmt: skip
    hf = tokenizers.Tokenizer(model)
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581+[^\u2581]*|[^\u2581]+"), behavior="isolated")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, kind in pieces if kind == _USER])
    return hf


# ----------------------------------------------------------------------------- parallel encoding helpers

_worker_tok: Tokenizer | None = None


def init_encode_worker(model_path: str) -> None:
    """Pool initializer: load the tokenizer once per worker process. The pool is the parallelism: the
    ``tokenizers`` library's own threads are turned off in its workers (they would oversubscribe the cores)."""
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = load_tokenizer(model_path)


def encode_chunk(texts: list[str], tok: Tokenizer | None = None) -> list[tuple[np.ndarray, int]]:
    """``(uint32 token ids, UTF-8 byte count)`` per text; in a pool worker ``tok`` is the worker's tokenizer."""
    tok = tok or _worker_tok
    assert tok is not None, "encode_chunk needs a tokenizer (pass tok, or call init_encode_worker first)"
    ids = tok.encode_batch(texts, num_threads=1)  # parallelism comes from the process pool
    return [(np.asarray(x, dtype=np.uint32), len(t.encode("utf-8"))) for x, t in zip(ids, texts)]
