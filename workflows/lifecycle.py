"""The MLflow runs of a submit, from start to end: one parent run per submit, one child run per sweep point.

A run's identity is a set of gptlab tags (``role``, ``spec_hash``, ``run_hash`` and, for a child, its parent), so
a re-submit of the same spec attaches to its runs instead of duplicating them; find-or-create happens under the
store's lock, so two submits at once share them too. Runs left RUNNING by a driver on this host that no longer
exists are marked KILLED. Each child ends FINISHED with everything its stages report, FAILED with the error that
stopped it, or KILLED when the submit was interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from workflows.compare import task_columns
from workflows.report import loss_curve_png
from workflows.spec import replicate_keys, swept_keys
from workflows.states import RunStatus, check_transition, mlflow_status, resubmitted
from workflows.store import Tracker, default_tracking_uri, flatten, retry_locked, tag

if TYPE_CHECKING:
    from workflows.planning import Plan, RunPlan

#: MLflow experiment tag naming the kind of work it holds (the value MLflow's own experiment-kind selector writes for
#: model training). MLflow 3.17's UI ignores it (it reads it only with its GenAI / Model training switch off, and
#: 3.17 has the switch on): the switch decides whether an experiment opens on the GenAI traces view or the runs
#: table, from the URL's ``workflowType`` or else the browser's last choice (GenAI at first). Hence
#: :func:`runs_table_url`; the tag still records what the runs are.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

#: The runs-table view gptlab saves on each experiment: an MLflow 3.17 saved view (the runs page's "Views" menu),
#: an experiment tag ``mlflow.sharedViewState.<key>`` that a URL opens with ``viewStateShareKey=<key>``. Saved views
#: are the only state of the runs table a server holds: the URL carries only the search (filter, sort, time range),
#: the rest (columns, expanded parents) lives in the browser. A view cannot expand parent runs: MLflow drops
#: ``runsExpanded`` from it.
RUNS_VIEW_KEY = "gptlab"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW_NAME = "gptlab sweep"  # the Views menu shows ~25 characters
RUNS_VIEW_METRICS = ("val/bpb",)
RUN_NAME_COLUMN = "attributes.`Run Name`"
MAX_EXPERIMENT_TAG_CHARS = 20000  # MLflow's limit on an experiment tag's value (and the UI's on a saved view)


@dataclass
class Child:
    """A sweep point's MLflow run: its id, its status before this submit (NEW when created by it) and now."""

    run_id: str
    previous: str
    status: RunStatus = RunStatus.RUNNING


def tracker_for(p: Plan) -> Tracker:
    t = p.spec.tracking
    tracker = Tracker(
        t.uri or default_tracking_uri(p.runs_root), t.experiment or p.spec.name, p.runs_root / "mlartifacts"
    )
    tracker.outage_report_s = t.outage_report_s
    return tracker


