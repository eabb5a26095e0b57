"""Find and stream the documents of a corpus described by a :class:`~llmcore.config.DataConfig`.

A corpus is a list of sources; each source expands to an ordered list of files, and each file to documents:

* a ``text`` file is one document, decoded as UTF-8. Invalid bytes are replaced by U+FFFD (the Unicode
  replacement character) rather than failing, so one stray Latin-1 byte cannot stop a long run. Line endings are
  kept exactly as on disk (``\\r\\n`` stays ``\\r\\n``), so byte counts and round trips are exact. A file
  holding a NUL byte is binary (an image, an archive, a ``.pyc`` caught by a glob), never text: it is an error
  naming the file, found by ``check_corpus`` in its first 8 KiB and while streaming anywhere in it.
* a ``jsonl`` file holds one JSON object per line; the string under ``text_field`` is one document. Blank lines
  are skipped; a line that is not a JSON object with that string field is an error naming the file and line.
* a ``parquet`` file holds one document per row, in the string column ``text_field``, read a batch of rows at a
  time; a null is an error naming the file and row.
* a ``huggingface`` source is a dataset split, one document per row as in parquet: a folder written by
  ``save_to_disk`` (read with ``datasets.load_from_disk``), else whatever ``datasets.load_dataset`` loads. Its
  files are the Arrow files holding the split.

Everything here streams: memory is bounded by the largest single document (a batch of rows for parquet files and
datasets). Listing and checking only stat files (and read the first 8 KiB of each text file, the first line of
each JSONL file, the footer of each parquet file); a dataset is opened (memory-mapped), never read whole.
``pyarrow`` and ``datasets`` are imported only for sources that need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from glob import glob
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any

from llmcore.config import DataConfig, FieldError, FilesSource, HuggingFaceSource, PythonStdlibSource, TaskSource

#: Directory names that hold test packages in the standard library.
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
#: Directory names under the stdlib that hold third-party packages, never part of the stdlib corpus.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
#: Rows of a parquet file or dataset converted to Python strings at a time while streaming.
BATCH_ROWS = 1024


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
            hint = ""
            if ".parquet" not in suffixes and any(Path(pattern).rglob("*.parquet")):
                hint = f" (it has parquet files: add .parquet to data.sources.{i}.suffixes)"
            raise CorpusError(field, f"directory {src.path!r} has no files ending in {', '.join(src.suffixes)}{hint}")
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
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


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


def _saved_dataset(src: HuggingFaceSource) -> bool:
    """Whether the source's path is a folder written by ``save_to_disk`` (a Dataset's or a DatasetDict's)."""
    folder = Path(src.path).expanduser()
    saved_dict = (folder / "dataset_dict.json").is_file()
    return saved_dict or ((folder / "dataset_info.json").is_file() and (folder / "state.json").is_file())


def _datasets(i: int) -> Any:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"data.sources.{i}.type", "a huggingface source needs the `datasets` package: pip install 'gptlab[hf]'"
        ) from None
    return datasets


def _load_dataset(i: int, src: HuggingFaceSource) -> Any:
    """The split a huggingface source reads, checked: its folder or name loads, it has the split, and its
    ``text_field`` is a string column. Memory-mapped, never read whole."""
    datasets = _datasets(i)
    field = f"data.sources.{i}"
    folder = Path(src.path).expanduser()
    if _saved_dataset(src):
        if src.name is not None:
            raise CorpusError(f"{field}.name", f"{src.path} is a save_to_disk folder: it has no configurations")
        dataset = datasets.load_from_disk(str(folder), keep_in_memory=False)
        if isinstance(dataset, datasets.DatasetDict):
            if src.split not in dataset:
                splits = _names(dataset)
                raise CorpusError(f"{field}.split", f"{src.path} has no split {src.split!r} (it has: {splits})")
            dataset = dataset[src.split]
    elif src.path.startswith(("/", ".", "~")) and not folder.exists():
        raise CorpusError(f"{field}.path", f"no such folder: {src.path!r} (relative to {os.getcwd()})")
    else:
        try:
            dataset = datasets.load_dataset(str(folder), src.name, split=src.split, keep_in_memory=False)
        except Exception as exc:  # a loader of anything (the Hub, scripts, data files): every failure means the same
            text = " ".join(str(exc).split())
            part = "split" if "Unknown split" in text else "name" if "BuilderConfig" in text else "path"
            where = "" if folder.exists() else f" (no such folder in {os.getcwd()}, so a Hub name)"
            message = f"datasets.load_dataset cannot load {src.path!r}{where}: {type(exc).__name__}: {text}"
            raise CorpusError(f"{field}.{part}", message) from None
    problem = _column_problem(dataset.data.schema, src.text_field, f"dataset {src.path!r}")
    if problem:
        raise CorpusError(f"{field}.text_field", problem)
    return dataset


