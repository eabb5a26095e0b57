"""Comparing the points of a sweep or the trials of a search: tables, and plots of a metric against what was swept.

The same rows come from a finished submit (``rows_from_results``; the driver logs the report on the parent run
under ``summary/``) or from any MLflow store afterwards (``rows_from_store``; ``gptlab compare``).

Replicates (``sweep.replicates``, or a sweep over a seed) are grouped: each point shows the mean, standard
deviation and n of its runs, the plot has error bars, the best point is chosen by its mean, and two points whose
95% confidence intervals overlap are noted, since the seeds cannot tell them apart.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workflows.report import save_atomically
from workflows.spec import replicate_keys, swept_keys
from workflows.states import mlflow_status

METRICS = ("final/val_loss", "val/ppl", "val/bpb", "train/tokens_per_sec", "model/params", "stage/train_seconds")
#: Metrics where higher is better (their last path component); every other metric is a loss, lower is better.
HIGHER_IS_BETTER = ("acc", "acc_norm", "map3", "tokens_per_sec", "mfu")


def higher_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in HIGHER_IS_BETTER


def task_columns(metrics: Iterable[dict[str, float]]) -> list[str]:
    """The benchmark task scores these runs report (``task/<name>/acc``, ``acc_norm``, ``map3``; not the
    question counts), in name order."""
    return sorted({k for m in metrics for k in m if k.startswith("task/") and not k.endswith("/n")})


@dataclass
class SweepRow:
    name: str
    status: str  # FINISHED, FAILED, KILLED, PRUNED (or RUNNING for an unfinished run)
    point: dict[str, Any]
    metrics: dict[str, float]
    run_id: str
    rung: int | None = None  # successive halving: the rung it reached (pruned there, or the last)


@dataclass
class Group:
    """One point of a sweep with its replicates (a single run when there are none)."""

    point: dict[str, Any]  # the swept values, replicate keys left out
    rows: list[SweepRow] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ",".join(f"{k.rsplit('.', 1)[-1]}={_cell(v)}" for k, v in self.point.items()) or self.rows[0].name

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.rows if r.status == "FINISHED" and metric in r.metrics]

    def mean(self, metric: str) -> float | None:
        v = self.values(metric)
        return statistics.fmean(v) if v else None

    def sd(self, metric: str) -> float | None:
        v = self.values(metric)
        return statistics.stdev(v) if len(v) > 1 else None

    def interval(self, metric: str) -> tuple[float, float] | None:
        """The 95% confidence interval of the mean (Student's t), or None with fewer than two values."""
        v = self.values(metric)
        if len(v) < 2:
            return None
        half = _t975(len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v))
        return statistics.fmean(v) - half, statistics.fmean(v) + half


def _t975(df: int) -> float:
    """Student's t quantile 0.975 for df degrees of freedom (a table for small df, the normal's beyond)."""
    table = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042)  # fmt: skip
    return table[df - 1] if df <= len(table) else 1.96


def group_rows(rows: list[SweepRow], keys: list[str], replicate_keys: list[str]) -> list[Group]:
    """Rows grouped by their swept values without the replicate keys, in the rows' order."""
    groups: dict[str, Group] = {}
    for r in rows:
        point = {k: r.point.get(k) for k in keys if k not in replicate_keys}
        groups.setdefault(yaml.safe_dump(point, sort_keys=True), Group(point)).rows.append(r)
    return list(groups.values())


def best_group(groups: list[Group], metric: str) -> Group | None:
    scored = [g for g in groups if g.mean(metric) is not None]
    pick = max if higher_is_better(metric) else min
    return pick(scored, key=lambda g: g.mean(metric)) if scored else None


def overlaps(groups: list[Group], metric: str) -> list[str]:
    """A note per point whose 95% interval overlaps the best point's: the seeds cannot tell them apart."""
    top = best_group(groups, metric)
    if top is None or top.interval(metric) is None:
        return []
    lo, hi = top.interval(metric)
    notes = []
    for g in groups:
        other = g.interval(metric)
        if g is not top and other is not None and other[0] <= hi and lo <= other[1]:
            notes.append(f"{g.name} ({g.mean(metric):.4f} ± {g.sd(metric):.4f}, n={len(g.values(metric))}) overlaps "
                         f"the best, {top.name} ({top.mean(metric):.4f} ± {top.sd(metric):.4f}): the difference is "
                         "within seed noise")  # fmt: skip
    return notes


