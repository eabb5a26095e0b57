"""Corpus resolution, checking and streaming (llmcore.corpus)."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import gptlab, make_corpus, tiny_spec, write_spec

from llmcore.config import DataConfig, FilesSource, HuggingFaceSource, PythonStdlibSource, TokenizerConfig
from llmcore.corpus import CorpusError, check_corpus, corpus_fingerprint, iter_documents, resolve_files


def files(*paths: str, **kw) -> DataConfig:
    return DataConfig(sources=[FilesSource(path=p, **kw) for p in paths])


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """d/a.txt, d/sub/b.md, d/sub/deep/c.txt, d/sub/skip.bin, d/recs.jsonl"""
    d = tmp_path / "d"
    (d / "sub" / "deep").mkdir(parents=True)
    (d / "a.txt").write_text("alpha\n")
    (d / "sub" / "b.md").write_text("# beta\n")
    (d / "sub" / "deep" / "c.txt").write_text("gamma\n")
    (d / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    (d / "recs.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    return d


def test_file_glob_and_directory_resolve_sorted_with_formats(tree: Path):
    one = resolve_files(files(str(tree / "a.txt")))
    assert one == [(0, (tree / "a.txt").resolve(), "text")]

    globbed = resolve_files(files(str(tree / "**" / "*.txt")))
    assert [p.name for _, p, _ in globbed] == ["a.txt", "c.txt"]

    listed = resolve_files(files(str(tree)))
    assert [p.relative_to(tree.resolve()).as_posix() for _, p, _ in listed] == [
        "a.txt",
        "recs.jsonl",
        "sub/b.md",
        "sub/deep/c.txt",
    ]
    assert {p.name: fmt for _, p, fmt in listed}["recs.jsonl"] == "jsonl"
    assert all(p.is_absolute() for _, p, _ in listed)


def test_source_index_and_suffix_filter(tree: Path):
    # suffixes filter directory listings only; a named file is always taken
    rows = resolve_files(files(str(tree / "a.txt"), str(tree / "sub"), suffixes=[".md"]))
    assert [(i, p.name) for i, p, _ in rows] == [(0, "a.txt"), (1, "b.md")]


def test_relative_paths_resolve_against_cwd(tree: Path, monkeypatch):
    monkeypatch.chdir(tree)
    assert [p for _, p, _ in resolve_files(files("sub/*.md"))] == [(tree / "sub" / "b.md").resolve()]


@pytest.mark.parametrize(
    "path, words",
    [("missing.txt", "no such file"), ("nothing/*.txt", "matches no files"), ("sub/deep", "no files ending")],
)
def test_unresolvable_source_names_its_field(tree: Path, monkeypatch, path: str, words: str):
    monkeypatch.chdir(tree)
    with pytest.raises(CorpusError) as info:
        resolve_files(files("a.txt", path, suffixes=[".rst"]))
    assert info.value.field == "data.sources.1.path"
    assert words in info.value.message
    assert str(info.value) == f"data.sources.1.path: {info.value.message}"


def test_check_corpus_reports_every_problem_at_once(tree: Path):
    errors = check_corpus(files(str(tree / "nope.txt"), str(tree / "a.txt"), str(tree / "zz*")))
    assert [e.field for e in errors] == ["data.sources.0.path", "data.sources.2.path"]
    assert check_corpus(files(str(tree))) == []


def test_check_corpus_flags_empty_corpus_and_bad_first_jsonl_record(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")  # only whitespace: no document to train on
    errors = check_corpus(files(str(tmp_path / "*.txt")))
    assert [e.field for e in errors] == ["data.sources.0.path"]
    assert "corpus is empty" in errors[0].message
    assert str(tmp_path / "empty.txt") in errors[0].message and str(tmp_path / "blank.txt") in errors[0].message
    (tmp_path / "one.txt").write_text("x")
    assert check_corpus(files(str(tmp_path / "*.txt"))) == []

    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    errors = check_corpus(files(str(tmp_path / "bad.jsonl")))
    assert len(errors) == 1 and "bad.jsonl line 1" in errors[0].message and "'text'" in errors[0].message


def test_text_documents_are_exact_and_invalid_utf8_is_replaced(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes(b"line one\r\n\tindented  twice\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 ok")  # Latin-1 byte, invalid UTF-8
    docs = list(iter_documents(files(str(tmp_path / "*.txt"))))
    assert docs == ["line one\r\n\tindented  twice\n", "caf\ufffd ok"]


def test_jsonl_documents_one_per_line_with_custom_field(tmp_path: Path):
    lines = [json.dumps({"body": "first\nsecond"}), "", json.dumps({"body": "  third"})]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    assert list(iter_documents(files(str(tmp_path / "r.jsonl"), text_field="body"))) == ["first\nsecond", "  third"]
    # format: jsonl forces JSONL parsing whatever the suffix
    (tmp_path / "r.data").write_text(json.dumps({"text": "x"}) + "\n")
    assert list(iter_documents(files(str(tmp_path / "r.data"), format="jsonl"))) == ["x"]


@pytest.mark.parametrize(
    "bad_line, words",
    [
        ("{not json", "invalid JSON"),
        ('{"other": 1, "id": 2}', "no field 'text' (it has: other, id)"),
        ("[1]", "no field 'text' (it is a list)"),
        ('{"text": 5}', "not a string"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, bad_line: str, words: str):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n' + bad_line + "\n")
    docs = iter_documents(files(str(path)))
    assert [next(docs), next(docs)] == ["a", "b"]  # streams: earlier documents come out before the error
    with pytest.raises(CorpusError) as info:
        next(docs)
    assert f"{path.resolve()} line 3" in info.value.message and words in info.value.message
    assert info.value.field.startswith("data.sources.0")


def test_stdlib_source_respects_max_files_and_excludes_tests_and_site_packages():
    rows = resolve_files(DataConfig(sources=[PythonStdlibSource(max_files=7)]))
    paths = [p for _, p, _ in rows]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(paths) == 7 and paths == sorted(paths)
    assert all(p.suffix == ".py" and stdlib in p.parents and p.is_file() for p in paths)

    everything = [p for _, p, _ in resolve_files(DataConfig(sources=[PythonStdlibSource()]))]
    parts = {part for p in everything for part in p.relative_to(stdlib).parts[:-1]}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    assert stdlib / "json" / "encoder.py" in everything


def test_stdlib_source_max_bytes_stops_once_reached():
    limit = 20_000
    paths = [p for _, p, _ in resolve_files(DataConfig(sources=[PythonStdlibSource(max_bytes=limit)]))]
    sizes = [p.stat().st_size for p in paths]
    assert sum(sizes[:-1]) < limit <= sum(sizes)


def test_stdlib_source_include_tests_adds_test_packages():
    everything = [p for _, p, _ in resolve_files(DataConfig(sources=[PythonStdlibSource(include_tests=True)]))]
    assert any("test" in p.parts or "tests" in p.parts for p in everything)


def test_fingerprint_is_stat_based_and_changes_with_the_file(tree: Path):
    data = files(str(tree / "*.txt"))
    fp = corpus_fingerprint(data)
    assert fp == [
        {
            "path": str((tree / "a.txt").resolve()),
            "size": 6,
            "mtime_ns": os.stat(tree / "a.txt").st_mtime_ns,
            "format": "text",
        }
    ]
    (tree / "a.txt").write_text("alpha, longer\n")
    assert corpus_fingerprint(data)[0]["size"] == 14


# ------------------------------------------------------------------------------------ parquet and datasets

ROWS = [f"document {i}\nwith two lines, café {i}" for i in range(7)]


def write_parquet(path: Path, texts: list, **columns: list) -> Path:
    """A parquet file of row groups of 3 rows: ``text`` and any other columns."""
    pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=3)
    return path


def test_parquet_rows_are_documents_and_auto_picks_parquet(tmp_path: Path):
    write_parquet(tmp_path / "a.parquet", ROWS, id=list(range(7)))
    assert resolve_files(files(str(tmp_path / "a.parquet"))) == [(0, (tmp_path / "a.parquet").resolve(), "parquet")]
    assert list(iter_documents(files(str(tmp_path / "a.parquet")))) == ROWS
    # format: parquet whatever the suffix; text_field names the column
    pq.write_table(pa.table({"body": ["x", "y"], "text": [1, 2]}), tmp_path / "b.data")
    assert list(iter_documents(files(str(tmp_path / "b.data"), format="parquet", text_field="body"))) == ["x", "y"]
    fp = corpus_fingerprint(files(str(tmp_path / "a.parquet")))
    assert [(r["size"], r["format"]) for r in fp] == [((tmp_path / "a.parquet").stat().st_size, "parquet")]


def test_a_directory_takes_parquet_files_its_suffixes_name(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha\n")
    write_parquet(tmp_path / "d" / "b.parquet", ROWS[:2])
    both = files(str(tmp_path / "d"), suffixes=[".txt", ".parquet"])
    assert list(iter_documents(both)) == ["alpha\n", *ROWS[:2]]
    assert check_corpus(both) == []
    (tmp_path / "d" / "a.txt").unlink()  # the default suffixes leave parquet files out, and say so
    (err,) = check_corpus(files(str(tmp_path / "d")))
    assert err.field == "data.sources.0.path" and "add .parquet to data.sources.0.suffixes" in err.message


def test_parquet_problems_name_the_field_and_file(tmp_path: Path):
    good = write_parquet(tmp_path / "good.parquet", ["a"], id=[1])
    (tmp_path / "fake.parquet").write_text("not parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    errors = check_corpus(files(str(good), str(tmp_path / "fake.parquet"), str(good), text_field="body"))
    assert [e.field for e in errors] == [
        "data.sources.0.text_field",
        "data.sources.1.path",
        "data.sources.2.text_field",
    ]
    assert errors[0].message == f"column 'body' is not in {good.resolve()} (it has: text, id)"
    assert "fake.parquet is not a parquet file" in errors[1].message
    (error,) = check_corpus(files(str(good), text_field="id"))
    assert error.field == "data.sources.0.text_field" and "holds int64, not strings" in error.message
    (error,) = check_corpus(files(str(tmp_path / "empty.parquet")))
    assert "corpus is empty" in error.message
    # a null is found while streaming: the documents before it come out first
    nulls = write_parquet(tmp_path / "nulls.parquet", ["a", "b", "c", "d", None])
    docs = iter_documents(files(str(nulls)))
    assert [next(docs) for _ in range(4)] == ["a", "b", "c", "d"]
    with pytest.raises(CorpusError) as info:
        next(docs)
    assert info.value.field == "data.sources.0.text_field" and f"{nulls.resolve()} row 4" in info.value.message


@pytest.fixture
def hf(tmp_path: Path, monkeypatch) -> Path:
    """Offline, with a private cache: a Dataset saved alone (one/) and a DatasetDict with two splits (dict/)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    # in case another test imported datasets first (it reads the environment once)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_home" / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.Dataset.from_dict({"text": ROWS, "n": list(range(7))}).save_to_disk(tmp_path / "one")
    splits = {
        "train": datasets.Dataset.from_dict({"text": ROWS[:5]}),
        "test": datasets.Dataset.from_dict({"text": ROWS[5:]}),
    }
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dict")
    return tmp_path


