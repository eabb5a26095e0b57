"""Sweeps scientists can trust and afford: replicates, searches with Optuna, early stopping (ASHA), through real
submits of a tiny model into a real MLflow store and a real Optuna journal file."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys

import pytest
from helpers import child_env, gptlab, kill_everything_under, make_corpus, tiny_spec, wait_for, write_spec
from mlflow.tracking import MlflowClient

from workflows import submit

pytestmark = pytest.mark.slow

SPACE = {"train.lr": {"log_uniform": [1e-3, 1e-2]}, "model.n_layer": {"choice": [1, 2]}}


def spec_tree(tmp_path, **sections):
    tree = tiny_spec(make_corpus(tmp_path / "corpus"), tmp_path / "runs", site={"max_workers": 1},
                     train={"min_lr": 1e-5})  # fmt: skip
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key].update(value)
        else:
            tree[key] = value
    return tree


def study_trials(tmp_path):
    import optuna

    (journal,) = (tmp_path / "runs" / "studies").glob("*.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def children(result):
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    return client, {r.info.run_name: r for r in runs}


# ------------------------------------------------------------------------------------------ bad search specs


@pytest.mark.parametrize(
    ("search", "field"),
    [
        ({"trials": 2, "space": {}}, "search.space: Dictionary should have at least 1 item"),
        ({"trials": 2, "space": {"model.depth": {"choice": [1, 2]}}}, "search.space.model.depth: 'depth' is not a "
         "field"),
        ({"trials": 2, "space": {"train.lr": {"log_uniform": [0, 1e-2]}}}, "search.space.train.lr: log_uniform: "
         "bounds must be > 0 (got [0.0, 0.01])"),
        ({"trials": 0, "space": SPACE}, "search.trials: Input should be greater than or equal to 1"),
        ({"trials": 2, "space": SPACE, "metric": "val/bbp"}, "search.metric: runs of this spec report no metric"),
        ({"trials": 2, "space": {"train.lr": {"uniform": [1e-2, 1e-3]}}}, "the low bound must be below the high"),
        ({"trials": 2, "space": {"model.n_head": {"choice": [2, 3]}}}, "search.space.model.n_head: the value 3 "
         "makes an invalid spec (model.n_head: must divide model.n_embd"),
    ],
)  # fmt: skip
def test_bad_search_specs_are_exit_2_naming_the_field(tmp_path, search, field):
    spec = write_spec(tmp_path / "s.yaml", spec_tree(tmp_path, search=search))
    r = gptlab("validate", spec, timeout=120)
    assert r.returncode == 2 and field in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_plan_shows_the_search_space_trials_and_worst_case_node_hours(tmp_path):
    tree = spec_tree(tmp_path, search={"method": "tpe", "trials": 12, "space": SPACE},
                     site={"name": "slurm", "queue": "debug", "walltime": "00:30:00"},
                     train={"nodes": 2, "ranks_per_node": 1})  # fmt: skip
    r = gptlab("plan", write_spec(tmp_path / "s.yaml", tree), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Search: tpe, 12 trials, val/bpb (minimize)" in r.stdout
    assert "train.lr: log_uniform [0.001, 0.01]" in r.stdout and "model.n_layer: choice [1, 2]" in r.stdout
    assert "12 trials x 2 node(s) x 0.5 h" in r.stdout and "= 12 node-hours of training" in r.stdout


# -------------------------------------------------------------------------------------------------- a search


def test_a_search_resumes_after_its_driver_is_killed_without_redoing_or_losing_a_trial(tmp_path):
    tree = spec_tree(tmp_path, search={"method": "tpe", "trials": 4, "max_parallel": 1, "space": SPACE},
                     train={"max_steps": 300, "checkpoint_interval": 50, "eval_interval": 100})  # fmt: skip
    spec = write_spec(tmp_path / "s.yaml", tree)
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "submit", str(spec), "--lines"], cwd=tmp_path,
                            env=child_env(), stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        # kill the driver while its second trial trains, after a checkpoint
        wait_for(lambda: "[trial=1] new trial" in (tmp_path / "first.log").read_text(), 300, "the second trial")
        stages = tmp_path / "runs" / "stages"
        # the first trial keeps its last two checkpoints; a third is the second trial's first
        wait_for(lambda: len(list(stages.glob("train-*/checkpoints/step_*/DONE.json"))) >= 3, 300,
                 "a checkpoint of the second trial")  # fmt: skip
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        states = sorted(t.state.name for t in study_trials(tmp_path))
        assert states == ["COMPLETE", "RUNNING"], states  # one told, one left running by the killed driver
        kill_everything_under(tmp_path / "runs", [])  # its training, orphaned
        result = submit(spec, quiet=True, poll_interval=0.5)
    finally:
        kill_everything_under(tmp_path, [proc])
    assert result.ok, [r.error for r in result.runs]
    trials = study_trials(tmp_path)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # none lost, none asked twice
    assert {t.state.name for t in trials} == {"COMPLETE"}  # none left RUNNING
    client, runs = children(result)
    assert sorted(runs) == ["trial=0", "trial=1", "trial=2", "trial=3"]
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert [t.value for t in sorted(trials, key=lambda t: t.number)] == [
        runs[f"trial={t.number}"].data.metrics["val/bpb"] for t in sorted(trials, key=lambda t: t.number)
    ]
    by_name = {r.name: r for r in result.runs}
    assert {str(v) for v in by_name["trial=0"].stages.values()} == {"cached"}  # finished before: not redone
    assert str(by_name["trial=1"].stages["train"]) == "done"  # trained on from the killed driver's checkpoint:
    assert any("resuming from checkpoint" in log.read_text() for log in stages.glob("train-*/train.log"))
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["gptlab.best_run"].startswith("trial=") and "best/bpb" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} >= {"summary/search.png"}
    again = submit(spec, quiet=True, poll_interval=0.5, overrides=["search.trials=5"])  # a budget raised goes on
    assert sorted(r.name for r in again.runs) == ["trial=0", "trial=1", "trial=2", "trial=3", "trial=4"]
    assert again.parent_run_id == result.parent_run_id  # the same study, the same parent run


# --------------------------------------------------------------------------------------------------- pruning


def test_pruning_stops_a_clearly_worse_point_early_with_a_resumable_checkpoint(tmp_path):
    """A grid with ASHA: the point with a hopeless learning rate is stopped at the first rung (its training saves
    a checkpoint and exits), recorded as pruned with its last metrics; the good point runs to the end."""
    tree = spec_tree(
        tmp_path,
        train={"max_steps": 1500, "eval_interval": 50, "eval_batches": 2, "checkpoint_interval": 500, "lr": 3e-3},
        sweep={"train.lr": [3e-3, 1e-5], "prune": {"min_steps": 100, "reduction_factor": 2}},
    )
    spec = write_spec(tmp_path / "s.yaml", tree)
    said: list[str] = []
    result = submit(spec, poll_interval=0.3, report=said.append)
    assert result.ok, [r.error for r in result.runs]
    status = {r.name: r for r in result.runs}
    assert status["lr=0.003"].status == "FINISHED"
    pruned = status["lr=1e-05"]
    assert pruned.status == "PRUNED" and "pruned at step" in pruned.error, pruned
    assert "train/loss" in pruned.metrics and "val/bpb" not in pruned.metrics  # its last metrics, no final eval
    train_dir = next(d for d in (tmp_path / "runs" / "stages").glob("train-*")
                     if '"lr": 1e-05' in (d / "config.json").read_text())  # fmt: skip
    import json

    summary = json.loads((train_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "requested" and 100 <= summary["steps"] < 1500
    assert (train_dir / "checkpoints" / f"step_{summary['steps']:08d}" / "DONE.json").exists()  # resumable
    client, runs = children(result)
    assert runs["lr=1e-05"].info.status == "KILLED" and runs["lr=1e-05"].data.tags["gptlab.pruned"] == "true"
    status_out = gptlab("status", spec, cwd=tmp_path, timeout=120).stdout
    row = next(x for x in status_out.splitlines() if "lr=1e-05" in x)
    assert "PRUNED" in row and "pruned" in row, status_out
    compare = gptlab("compare", spec, cwd=tmp_path, timeout=120).stdout
    assert "PRUNED" in next(x for x in compare.splitlines() if "lr=1e-05" in x)
    # the same training without the pruner resumes from that checkpoint instead of starting over
    again = submit(spec, quiet=True, poll_interval=0.5, overrides=["sweep.prune=null"])
    assert again.ok
    log = (train_dir / "train.log").read_text()
    assert f"resuming from checkpoint {train_dir / 'checkpoints'}" in log


# ------------------------------------------------------------------------------------------------ replicates


def test_replicates_share_data_stages_and_compare_shows_their_mean_sd_and_n(tmp_path):
    tree = spec_tree(tmp_path, sweep={"model.n_layer": [1, 2], "replicates": 3})
    spec = write_spec(tmp_path / "s.yaml", tree)
    result = submit(spec, quiet=True, poll_interval=0.5)
    assert result.ok and len(result.runs) == 6
    stages = tmp_path / "runs" / "stages"
    assert len(list(stages.glob("tokenizer-*"))) == len(list(stages.glob("shards-*"))) == 1
    assert len(list(stages.glob("train-*"))) == 6
    client, runs = children(result)
    r = gptlab("compare", spec, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    for n_layer in (1, 2):
        values = [run.data.metrics["val/bpb"] for name, run in runs.items() if name.startswith(f"n_layer={n_layer},")]
        assert len(values) == 3
        row = next(x for x in r.stdout.splitlines() if f"│ n_layer={n_layer} " in x)
        cells = [c.strip() for c in row.split("│") if c.strip()]
        assert cells[1:] == ["3", f"{statistics.fmean(values):.4f}", f"{statistics.stdev(values):.4f}"], row
    assert "Best val/bpb by mean: n_layer=" in r.stdout
    points = (tmp_path / "runs" / "reports" / "compare-tiny" / "points.csv").read_text().splitlines()
    assert points[0] == "point,model.n_layer,n,val/bpb mean,val/bpb sd" and len(points) == 3