def best(rows: list[SweepRow], metric: str) -> SweepRow | None:
    scored = [r for r in rows if r.status == "FINISHED" and metric in r.metrics]
    pick = max if higher_is_better(metric) else min
    return pick(scored, key=lambda r: r.metrics[metric]) if scored else None


# -------------------------------------------------------------------------------------------- the rows


def rows_from_results(runs: list[Any]) -> list[SweepRow]:
    """Rows from a submit's RunResults (already in sweep order)."""
    return [SweepRow(r.name, r.status, dict(r.point), dict(r.metrics), r.run_id, r.rung) for r in runs]


def rows_from_store(client: Any, parent: Any) -> tuple[list[SweepRow], list[str], list[str]]:
    """(rows, swept keys, replicate keys) for the children of one parent run, in the order of the sweep's grid.

    The swept keys are the parent's ``swept`` param (a submit before it: the keys of its ``sweep`` param), each
    point's values the child's params (the full resolved spec, flattened with dotted names)."""
    params = parent.data.params
    sweep = yaml.safe_load(params.get("sweep", "{}")) or {}
    grid = {k: v for k, v in sweep.items() if isinstance(v, list)}
    keys = yaml.safe_load(params["swept"]) if "swept" in params else list(grid)
    replicate_keys = yaml.safe_load(params.get("replicate_keys", "[]")) or []
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=50000
    )
    rows = []
    for child in children:
        p = child.data.params
        point = {k: yaml.safe_load(p[k]) if k in p else None for k in keys}
        status = mlflow_status(child.info.status, child.data.tags.get("gptlab.pruned")).value
        rung = child.data.tags.get("gptlab.rung")
        rows.append(SweepRow(child.info.run_name, status, point, dict(child.data.metrics), child.info.run_id,
                             int(rung) if rung is not None and rung.isdigit() else None))  # fmt: skip

    def order(row: SweepRow) -> tuple:
        return tuple(_index(grid.get(k, []), row.point.get(k)) for k in keys) + (row.name,)

    return sorted(rows, key=order), keys, replicate_keys


def _index(values: list[Any], value: Any) -> int:
    for i, v in enumerate(values):
        if v == value or str(v) == str(value):
            return i
    return len(values)


# -------------------------------------------------------------------------------------------- tables


def csv_text(rows: list[SweepRow], keys: list[str], extra: tuple[str, ...] = ()) -> str:
    columns = list(dict.fromkeys((*METRICS, *task_columns(r.metrics for r in rows), *extra)))
    rungs = any(r.rung is not None for r in rows)  # successive halving: the rung each point reached
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", *keys, "status", *(["rung"] if rungs else []), *columns, "run_id"])
    for r in rows:
        rung = ["" if r.rung is None else r.rung] if rungs else []
        w.writerow([r.name, *(_cell(r.point.get(k)) for k in keys), r.status, *rung,
                    *(r.metrics.get(m, "") for m in columns), r.run_id])  # fmt: skip
    return buf.getvalue()


