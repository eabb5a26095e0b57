"""The ``metrics.jsonl`` record: one JSON object per line, written by training (rank 0), read by the driver
(live table, MLflow forwarding, pruning), ``gptlab status`` and the loss-curve plot.

This module is the only writer and reader of the format. A line is a :class:`TrainLine` (``"kind": "train"``,
every ``train.log_interval`` steps) or an :class:`EvalLine` (``"kind": "eval"``, every ``train.eval_interval``
steps). Each field that is a metric names its MLflow key (``train/loss``); ``None`` values are not metrics.
Readers skip a torn last line (a crash mid-write) and unknown fields (a newer writer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from llmcore.io import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"


def _metric(name: str, description: str, default: Any = None) -> Any:
    return Field(default, description=description, json_schema_extra={"metric": name})


class _Line(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    step: int = Field(..., ge=0, description="Optimiser steps completed.")
    time: float = Field(..., description="Wall-clock time of the line (Unix seconds); the metric timestamp.")
    elapsed_s: float = Field(0.0, description="Training seconds over every attempt of this run so far.")

    @classmethod
    def metric_names(cls) -> dict[str, str]:
        """field -> metric name (``loss`` -> ``train/loss``)."""
        return {
            k: f.json_schema_extra["metric"]
            for k, f in cls.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and "metric" in f.json_schema_extra
        }

    def metrics(self) -> dict[str, float]:
        """{metric name: value} of the fields that hold a value."""
        return {name: float(v) for k, name in self.metric_names().items() if (v := getattr(self, k)) is not None}


class TrainLine(_Line):
    """One logged training step."""

    kind: Literal["train"] = "train"
    loss: float = _metric("train/loss", "Mean training loss of the step's micro-batches, over ranks.", ...)
    lr: float | None = _metric("train/lr", "Learning rate of the step.")
    grad_norm: float | None = _metric("train/grad_norm", "Global gradient norm before clipping.")
    tokens_per_sec: float | None = _metric("train/tokens_per_sec", "Training tokens per second, all ranks.")
    mfu: float | None = _metric("train/mfu", "Model FLOPs utilisation (CUDA GPUs with a known peak).")
    peak_mem_mb: float | None = _metric("train/peak_mem_mb", "Peak memory torch allocated on the GPU, MiB.")
    tokens_seen: int | None = _metric("train/tokens_seen", "Training tokens consumed so far.")
    gpu_util: float | None = _metric("gpu/utilization", "GPU busy percentage (NVML), rank 0's GPU.")
    gpu_mem_mb: float | None = _metric("gpu/memory_used_mb", "GPU memory in use (NVML, all processes), MiB.")


class EvalLine(_Line):
    """One validation estimate during training."""

    kind: Literal["eval"] = "eval"
    val_loss: float = _metric("val/loss", "Validation loss estimate (train.eval_batches batches).", ...)


MetricsLine = Annotated[TrainLine | EvalLine, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(MetricsLine)


def parse_line(text: str | bytes) -> TrainLine | EvalLine | None:
    """The record on one line, or None for a torn or foreign line."""
    try:
        return _ADAPTER.validate_json(text)
    except ValidationError:
        return None


def parse_lines(lines: Iterable[str | bytes]) -> list[TrainLine | EvalLine]:
    return [r for line in lines if (r := parse_line(line)) is not None]


def read_metrics(path: Path) -> list[TrainLine | EvalLine]:
    """Every complete record of a ``metrics.jsonl`` ([] when it does not exist)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return parse_lines(data.splitlines())


def split_kinds(records: Iterable[TrainLine | EvalLine]) -> tuple[list[TrainLine], list[EvalLine]]:
    train, evals = [], []
    for r in records:
        (train if isinstance(r, TrainLine) else evals).append(r)
    return train, evals


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the complete records with ``step <= last_step`` (a resumed training writes the rest again);
    atomically, so a reader sees the old file or the new one."""
    if not Path(path).exists():
        return
    kept = [r for r in read_metrics(path) if r.step <= last_step]
    atomic_write_bytes(path, b"".join(to_json(r) for r in kept))


def to_json(record: TrainLine | EvalLine) -> bytes:
    """The record as one line (with its newline)."""
    return record.model_dump_json().encode() + b"\n"


class MetricsWriter:
    """Appends records to a ``metrics.jsonl``, one flushed line each (``None``: writes nothing, other ranks)."""

    def __init__(self, path: Path | None):
        self._f = open(path, "ab") if path is not None else None

    def write(self, record: TrainLine | EvalLine) -> None:
        if self._f is not None:
            self._f.write(to_json(record))
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def jsonable(record: TrainLine | EvalLine) -> dict[str, Any]:
    return json.loads(record.model_dump_json())
