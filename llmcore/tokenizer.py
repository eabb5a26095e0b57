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

import hashlib
import io
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

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

    def __init__(self, model_bytes: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        proto = sp_pb2.ModelProto.FromString(model_bytes)
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


# ----------------------------------------------------------------------------- parallel encoding helpers

_worker_tok: Tokenizer | None = None


def init_encode_worker(model_path: str) -> None:
    """Pool initializer: load the tokenizer once per worker process."""
    global _worker_tok
    _worker_tok = Tokenizer.load(model_path)


def encode_chunk(texts: list[str], tok: Tokenizer | None = None) -> list[tuple[np.ndarray, int]]:
    """``(uint32 token ids, UTF-8 byte count)`` per text; in a pool worker ``tok`` is the worker's tokenizer."""
    tok = tok or _worker_tok
    assert tok is not None, "encode_chunk needs a tokenizer (pass tok, or call init_encode_worker first)"
    ids = tok.encode_batch(texts, num_threads=1)  # parallelism comes from the process pool
    return [(np.asarray(x, dtype=np.uint32), len(t.encode("utf-8"))) for x, t in zip(ids, texts)]