def points_csv(groups: list[Group], metric: str) -> str:
    """One line per point: its swept values, n, mean and standard deviation of ``metric``."""
    keys = list(groups[0].point) if groups else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["point", *keys, "n", f"{metric} mean", f"{metric} sd"])
    for g in groups:
        mean, sd = g.mean(metric), g.sd(metric)
        w.writerow([g.name, *(_cell(g.point[k]) for k in keys), len(g.values(metric)),
                    "" if mean is None else mean, "" if sd is None else sd])  # fmt: skip
    return buf.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _integer(values: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def x_key(points: list[dict[str, Any]], keys: list[str]) -> str:
    """The parameter on the x axis: the first swept key with numeric values, else the first key."""
    for k in keys:
        values = [p.get(k) for p in points]
        if _numeric(values) and len(set(values)) > 1:
            return k
    return keys[0]


# -------------------------------------------------------------------------------------------- plots


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


def _x_axis(ax: Any, values: list[Any], numeric: bool, categories: list[str]) -> None:
    """Log scale for a numeric parameter spanning 10x or more; integer ticks for integers; names for others."""
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


def plot(groups: list[Group], metric: str, out: Path, title: str) -> Path | None:
    """``metric`` against the swept parameter, one line per combination of the other swept keys (legend in the
    sweep's value order), error bars of one standard deviation where points have replicates, the best point
    starred. None when no finished point has the metric."""
    done = [g for g in groups if g.mean(metric) is not None]
    keys = list(done[0].point) if done else []
    if not done or not keys:
        return None
    x = x_key([g.point for g in done], keys)
    others = [k for k in keys if k != x]
    values = [g.point.get(x) for g in done]
    numeric = _numeric(values)
    categories = list(dict.fromkeys(_cell(v) for v in values))
    series: dict[str, list[tuple[Any, float, float]]] = {}  # groups come in grid order: labels in value order
    for g in done:
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={_cell(g.point.get(k))}" for k in others) or metric
        xv = g.point.get(x) if numeric else categories.index(_cell(g.point.get(x)))
        series.setdefault(label, []).append((xv, g.mean(metric), g.sd(metric) or 0.0))
    # Past MAX_SIDE_BY_SIDE points the values are not written beside them (2,000 labels: unreadable, and 10 s of
    # matplotlib's layout), and past MAX_SIDE_BY_SIDE lines the legend names only the first ones.
    few = len(done) <= MAX_SIDE_BY_SIDE
    fig, ax = _figure()
    for i, (label, pts) in enumerate(series.items()):
        pts.sort(key=lambda p: p[0])
        xs, ys, errs = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        fmt, named = ("o-" if few else ".-"), i < MAX_SIDE_BY_SIDE
        if any(errs):
            ax.errorbar(xs, ys, yerr=errs, fmt=fmt, capsize=4, label=f"{label} (mean ± sd)" if named else "_")
        else:
            ax.plot(xs, ys, fmt, label=label if named else "_")
        for xv, yv in zip(xs, ys) if few else ():
            ax.annotate(f"{yv:.4f}", (xv, yv), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    top = best_group(done, metric)
    if top is not None:
        tx = top.point.get(x) if numeric else categories.index(_cell(top.point.get(x)))
        ax.plot([tx], [top.mean(metric)], marker="*", markersize=18, color="gold", markeredgecolor="black",
                linestyle="none", label=f"best: {top.name}", zorder=5)  # fmt: skip
    _x_axis(ax, values, numeric, categories)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_search(rows: list[SweepRow], keys: list[str], metric: str, out: Path, title: str) -> Path | None:
    """A search's trials: ``metric`` against the trial number (with the best so far) and against each searched
    field, side by side. None when no trial finished."""
    done = [(i, r) for i, r in enumerate(rows) if r.status == "FINISHED" and metric in r.metrics]
    if not done:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(5.0 * (1 + len(keys)), 4.6), dpi=110, squeeze=False)
    ax = axes[0][0]
    ys = [r.metrics[metric] for _, r in done]
    pick = max if higher_is_better(metric) else min
    ax.plot([i for i, _ in done], ys, "o", label="trial")
    ax.plot([i for i, _ in done], [pick(ys[: j + 1]) for j in range(len(ys))], "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for k, ax in zip(keys, axes[0][1:]):
        values = [r.point.get(k) for _, r in done]
        numeric = _numeric(values)
        categories = list(dict.fromkeys(_cell(v) for v in values))
        xs = values if numeric else [categories.index(_cell(v)) for v in values]
        ax.plot(xs, ys, "o")
        _x_axis(ax, values, numeric, categories)
        ax.set_xlabel(k)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out)


def plot_loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], out: Path, title: str,
                     stopped: frozenset[str] = frozenset()) -> Path | None:  # fmt: skip
    """Every run's training loss (line) and validation estimates (markers) against the step, overlaid; where a
    pruned run (``stopped``) stopped is marked with an x. ``curves``: {run name: {"train/loss": [(step, value)],
    "val/loss": [(step, value)]}}. None without curves."""
    if not any(c.get("train/loss") for c in curves.values()):
        return None
    fig, ax = _figure()
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        train = sorted(c.get("train/loss", []))
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], lw=1, alpha=0.75, color=color, label=name)
            if name in stopped:
                ax.plot(*train[-1], "x", ms=9, mew=2, color=color)
        val = sorted(c.get("val/loss", []))
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o--", lw=1, ms=4, color=color)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token): train lines, validation markers")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 8 else 1)
    return _save(fig, out)