def test_saved_datasets_rows_are_documents_and_their_files_the_fingerprint(hf: Path):
    data = DataConfig(
        sources=[HuggingFaceSource(path=str(hf / "one")), HuggingFaceSource(path=str(hf / "dict"), split="test")]
    )
    assert check_corpus(data) == []
    assert list(iter_documents(data)) == ROWS + ROWS[5:]
    rows = resolve_files(data)
    assert {fmt for _, _, fmt in rows} == {"huggingface"}
    assert all(hf / "one" in p.parents for i, p, _ in rows if i == 0)
    assert all(hf / "dict" / "test" in p.parents for i, p, _ in rows if i == 1)
    fp = corpus_fingerprint(data)
    assert [(r["path"], r["size"]) for r in fp] == [(str(p), p.stat().st_size) for _, p, _ in rows]


def test_dataset_problems_name_the_field(hf: Path, monkeypatch):
    monkeypatch.chdir(hf)
    sources = [
        HuggingFaceSource(path="dict", split="validation"),
        HuggingFaceSource(path="one", text_field="body"),
        HuggingFaceSource(path="one", text_field="n"),
        HuggingFaceSource(path="./missing"),
        HuggingFaceSource(path="dict", name="default"),
    ]
    errors = check_corpus(DataConfig(sources=sources))
    assert [str(e) for e in errors] == [
        "data.sources.0.split: dict has no split 'validation' (it has: train, test)",
        "data.sources.1.text_field: column 'body' is not in dataset 'one' (it has: text, n)",
        "data.sources.2.text_field: column 'n' of dataset 'one' holds int64, not strings",
        f"data.sources.3.path: no such folder: './missing' (relative to {hf})",
        "data.sources.4.name: dict is a save_to_disk folder: it has no configurations",
    ]


