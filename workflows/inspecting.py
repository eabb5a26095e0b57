"""`gptlab inspect` and its notebook form: a run's (or a Hugging Face folder's) model and what to look at.

In a notebook (ALCF's tutorial is one), the views of ``llmcore.inspect`` are figures shown inline::

    from llmcore.inspect import attention_figure, logit_lens_figure, positions_figure, trace
    from workflows.inspecting import load_model_of

    model, tok = load_model_of("pos_encoding=rope", spec="specs/quickstart.yaml")  # or pretrained="gpt2-folder"
    tr = trace(model, tok, "import os\\nimport sys\\n")
    attention_figure(tr)           # every layer x head
    attention_figure(tr, layer=2)  # one layer, larger
    logit_lens_figure(tr, tok)
    positions_figure(model)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflows.spec import InputError
from workflows.stages import INSPECT, SHARDS, dir_of


@dataclass
class Inspected:
    """What ``gptlab inspect`` needs: the model, its tokenizer, a name, and the passage's token ids (or None)."""

    model: Any
    tokenizer: Any
    name: str
    prompts: list[str]  # the run's eval.inspect prompts when it has them, else the default ones
    passage: list[int] | None
    default_out: Path
    passage_chars: int  # the run's eval.inspect passage_chars when it has them, else the default


def load_model_of(run: str | None = None, *, pretrained: str | Path | None = None, spec: str | Path | None = None,
                  runs_root: str | Path | None = None, device: str = "cpu") -> tuple[Any, Any]:  # fmt: skip
    """(model in eval mode, tokenizer) of a run (its name, MLflow run id or id prefix; found in the store of
    ``spec`` or under ``runs_root``, default ``runs``) or of a Hugging Face folder."""
    from workflows.query import open_store, pretrained_model, run_model

    if pretrained is not None:
        return pretrained_model(Path(pretrained), device)
    store = open_store(Path(spec) if spec else None, None, Path(runs_root) if runs_root else None, None)
    _, model, tokenizer, _ = run_model(store, run, device)
    return model.eval(), tokenizer


def passage_from_text(tok: Any, path: Path, chars: int) -> list[int]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError("gptlab inspect", [f"--text: {path}: {exc.strerror or exc}"]) from None
    return tok.encode(text[:chars])


def from_run(store: Any, ref: str, device: str, chars: int | None, say: Any) -> Inspected:
    """A run's final weights; its passage: the first ``chars`` characters of its validation split; its prompts and
    (``chars`` None) passage length: its eval.inspect's, else the defaults."""
    from llmcore.config import InspectConfig
    from llmcore.inspect import passage_ids
    from llmcore.io import read_json
    from llmcore.shards import ShardError, TokenSplit
    from workflows.query import run_model, stage_dirs

    found, model, tok, meta = run_model(store, ref, device, say)
    dirs = stage_dirs(found, store.runs_root)
    cfg = InspectConfig()
    inspected, shards = dir_of(dirs, INSPECT), dir_of(dirs, SHARDS)
    if inspected is not None and (inspected / "config.json").is_file():
        cfg = INSPECT.parse(read_json(inspected / "config.json")).inspect
    chars = cfg.passage_chars if chars is None else chars
    passage = None
    if chars and shards is not None:
        try:
            val = TokenSplit(shards, "val")
        except ShardError as err:
            raise InputError(store.source, [f"RUN: the validation shards of {found.info.run_name}: {err}"]) from None
        passage = passage_ids(tok, val.read(0, min(val.tokens, chars)), chars)
    name = f"{found.info.run_name} (run {found.info.run_id[:12]}, step {meta['step']})"
    out = (store.runs_root or Path(".")) / "reports" / f"inspect-{_slug(found.info.run_name)}"
    return Inspected(model.eval(), tok, name, cfg.prompts, passage, out, cfg.passage_chars)


def from_pretrained(folder: Path, device: str) -> Inspected:
    from llmcore.config import InspectConfig
    from workflows.query import pretrained_model

    try:
        model, tok = pretrained_model(folder, device)
    except InputError as err:
        raise InputError("gptlab inspect", err.problems) from None
    cfg = InspectConfig()
    return Inspected(model, tok, str(folder), cfg.prompts, None, Path(f"inspect-{_slug(folder.name)}"),
                     cfg.passage_chars)  # fmt: skip


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) or "model"


def write(target: Inspected, prompts: list[str], out: Path) -> list[Path]:
    """The report of ``target`` in ``out``; returns the files, the report first."""
    from llmcore.inspect import compute, write_report

    if out.exists() and not out.is_dir():
        raise InputError("gptlab inspect", [f"--out: {out} is a file, not a directory"])
    views = compute(target.model, target.tokenizer, prompts, target.passage)
    try:
        summary = write_report(target.model, target.tokenizer, views, out, f"Inside the model: {target.name}")
    except OSError as exc:
        raise InputError("gptlab inspect", [f"--out: cannot write to {out} ({exc.strerror or exc})"]) from None
    return [out / f for f in summary["files"]]
