"""What can be known before running: the checks ``validate``, ``plan`` and ``submit`` make after the schema.

They need the file system or the site (corpus files, runs_root, the account) but no model and no torch, so
``gptlab validate`` stays fast. Every problem is reported at once, as ``field: message``, in a SpecError.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llmcore.config import DataConfig
from site_configs import site_problems
from workflows.pretrained import Sources
from workflows.spec import ExperimentSpec, LoadedSpec, SpecError, load_spec
from workflows.stages import STAGES


def load_and_check(
    spec: str | Path | LoadedSpec, overrides: list[str] | None = None, site: str | None = None, submitting: bool = False
) -> LoadedSpec:
    """Load a spec (unless given loaded) and run every check; raises SpecError listing every problem."""
    if isinstance(spec, LoadedSpec):
        loaded = spec
    else:
        extra = [f"site.name={site}"] if site else []
        loaded = load_spec(spec, [*(overrides or []), *extra], Sources(find_run_weights))
    preflight(loaded, submitting)
    return loaded


def find_run_weights(ref: str, runs_root: str, uri: str | None) -> tuple[Path, Path]:
    """``model.init_from: {type: run}`` found in the store (``workflows.query.find_run_weights``), a step that
    opens MLflow only for a spec that starts from an earlier run."""
    from workflows import query  # MLflow

    return query.find_run_weights(ref, runs_root, uri)


def preflight(loaded: LoadedSpec, submitting: bool = False) -> None:
    """Problems that need the file system or the site (missing corpus files, a corpus a split leaves empty or too
    short for the model, an unwritable runs_root, a missing account), all at once. ``submitting`` adds checks
    that hold only where the driver will run."""
    problems: list[str] = []
    seen: set[str] = set()
    for _, _, spec in loaded.runs:
        key = spec.data.model_dump_json()
        if key not in seen:
            seen.add(key)
            problems += corpus_problems(spec.data, spec.seed)
    if not problems:
        problems += [p for p in dict.fromkeys(p for _, _, spec in loaded.runs for p in size_problems(spec))]
    kinds = [k for k in STAGES.values() if k.preflight is not None]  # the files each kind of stage will read
    found = (p for _, _, spec in loaded.runs for k in kinds for p in k.preflight(spec, loaded.sources))
    problems += list(dict.fromkeys(found))
    problems += site_problems(loaded.spec.site, [spec.train for _, _, spec in loaded.runs], submitting=submitting)
    problems += runs_root_problems(Path(loaded.spec.runs_root).expanduser())
    if problems:
        raise SpecError(loaded.source, problems)


def corpus_problems(data: DataConfig, seed: int) -> list[str]:
    """Missing, binary or empty corpus files, and a ``document`` split that certainly leaves a split empty."""
    from llmcore.corpus import check_corpus
    from llmcore.sft import check_task_sources

    problems = [str(e) for e in [*check_corpus(data), *check_task_sources(data)]]
    if problems or data.split != "document":
        return problems
    counts = document_counts(data, seed)
    if counts is not None and (empty := [s for s in ("train", "val") if counts[s] == 0]):
        docs = counts["train"] + counts["val"]
        what = (
            "the corpus is one document"
            if docs == 1
            else f"the {' and '.join(empty)} split gets none of its {docs} documents"
        )
        problems.append(
            f"data.split: {what} with `split: document` (whole documents go to train or val; val_fraction "
            f"{data.val_fraction}); use `data.split: tail` to hold out the end of every document instead"
        )
    return problems


def document_counts(data: DataConfig, seed: int) -> dict[str, int] | None:
    """Documents per split under ``split: document``, known without reading the text when every document is a
    file (text sources); None when some source holds several documents per file (JSONL, parquet, a dataset)."""
    from llmcore.corpus import is_val_document, resolve_files

    files = resolve_files(data)
    if any(fmt != "text" for _, _, fmt in files):
        return None
    counts = {"train": 0, "val": 0}
    for index, (_, path, _) in enumerate(files):
        if path.stat().st_size:  # empty files are not documents (their index still counts)
            counts["val" if is_val_document(seed, index, data.val_fraction) else "train"] += 1
    return counts


def size_problems(spec: ExperimentSpec) -> list[str]:
    """A split certainly too short for ``model.block_size``: each training and validation batch row needs
    block_size + 1 consecutive tokens of one split. Before the shards exist this is an upper bound from the
    bytes (a token covers at least one byte; plus an EOS per document); it is reported only when even that bound
    is too short."""
    from llmcore.corpus import is_val_document, resolve_files

    files = resolve_files(spec.data)
    if any(fmt != "text" for _, _, fmt in files):
        return []
    data, need = spec.data, spec.model.block_size + 1
    bound = {"train": 0, "val": 0}
    for index, (_, path, _) in enumerate(files):
        n = path.stat().st_size
        if not n:
            continue
        if data.split == "document":
            bound["val" if is_val_document(spec.seed, index, data.val_fraction) else "train"] += n + 1
        else:  # tail: the last val_fraction of each document (counted in characters, at most its bytes)
            cut = int(n * (1.0 - data.val_fraction))
            bound["train"] += cut + 1
            bound["val"] += n - cut + 1
    return [
        f"model.block_size: the {split} split holds at most {bound[split]} tokens (from its {'bytes'}), fewer than "
        f"block_size + 1 = {need}: lower model.block_size, or give the {split} split more text (data.val_fraction)"
        for split in ("train", "val")
        if 0 < bound[split] < need
    ]


def runs_root_problems(root: Path) -> list[str]:
    if root.exists() and not root.is_dir():
        return [f"runs_root: cannot write to {root} (it is a file, not a directory)"]
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        return [f"runs_root: cannot write to {root} ({exc.strerror or exc})"]
    return []
