"""Find and stream the documents of a corpus described by a :class:`~llmcore.config.DataConfig`.

A corpus is a list of sources; each source expands to an ordered list of files, and each file to documents:

* a ``text`` file is one document, decoded as UTF-8. Invalid bytes are replaced by U+FFFD (the Unicode
  replacement character) rather than failing, so one stray Latin-1 byte cannot stop a long run. Line endings are
  kept exactly as on disk (``\\r\\n`` stays ``\\r\\n``), so byte counts and round trips are exact. A file
  holding a NUL byte is binary (an image, an archive, a ``.pyc`` caught by a glob), never text: it is an error
  naming the file, found by ``check_corpus`` in its first 8 KiB and while streaming anywhere in it.
* a ``jsonl`` file holds one JSON object per line; the string under ``text_field`` is one document. Blank lines
  are skipped; a line that is not a JSON object with that string field is an error naming the file and line.

Everything here streams: memory is bounded by the largest single document. Listing and checking only stat files
(and read the first 8 KiB of each text file and the first line of each JSONL file).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from glob import glob
from pathlib import Path

from llmcore.config import DataConfig, FieldError, FilesSource, PythonStdlibSource

#: Directory names that hold test packages in the standard library.
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
#: Directory names under the stdlib that hold third-party packages, never part of the stdlib corpus.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class CorpusError(FieldError):
    """A problem with the corpus, reported against the spec field it comes from (``data.sources.0.path``)."""


# ------------------------------------------------------------------------------------------ resolving


def _files_source(i: int, src: FilesSource) -> list[tuple[int, Path, str]]:
    """Expand one FilesSource (file, glob or directory) into sorted ``(i, path, format)`` rows."""
    field = f"data.sources.{i}.path"
    pattern = os.path.expanduser(src.path)
    if os.path.isfile(pattern):
        paths = [Path(pattern).resolve()]
    elif os.path.isdir(pattern):
        suffixes = {s.lower() for s in src.suffixes}
        paths = sorted(p.resolve() for p in Path(pattern).rglob("*") if p.suffix.lower() in suffixes and p.is_file())
        if not paths:
            raise CorpusError(field, f"directory {src.path!r} has no files ending in {', '.join(src.suffixes)}")
    elif any(c in pattern for c in "*?["):
        paths = sorted(Path(p).resolve() for p in glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise CorpusError(field, f"glob {src.path!r} matches no files (searched from {os.getcwd()})")
    else:
        raise CorpusError(field, f"no such file or directory: {src.path!r} (relative to {os.getcwd()})")
    return [(i, p, _format_of(src, p)) for p in paths]


def _format_of(src: FilesSource, path: Path) -> str:
    """Resolve ``format: auto`` from the file suffix."""
    if src.format != "auto":
        return src.format
    return "jsonl" if path.suffix.lower() == ".jsonl" else "text"


def stdlib_files(include_tests: bool) -> list[Path]:
    """All ``.py`` files of the running Python's standard library, sorted; never site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = STDLIB_SKIP_DIRS if include_tests else STDLIB_SKIP_DIRS | STDLIB_TEST_DIRS
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found)


def _stdlib_source(i: int, src: PythonStdlibSource) -> list[tuple[int, Path, str]]:
    """The stdlib files, cut at ``max_files`` and at the file where the running size reaches ``max_bytes``."""
    rows: list[tuple[int, Path, str]] = []
    total = 0
    for path in stdlib_files(src.include_tests):
        if src.max_files is not None and len(rows) >= src.max_files:
            break
        if src.max_bytes is not None and total >= src.max_bytes:
            break
        rows.append((i, path, "text"))
        total += path.stat().st_size
    if not rows:
        raise CorpusError(f"data.sources.{i}", f"no .py files found under {sysconfig.get_paths()['stdlib']}")
    return rows


def _source_files(i: int, src: FilesSource | PythonStdlibSource) -> list[tuple[int, Path, str]]:
    if isinstance(src, PythonStdlibSource):
        return _stdlib_source(i, src)
    return _files_source(i, src)


def resolve_files(data: DataConfig) -> list[tuple[int, Path, str]]:
    """Every corpus file as ``(source_index, absolute_path, format)`` in corpus order.

    Raises :class:`CorpusError` (field ``data.sources.{i}.path``) for the first source whose file is missing,
    whose glob matches nothing, or whose directory has no file with an accepted suffix.
    """
    rows: list[tuple[int, Path, str]] = []
    for i, src in enumerate(data.sources):
        rows.extend(_source_files(i, src))
    return rows


# ------------------------------------------------------------------------------------------- checking

#: How much of each text file ``check_corpus`` reads to tell binary files from text.
SNIFF_BYTES = 8192