def _dataset_source(i: int, src: HuggingFaceSource) -> list[tuple[int, Path, str]]:
    """The Arrow files holding a huggingface source's split."""
    return [(i, Path(f["filename"]).resolve(), "huggingface") for f in _load_dataset(i, src).cache_files]


def _task_source(i: int, src: TaskSource) -> list[tuple[int, Path, str]]:
    """A task source's file (none for a derived next_line source: its questions come from the other sources)."""
    if src.path is None:
        return []
    path = Path(src.path).expanduser()
    if not path.is_file():
        raise CorpusError(f"data.sources.{i}.path", f"no such task file: {src.path!r} (relative to {os.getcwd()})")
    return [(i, path.resolve(), "task")]


def _source_files(
    i: int, src: FilesSource | PythonStdlibSource | HuggingFaceSource | TaskSource
) -> list[tuple[int, Path, str]]:
    if isinstance(src, TaskSource):
        return _task_source(i, src)
    if isinstance(src, PythonStdlibSource):
        return _stdlib_source(i, src)
    if isinstance(src, HuggingFaceSource):
        return _dataset_source(i, src)
    return _files_source(i, src)


def resolve_files(data: DataConfig) -> list[tuple[int, Path, str]]:
    """Every corpus file as ``(source_index, absolute_path, format)`` in corpus order.

    Raises :class:`CorpusError` (naming the source's field) for the first source whose file is missing, whose glob
    matches nothing, whose directory has no file with an accepted suffix, or whose dataset does not load, lacks
    the split, or lacks a string column ``text_field``.
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


def _names(names: Iterable[Any], limit: int = 20) -> str:
    """``a, b, c``: the first ``limit`` names, and how many more."""
    shown = [str(n) for n in names]
    return ", ".join(shown[:limit]) + (f" and {len(shown) - limit} more" if len(shown) > limit else "")


def _column_problem(schema: Any, text_field: str, where: str) -> str | None:
    """What is wrong with ``text_field`` as the text column of an Arrow schema (parquet file, dataset), or None."""
    import pyarrow as pa

    if text_field not in schema.names:
        return f"column {text_field!r} is not in {where} (it has: {_names(schema.names)})"
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return f"column {text_field!r} of {where} holds {kind}, not strings"
    return None


def _parquet_file(i: int, path: Path, text_field: str) -> Any:
    """The open ``pyarrow.parquet.ParquetFile`` (only its footer read), checked: it is parquet and its
    ``text_field`` is a string column."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(
            f"data.sources.{i}.format", f"{path} is parquet: reading it needs the `pyarrow` package: "
            "pip install 'gptlab[hf]'"
        ) from None  # fmt: skip
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise CorpusError(f"data.sources.{i}.path", f"{path} is not a parquet file ({exc})") from None
    problem = _column_problem(parquet.schema_arrow, text_field, str(path))
    if problem:
        parquet.close()
        raise CorpusError(f"data.sources.{i}.text_field", problem)
    return parquet


