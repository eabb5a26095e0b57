"""Tokenizers to and from Hugging Face: pretrained tokenizers read with the `tokenizers` library (the same ids as
transformers' AutoTokenizer), imported by the tokenizer stage and used for sharding; gptlab's SentencePiece
tokenizers exported so that AutoTokenizer gives exactly llmcore's ids on any text."""

from __future__ import annotations

import json
import random

import pytest
import transformers
from helpers import byte_level_bpe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcore.config import DataConfig, FilesSource, PythonStdlibSource, TokenizerConfig
from llmcore.shards import TokenSplit, write_shards
from llmcore.tokenizer import (
    HFTokenizer,
    TokenizerError,
    export_tokenizer,
    import_tokenizer,
    load_tokenizer,
    train_tokenizer,
)

KINDS = [("bpe", False), ("bpe", True), ("unigram", False), ("unigram", True), ("char", False), ("char", True)]
ALPHABET = list("abc def\n\t  ()xyz_0123héé你🙂\r\u2581<>/0xAs")


def mixed_text(seed: int, n: int = 4000) -> str:
    """Code, prose, runs of whitespace, CR LF, CJK, emoji, combining marks and strings that look like special and
    byte tokens."""
    rng = random.Random(seed)
    parts = ["def f(x):\n    return x  \t# ok\r\n", "Überraschung! naïve café — “quotes” 你好，世界 🙂🚀 e\u0301 ",
             "<s> </s> <unk> <pad> <0x41> <0x0A> ", "    \n\n\t\t   \n", "x = [1, 2, 3]  # comment\n"]  # fmt: skip
    out = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(parts) if rng.random() < 0.5 else "".join(rng.choice(ALPHABET) for _ in range(20)))
    return "".join(out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(llmcore tokenizer, transformers AutoTokenizer) for each SentencePiece type, trained on ~300 kB of stdlib."""
    root = tmp_path_factory.mktemp("export")
    data = DataConfig(sources=[PythonStdlibSource(max_bytes=300_000)])
    pairs = {}
    for model_type, byte_fallback in KINDS:
        name = f"{model_type}{'-bytes' if byte_fallback else ''}"
        vocab = {"bpe": 600, "unigram": 600, "char": 300}[model_type] + (256 if byte_fallback else 0)
        cfg = TokenizerConfig(model_type=model_type, vocab_size=vocab, byte_fallback=byte_fallback, num_threads=1)
        train_tokenizer(data, cfg, root / name, seed=0)
        export_tokenizer(root / name, root / f"{name}-hf", model_max_length=256)
        pairs[name] = (load_tokenizer(root / name), transformers.AutoTokenizer.from_pretrained(root / f"{name}-hf"))
    return pairs


@pytest.mark.parametrize("name", ["bpe", "bpe-bytes", "unigram", "unigram-bytes", "char", "char-bytes"])
def test_exported_sentencepiece_gives_llmcores_ids_on_mixed_text(exported, name):
    ours, theirs = exported[name]
    for seed in range(3):
        text = mixed_text(seed)
        assert theirs(text)["input_ids"] == ours.encode(text), name
    if name.endswith("bytes"):  # every text round-trips with byte fallback (U+2581 decodes as a space, as in any
        text = mixed_text(9)  # SentencePiece model)
        assert theirs.decode(theirs(text)["input_ids"]) == ours.decode(ours.encode(text)) == text.replace("\u2581", " ")


# (lone surrogates are left out: text decoded from files never holds one)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(ALPHABET) | st.characters(exclude_categories=("Cs",)), max_size=80))
def test_exported_sentencepiece_gives_llmcores_ids_on_any_text(exported, text):
    """The same ids; a unigram model may break a tie between equally likely segmentations the other way (its
    Viterbi meets `a|c|cc` and `a|cc|c`, the same pieces in another order, with one score): then the pieces must
    spell the same text with the same total score."""
    for name, (ours, theirs) in exported.items():
        got, want = theirs(text)["input_ids"], ours.encode(text)
        if name.startswith("unigram") and got != want:
            score = lambda ids: sum(ours._sp.get_score(i) for i in ids)
            assert ours.decode(got) == ours.decode(want) and score(got) == pytest.approx(score(want)), (name, text)
        else:
            assert got == want, (name, text)


def test_a_word_model_is_not_exported(tmp_path):
    data = DataConfig(sources=[PythonStdlibSource(max_bytes=100_000)])
    train_tokenizer(data, TokenizerConfig(model_type="word", vocab_size=300, num_threads=1), tmp_path / "w", seed=0)
    with pytest.raises(TokenizerError, match="tokenizer.model_type: a SentencePiece word model has no exact"):
        export_tokenizer(tmp_path / "w", tmp_path / "out")


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory):
    """A GPT-2-style byte-level BPE (trained with `tokenizers`), saved as tokenizer.json and as vocab.json +
    merges.txt, with its end-of-text token named in tokenizer_config.json."""
    root = tmp_path_factory.mktemp("gpt2tok")
    corpus = root / "corpus.txt"
    corpus.write_text(mixed_text(1, 60_000), encoding="utf-8")
    tok = byte_level_bpe([corpus], 400)
    (root / "json").mkdir()
    tok.save(str(root / "json" / "tokenizer.json"))
    (root / "json" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (root / "files").mkdir()
    tok.model.save(str(root / "files"))  # vocab.json + merges.txt, GPT-2's original format
    return root, corpus


def test_a_pretrained_tokenizer_gives_transformers_ids_from_either_format(gpt2_style):
    root, _ = gpt2_style
    text = mixed_text(3)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "json" / "tokenizer.json"))
    for folder in (root / "json", root / "files", root / "json" / "tokenizer.json"):
        tok = load_tokenizer(folder)
        assert isinstance(tok, HFTokenizer) and tok.vocab_size == 400
        assert tok.encode(text) == reference(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == text
        assert tok.eos_id == reference.convert_tokens_to_ids("<|endoftext|>")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.one_of(
            st.lists(st.sampled_from(ALPHABET + ["'s", "'ll", "<|endoftext|>", " 12", "\u00a0"]), max_size=60).map(
                "".join
            ),
            st.text(max_size=40),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_batches_of_gpt2s_kind_get_the_tokenizers_librarys_ids_from_tiktoken(gpt2_style, texts):
    """Shards are encoded in batches, by tiktoken for GPT-2's kind of tokenizer: ids equal the `tokenizers`
    library's for any text (contractions, digits, Unicode whitespace, emoji; an added token's text is left to it)."""
    root, _ = gpt2_style
    for folder in (root / "json", root / "files"):
        tok = load_tokenizer(folder)
        assert tok.encoder == "tiktoken"
        assert [list(map(int, ids)) for ids in tok.encode_batch(texts, num_threads=1)] == [tok.encode(t) for t in texts]


def test_other_kinds_of_tokenizer_json_are_left_to_the_tokenizers_library(gpt2_style, tmp_path):
    """A tokenizer.json tiktoken would encode differently (a prefix space, a normaliser) is not given to it."""
    root, _ = gpt2_style
    spec = json.loads((root / "json" / "tokenizer.json").read_text())
    text = mixed_text(5, 2000)
    for change in ({"pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}},
                   {"normalizer": {"type": "Lowercase"}}):  # fmt: skip
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "tokenizer.json").write_text(json.dumps({**spec, **change}))
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        tok = load_tokenizer(folder)
        reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        assert tok.encoder == "tokenizers"
        assert tok.encode_batch([text])[0] == reference(text)["input_ids"] != load_tokenizer(root / "json").encode(text)


def test_the_tokenizer_stage_imports_checks_and_shards_with_it(gpt2_style, tmp_path):
    root, corpus = gpt2_style
    stats = import_tokenizer(TokenizerConfig(type="pretrained", path=str(root / "json")), tmp_path / "tok", 400)
    assert stats["vocab_size"] == 400 and stats["format"] == "huggingface"
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["stats.json", "tokenizer.json",
                                                                     "tokenizer_config.json"]  # fmt: skip
    with pytest.raises(TokenizerError, match=r"tokenizer.path: .*400 tokens, but the model's vocabulary has 50257"):
        import_tokenizer(TokenizerConfig(type="pretrained", path=str(root / "json")), tmp_path / "x", 50257)
    with pytest.raises(TokenizerError, match=r"tokenizer.path: .*nowhere: no such file"):
        import_tokenizer(TokenizerConfig(type="pretrained", path=str(tmp_path / "nowhere")), tmp_path / "y")
    data = DataConfig(sources=[FilesSource(path=str(corpus))], split="tail", val_fraction=0.1, num_workers=1)
    manifest = write_shards(data, tmp_path / "tok", tmp_path / "shards", seed=0)
    assert manifest["encoder"] == "tiktoken"
    tok = load_tokenizer(tmp_path / "tok")
    text = corpus.read_bytes().decode("utf-8")  # as the corpus reader reads it: line endings as they are
    cut = int(len(text) * 0.9)
    val = TokenSplit(tmp_path / "shards", "val")
    assert val.read(0, val.tokens).tolist() == tok.encode(text[cut:]) + [tok.eos_id]
    assert manifest["splits"]["val"]["bytes"] == len(text[cut:].encode("utf-8"))  # bits per byte: the text's bytes


def test_config_rules_of_pretrained_tokenizers():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="path: a pretrained tokenizer needs the folder or file to import"):
        TokenizerConfig(type="pretrained")
    with pytest.raises(ValidationError, match="path: only a pretrained tokenizer reads one"):
        TokenizerConfig(path="x")