#: At most this many runs in the overlaid plots (loss curves, the attention head side by side): more are unreadable,
#: and each costs the store a query (`compare` over 2,000 runs read 4,000 metric histories).
MAX_SIDE_BY_SIDE = 24


def loss_histories(client: Any, rows: list[SweepRow], metric: str = "val/bpb") -> dict[str, dict[str, list]]:
    """The loss curves of the rows that trained (finished or pruned), from MLflow: all of them up to
    MAX_SIDE_BY_SIDE, else the best finished ones by ``metric`` and the first pruned ones."""
    keys = ("train/loss", "val/loss")
    trained = [r for r in rows if r.status in ("FINISHED", "PRUNED")]
    if len(trained) > MAX_SIDE_BY_SIDE:
        finished = sorted((r for r in trained if metric in r.metrics), key=lambda r: r.metrics[metric])
        keep = {r.name for r in finished[: MAX_SIDE_BY_SIDE * 3 // 4]}
        keep |= {r.name for r in trained if r.status == "PRUNED"}
        trained = [r for r in trained if r.name in keep][:MAX_SIDE_BY_SIDE]
    return {r.name: {k: [(m.step, m.value) for m in client.get_metric_history(r.run_id, k)] for k in keys}
            for r in trained}  # fmt: skip


def inspect_data(client: Any, rows: list[SweepRow]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """{run name: (its inspect.json, its attention arrays per prompt)} of the finished rows whose runs have an
    inspect stage (``eval.inspect``), read from their MLflow artifacts (so a tracking server's runs work too)."""
    import numpy as np

    from llmcore.inspect import ATTENTION, SUMMARY

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file on stderr otherwise
    out = {}
    for r in rows[:MAX_SIDE_BY_SIDE]:
        if r.status != "FINISHED":
            continue
        if f"inspect/{ATTENTION}" not in {a.path for a in client.list_artifacts(r.run_id, "inspect")}:
            continue  # a run without an inspect stage
        with tempfile.TemporaryDirectory(prefix="gptlab-compare-") as tmp:
            summary = json.loads(Path(client.download_artifacts(r.run_id, f"inspect/{SUMMARY}", tmp)).read_text())
            with np.load(client.download_artifacts(r.run_id, f"inspect/{ATTENTION}", tmp)) as arrays:
                out[r.name] = (summary, {k: arrays[k] for k in arrays.files})
    return out


def plot_attention(data: dict[str, tuple[dict[str, Any], dict[str, Any]]], layer: int | None, head: int, out: Path,
                   title: str) -> Path | None:  # fmt: skip
    """The same layer and head of every run side by side (columns), one row per prompt: how, e.g., learned and
    RoPE models attend. ``layer`` None: the last layer. None when no run was inspected."""
    if not data:
        return None
    from matplotlib.figure import Figure

    from llmcore.inspect import heatmap

    prompts = max(len(summary["prompts"]) for summary, _ in data.values())
    fig = Figure(figsize=(3.6 * len(data) + 1.0, 3.6 * prompts + 0.8), dpi=100, layout="constrained")
    axes = fig.subplots(prompts, len(data), squeeze=False)
    for c, (name, (summary, arrays)) in enumerate(data.items()):
        L, H = summary["n_layer"], summary["n_head"]
        li = L - 1 if layer is None else layer
        for p in range(prompts):
            ax = axes[p][c]
            if p >= len(summary["prompts"]) or li >= L or head >= H:
                ax.set_axis_off()
                ax.set_title(f"{name}: no layer {li} head {head}" if p < len(summary["prompts"]) else "", fontsize=8)
                continue
            heatmap(ax, arrays[f"prompt{p}"][li, head], summary["prompts"][p]["tokens"], True, c == 0,
                    f"{name}\nlayer {li} head {head}, prompt {p}")  # fmt: skip
    fig.suptitle(title)
    save_atomically(fig, out)
    return out


# -------------------------------------------------------------------------------------------- reports

REPORT_MANIFEST = ".gptlab-report.json"  # which files the last report wrote into its directory


@dataclass
class Report:
    """What a report compares: the rows, the swept keys and which of them are replicate seeds, the metric, and
    whether it is a search (its trials are plotted in order too)."""

    rows: list[SweepRow]
    keys: list[str]
    replicate_keys: list[str]
    metric: str
    title: str
    search: bool = False

    @property
    def groups(self) -> list[Group]:
        return group_rows(self.rows, self.keys, self.replicate_keys)


def write_report(report: Report, out_dir: Path, curves: dict[str, Any] | None = None,
                 attention: tuple[dict[str, Any], int | None, int] | None = None) -> list[Path]:  # fmt: skip
    """sweep.csv (a line per run), points.csv (per point, with replicates), <metric>.png, search.png (a search),
    loss_curves.png and inspect_attention.png (``attention``: inspect_data's runs, the layer and the head) in
    out_dir, those there is something for; returns the files written. Files an earlier report wrote there and this
    one does not are removed, so the directory always holds one consistent report."""
    from llmcore.io import atomic_write_bytes, atomic_write_json, read_json

    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "sweep.csv"
    atomic_write_bytes(table, csv_text(report.rows, report.keys, (report.metric,)).encode("utf-8"))
    written = [table]
    groups = report.groups
    if report.replicate_keys:
        written.append(out_dir / "points.csv")
        atomic_write_bytes(written[-1], points_csv(groups, report.metric).encode("utf-8"))
    name = report.metric.replace("/", "_")
    if report.search:
        written.append(plot_search(report.rows, report.keys, report.metric, out_dir / "search.png", report.title))
    else:
        written.append(plot(groups, report.metric, out_dir / f"{name}.png", report.title))
    if curves:
        pruned = frozenset(r.name for r in report.rows if r.status == "PRUNED")
        title = f"{report.title.split(':')[0]}: loss" + (" (x: pruned there)" if pruned else "")
        written.append(plot_loss_curves(curves, out_dir / "loss_curves.png", title, pruned))
    if attention:
        data, layer, head = attention
        heading = f"{report.title.split(':')[0]}: the same attention head across runs"
        written.append(plot_attention(data, layer, head, out_dir / "inspect_attention.png", heading))
    files = [f for f in written if f is not None]
    manifest = out_dir / REPORT_MANIFEST
    try:
        before = read_json(manifest)["files"] if manifest.is_file() else []
    except (OSError, ValueError, KeyError, TypeError):
        before = []
    for stale in set(before) - {f.name for f in files}:
        (out_dir / Path(stale).name).unlink(missing_ok=True)
    atomic_write_json(manifest, {"files": [f.name for f in files]})
    return files


def log_sweep_summary(tracker: Any, parent_id: str, p: Any, runs: list[Any], metric: str = "val/bpb") -> None:
    """On the parent run: the report's files under summary/, the best point's (or trial's) name and metric, and,
    with replicates, its mean."""

    spec = p.spec
    if spec.search is not None:
        metric = spec.search.metric
    report = Report(rows_from_results(runs), swept_keys(spec), replicate_keys(spec), metric,
                    f"{spec.name}: {metric}", search=spec.search is not None)  # fmt: skip
    curves = loss_histories(tracker.client, report.rows)
    attention = (inspect_data(tracker.client, report.rows), None, 0)
    files = write_report(report, p.runs_root / "reports" / f"sweep-{p.spec_hash}", curves, attention)
    tracker.log_artifacts(parent_id, [(f, "summary") for f in files])
    top = best_group(report.groups, metric)
    if top is not None:
        run = best([r for r in top.rows], metric)
        tracker.set_tags(parent_id, {"best_run": top.name if report.replicate_keys else run.name,
                                     "best_run_id": run.run_id})  # fmt: skip
        tracker.log_values(parent_id, {f"best/{metric.split('/')[-1]}": top.mean(metric)}, step=0)


def fmt(value: float | None, name: str = "") -> str:
    """A metric for a table: losses to 4 decimals, large counts without, times (``*_seconds``) to 0.1 s."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if name.endswith("seconds") or abs(value) >= 100:  # four decimals would be noise
        return f"{value:.1f}"
    return f"{value:.4f}"
