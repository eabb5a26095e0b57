"""The `gptlab` command line: validate, plan, submit, status, compare, sample, inspect, ui, schema.

Bad input (spec, override, corpus) prints one paragraph naming the file and field and exits with code 2;
a submit whose sweep points do not all finish exits with code 1.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from site_configs import LOCAL_EXECUTORS, build_site
from site_configs.render import render_jobs
from site_configs.spec import BATCH_SITES, resolve
from workflows import submit as run_submit
from workflows.checks import load_and_check
from workflows.compare import (
    METRICS,
    Report,
    best,
    best_group,
    fmt,
    inspect_data,
    loss_histories,
    overlaps,
    rows_from_store,
    task_columns,
    write_report,
)
from workflows.inspecting import from_pretrained, from_run, passage_from_text, write
from workflows.planning import param_count, plan
from workflows.pretrained import model_vocab
from workflows.progress import LiveDisplay
from workflows.rungs import Hyperband, Journal, Layout, brackets, halving_cost, rung_steps
from workflows.search import (
    add_recorded_trials,
    default_parallel,
    journal_path,
    largest_trial,
    recorded_trials,
    space_lines,
)
from workflows.server import PrivateUI, check_tracking_server
from workflows.spec import InputError, SpecError, json_schema
from workflows.stages import INSPECT, TOKENIZER, dir_of
from workflows.states import StageState

# workflows.query, .store and .lifecycle import MLflow (over a second): only the commands that use them import them.

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="gptlab: experiment specs -> Parsl task graphs -> MLflow runs.",
)
out = Console(width=None if sys.stdout.isatty() else 400)  # no wrapping when piped to a file or a program

SpecArg = typer.Argument(..., help="Experiment spec (YAML).", show_default=False)
SetOpt = typer.Option(None, "--set", "-s", help="Override a field: --set train.lr=3e-4 (repeatable).")
SiteOpt = typer.Option(None, "--site", help="Site to run on (overrides the spec's site.name).")
OptSpecArg = typer.Argument(
    None, help="Experiment spec (YAML); without it, every run in the store under --runs-root.", show_default=False
)
CompareSpecArg = typer.Argument(
    None, help="Experiment spec (YAML); without it, the newest submit in the store under --runs-root (or of "
    "--experiment).", show_default=False,
)  # fmt: skip
RunsRootOpt = typer.Option(
    None,
    "--runs-root",
    show_default=False,
    help="runs_root of the experiments (holds mlflow.db) \\[default: runs; with a spec: the "
    "spec's runs_root]. With a spec it overrides the spec's runs_root.",
)
UriOpt = typer.Option(
    None,
    "--uri",
    help="Tracking URI \\[default: sqlite:///<runs_root>/mlflow.db, or the spec's "
    "tracking.uri]. With a spec it overrides tracking.uri.",
)
ExperimentOpt = typer.Option(None, "--experiment", "-e", help="Only this MLflow experiment.")
FindSpecOpt = typer.Option(None, "--spec", help="Find the run among this spec's runs.")
PretrainedOpt = typer.Option(
    None,
    "--pretrained",
    help="A Hugging Face model folder (GPT-2, Llama or GPT-NeoX family) instead of a run.",
    show_default=False,
)
DeviceOpt = typer.Option("auto", help="cpu, cuda, mps or auto.")


def make_table(title: str, columns: list[str]) -> Table:
    """A table whose cells fold rather than truncate: run ids and metric names stay readable in logs."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bad input into a one-paragraph message and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            # A store on a full or read-only file system. (workflows.store imports MLflow, seconds of start-up
            # that validate and plan do not need: it is only imported by commands that write a store.)
            store = sys.modules.get("workflows.store")
            if store is None or not isinstance(exc, store.TrackingStoreError):
                raise
            typer.echo(f"Cannot use the MLflow store: {exc}.", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@user_errors
def validate(spec: Path = SpecArg, set_: list[str] | None = SetOpt, site: str | None = SiteOpt) -> None:
    """Check a spec (schema, cross-field rules, sweep, corpus files) without running anything."""

    loaded = load_and_check(spec, set_, site)
    if loaded.spec.search is not None:  # its runs are its trials, asked for one by one when it is submitted
        typer.echo(f"{spec}: valid, a search of {loaded.spec.search.trials} trials")
        _show_space(loaded.spec)
        return
    n = len(loaded.runs)
    typer.echo(f"{spec}: valid, {n} run{'s' if n != 1 else ''}: " + ", ".join(r[0] for r in loaded.runs))


@app.command("plan")
@user_errors
def plan_cmd(spec: Path = SpecArg, set_: list[str] | None = SetOpt, site: str | None = SiteOpt) -> None:
    """Show the runs, their stages (done or to run, shared or not) and model sizes; submits nothing."""

    p = plan(load_and_check(spec, set_, site))
    add_recorded_trials(p)  # a search's runs: its trials so far, from the study's journal
    if p.runs or p.spec.search is None:  # a search before its first trial has none
        _show_runs(p)
    if p.spec.search is not None:
        _show_search(p)
    if p.spec.sweep.prune is not None and p.spec.sweep.prune.method == "sha":
        _show_rungs(p)
    if p.spec.search is not None and p.spec.search.prune is not None and p.spec.search.prune.method == "hyperband":
        _show_brackets(p)
    _show_site(p)
    _show_tracking(p)


def _show_tracking(p: Any) -> None:
    """Where the runs are tracked, and a warning when more trainings run at once than a SQLite store's forwarding
    was measured to keep up with (``bench/tracking_scale.py``)."""
    from workflows.store import SQLITE_CEILING, default_tracking_uri

    uri = p.spec.tracking.uri or default_tracking_uri(p.runs_root)
    width = len(p.runs) if p.spec.search is None else p.spec.search.trials
    at_once = min(width, (p.spec.search.max_parallel if p.spec.search else None) or default_parallel(p.spec))
    typer.echo(f"Tracking: {uri}; up to {at_once} training(s) at once")
    if uri.startswith("sqlite:") and at_once > SQLITE_CEILING:
        typer.echo(f"Warning: {at_once} trainings at once is past what one driver forwards into a SQLite store "
                   f"within 30 s ({SQLITE_CEILING}, measured by bench/tracking_scale.py): metrics will lag; use a "
                   "tracking server (README: Sharing runs with a team) for a study this wide")  # fmt: skip


def _show_rungs(p: Any) -> None:
    """Successive halving: its rungs, how many points reach each, the most steps a point trains and, on batch
    sites, the node-hours of the trainings at most."""

    prune, train = p.spec.sweep.prune, p.runs[0].spec.train
    rungs = rung_steps(prune.min_steps, prune.reduction_factor, train.max_steps)
    n = len(p.runs)
    typer.echo(f"Successive halving (sha, reduction factor {prune.reduction_factor}) over {n} points:")
    for k, steps in enumerate(rungs):
        typer.echo(f"  rung {k}: {n} point(s) train to step {steps}" + (" (the end)" if k == len(rungs) - 1 else ""))
        n = max(1, n // prune.reduction_factor)
    total, grid = halving_cost(len(p.runs), rungs, prune.reduction_factor)
    typer.echo(f"At most {rungs[-1]} steps for any point; {total} training steps in all, "
               f"{100 * total / grid:.1f}% of the grid's {grid}")  # fmt: skip
    if p.spec.site.name in BATCH_SITES and train.time_budget_s is None:
        h, m, sec = (int(x) for x in p.spec.site.walltime.split(":"))
        hours = (h + m / 60 + sec / 3600) * total / grid * len(p.runs)
        typer.echo(f"At most {hours * train.nodes:g} node-hours of training (each point's share of its walltime)")


def _show_brackets(p: Any) -> None:
    """A hyperband search's brackets (read from its layout file, never written; the spec's budget before the first
    submit): each one's trials and rungs, how many trials reach each rung, the most steps any trial trains and the
    share of training every trial to the end."""
    prune, train, studies = p.spec.search.prune, p.loaded.base.train, p.runs_root / "studies"
    rounds = Layout(studies / f"{p.spec_hash}.brackets.json").rounds()
    if p.spec.search.trials > sum(rounds):
        rounds.append(p.spec.search.trials - sum(rounds))
    layout = brackets(rounds, prune.min_steps, prune.reduction_factor, train.max_steps)
    hyperband = Hyperband(layout, prune.reduction_factor, Journal(studies / f"{p.spec_hash}.rungs.jsonl"))
    typer.echo(f"HyperBand (reduction factor {prune.reduction_factor}, min_steps {prune.min_steps}): {len(layout)} "
               f"bracket(s) of successive halving over {hyperband.budget} trials; at most {train.max_steps} steps "
               "for any trial")  # fmt: skip
    for line in hyperband.plan_lines(train.max_steps):
        typer.echo(line)
    if p.spec.site.name in BATCH_SITES and train.time_budget_s is None:
        h, m, sec = (int(x) for x in p.spec.site.walltime.split(":"))
        total = sum(halving_cost(b.trials, list(b.rungs), prune.reduction_factor)[0] for b in layout)
        hours = (h + m / 60 + sec / 3600) * total / train.max_steps
        typer.echo(f"At most {hours * train.nodes:g} node-hours of training (each trial's share of its walltime)")


def _show_runs(p: Any) -> None:
    """Each run's stages (done or to run, shared or not) and model size, then its memory estimate."""

    users: dict[str, int] = {}
    for r in p.runs:
        for s in r.stages.values():
            users[s.key] = users.get(s.key, 0) + 1
    labels = list(dict.fromkeys(label for r in p.runs for label in r.stages))
    table = make_table(f"{p.spec.name}: {len(p.runs)} runs, {len(p.stages)} stages under {p.runs_root}",
                       ["run", "params", *labels])  # fmt: skip
    for r in p.runs:
        cells = [
            "-"
            if (s := r.stages.get(label)) is None
            else f"{s.key[:8]} {'done' if s.done else 'to run'}"
            + (f" (shared x{users[s.key]})" if users[s.key] > 1 else "")
            for label in labels
        ]
        table.add_row(r.name, f"{param_count(r.spec, _vocab_size(r, p.loaded.sources)) / 1e6:.2f}M", *cells)
    out.print(table)
    todo = [s for s in p.stages.values() if not s.done]
    typer.echo(
        f"{len(p.stages) - len(todo)} of {len(p.stages)} stages done; {len(todo)} to run on site '{p.spec.site.name}'."
    )
    _show_memory(p)


def _show_memory(p: Any) -> None:
    """Estimated memory per rank of each training under ddp and fsdp (``llmcore.memory``: arithmetic, no torch),
    against the site's GPU memory where it is known; what to change when the chosen one does not fit."""
    from llmcore.memory import GIB, estimate_memory

    gpu = resolve(p.spec.site).gpu_memory_gib
    card = f" against {gpu:g} GiB GPUs" if gpu else ""
    table = make_table(f"Estimated memory per rank{card} (state: weights, gradients, AdamW; activations: one "
                       "micro-batch; *: train.parallelism)", ["run", "ranks", "ddp", "fsdp"])  # fmt: skip
    notes: list[str] = []
    seen: set[str] = set()
    for r in p.runs:
        t, key = r.spec.train, r.training.key
        if key in seen:
            continue
        seen.add(key)
        world = t.nodes * t.ranks_per_node
        vocab = _vocab_size(r, p.loaded.sources)
        est = {par: estimate_memory(r.spec.model, vocab, t.model_copy(update={"parallelism": par}), world)
               for par in ("ddp", "fsdp")}  # fmt: skip
        fits = {par: gpu is None or e.fits(int(gpu * GIB)) for par, e in est.items()}
        cells = []
        for par, e in est.items():
            text = "- (one rank)" if par == "fsdp" and world == 1 else e.summary().split(": ", 1)[1]
            cells.append(text + ("" if fits[par] else ": does not fit") + (" *" if par == t.parallelism else ""))
        table.add_row(r.name, str(world), *cells)
        if not fits[t.parallelism]:
            if t.parallelism == "ddp" and world > 1 and fits["fsdp"]:
                notes.append(
                    f"[{r.name}] ddp does not fit a {gpu:g} GiB GPU but fsdp does: set train.parallelism: fsdp"
                )
            elif not t.activation_checkpointing:
                notes.append(f"[{r.name}] {t.parallelism} does not fit a {gpu:g} GiB GPU: try "
                             "train.activation_checkpointing: true, a smaller train.batch_size (raise grad_accum), "
                             "or more ranks with fsdp")  # fmt: skip
            else:
                notes.append(f"[{r.name}] {t.parallelism} does not fit a {gpu:g} GiB GPU: lower train.batch_size "
                             "or shard over more ranks (fsdp)")  # fmt: skip
    out.print(table)
    for note in notes:
        typer.echo(note)


def _show_search(p: Any) -> None:
    """A search's space, its trial budget, its trials so far, the memory of the largest model its space allows and,
    on batch sites, the node-hours of its trials at worst."""

    search, train = p.spec.search, p.loaded.base.train
    _show_space(p.spec)
    states = [t.state.name for t in recorded_trials(p)]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in dict.fromkeys(sorted(states)))
    typer.echo(f"Trials so far: {len(states)} of {search.trials}{f' ({counts})' if counts else ''}; study "
               f"{journal_path(p)}")  # fmt: skip
    _show_largest(p)
    if p.spec.site.name in BATCH_SITES:
        h, m, sec = (int(x) for x in p.spec.site.walltime.split(":"))
        hours = (
            (h + m / 60 + sec / 3600) if train.time_budget_s is None else min(train.time_budget_s / 3600, h + m / 60)
        )
        typer.echo(f"Worst case: {search.trials} trials x {train.nodes} node(s) x {hours:g} h (a training's walltime "
                   f"or time budget) = {search.trials * train.nodes * hours:g} node-hours of training")  # fmt: skip


def _show_space(spec: Any) -> None:

    search = spec.search
    typer.echo(f"Search: {search.method}, {search.trials} trials, {search.metric} ({search.direction}), at most "
               f"{search.max_parallel or 'one per worker'} at once; space:")  # fmt: skip
    for line in space_lines(spec):
        typer.echo(line)


def _show_largest(p: Any) -> None:
    """The memory per rank of the search's largest trial (the corner of its space that needs the most)."""
    from llmcore.memory import GIB, estimate_memory

    found = largest_trial(p.loaded)
    if found is None:
        typer.echo("Largest model: no corner of the space makes a valid spec")
        return
    values, spec = found
    vocab, gpu = model_vocab(spec, p.loaded.sources), resolve(p.spec.site).gpu_memory_gib
    est = estimate_memory(spec.model, vocab, spec.train)
    fits = "" if gpu is None or est.fits(int(gpu * GIB)) else f": does not fit a {gpu:g} GiB GPU"
    typer.echo(f"Largest model the space allows ({', '.join(f'{k}={v}' for k, v in values.items())}): "
               f"{param_count(spec, vocab) / 1e6:.2f}M params, {est.summary()}{fits}")  # fmt: skip


def _show_site(p: Any) -> None:
    """How stages map to executors and, on batch sites, the job scripts and node-hours (nothing submitted)."""
    import tempfile

    multi = [r for r in p.runs if r.spec.train.nodes * r.spec.train.ranks_per_node > 1]
    if p.spec.site.name in LOCAL_EXECUTORS:  # no job scripts: no need to build Parsl's config (seconds of import)
        cpu, train = LOCAL_EXECUTORS[p.spec.site.name]
        site, mpi = None, "mpiexec on this machine" if multi else None
    else:
        trains = [r.spec.train for r in p.runs]
        site = build_site(p.spec.site, p.runs_root / "parsl", trains, resolve_address=False)
        cpu, train, mpi = site.cpu_executor, site.train_executor, site.mpi_executor
    typer.echo(
        f"Executors: tokenizer, shards, eval -> {cpu}; single-rank training -> {train}"
        + (f"; multi-rank training ({', '.join(r.name for r in multi)}) -> {mpi}" if multi else "")
    )
    if site is None:
        return

    with tempfile.TemporaryDirectory(prefix="gptlab-plan-") as tmp:
        jobs = render_jobs(site.config, Path(tmp))
    real = str(p.runs_root / "parsl" / "<NNN>" / "submit_scripts")  # where Parsl writes them on submit
    for job in jobs:
        typer.echo(
            f"\n--- {job.executor}: up to {job.max_jobs} job(s) of {job.nodes} node(s) x {job.walltime} "
            f"= {job.node_hours:g} node-hours; submitted with: {' '.join(job.submit_command.split()[:-1])} <script>"
        )
        typer.echo(job.script.replace(tmp, real).rstrip())
    if jobs:
        typer.echo(f"\nAt most {sum(j.node_hours for j in jobs):g} node-hours requested in all.")


def _vocab_size(run: Any, sources: Any) -> int:
    """The model's vocabulary: the pretrained weights' (``model.init_from``), else the trained tokenizer's when its
    stage is done, else the configured size."""

    tok = run.stage_of(TOKENIZER)
    if tok.done and run.spec.model.init_from is None:
        return int(tok.marker()["result"]["vocab_size"])
    return model_vocab(run.spec, sources)


@app.command()
@user_errors
def submit(
    spec: Path = SpecArg,
    set_: list[str] | None = SetOpt,
    site: str | None = SiteOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final summary (batch jobs)."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop every sweep point when one fails."),
    live: bool | None = typer.Option(
        None, "--live/--lines", help="Progress as a live table or as plain lines \\[default: live on a terminal]."
    ),
) -> None:
    """Run every stage of every sweep point that is not done yet, and record the runs in MLflow."""

    display = LiveDisplay(out) if not quiet and (live if live is not None else sys.stdout.isatty()) else None
    result = run_submit(spec, set_, site=site, quiet=quiet, fail_fast=fail_fast, display=display)
    if result.interrupted:
        typer.echo(f"Interrupted ({result.interrupted}): `gptlab submit {spec}` resumes the runs.", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # Parsl is shut down (or its processes killed): leave now, without waiting on any thread it left behind
        os._exit(128 + (2 if result.interrupted == "SIGINT" else 15))

    tasks = task_columns(r.metrics for r in result.runs)
    table = make_table(
        f"{result.experiment}: {sum(r.status == 'FINISHED' for r in result.runs)}/{len(result.runs)} "
        f"runs finished in {result.seconds:.0f}s",
        ["run", "status", "final/val_loss", "val/ppl", "val/bpb", *tasks, "stages cached", "MLflow run"],
    )
    for r in result.runs:
        m = r.metrics
        cell = lambda k: f"{m[k]:.4f}" if k in m else "-"
        cached = ",".join(k for k, v in r.stages.items() if v == StageState.CACHED) or "-"
        table.add_row(r.name, r.status, *(cell(k) for k in ("final/val_loss", "val/ppl", "val/bpb", *tasks)), cached,
                      r.run_id[:12])  # fmt: skip
    out.print(table)
    for r in result.runs:
        if r.error:
            typer.echo(f"[{r.name}] {r.error}", err=True)
    typer.echo(f"Tracking: {result.tracking_uri} (experiment {result.experiment}); browse with `gptlab ui`.")
    _show_inspect_reports(result)
    if not result.ok:
        raise typer.Exit(1)


def _show_inspect_reports(result: Any) -> None:
    """Where each run's inspect report is (eval.inspect): its stage directory, from the run's MLflow tags."""
    from mlflow.tracking import MlflowClient

    from llmcore.inspect import REPORT
    from workflows.query import stage_dirs
    from workflows.store import retry_locked

    runs = [r for r in result.runs if INSPECT.name in r.stages and r.run_id]
    if not runs:
        return
    client = MlflowClient(result.tracking_uri)
    typer.echo("Inside the model (eval.inspect; also MLflow artifacts under inspect/):")
    for r in runs:
        stage = dir_of(stage_dirs(retry_locked(lambda: client.get_run(r.run_id)), None), INSPECT)
        if stage is not None and (stage / REPORT).is_file():
            typer.echo(f"  {r.name}: {stage / REPORT}")


@app.command()
@user_errors
def status(
    spec: Path | None = OptSpecArg,
    set_: list[str] | None = SetOpt,
    runs_root: Path | None = RunsRootOpt,
    uri: str | None = UriOpt,
    experiment: str | None = ExperimentOpt,
) -> None:
    """Each run's stages, training step, last metrics and MLflow run id.

    Stages are done, cached, running, queued, waiting, failed, not run (after a failed stage), interrupted (a
    training stopped with a committed checkpoint: the next submit resumes it) or to run. Runs left RUNNING by a
    driver that is gone are marked KILLED."""
    from workflows.query import open_store, status_rows

    store = open_store(spec, set_, runs_root, uri, experiment)
    rows, killed = status_rows(store)
    for run_id in killed:
        typer.echo(f"run {run_id} was left RUNNING by a driver that is gone: marked KILLED")
    several = len({r.experiment for r in rows}) > 1
    labels = list(dict.fromkeys(label for r in rows for label in r.stages))
    tasks = task_columns(r.metrics for r in rows)
    columns = ["run", "status", *labels, "step", "train/loss", "final/val_loss", "val/bpb", *tasks, "MLflow run"]
    title = f"{store.source}: {len(rows)} run{'s' if len(rows) != 1 else ''} (store {store.uri})"
    table = make_table(title, ["experiment"] * several + columns)
    for r in rows:
        m = r.metrics
        table.add_row(
            *[r.experiment] * several, r.name, r.status, *(str(r.stages.get(k, "-")) for k in labels), r.step,
            fmt(r.train_loss), fmt(m.get("final/val_loss", m.get("val/loss"))), fmt(m.get("val/bpb")),
            *(fmt(m.get(k)) for k in tasks), r.run_id or "-",
        )  # fmt: skip
    out.print(table)
    for r in rows:
        if r.error:
            typer.echo(f"[{r.name}] {r.error}")


@app.command()
@user_errors
def compare(
    spec: Path | None = CompareSpecArg,
    set_: list[str] | None = SetOpt,
    runs_root: Path | None = RunsRootOpt,
    uri: str | None = UriOpt,
    experiment: str | None = ExperimentOpt,
    metric: str = typer.Option(
        "val/bpb",
        help="Metric to rank and plot (val/bpb: comparable across tokenizers; or a task score such as "
        "task/science/acc).",
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Where sweep.csv and the plot go \\[default: <runs_root>/reports/compare-<experiment>]."
    ),
    layer: int | None = typer.Option(
        None,
        "--layer",
        min=0,
        help="Runs with eval.inspect: the layer whose attention is drawn side by side \\[default: the last].",
    ),
    head: int = typer.Option(0, "--head", min=0, help="Runs with eval.inspect: the head drawn side by side."),
) -> None:
    """Table and plots of one submit's sweep points (or search trials): swept values against results.

    The submit is the latest of the spec (with a spec) or of the store's newest experiment (or --experiment).
    Replicates are grouped (mean, sd and n per point; the best point by its mean; a note where a point's 95%
    interval overlaps the best one's). Writes sweep.csv (points.csv with replicates), a plot of --metric against
    the swept parameter (a search: against the trial number and each searched field), the runs' loss curves and,
    for runs with eval.inspect, the same attention head (--layer, --head) of every run side by side; files an
    earlier compare wrote there are replaced or removed."""
    from workflows.query import latest_parent, open_store

    store = open_store(spec, set_, runs_root, uri, experiment)
    parent = latest_parent(store)
    rows, keys, replicate_keys = rows_from_store(store.client, parent)
    known = sorted({k for r in rows for k in r.metrics})
    if known and metric not in known:
        raise InputError(
            store.source,
            [f"--metric: no run of {parent.info.run_name} has a metric '{metric}' (it has: {', '.join(known)})"],
        )
    name = store.experiment or parent.info.run_name
    report = Report(
        rows, keys, replicate_keys, metric, f"{name}: {metric}", search=parent.data.params.get("search") is not None
    )
    top = best(rows, metric)
    columns = list(dict.fromkeys((metric, *METRICS, *task_columns(r.metrics for r in rows))))
    table = make_table(f"{name}: {len(rows)} runs, parent run {parent.info.run_id}", ["run", *keys, "status", *columns])
    for r in rows:
        cells = [r.name, *(str(r.point.get(k)) for k in keys), r.status, *(fmt(r.metrics.get(m), m) for m in columns)]
        table.add_row(*cells, style="bold green" if r is top and not replicate_keys else None)
    out.print(table)
    groups = report.groups
    if replicate_keys:
        top_group = best_group(groups, metric)
        points = make_table(f"{name}: {len(groups)} points, replicates over {', '.join(replicate_keys)}",
                            ["point", "n", f"{metric} mean", "sd"])  # fmt: skip
        for g in groups:
            points.add_row(g.name, str(len(g.values(metric))), fmt(g.mean(metric)), fmt(g.sd(metric)),
                           style="bold green" if g is top_group else None)  # fmt: skip
        out.print(points)
        if top_group is not None:
            typer.echo(f"Best {metric} by mean: {top_group.name} ({top_group.mean(metric):.4f} ± "
                       f"{top_group.sd(metric) or 0:.4f}, n={len(top_group.values(metric))})")  # fmt: skip
        for note in overlaps(groups, metric):
            typer.echo(f"Note: {note}")
    elif top is not None:
        typer.echo(f"Best {metric}: {top.name} ({top.metrics[metric]:.4f}, run {top.run_id})")
    root = store.runs_root or Path(".")
    target = out_dir or root / "reports" / f"compare-{name}"
    option = "--out" if out_dir else "the report directory"
    if target.exists() and not target.is_dir():
        raise InputError("gptlab compare", [f"{option}: {target} is a file, not a directory"])
    try:
        attention = (inspect_data(store.client, rows), layer, head)
        files = write_report(report, target, loss_histories(store.client, rows), attention)
    except OSError as exc:
        raise InputError("gptlab compare", [f"{option}: cannot write to {target} ({exc.strerror or exc})"]) from None
    plotted = any(f.suffix == ".png" and f.name not in ("loss_curves.png", "inspect_attention.png") for f in files)
    why = "" if plotted else f" (nothing to plot: no finished run has {metric} or nothing was swept)"
    typer.echo("Wrote " + ", ".join(str(f) for f in files) + why)


@app.command()
@user_errors
def sample(
    run: str | None = typer.Argument(
        None,
        help="Run name of a sweep point, MLflow run id, or a unique prefix of a run id (6 characters or more).",
        show_default=False,
    ),
    pretrained: Path | None = PretrainedOpt,
    prompt: str = typer.Option(
        "\\n", "--prompt", "-p", help="Text to continue; \\n and \\t are read as newline and tab."
    ),
    num_samples: int = typer.Option(1, "--num-samples", "-n", min=1, help="Continuations to draw."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, help="Sampling temperature; 0 is greedy."),
    top_k: int | None = typer.Option(200, "--top-k", help="Sample from the k most likely tokens."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling threshold in (0, 1]."),
    seed: int = typer.Option(1337, help="Sampling seed (same seed, same text)."),
    device: str = DeviceOpt,
    spec: Path | None = FindSpecOpt,
    runs_root: Path | None = RunsRootOpt,
    uri: str | None = UriOpt,
    experiment: str | None = ExperimentOpt,
) -> None:
    """Generate text from a run's trained weights (its newest committed checkpoint), or with --pretrained from a
    Hugging Face folder directly (as transformers' text-generation pipeline does)."""
    from llmcore.evaluate import sample as generate
    from llmcore.hardware import resolve_device
    from workflows.query import open_store, pretrained_model, run_model, sample_config

    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise InputError("gptlab sample", [f"--device: {exc}"]) from None
    if (run is None) == (pretrained is None):
        raise InputError("gptlab sample", ["RUN / --pretrained: give a run, or --pretrained DIR, not both"])
    text = prompt.replace("\\n", "\n").replace("\\t", "\t")  # typed escapes, as in "def f():\n"
    cfg = sample_config(text, num_samples, max_new_tokens, temperature, top_k, top_p)
    if pretrained is not None:
        model, tokenizer = pretrained_model(pretrained, dev)
        typer.echo(f"# {pretrained} ({model.num_params():,} parameters)", err=True)
    else:
        say = lambda msg: typer.echo(f"# {msg}", err=True)
        store = open_store(spec, None, runs_root, uri, experiment)
        found, model, tokenizer, meta = run_model(store, run, dev, say)
        typer.echo(f"# {found.info.run_name} (run {found.info.run_id}), checkpoint step {meta['step']}", err=True)
    for i, s in enumerate(generate(model, tokenizer, cfg, dev, seed)):
        if i:
            typer.echo("\n---")
        typer.echo(text + s["text"])


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    run: str | None = typer.Argument(None, help="Run name, MLflow run id, or a unique id prefix.", show_default=False),
    task_file: Path = typer.Option(..., "--task", help="The task file.", show_default=False),
    fmt: str = typer.Option(
        ..., "--format", help="multiple_choice, kaggle_science_exam, hellaswag or next_line.", show_default=False
    ),
    name: str | None = typer.Option(None, "--name", help="The task's name in metric names [default: the file's stem]."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score the first K questions only."),
    num_fewshot: int = typer.Option(0, "--num-fewshot", min=0, help="Solved examples before each question."),
    pretrained: Path | None = PretrainedOpt,
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Sequences per forward pass."),
    seed: int = typer.Option(1337, help="Seed of the few-shot examples' choice."),
    device: str = DeviceOpt,
    spec: Path | None = FindSpecOpt,
    runs_root: Path | None = RunsRootOpt,
    uri: str | None = UriOpt,
    experiment: str | None = ExperimentOpt,
) -> None:
    """Score a multiple-choice benchmark task (log-likelihood of each choice, as lm-evaluation-harness) on a run's
    final weights and record it on that run (task/<name>/acc, acc_norm, map3, n and the predictions as
    tasks/<name>.jsonl); or with --pretrained on a Hugging Face folder, to know a public model's number first."""
    from pydantic import ValidationError

    from llmcore.config import TaskConfig
    from llmcore.hardware import resolve_device
    from llmcore.tasks import TaskError, evaluate_task, read_questions, stderr
    from workflows.query import evaluate_run, open_store, pretrained_model

    if (run is None) == (pretrained is None):
        raise InputError("gptlab evaluate", ["RUN / --pretrained: give a run, or --pretrained DIR, not both"])
    try:
        task = TaskConfig(name=name or task_file.stem, path=str(task_file), format=fmt, limit=limit,
                          num_fewshot=num_fewshot)  # fmt: skip
    except ValidationError as err:
        flags = {"name": "--name", "format": "--format", "limit": "--limit", "num_fewshot": "--num-fewshot"}
        problems = [f"{flags.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in err.errors()]
        raise InputError("gptlab evaluate", problems) from None
    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise InputError("gptlab evaluate", [f"--device: {exc}"]) from None
    try:
        if pretrained is not None:
            model, tokenizer = pretrained_model(pretrained, dev)
            what = f"{pretrained} ({model.num_params():,} parameters)"
            result = evaluate_task(model, tokenizer, read_questions(task_file, fmt), task, seed, None, batch_size, dev)
        else:
            store = open_store(spec, None, runs_root, uri, experiment)
            say = lambda msg: typer.echo(f"# {msg}", err=True)
            found, meta, result = evaluate_run(store, run, task, batch_size, dev, seed, say)
            what = f"{found.info.run_name} (run {found.info.run_id}), checkpoint step {meta['step']}"
    except TaskError as err:
        raise InputError("gptlab evaluate", [f"--task: {err}"]) from None
    m = result["metrics"]
    n = int(m["n"])
    table = make_table(f"{task.name} on {what}", ["metric", "value", "stderr"])
    for k in ("acc", "acc_norm", "map3"):
        if k in m:
            table.add_row(f"task/{task.name}/{k}", f"{m[k]:.4f}", f"{stderr(m[k], n):.4f}" if k != "map3" else "-")
    table.add_row(f"task/{task.name}/n", str(n), "")
    out.print(table)
    typer.echo(f"{n} questions in {result['seconds_scoring']:.1f}s ({result['questions_per_second']:.1f}/s)"
               + ("; recorded on the run" if pretrained is None else ""))  # fmt: skip


@app.command("inspect")
@user_errors
def inspect_cmd(
    run: str | None = typer.Argument(None, help="Run name, MLflow run id, or a unique id prefix.", show_default=False),
    pretrained: Path | None = PretrainedOpt,
    prompt: list[str] | None = typer.Option(
        None,
        "--prompt",
        "-p",
        help="A text to look at (repeatable; \\n and \\t are read as newline and tab) "
        "\\[default: the run's eval.inspect prompts].",
        show_default=False,
    ),
    text: Path | None = typer.Option(
        None,
        "--text",
        help="A text file whose start is scored token by token \\[default: a run's validation split].",
        show_default=False,
    ),
    passage_chars: int | None = typer.Option(
        None,
        "--passage-chars",
        min=0,
        help="Characters scored token by token \\[default: the run's eval.inspect.passage_chars, else 2000].",
        show_default=False,
    ),
    out_dir: Path | None = typer.Option(
        None,
        "--out",
        help="Where report.html and the PNGs go \\[default: <runs_root>/reports/inspect-<run>, or "
        "inspect-<folder> for --pretrained].",
        show_default=False,
    ),
    device: str = DeviceOpt,
    spec: Path | None = FindSpecOpt,
    runs_root: Path | None = RunsRootOpt,
    uri: str | None = UriOpt,
    experiment: str | None = ExperimentOpt,
) -> None:
    """Look inside a run's final weights (or a Hugging Face folder's): for each prompt the attention maps of every
    layer x head and the logit lens (the top next tokens after each layer), the position encodings, and the loss of
    each token of a passage; one self-contained report.html (open it in a browser, no network) and its PNGs."""
    from llmcore.hardware import resolve_device
    from workflows.query import open_store

    if (run is None) == (pretrained is None):
        raise InputError("gptlab inspect", ["RUN / --pretrained: give a run, or --pretrained DIR, not both"])
    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise InputError("gptlab inspect", [f"--device: {exc}"]) from None
    if pretrained is not None:
        target = from_pretrained(pretrained, dev)
    else:
        store = open_store(spec, None, runs_root, uri, experiment)
        say = lambda msg: typer.echo(f"# {msg}", err=True)
        target = from_run(store, run, dev, 0 if text else passage_chars, say)
    chars = target.passage_chars if passage_chars is None else passage_chars
    if text is not None and chars:
        target.passage = passage_from_text(target.tokenizer, text, chars)
    prompts = [p.replace("\\n", "\n").replace("\\t", "\t") for p in prompt] if prompt else target.prompts
    files = write(target, prompts, out_dir or target.default_out)
    typer.echo(f"Inside {target.name}: {files[0]} ({len(files) - 1} more files beside it)")


@app.command()
@user_errors
def export(
    run: str = typer.Argument(..., help="Run name, MLflow run id, or a unique id prefix.", show_default=False),
    out_dir: Path = typer.Option(..., "--out", help="The folder to write (created).", show_default=False),
    spec: Path | None = FindSpecOpt,
    runs_root: Path | None = RunsRootOpt,
    uri: str | None = UriOpt,
    experiment: str | None = ExperimentOpt,
) -> None:
    """Write a run's final weights and tokenizer as a Hugging Face folder that transformers loads with no extra
    code (AutoModelForCausalLM, AutoTokenizer): config.json, model.safetensors, generation_config.json, the
    tokenizer files and a README.md model card. Learned positions + LayerNorm + GELU export as GPT2LMHeadModel,
    RoPE + RMSNorm + SwiGLU without biases as LlamaForCausalLM, RoPE + LayerNorm + GELU as GPTNeoXForCausalLM."""
    from workflows.query import export_run, open_store

    store = open_store(spec, None, runs_root, uri, experiment)
    found, files = export_run(store, run, out_dir, lambda msg: typer.echo(f"# {msg}", err=True))
    typer.echo(f"Exported {found.info.run_name} (run {found.info.run_id}) to {out_dir}: "
               + ", ".join(f.name for f in files))  # fmt: skip


@app.command()
@user_errors
def ui(
    runs_root: Path = typer.Option(Path("runs"), help="runs_root of the experiments (holds mlflow.db)."),
    uri: str | None = typer.Option(None, help="Backend store URI; default sqlite:///<runs_root>/mlflow.db."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; loopback unless you opt in to another."),
    port: int = typer.Option(5000, help="Port."),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="Serve without a password: every user who can reach the port reads and changes "
        "the runs (on a shared login node: every user of the node).",
    ),
) -> None:
    """Start the MLflow UI on this store, for you only: MLflow's basic-auth app with one account, yours (its
    password generated once and kept 0600 in <runs_root>/.gptlab-ui), on loopback by default. Prints the login and
    the URL of each experiment's runs table: MLflow 3.17 opens an experiment reached from its home page on the
    GenAI traces view, these URLs open the training runs with the swept fields and val/bpb as
    columns (the view each submit saves on its experiment)."""
    if uri is not None and uri.lower().startswith(("http://", "https://")):
        return _server_ui_links(uri)  # a tracking server is its own UI, behind its own login
    store = uri or f"sqlite:///{runs_root.resolve() / 'mlflow.db'}"
    if uri is None and not (runs_root / "mlflow.db").is_file():
        typer.echo(
            f"ui: no MLflow store at {runs_root / 'mlflow.db'}: run `gptlab submit` first or pass --runs-root.",
            err=True,
        )
        raise typer.Exit(2)

    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    base = f"http://{host}:{port}"
    private = None if insecure else PrivateUI(runs_root)
    if private is None:
        typer.echo(f"MLflow UI on {base} (store {store}) WITHOUT a password (--insecure): every user who can "
                   f"connect to port {port} of {host} reads and changes these runs; Ctrl-C stops it.")  # fmt: skip
    else:
        typer.echo(f"MLflow UI on {base} (store {store}) for you only: user {private.user}, password "
                   f"{private.password} (kept in {private.config_path}); your browser asks for them once, or open "
                   f"{private.login_url(base)} first. Ctrl-C stops it.")  # fmt: skip
    try:
        from mlflow.tracking import MlflowClient

        from workflows.lifecycle import runs_table_url
        from workflows.store import quiet_mlflow_logs, retry_locked

        quiet_mlflow_logs()
        experiments = retry_locked(lambda: MlflowClient(store).search_experiments(), seconds=10)
    except Exception as exc:  # the UI itself may still serve it: say why there are no links and start it
        typer.echo(f"(no experiment links: reading the store failed: {next(iter(str(exc).splitlines()), exc)!s:.200})")
        experiments = []
    for exp in experiments:
        if exp.name != "Default":  # MLflow's own, empty in a gptlab store (as in `gptlab status`)
            typer.echo(f"  {exp.name}: {runs_table_url(base, exp)}")
    sys.stdout.flush()  # before exec replaces this process
    argv = ["--backend-store-uri", store, "--host", host, "--port", str(port)]
    # MLflow's server also starts a job runner (GenAI jobs: a pool of worker processes, ~250 MB each) that gptlab's
    # runs never use: off, on a shared login node above all.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if private is None:
        os.execve(mlflow, [mlflow, "ui", *argv], env)
    os.execve(mlflow, [mlflow, "server", "--app-name", "basic-auth", *argv], {**env, **private.env()})


def _server_ui_links(uri: str) -> None:
    """`gptlab ui --uri http(s)://...`: start nothing (the server serves its own UI, to its own accounts); check
    the credentials in MLflow's variables and print the runs-table URL of each experiment they may read."""
    from mlflow.tracking import MlflowClient

    from workflows.lifecycle import runs_table_url
    from workflows.store import quiet_mlflow_logs

    quiet_mlflow_logs()
    check_tracking_server(uri)  # no server, or refused credentials: exit 2 naming tracking.uri
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    typer.echo(f"{uri} is a tracking server: it serves its own UI; log in there" + (f" as {user}." if user else "."))
    for exp in MlflowClient(uri).search_experiments():
        if exp.name != "Default":
            typer.echo(f"  {exp.name}: {runs_table_url(uri, exp)}")


@app.command()
def schema() -> None:
    """Print the JSON schema of experiment specs."""

    print(json.dumps(json_schema(), indent=2))


def main() -> None:
    app(prog_name="gptlab")


if __name__ == "__main__":
    main()