class RunLifecycle:
    """Starts, resumes and ends the MLflow runs of one plan."""

    def __init__(self, tracker: Tracker, p: Plan | None):
        self.tracker, self.plan = tracker, p
        self.parent_id = ""
        self.children: dict[str, Child] = {}  # run hash -> its run

    # ---- starting

    def mark_dead_runs_killed(self) -> list[str]:
        """Runs left RUNNING by a driver on this host that no longer exists become KILLED; returns their ids."""
        import psutil

        host, killed = socket.gethostname(), []
        with self.tracker.locked():
            for run in self.tracker.find_runs("attributes.status = 'RUNNING'"):
                tags = run.data.tags
                pid = tags.get(tag("driver_pid"))
                if tags.get(tag("host")) != host or pid is None or not pid.isdigit():
                    continue  # another machine's driver: it may well be alive
                if psutil.pid_exists(int(pid)) and int(pid) != os.getpid():
                    continue
                self.tracker.set_status(run.info.run_id, "KILLED")
                killed.append(run.info.run_id)
        return killed

    def start(self) -> None:
        """Find or create the parent run and every planned sweep point's child run, tagged with where they are
        driven."""
        p, tracker = self.plan, self.tracker
        retry_locked(
            lambda: tracker.client.set_experiment_tag(tracker.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        )
        self.driven = driver_tags(p)
        tags = {"spec_hash": p.spec_hash, "role": "parent", **self.driven, "spec_file": str(p.loaded.source)}
        self.parent_id, _, _ = self.find_or_create(p.spec.name, tags)
        tracker.log_params(self.parent_id, sweep_params(p))
        self.save_runs_view()
        if p.spec.search is not None:
            tracker.set_tags(self.parent_id, {"search_trials": str(p.spec.search.trials)})
        for r in p.runs:
            self.start_child(r)

    def save_runs_view(self) -> None:
        """Save (or widen) the experiment's runs-table view for this plan's sweep: see :func:`runs_view`."""
        tracker = self.tracker
        with tracker.locked():  # read, merge, write: two submits to one experiment keep both sweeps' columns
            experiment = retry_locked(lambda: tracker.client.get_experiment(tracker.experiment_id))
            view = runs_view(self.plan, experiment.tags.get(RUNS_VIEW_TAG))
            if view is not None:
                retry_locked(lambda: tracker.client.set_experiment_tag(tracker.experiment_id, RUNS_VIEW_TAG, view))

    def start_child(self, r: RunPlan) -> Child:
        """Find or create one sweep point's (or trial's) run under the parent."""
        stages = {"stages": ",".join(s.label for s in r.stages.values()), "stage_labels": ",".join(r.stages)}
        tags = {"run_hash": r.run_hash, "spec_hash": self.plan.spec_hash, "role": "sweep_point", **self.driven,
                **stages}  # fmt: skip
        run_id, previous, status = self.find_or_create(r.name, tags, self.parent_id)
        if previous == "NEW":
            self.tracker.log_params(run_id, flatten(r.spec.model_dump(mode="json", exclude={"sweep", "search"})))
        self.children[r.run_hash] = Child(run_id, previous, status)
        return self.children[r.run_hash]

    @property
    def pruning(self) -> bool:
        """Whether this plan's spec prunes (a pruned run then stays pruned)."""
        if self.plan is None:
            return False
        spec = self.plan.spec
        return (spec.search.prune if spec.search is not None else spec.sweep.prune) is not None

    def find_or_create(self, name: str, tags: dict[str, str],
                       parent_id: str | None = None) -> tuple[str, str, RunStatus]:  # fmt: skip
        """(run id, previous status, status now): an existing run with the same identity tags is reused, not
        duplicated, and taken where a re-submit takes it (``workflows.states.resubmitted``: never downgraded)."""
        identity = {k: v for k, v in tags.items() if k in ("role", "spec_hash", "run_hash")}
        if parent_id:
            identity["parent"] = parent_id
            tags = {**tags, "parent": parent_id, "mlflow.parentRunId": parent_id}
        with self.tracker.locked():
            found = self.tracker.find_runs(**identity)
            if not found:
                return self.tracker.create_run(name, tags), "NEW", RunStatus.RUNNING
            run = found[0]
            previous = mlflow_status(run.info.status, run.data.tags.get(tag("pruned")))
            now = resubmitted(previous, self.pruning and parent_id is not None)
            if now is RunStatus.RUNNING and previous is RunStatus.PRUNED:
                tags = {**tags, "pruned": "false"}
            if now.mlflow != run.info.status:
                self.tracker.set_status(run.info.run_id, now.mlflow)
            self.tracker.set_tags(run.info.run_id, tags)
            return run.info.run_id, previous.value, now

    def child(self, run: RunPlan) -> str:
        return self.children[run.run_hash].run_id

    # ---- ending

    def end_child(self, run: RunPlan, status: RunStatus, error: str | None = None) -> None:
        """End a sweep point's run (only along ``workflows.states.TRANSITIONS``)."""
        child = self.children[run.run_hash]
        child.status = check_transition(child.status, status)
        self.end(child.run_id, status.mlflow, error)

    def end(self, run_id: str, status: str, error: str | None = None) -> None:
        """FINISHED, FAILED or KILLED, with the error (one line in the run's tags and its note) when there is one."""
        with self.tracker.locked():
            if error:
                self.tracker.set_tags(run_id, {"error": error[:5000], "mlflow.note.content": f"**{status}:** {error}"})
            self.tracker.set_status(run_id, status)

    def log_outputs(self, run: RunPlan) -> dict[str, float]:
        """Everything a finished run's stages report, its spec and its loss curve; returns the metrics logged."""

        run_id = self.child(run)
        metrics: dict[str, float] = {}
        files: list[tuple[Path, str]] = []
        for label, stage in run.stages.items():
            marker = stage.marker()
            report = stage.definition.report(stage.dir, marker["result"])
            if report.metrics:
                self.tracker.log_values(run_id, report.metrics, step=report.step)
                metrics.update(report.metrics)
            files += [(f, d) for f, d in report.artifacts if d != "model" or run.spec.tracking.log_model]
            metrics[f"stage/{label}_seconds"] = marker["seconds"]
        seconds = {k: v for k, v in metrics.items() if k.startswith("stage/")}
        self.tracker.log_values(run_id, seconds, step=0)
        spec_yaml = yaml.safe_dump(run.spec.model_dump(mode="json", exclude={"sweep"}), sort_keys=False)
        self.tracker.log_text(run_id, spec_yaml, "spec.yaml")
        train = run.training.dir
        reports = self.plan.runs_root / "reports" / run.run_hash  # driver-owned: committed stage dirs stay as they are
        files.append((loss_curve_png(train / "metrics.jsonl", reports / "loss_curve.png", run.name), "plots"))
        self.tracker.log_artifacts(run_id, files)
        return metrics

    def metrics_of(self, run: RunPlan) -> dict[str, float]:
        """What MLflow holds for a run finished by an earlier submit (nothing is logged again)."""
        return dict(retry_locked(lambda: self.tracker.client.get_run(self.child(run)).data.metrics))


def sweep_params(p: Plan) -> dict[str, str]:
    """The parent run's record of what its children vary (compare reads it back): the sweep as written, the swept
    fields, those that only repeat a point with another seed, and the search."""

    dump = lambda value: yaml.safe_dump(value, sort_keys=False, default_flow_style=True).strip()
    params = {"sweep": dump(p.spec.sweep.model_dump(mode="json")), "swept": dump(swept_keys(p.spec)),
              "replicate_keys": dump(replicate_keys(p.spec))}  # fmt: skip
    if p.spec.search is not None:  # (its trial budget may be raised by a later submit: a tag, see start)
        params["search"] = dump(p.spec.search.model_dump(mode="json", exclude_none=True, exclude={"trials"}))
    else:
        params["runs"] = str(len(p.runs))
    return params


def runs_view(p: Plan, previous: str | None, now_ms: int | None = None) -> str | None:
    """The saved runs-table view (the value of :data:`RUNS_VIEW_TAG`) that shows a sweep as a table: val/bpb and
    then the swept fields as columns, each as wide as its header and values need, and Run Name as wide as the
    longest run name (MLflow's 190 px cuts ``pos_encoding=learned`` to ``pos_encoding...``). val/bpb comes first:
    Run Name and Created stay pinned on the left, and at 1600 px with MLflow's assistant panel open (as on a first
    visit) ~450 px are left for the other columns. What an earlier spec's submit saved on the experiment is kept
    (its columns, wider widths). None when nothing would change, or the view would exceed MLflow's limit on a tag."""

    old: dict[str, Any] = {}
    created = now = int(time.time() * 1000) if now_ms is None else now_ms
    if previous:
        try:
            envelope = json.loads(previous)
            old, created = json.loads(envelope["state"]), int(envelope["createdAt"])
        except (ValueError, KeyError, TypeError):
            old = {}  # not a view gptlab wrote: replaced
    keys = swept_keys(p.spec)
    params = [c for c in old.get("selectedColumns", []) if c.startswith("params.")]
    params += [c for c in (f"params.`{k}`" for k in keys) if c not in params]
    columns = [f"metrics.`{m}`" for m in RUNS_VIEW_METRICS] + params
    text = lambda value: value if isinstance(value, str) else json.dumps(value)  # as params are logged (flatten)
    # Pixels for a text of n characters in the table's fonts (Chromium at 1600 px: run names ~6.8 px a character,
    # starting ~80 px into the cell after the nesting; headers ~7.7 px; a float's 17 digits 126 px; 12 px of padding
    # either side), capped so a very long name leaves room for the other columns.
    width = lambda chars, per, pad, least: min(max(least, round(pad + per * chars)), 400)
    widths = {RUN_NAME_COLUMN: width(max((len(r.name) for r in p.runs), default=0), 7, 96, 190),
              **{f"params.`{k}`": width(max([len(k)] + [len(text(r.point[k])) for r in p.runs if k in r.point]), 8,
                                        32, 100) for k in keys},
              **{f"metrics.`{m}`": 160 for m in RUNS_VIEW_METRICS}}  # fmt: skip
    for column, px in old.get("columnWidths", {}).items():
        widths[column] = max(widths.get(column, 0), px)
    state = {"selectedColumns": columns, "columnOrder": [RUN_NAME_COLUMN, *columns], "columnWidths": widths}
    if state == old:
        return None
    view = json.dumps({"name": RUNS_VIEW_NAME, "createdAt": created, "updatedAt": now, "state": json.dumps(state)})
    return view if len(view) <= MAX_EXPERIMENT_TAG_CHARS else None


def runs_table_url(base: str, experiment: Any) -> str:
    """The URL that opens an experiment on its runs table in MLflow 3.17 (never the GenAI traces view), in the
    view gptlab saved on it when there is one. ``base`` is the UI's address, ``experiment`` an MLflow Experiment."""
    query = "workflowType=machine_learning"
    if RUNS_VIEW_TAG in experiment.tags:
        query += f"&viewStateShareKey={RUNS_VIEW_KEY}"
    return f"{base.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs?{query}"


def driver_tags(p: Plan) -> dict[str, str]:
    """Where and by whom a run is driven: host, site, this driver's pid (to detect a killed driver later),
    runs_root, and the git commit of the spec file's directory when it is in a git work tree."""
    tags = {"host": socket.gethostname(), "site": p.spec.site.name, "driver_pid": str(os.getpid()),
            "runs_root": str(p.runs_root)}  # fmt: skip
    commit = git_commit(Path(p.loaded.source))
    if commit:
        tags["git_commit"] = commit
    return tags


def git_commit(path: Path) -> str | None:
    """``HEAD`` of the git work tree holding ``path`` (``-dirty`` when the file has changes), or None."""
    try:
        head = subprocess.run(
            ["git", "-C", str(path.parent), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(path.parent), "status", "--porcelain", "--", path.name],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def run_summary_line(metrics: dict[str, Any]) -> str:

    keys = ("final/val_loss", "val/ppl", "val/bpb", *task_columns([metrics]))
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