def test_load_dataset_reads_a_folder_of_data_files_and_fingerprints_it(hf: Path):
    (hf / "files").mkdir()
    write_parquet(hf / "files" / "train.parquet", ROWS[:3])
    data = DataConfig(sources=[HuggingFaceSource(path=str(hf / "files"))])
    assert check_corpus(data) == [] and list(iter_documents(data)) == ROWS[:3]
    (row,) = corpus_fingerprint(data)
    assert row.keys() == {"dataset", "name", "split", "fingerprint"} and row["fingerprint"]
    write_parquet(hf / "files" / "train.parquet", ROWS[:4])
    assert corpus_fingerprint(data)[0]["fingerprint"] != row["fingerprint"]
    assert list(iter_documents(data)) == ROWS[:4]
    (error,) = check_corpus(DataConfig(sources=[HuggingFaceSource(path=str(hf / "files"), split="nope")]))
    assert error.field == "data.sources.0.split" and "Unknown split" in error.message


def test_gptlab_validate_checks_parquet_and_dataset_sources(hf: Path):
    """Through the real CLI: good sources pass; a bad column, a bad split and an unknown Hub name (offline) exit 2
    naming each field, before anything runs."""
    parquet = write_parquet(hf / "c.parquet", ROWS, id=list(range(7)))
    good = [{"type": "files", "path": str(parquet)}, {"type": "huggingface", "path": str(hf / "dict")}]
    spec = write_spec(hf / "good.yaml", tiny_spec(make_corpus(hf / "corpus"), hf / "runs", data={"sources": good}))
    r = gptlab("validate", spec)
    assert r.returncode == 0, r.stderr
    bad = [
        {"type": "files", "path": str(parquet), "text_field": "body"},
        {"type": "huggingface", "path": str(hf / "dict"), "split": "validation"},
        {"type": "huggingface", "path": "nobody-here/no-such-dataset"},
    ]
    spec = write_spec(hf / "bad.yaml", tiny_spec(hf / "corpus", hf / "runs", data={"sources": bad}))
    r = gptlab("validate", spec)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"data.sources.0.text_field: column 'body' is not in {parquet} (it has: text, id)" in r.stderr
    assert "data.sources.1.split: " in r.stderr and "(it has: train, test)" in r.stderr
    assert "data.sources.2.path: datasets.load_dataset cannot load 'nobody-here/no-such-dataset'" in r.stderr


def test_tokenizer_and_shards_read_parquet_and_dataset_sources(hf: Path):
    from llmcore.shards import write_shards
    from llmcore.tokenizer import train_tokenizer

    texts = [f"row {i}: the quick brown fox jumps over a lazy dog, {i} times" for i in range(30)]
    write_parquet(hf / "rows.parquet", texts)
    sources = [FilesSource(path=str(hf / "rows.parquet")), HuggingFaceSource(path=str(hf / "dict"))]
    data = DataConfig(sources=sources, val_fraction=0.2, num_workers=1)
    train_tokenizer(data, TokenizerConfig(model_type="char", vocab_size=64, num_threads=1), hf / "tok", seed=0)
    manifest = write_shards(data, hf / "tok" / "tokenizer.model", hf / "shards", seed=7)
    everything = texts + ROWS[:5]
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(everything)
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == sum(len(t.encode()) for t in everything)