def _peek_parquet(i: int, path: Path, text_field: str) -> tuple[CorpusError | None, bool]:
    """(the error reading a parquet file would raise, or None; whether it has no rows), from its footer."""
    try:
        with _parquet_file(i, path, text_field) as parquet:
            return None, parquet.metadata.num_rows == 0
    except CorpusError as err:
        return err, False


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
    a malformed first record per JSONL file, a parquet file or dataset without a string column ``text_field``, a
    dataset that does not load or lacks the split, a binary file (NUL byte in its first 8 KiB) among text files, and
    ``corpus is empty`` (naming the files) when every file is empty or holds only whitespace.

    Stats files and reads the first 8 KiB of text files (first line of JSONL files, footer of parquet files); never
    a whole corpus.
    """
    errors: list[CorpusError] = []
    empty: list[tuple[int, Path]] = []
    has_text = False
    for i, src in enumerate(data.sources):
        try:
            if isinstance(src, TaskSource):  # questions, checked by llmcore.sft.check_task_sources
                has_text = True
                continue
            if isinstance(src, HuggingFaceSource):
                if _load_dataset(i, src).num_rows:
                    has_text = True
                else:
                    empty.append((i, Path(src.path)))
                continue
            rows = _source_files(i, src)
        except CorpusError as err:
            errors.append(err)
            continue
        for _, path, fmt in rows:
            size = path.stat().st_size
            err, blank = None, size == 0
            if fmt == "parquet":
                err, blank = _peek_parquet(i, path, src.text_field)
            elif fmt == "jsonl" and size:
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
        names = _names((p for _, p in empty), limit=3)
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
        has = f"it has: {_names(record)}" if isinstance(record, dict) else f"it is a {type(record).__name__}"
        raise CorpusError(f"data.sources.{i}.text_field", f"{where}: record has no field {text_field!r} ({has})")
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


def _read_text(i: int, path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    if "\0" in text:
        raise _binary_error(i, path, f"at character {text.index(chr(0))}")
    return text


def _iter_rows(i: int, where: str, batches: Iterable[list[Any]], text_field: str) -> Iterator[str]:
    """The strings of a text column given in batches; a null is an error naming ``where`` and the row."""
    row = 0
    for batch in batches:
        for text in batch:
            if text is None:
                raise CorpusError(f"data.sources.{i}.text_field", f"{where} row {row}: {text_field!r} is null")
            yield text
            row += 1


def _iter_parquet(i: int, path: Path, text_field: str) -> Iterator[str]:
    with _parquet_file(i, path, text_field) as parquet:
        batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=[text_field])
        yield from _iter_rows(i, str(path), (b.column(0).to_pylist() for b in batches), text_field)


def _iter_dataset(i: int, src: HuggingFaceSource) -> Iterator[str]:
    rows = _load_dataset(i, src).select_columns(src.text_field)
    batches = (b[src.text_field] for b in rows.iter(batch_size=BATCH_ROWS))
    yield from _iter_rows(i, f"dataset {src.path!r}", batches, src.text_field)


def iter_documents(data: DataConfig) -> Iterator[str]:
    """Stream the corpus documents in order: a text file is one document (invalid UTF-8 bytes become U+FFFD,
    line endings kept as on disk); a JSONL line, a parquet row or a dataset row is one document. Every source is
    resolved before the first document. Memory is bounded by the largest document (a batch of rows)."""
    for i, rows in groupby(resolve_files(data), key=itemgetter(0)):
        src = data.sources[i]
        if isinstance(src, TaskSource):  # questions, not documents: llmcore.sft.task_examples reads them
            continue
        if isinstance(src, HuggingFaceSource):
            yield from _iter_dataset(i, src)
            continue
        for _, path, fmt in rows:
            if fmt == "jsonl":
                yield from _iter_jsonl(i, path, src.text_field)
            elif fmt == "parquet":
                yield from _iter_parquet(i, path, src.text_field)
            else:
                yield _read_text(i, path)


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
    """``[{"path", "size", "mtime_ns", "format"}]`` per corpus file, from stat only (for content addressing); a
    task file is ``{"path", "sha256", "format"}`` (its content); a
    dataset ``load_dataset`` loads (not a ``save_to_disk`` folder, whose files are rows) is one row
    ``{"dataset", "name", "split", "fingerprint"}``: the fingerprint ``datasets`` gave it, not the paths of a cache
    that differs from machine to machine."""
    rows = []
    for i, src in enumerate(data.sources):
        if isinstance(src, HuggingFaceSource) and not _saved_dataset(src):
            fingerprint = getattr(_load_dataset(i, src), "_fingerprint", None)
            rows.append({"dataset": src.path, "name": src.name, "split": src.split, "fingerprint": fingerprint})
            continue
        if isinstance(src, TaskSource):  # small files: their content, so an edited question makes new shards
            rows += [{"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "format": src.format}
                     for _, p, _ in _source_files(i, src)]  # fmt: skip
            continue
        for _, path, fmt in _source_files(i, src):
            st = path.stat()
            rows.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": fmt})
    return rows