def _binary_error(i: int, path: Path, where: str) -> CorpusError:
    return CorpusError(
        f"data.sources.{i}.path",
        f"{path} is binary, not text (a NUL byte {where}); remove it or narrow the path, glob or suffixes",
    )


def _sniff_binary(i: int, path: Path) -> tuple[CorpusError | None, bool]:
    """(the error a binary file gets, or None; whether the file holds only whitespace, judged when it is small
    enough to have been read whole)."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES + 1)
    offset = head.find(b"\0")
    blank = len(head) <= SNIFF_BYTES and not head.strip()
    return (None if offset < 0 else _binary_error(i, path, f"at byte {offset}")), blank


def _peek_jsonl(i: int, path: Path, text_field: str) -> CorpusError | None:
    """Parse the first non-blank line of a JSONL file; the error it would raise when streamed, or None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    _jsonl_record(i, path, lineno, line, text_field)
                except CorpusError as err:
                    return err
                return None
    return None


def check_corpus(data: DataConfig) -> list[CorpusError]:
    """Every problem with the corpus at once, cheaply: missing files and empty globs or directories per source,
    a malformed first record per JSONL file, a binary file (NUL byte in its first 8 KiB) among text files, and
    ``corpus is empty`` (naming the files) when every file is empty or holds only whitespace.

    Stats files and reads the first 8 KiB of text files (first line of JSONL files); never a whole corpus.
    """
    errors: list[CorpusError] = []
    empty: list[tuple[int, Path]] = []
    has_text = False
    for i, src in enumerate(data.sources):
        try:
            rows = _source_files(i, src)
        except CorpusError as err:
            errors.append(err)
            continue
        for _, path, fmt in rows:
            size = path.stat().st_size
            err, blank = None, size == 0
            if fmt == "jsonl" and size:
                err = _peek_jsonl(i, path, src.text_field)
            elif size and isinstance(src, FilesSource):
                err, blank = _sniff_binary(i, path)
            if err is not None:
                errors.append(err)
            if blank:
                empty.append((i, path))
            else:
                has_text = True
    if not errors and not has_text:
        sources = sorted({i for i, _ in empty})
        field = f"data.sources.{sources[0]}.path" if len(sources) == 1 else "data.sources"
        names = ", ".join(str(p) for _, p in empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        errors.append(CorpusError(field, f"corpus is empty: every file is empty or only whitespace ({names})"))
    return errors


# ------------------------------------------------------------------------------------------ streaming


def _jsonl_record(i: int, path: Path, lineno: int, line: str, text_field: str) -> str:
    """The document text in one JSONL line, or a CorpusError naming the file and line."""
    where = f"{path} line {lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"data.sources.{i}", f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise CorpusError(f"data.sources.{i}.text_field", f"{where}: record has no field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
        raise CorpusError(
            f"data.sources.{i}.text_field", f"{where}: field {text_field!r} is {type(text).__name__}, not a string"
        )
    return text


def _iter_jsonl(i: int, path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _jsonl_record(i, path, lineno, line, text_field)


def iter_documents(data: DataConfig) -> Iterator[str]:
    """Stream the corpus documents in order: a text file is one document (invalid UTF-8 bytes become U+FFFD,
    line endings kept as on disk); a JSONL line is one document. Memory is bounded by the largest document."""
    for i, path, fmt in resolve_files(data):
        if fmt == "jsonl":
            yield from _iter_jsonl(i, path, data.sources[i].text_field)
        else:
            with open(path, encoding="utf-8", errors="replace", newline="") as f:
                text = f.read()
            if "\0" in text:
                raise _binary_error(i, path, f"at character {text.index(chr(0))}")
            yield text


def is_val_document(seed: int, index: int, val_fraction: float) -> bool:
    """The ``document`` split: whether document ``index`` (counted over the whole corpus, empty ones included)
    is validation. Seeded and deterministic: hash (seed, index) to a number in [0, 1)."""
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def split_pieces(data: DataConfig, seed: int) -> Iterator[tuple[str, str]]:
    """``(split, text)`` in corpus order: whole documents (``document``) or each document's head and tail."""
    for index, doc in enumerate(iter_documents(data)):
        if not doc:
            continue
        if data.split == "document":
            yield ("val" if is_val_document(seed, index, data.val_fraction) else "train"), doc
            continue
        cut = int(len(doc) * (1.0 - data.val_fraction))
        if cut:
            yield "train", doc[:cut]
        if cut < len(doc):
            yield "val", doc[cut:]


def corpus_fingerprint(data: DataConfig) -> list[dict]:
    """``[{"path", "size", "mtime_ns", "format"}]`` per corpus file, from stat only (for content addressing)."""
    rows = []
    for _, path, fmt in resolve_files(data):
        st = path.stat()
        rows.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": fmt})
    return rows
