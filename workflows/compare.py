"""Comparing the points of a sweep: a table of each point's swept values and results, and a plot of a metric
(val/bpb by default) against the swept parameter.

The same rows come from a finished submit (``rows_from_results``; the driver logs them on the parent run as
``summary/sweep.csv`` and ``summary/<metric>.png``) or from any MLflow store afterwards (``rows_from_store``;
``gptlab compare``).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workflows.report import save_atomically

METRICS = ("final/val_loss", "val/ppl", "val/bpb", "train/tokens_per_sec", "model/params", "stage/train_seconds")


@dataclass
class SweepRow:
    name: str
    status: str
    point: dict[str, Any]
    metrics: dict[str, float]
    run_id: str


def rows_from_results(runs: list[Any]) -> list[SweepRow]:
    """Rows from a submit's RunResults (already in sweep order)."""
    return [SweepRow(r.name, r.status, dict(r.point), dict(r.metrics), r.run_id) for r in runs]


def rows_from_store(client: Any, parent: Any) -> tuple[list[SweepRow], dict[str, list[Any]]]:
    """(rows, sweep) for the children of one parent run, in the order of the sweep's grid.

    The swept keys come from the parent's ``sweep`` param, each point's values from the child's params (the
    full resolved spec, flattened with dotted names)."""
    sweep = yaml.safe_load(parent.data.params.get("sweep", "{}")) or {}
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=50000
    )
    rows = []
    for child in children:
        params = child.data.params
        point = {k: yaml.safe_load(params[k]) if k in params else None for k in sweep}
        rows.append(
            SweepRow(child.info.run_name, child.info.status, point, dict(child.data.metrics), child.info.run_id)
        )

    def order(row: SweepRow) -> tuple:
        return tuple(_index(sweep[k], row.point[k]) for k in sweep)

    return sorted(rows, key=order), sweep


def _index(values: list[Any], value: Any) -> int:
    for i, v in enumerate(values):
        if v == value or str(v) == str(value):
            return i
    return len(values)


def best(rows: list[SweepRow], metric: str) -> SweepRow | None:
    scored = [r for r in rows if r.status == "FINISHED" and metric in r.metrics]
    return min(scored, key=lambda r: r.metrics[metric]) if scored else None


def csv_text(rows: list[SweepRow], keys: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", *keys, "status", *METRICS, "run_id"])
    for r in rows:
        w.writerow(
            [
                r.name,
                *(_cell(r.point.get(k)) for k in keys),
                r.status,
                *(r.metrics.get(m, "") for m in METRICS),
                r.run_id,
            ]
        )
    return buf.getvalue()


def _cell(value: Any) -> str:
    return (
        value
        if isinstance(value, str)
        else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    )


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def x_key(rows: list[SweepRow], keys: list[str]) -> str:
    """The parameter on the x axis: the first swept key with numeric values, else the first key."""
    for k in keys:
        values = [r.point.get(k) for r in rows]
        if _numeric(values) and len(set(values)) > 1:
            return k
    return keys[0]


def plot(rows: list[SweepRow], keys: list[str], metric: str, out: Path, title: str) -> Path | None:
    """``metric`` against the swept parameter, one line per combination of the other swept keys. None when no
    finished point has the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "FINISHED" and metric in r.metrics]
    if not done or not keys:
        return None
    x = x_key(done, keys)
    others = [k for k in keys if k != x]
    numeric = _numeric([r.point.get(x) for r in done])
    categories = list(dict.fromkeys(_cell(r.point.get(x)) for r in done))
    series: dict[str, list[tuple[Any, float]]] = {}
    for r in done:
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={_cell(r.point.get(k))}" for k in others) or metric
        xv = r.point.get(x) if numeric else categories.index(_cell(r.point.get(x)))
        series.setdefault(label, []).append((xv, r.metrics[metric]))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, pts in series.items():
        pts.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        for xv, yv in pts:
            ax.annotate(f"{yv:.4f}", (xv, yv), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if numeric:
        xs = [r.point[x] for r in done]
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(fig, out)
    plt.close(fig)
    return out


def write_report(rows: list[SweepRow], keys: list[str], metric: str, out_dir: Path, title: str) -> list[Path]:
    """sweep.csv and <metric>.png (when there is something to plot) in out_dir; returns the files written."""
    from llmcore.io import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "sweep.csv"
    atomic_write_bytes(table, csv_text(rows, keys).encode("utf-8"))
    png = plot(rows, keys, metric, out_dir / f"{metric.replace('/', '_')}.png", title)
    return [table] + ([png] if png else [])


def log_sweep_summary(tracker: Any, parent_id: str, p: Any, runs: list[Any], metric: str = "val/bpb") -> None:
    """On the parent run: summary/sweep.csv, summary/val_bpb.png, and the best point's name and metric."""
    rows = rows_from_results(runs)
    keys = list(p.spec.sweep)
    files = write_report(
        rows, keys, metric, p.runs_root / "reports" / f"sweep-{p.spec_hash}", f"{p.spec.name}: {metric}"
    )
    tracker.log_artifacts(parent_id, [(f, "summary") for f in files])
    top = best(rows, metric)
    if top is not None:
        tracker.set_tags(parent_id, {"best_run": top.name, "best_run_id": top.run_id})
        tracker.log_values(parent_id, {f"best/{metric.split('/')[-1]}": top.metrics[metric]}, step=0)


def fmt(value: float | None, name: str = "") -> str:
    """A metric for a table: losses to 4 decimals, large counts without, times (``*_seconds``) to 0.1 s."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if name.endswith("seconds") or abs(value) >= 100:  # four decimals would be noise
        return f"{value:.1f}"
    return f"{value:.4f}"
