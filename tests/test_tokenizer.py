"""SentencePiece training and the lossless Tokenizer wrapper (llmcore.tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmcore.config import DataConfig, FilesSource, TokenizerConfig
from llmcore.corpus import CorpusError, iter_documents
from llmcore.tokenizer import MAX_SENTENCE_BYTES, Tokenizer, TokenizerError, train_tokenizer

CODE = '''def add(a, b):
    """Add two numbers."""
    return a + b


class Point:
\tdef __init__(self, x, y):
\t\tself.x = x  # two  spaces
\t\tself.y = y

    def norm(self):
        if self.x > 0:
            return (self.x ** 2 + self.y ** 2) ** 0.5
        return 0
'''


def make_corpus(tmp: Path, copies: int = 20) -> DataConfig:
    """A tiny code corpus: several files of indented Python with tabs, blank lines and runs of spaces."""
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        (tmp / f"m{i:02d}.py").write_text(CODE.replace("add", f"add{i}").replace("Point", f"Point{i % 5}"))
    return DataConfig(sources=[FilesSource(path=str(tmp / "*.py"))])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> DataConfig:
    return make_corpus(tmp_path_factory.mktemp("code"))


VOCAB = {"bpe": 120, "unigram": 64, "char": 1000, "word": 1000}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, tuple[dict, Tokenizer]]:
    out = {}
    for model_type, vocab in VOCAB.items():
        d = tmp_path_factory.mktemp(model_type)
        stats = train_tokenizer(corpus, TokenizerConfig(model_type=model_type, vocab_size=vocab), d, seed=0)
        out[model_type] = (stats, Tokenizer.load(d / "tokenizer.model"), d)
    return out


@pytest.mark.parametrize("model_type", list(VOCAB))
def test_each_model_type_round_trips_code_exactly(trained, model_type):
    stats, tok, d = trained[model_type]
    text = CODE.replace("add", "add3").replace("Point", "Point3")
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    snippet = "\n\n\t\tself.x = x  # two\n    return 0\n"  # made of words seen in training (for `word`)
    assert tok.decode(tok.encode(snippet)) == snippet
    assert json.loads((d / "stats.json").read_text()) == stats
    assert stats["model_type"] == model_type and stats["vocab_size"] == tok.vocab_size


def test_training_stats_count_the_corpus(corpus, trained):
    stats = trained["bpe"][0]
    texts = list(iter_documents(corpus))
    assert len(texts) == 20
    assert stats["training_bytes"] == sum(len(t.encode()) for t in texts)
    assert stats["training_lines"] == sum(t.count("\n") for t in texts)  # every file ends with a newline


@pytest.mark.parametrize("model_type", list(VOCAB))
def test_special_ids_are_fixed(trained, model_type):
    _, tok, _ = trained[model_type]
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.decode([tok.bos_id, *tok.encode(" return"), tok.eos_id, tok.pad_id]) == " return"


def test_bpe_gets_exact_vocab_and_indentation_pieces(trained):
    _, tok, _ = trained["bpe"]
    assert tok.vocab_size == VOCAB["bpe"]
    assert len(tok.encode("        return 0")) < len("        return 0")  # indentation merges into pieces


def test_char_vocab_size_is_an_upper_bound(corpus, trained):
    _, tok, _ = trained["char"]
    distinct = set("".join(iter_documents(corpus))) - {"\n"}
    assert tok.vocab_size == len(distinct) + 4 + 1  # characters, 4 specials, the newline symbol


def test_char_vocab_smaller_than_alphabet_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(TokenizerError) as info:
        train_tokenizer(corpus, TokenizerConfig(model_type="char", vocab_size=12), tmp_path, seed=0)
    assert info.value.field == "tokenizer.vocab_size" and "distinct characters" in info.value.message


def test_byte_fallback_round_trips_unseen_characters(corpus, tmp_path):
    train_tokenizer(corpus, TokenizerConfig(vocab_size=400, byte_fallback=True), tmp_path, seed=0)
    tok = Tokenizer.load(tmp_path / "tokenizer.model")
    unseen = "naïve — 日本語 🙂\n\tdone"
    ids = tok.encode(unseen)
    assert tok.unk_id not in ids and tok.decode(ids) == unseen


def test_without_byte_fallback_unseen_characters_are_unk(trained):
    _, tok, _ = trained["bpe"]
    assert tok.unk_id in tok.encode("日")


def test_too_large_vocab_is_a_tokenizer_error(corpus, tmp_path):
    with pytest.raises(TokenizerError) as info:
        train_tokenizer(corpus, TokenizerConfig(vocab_size=50_000), tmp_path, seed=0)
    assert info.value.field == "tokenizer.vocab_size"
    assert "too large" in info.value.message and str(info.value).startswith("tokenizer.vocab_size: 50000")
    assert not (tmp_path / "tokenizer.model").exists()


def test_vocab_without_room_for_pieces_is_a_config_error():
    with pytest.raises(ValidationError, match="vocab_size: 200 leaves no room for pieces: 261 entries"):
        TokenizerConfig(vocab_size=200, byte_fallback=True)


def test_long_lines_train_and_round_trip(tmp_path):
    line = "x = [" + ", ".join(str(i) for i in range(MAX_SENTENCE_BYTES // 3)) + "]"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "long.py").write_text(line + "\n" + CODE)
    data = DataConfig(sources=[FilesSource(path=str(tmp_path / "c"))])
    train_tokenizer(data, TokenizerConfig(vocab_size=80), tmp_path / "tok", seed=0)
    tok = Tokenizer.load(tmp_path / "tok" / "tokenizer.model")
    assert len(line.encode()) > MAX_SENTENCE_BYTES
    assert tok.decode(tok.encode(line)) == line


def test_max_training_bytes_bounds_reading(corpus, tmp_path):
    stats = train_tokenizer(corpus, TokenizerConfig(model_type="char", max_training_bytes=500), tmp_path, seed=0)
    assert 500 <= stats["training_bytes"] < 500 + 80  # stops at the first line past the limit


def test_training_is_deterministic_for_a_seed(corpus, trained, tmp_path):
    train_tokenizer(corpus, TokenizerConfig(model_type="bpe", vocab_size=VOCAB["bpe"]), tmp_path, seed=0)
    assert Tokenizer.load(tmp_path / "tokenizer.model").sha256 == trained["bpe"][1].sha256


def test_encode_batch_matches_encode(trained):
    texts = ["def f():\n    pass\n", "", "\tx = 1  # c\n\n"]
    for _, tok, _ in trained.values():
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_empty_corpus_is_a_corpus_error(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(CorpusError, match="data.sources: corpus is empty"):
        train_tokenizer(DataConfig(sources=[FilesSource(path=str(tmp_path / "e.txt"))]), TokenizerConfig(), tmp_path, 0)


def test_bad_jsonl_line_surfaces_as_the_corpus_error(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"text": "def f():\\n    pass"}\n' * 30 + "{oops\n")
    data = DataConfig(sources=[FilesSource(path=str(tmp_path / "r.jsonl"))])
    with pytest.raises(CorpusError, match=r"r\.jsonl line 31: invalid JSON"):
        train_tokenizer(data, TokenizerConfig(model_type="char"), tmp_path / "tok", 0)
    assert not (tmp_path / "tok" / "tokenizer.model").exists()
