"""Corpus resolution, checking and streaming (llmcore.corpus)."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest

from llmcore.config import DataConfig, FilesSource, PythonStdlibSource
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
    [("{not json", "invalid JSON"), ('{"other": 1}', "no field 'text'"), ('{"text": 5}', "not a string")],
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
