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


def _integer(values: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _figure(width: float = 9.0, height: float = 5.4) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=120)


def _save(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    save_atomically(fig, out)
    plt.close(fig)
    return out


def plot(rows: list[SweepRow], keys: list[str], metric: str, out: Path, title: str) -> Path | None:
    """``metric`` against the swept parameter, one line per combination of the other swept keys (legend in the
    sweep's value order), the best point starred. Integer parameters get integer ticks; a parameter spanning 10x
    or more a log axis. None when no finished point has the metric."""
    done = [r for r in rows if r.status == "FINISHED" and metric in r.metrics]
    if not done or not keys:
        return None
    x = x_key(done, keys)
    others = [k for k in keys if k != x]
    values = [r.point.get(x) for r in done]
    numeric = _numeric(values)
    categories = list(dict.fromkeys(_cell(v) for v in values))
    series: dict[str, list[tuple[Any, float]]] = {}  # rows come in the sweep's grid order: labels in value order
    for r in done:
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={_cell(r.point.get(k))}" for k in others) or metric
        xv = r.point.get(x) if numeric else categories.index(_cell(r.point.get(x)))
        series.setdefault(label, []).append((xv, r.metrics[metric]))
    fig, ax = _figure()
    for label, pts in series.items():
        pts.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        for xv, yv in pts:
            ax.annotate(f"{yv:.4f}", (xv, yv), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    top = best(done, metric)
    if top is not None:
        tx = top.point.get(x) if numeric else categories.index(_cell(top.point.get(x)))
        ax.plot([tx], [top.metrics[metric]], marker="*", markersize=18, color="gold", markeredgecolor="black",
                linestyle="none", label=f"best: {top.name}", zorder=5)  # fmt: skip
    if numeric:
        if min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        if _integer(values) and len(set(values)) <= 12:
            ax.set_xticks(sorted(set(values)), [str(v) for v in sorted(set(values))])
            ax.minorticks_off()
        elif _integer(values):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], out: Path, title: str) -> Path | None:
    """Every run's training loss (line) and validation estimates (markers) against the step, overlaid.
    ``curves``: {run name: {"train/loss": [(step, value)], "val/loss": [(step, value)]}}. None without curves."""
    if not any(c.get("train/loss") for c in curves.values()):
        return None
    fig, ax = _figure()
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        train = sorted(c.get("train/loss", []))
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], lw=1, alpha=0.75, color=color, label=name)
        val = sorted(c.get("val/loss", []))
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o--", lw=1, ms=4, color=color)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token): train lines, validation markers")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def loss_histories(client: Any, rows: list[SweepRow]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The loss curves of the finished rows, from MLflow."""
    keys = ("train/loss", "val/loss")
    return {
        r.name: {k: [(m.step, m.value) for m in client.get_metric_history(r.run_id, k)] for k in keys}
        for r in rows
        if r.status == "FINISHED"
    }


REPORT_MANIFEST = ".gptlab-report.json"  # which files the last report wrote into its directory


def write_report(rows: list[SweepRow], keys: list[str], metric: str, out_dir: Path, title: str,
                 curves: dict[str, dict[str, list[tuple[int, float]]]] | None = None) -> list[Path]:  # fmt: skip
    """sweep.csv, <metric>.png and loss_curves.png (when there is something to plot) in out_dir; returns the files
    written. Files an earlier report wrote there and this one does not (a plot of another metric, a plot there is
    nothing for now) are removed, so the directory always holds one consistent report."""
    from llmcore.io import atomic_write_bytes, atomic_write_json, read_json

    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "sweep.csv"
    atomic_write_bytes(table, csv_text(rows, keys).encode("utf-8"))
    written = [table, plot(rows, keys, metric, out_dir / f"{metric.replace('/', '_')}.png", title)]
    if curves:
        written.append(plot_loss_curves(curves, out_dir / "loss_curves.png", f"{title.split(':')[0]}: loss curves"))
    files = [f for f in written if f is not None]
    manifest = out_dir / REPORT_MANIFEST
    try:
        before = read_json(manifest)["files"] if manifest.is_file() else []
    except (OSError, ValueError, KeyError, TypeError):
        before = []
    for name in set(before) - {f.name for f in files}:
        (out_dir / Path(name).name).unlink(missing_ok=True)
    atomic_write_json(manifest, {"files": [f.name for f in files]})
    return files


def log_sweep_summary(tracker: Any, parent_id: str, p: Any, runs: list[Any], metric: str = "val/bpb") -> None:
    """On the parent run: summary/sweep.csv, summary/val_bpb.png, summary/loss_curves.png, and the best point's
    name and metric."""
    rows = rows_from_results(runs)
    keys = list(p.spec.sweep)
    curves = loss_histories(tracker.client, rows)
    out = p.runs_root / "reports" / f"sweep-{p.spec_hash}"
    files = write_report(rows, keys, metric, out, f"{p.spec.name}: {metric}", curves)
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
