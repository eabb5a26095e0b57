"""Reading what a store and a runs_root hold, for ``gptlab status``, ``compare``, ``sample`` and ``export``.

A store is found from a spec (its tracking target, or ``<runs_root>/mlflow.db``) or from ``--runs-root`` /
``--uri``. Each sweep-point run carries the labels of its stages and the runs_root they live under as tags, so a
run's stage directories (its checkpoints, its tokenizer) are found from the run alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from workflows.lifecycle import RunLifecycle
from workflows.planning import plan
from workflows.pretrained import Sources
from workflows.search import add_recorded_trials
from workflows.server import check_tracking_server
from workflows.spec import InputError, SpecError, load_spec
from workflows.stages import TOKENIZER, TRAIN, dir_of, kind_of
from workflows.states import OnDisk, RunStatus, StageState, mlflow_status, run_stage_states
from workflows.store import Tracker, default_tracking_uri, quiet_mlflow_logs, tag


@dataclass
class Store:
    uri: str
    client: Any
    source: str  # what the user named (spec file or runs_root), for error messages
    runs_root: Path | None = None
    plan: Any = None  # the spec's Plan when opened from a spec
    experiment: str | None = None  # restrict to this experiment

    def experiments(self) -> list[Any]:
        if self.experiment:
            exp = self.client.get_experiment_by_name(self.experiment)
            return [exp] if exp is not None and exp.lifecycle_stage == "active" else []
        return [e for e in self.client.search_experiments() if e.name != "Default"]

    def runs(self, role: str = "sweep_point", extra: str = "") -> list[Any]:
        ids = [e.experiment_id for e in self.experiments()]
        if not ids:
            return []
        filt = f"tags.`{tag('role')}` = '{role}'" + (f" and {extra}" if extra else "")
        if self.plan is not None and "spec_hash" not in extra:  # from a spec: only its runs
            filt += f" and tags.`{tag('spec_hash')}` = '{self.plan.spec_hash}'"
        return list(self.client.search_runs(ids, filt, order_by=["attributes.start_time DESC"], max_results=50000))


def open_store(
    spec: Path | None,
    overrides: list[str] | None,
    runs_root: Path | None,
    uri: str | None,
    experiment: str | None = None,
) -> Store:
    """The store a spec tracks to, or the one under runs_root (default ``runs``) or at uri. With a spec,
    runs_root and uri override the spec's ``runs_root`` and ``tracking.uri`` (as ``--set`` would): neither is
    ignored. Raises SpecError when there is no store."""
    from mlflow.tracking import MlflowClient

    from llmcore.corpus import CorpusError

    quiet_mlflow_logs()
    if spec is not None:
        overrides = [
            *(overrides or []),
            *([f"runs_root={runs_root}"] if runs_root is not None else []),
            *([f"tracking.uri={uri}"] if uri is not None else []),
        ]
        try:  # finding the runs means keying the stages, which reads the corpus files' sizes
            p = plan(load_spec(spec, overrides, Sources(find_run_weights)))
            add_recorded_trials(p)  # a search's runs: its trials so far
        except CorpusError as exc:
            raise SpecError(str(spec), [str(exc)]) from None
        uri = p.spec.tracking.uri or default_tracking_uri(p.runs_root)
        if not p.spec.tracking.uri and not (p.runs_root / "mlflow.db").is_file():
            raise InputError(
                str(spec),
                [
                    f"runs_root: no MLflow store at {p.runs_root / 'mlflow.db'}: nothing was "
                    "submitted from this spec yet (run `gptlab submit` first)"
                ],
            )
        check_tracking_server(uri)  # an http(s) URI where no server answers fails at once, not after minutes
        return Store(
            uri, MlflowClient(uri), str(spec), p.runs_root, p, experiment or p.spec.tracking.experiment or p.spec.name
        )
    runs_root = runs_root or Path("runs")
    root = runs_root.expanduser().resolve()
    if uri is None:
        if not (root / "mlflow.db").is_file():
            raise InputError(
                str(runs_root),
                [
                    f"--runs-root: no MLflow store at {root / 'mlflow.db'}: pass the runs_root "
                    "of your experiments, a spec, or --uri"
                ],
            )
        uri = default_tracking_uri(root)
    check_tracking_server(uri)
    return Store(uri, MlflowClient(uri), str(runs_root), root, None, experiment)


# -------------------------------------------------------------------------------------------- status


@dataclass
class StatusRow:
    experiment: str
    name: str
    run_id: str | None
    status: str  # MLflow status, or "NOT SUBMITTED"
    stages: dict[str, StageState] = field(default_factory=dict)
    step: str = "-"  # "n/max" from the training's own metrics.jsonl
    train_loss: float | None = None  # the training's last logged loss (its own line, not the last one forwarded)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def stage_dirs(run: Any, runs_root: Path | None) -> dict[str, Path]:
    """label -> stage directory of a sweep-point run, from its tags (empty when the run predates them)."""
    tags = run.data.tags
    root = Path(tags[tag("runs_root")]) if tag("runs_root") in tags else runs_root
    dirs = [x for x in tags.get(tag("stages"), "").split(",") if x]
    labels = [x for x in tags.get(tag("stage_labels"), "").split(",") if x]
    if root is None or not dirs:
        return {}
    if len(labels) != len(dirs):  # runs recorded before stage labels were tagged: one stage per kind
        labels = [d.split("-", 1)[0] for d in dirs]
    return {label: root / "stages" / d for label, d in zip(labels, dirs)}


def stage_states(dirs: dict[str, Path], run: Any | None) -> dict[str, StageState]:
    """label -> state of a run's stages (``workflows.states``), from their directories and what MLflow holds of
    the run: its status (RUNNING: a driver runs it), the stage its error names, the stages cached for it."""
    tags = run.data.tags if run is not None else {}
    status = mlflow_status(run.info.status, tags.get(tag("pruned"))) if run is not None else None
    error = tags.get(tag("error"), "")
    failed = error.split()[1] if error.startswith("stage ") else None
    disks = {label: OnDisk.read(d, kind_of(d)) for label, d in dirs.items()}
    cached = set(tags.get(tag("cached_stages"), "").split(","))
    return run_stage_states(disks, cached=cached, run=status, failed=failed if status is RunStatus.FAILED else None)


def training_progress(train_dir: Path | None) -> tuple[str, float | None]:
    """('n/max', last loss) from a training's own metrics.jsonl and config, or ('-', None)."""
    from llmcore.io import read_json
    from llmcore.metrics import read_metrics, split_kinds

    if train_dir is None:
        return "-", None
    train, _ = split_kinds(read_metrics(train_dir / "metrics.jsonl"))
    if not train:
        return "-", None
    try:
        total = TRAIN.parse(read_json(train_dir / "config.json")).train.max_steps
    except (OSError, ValueError):  # (a pydantic ValidationError is a ValueError)
        total = "?"
    return f"{train[-1].step}/{total}", train[-1].loss


def status_rows(store: Store) -> tuple[list[StatusRow], list[str]]:
    """(one row per sweep point, ids of runs marked KILLED because their driver is gone).

    From a spec: every point of its sweep, also those never submitted; otherwise every sweep-point run in the
    store (the newest first, per experiment)."""
    killed = mark_dead_runs_killed(store)
    rows = []
    if store.plan is not None:
        p = store.plan
        by_hash: dict[str, Any] = {}
        for r in store.runs(extra=f"tags.`{tag('spec_hash')}` = '{p.spec_hash}'"):  # newest first: keep the newest
            by_hash.setdefault(r.data.tags.get(tag("run_hash")), r)
        for rp in p.runs:
            dirs = {label: s.dir for label, s in rp.stages.items()}
            rows.append(_row(store.experiment or p.spec.name, rp.name, by_hash.get(rp.run_hash), dirs))
        return rows, killed
    names = {e.experiment_id: e.name for e in store.experiments()}
    for run in store.runs():
        dirs = stage_dirs(run, store.runs_root)
        rows.append(_row(names.get(run.info.experiment_id, "?"), run.info.run_name, run, dirs))
    return rows, killed


def mark_dead_runs_killed(store: Store) -> list[str]:

    killed: list[str] = []
    for exp in store.experiments():
        tracker = Tracker(store.uri, exp.name, (store.runs_root or Path(".")) / "mlartifacts")  # creates nothing
        killed += RunLifecycle(tracker, None).mark_dead_runs_killed()
    return killed


def _row(experiment: str, name: str, run: Any | None, dirs: dict[str, Path]) -> StatusRow:
    states = stage_states(dirs, run)
    step, loss = training_progress(training_dir(dirs))
    if run is None:
        return StatusRow(experiment, name, None, "NOT SUBMITTED", states, step, loss)
    error = run.data.tags.get(tag("error"))
    status = mlflow_status(run.info.status, run.data.tags.get(tag("pruned"))).value
    return StatusRow(experiment, name, run.info.run_id, status, states, step, loss, dict(run.data.metrics),
                     error.splitlines()[0] if error else None)  # fmt: skip


def training_dir(dirs: dict[str, Path]) -> Path | None:
    """The directory of a run's training stage (the stage that is a process of its own), if it has one."""
    return next((d for d in dirs.values() if kind_of(d).process), None)


# -------------------------------------------------------------------------------------------- finding


def find_run(store: Store, ref: str, say: Any = None) -> Any:
    """A sweep-point run by MLflow run id, a unique id prefix (6+ characters) or its run name. A name several runs
    share (an earlier submit of an edited spec, a failed one) means the newest one with weights, FINISHED first;
    ``say`` is told which."""
    runs = store.runs()
    matches = [r for r in runs if r.info.run_id == ref]
    if not matches and len(ref) >= 6:
        matches = [r for r in runs if r.info.run_id.startswith(ref)]
    if not matches:
        matches = [r for r in runs if r.info.run_name == ref]
    if len(matches) == 1:
        return matches[0]
    where = f"the store {store.uri}" + (f", experiment {store.experiment}" if store.experiment else "")
    if not matches:
        known = ", ".join(sorted({r.info.run_name for r in runs})[:20]) or "none"
        short = (" (a run id prefix needs 6 characters or more)"
                 if len(ref) < 6 and any(r.info.run_id.startswith(ref) for r in runs) else "")  # fmt: skip
        raise InputError(
            store.source, [f"RUN: no sweep-point run named or with id '{ref}' in {where}{short} (runs: {known})"]
        )
    with_weights = [r for r in matches if has_weights(r, store.runs_root)]  # newest first
    if with_weights and len({r.info.run_name for r in matches}) == 1:
        chosen = next((r for r in with_weights if r.info.status == "FINISHED"), with_weights[0])
        if say is not None:
            say(f"'{ref}' names {len(matches)} runs; using {chosen.info.run_id} ({chosen.info.status}, the newest "
                f"{'finished run' if chosen.info.status == 'FINISHED' else 'run'} with weights)")  # fmt: skip
        return chosen
    names = {e.experiment_id: e.name for e in store.experiments()}
    listed = "; ".join(f"{r.info.run_id} ({names.get(r.info.experiment_id)}, {r.info.status})" for r in matches[:10])
    raise InputError(
        store.source, [f"RUN: '{ref}' matches {len(matches)} runs in {where}: pass a run id or --experiment ({listed})"]
    )


def find_run_weights(ref: str, runs_root: str, uri: str | None) -> tuple[Path, Path]:
    """(newest committed checkpoint, tokenizer stage) of an earlier run of a store, found as `gptlab sample` finds
    one (any experiment): how ``model.init_from: {type: run}`` is resolved (``workflows.pretrained.Sources``)."""
    from llmcore.checkpoint import latest_checkpoint
    from llmcore.config import ConfigError

    try:
        store = open_store(None, None, Path(runs_root), uri)
        run = find_run(store, ref)
    except SpecError as err:
        raise ConfigError(f"model.init_from.run: {'; '.join(err.problems)}") from None
    dirs = stage_dirs(run, store.runs_root)
    train = training_dir(dirs)
    checkpoint = latest_checkpoint(train) if train is not None else None
    if checkpoint is None or dir_of(dirs, TOKENIZER) is None:
        raise ConfigError(f"model.init_from.run: run {run.info.run_name} ({run.info.run_id}) has no committed "
                          "checkpoint or tokenizer on this machine")  # fmt: skip
    return checkpoint, dir_of(dirs, TOKENIZER)


def has_weights(run: Any, runs_root: Path | None) -> bool:
    """Whether a run's training directory holds a committed checkpoint."""
    from llmcore.checkpoint import latest_checkpoint

    train = training_dir(stage_dirs(run, runs_root))
    return train is not None and latest_checkpoint(train) is not None


def latest_parent(store: Store) -> Any:
    """The newest parent run of the spec (from a spec) or of the store's (only or newest) experiment."""
    extra = f"tags.`{tag('spec_hash')}` = '{store.plan.spec_hash}'" if store.plan is not None else ""
    parents = store.runs(role="parent", extra=extra)
    if not parents:
        raise InputError(
            store.source,
            [
                "no submitted experiment to compare here"
                + (f" (experiment {store.experiment})" if store.experiment else "")
            ],
        )
    if store.plan is None and store.experiment is None and len({r.info.experiment_id for r in parents}) > 1:
        store.experiment = next(e.name for e in store.experiments() if e.experiment_id == parents[0].info.experiment_id)
    return parents[0]


# -------------------------------------------------------------------------------------------- sampling


def sample_config(prompt: str, num_samples: int, max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None) -> Any:  # fmt: skip
    """The sampling options as an EvalConfig; a bad one is InputError naming its command-line option."""

    from llmcore.config import EvalConfig

    try:
        return EvalConfig(prompts=[prompt] * num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p)  # fmt: skip
    except ValidationError as err:
        options = {"prompts": "--prompt"}
        raise InputError("gptlab sample", [
            f"{options.get(str(e['loc'][0]), '--' + str(e['loc'][0]).replace('_', '-'))}: {e['msg']}"
            for e in err.errors()
        ]) from None  # fmt: skip


def run_model(store: Store, ref: str, device: str = "cpu", say: Any = None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(run, model, tokenizer, checkpoint meta) of a run's newest committed checkpoint."""
    from llmcore.checkpoint import CheckpointError, load_model
    from llmcore.tokenizer import TokenizerError, load_tokenizer

    run = find_run(store, ref, say)
    dirs = stage_dirs(run, store.runs_root)
    train, tok = training_dir(dirs), dir_of(dirs, TOKENIZER)
    if train is None or tok is None:
        raise InputError(store.source, [f"RUN: run {run.info.run_id} does not record its stage directories "
                                        "(submitted by an older gptlab): pass --runs-root"])  # fmt: skip
    try:
        tokenizer = load_tokenizer(tok)
    except TokenizerError as err:
        raise InputError(store.source, [f"RUN: the tokenizer of run {run.info.run_name} is not on this machine "
                                        f"({err.message})"]) from None  # fmt: skip
    try:
        model, meta = load_model(train, device)
    except CheckpointError as err:
        raise InputError(store.source, [f"RUN: run {run.info.run_name} has no usable weights: {err}"]) from None
    return run, model, tokenizer, meta


def pretrained_model(folder: Path, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a Hugging Face folder, read by llmcore (no transformers)."""
    from llmcore.config import ConfigError
    from llmcore.hf import load_pretrained
    from llmcore.tokenizer import load_tokenizer

    try:
        model, _ = load_pretrained(folder)
        tokenizer = load_tokenizer(folder)
    except ConfigError as err:
        raise InputError("gptlab sample", [f"--pretrained: {err}"]) from None
    return model.to(device).eval(), tokenizer


def export_run(store: Store, ref: str, out: Path, say: Any = None) -> tuple[Any, list[Path]]:
    """Write a run's final weights and tokenizer as a Hugging Face folder with a model card, and tag the run with
    where it went; (run, files written)."""
    from llmcore.config import ConfigError
    from llmcore.hf import export_model
    from llmcore.io import atomic_write_bytes
    from llmcore.tokenizer import export_tokenizer

    if out.exists() and not out.is_dir():
        raise InputError("gptlab export", [f"--out: {out} is a file, not a directory"])
    run, model, tokenizer, meta = run_model(store, ref, "cpu", say)
    bos = tokenizer.bos_id if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else None
    try:
        files = export_model(model, out, bos_id=bos, eos_id=tokenizer.eos_id)
        files += export_tokenizer(dir_of(stage_dirs(run, store.runs_root), TOKENIZER), out, model.cfg.block_size)
    except ConfigError as err:
        raise InputError("gptlab export", [f"RUN: run {run.info.run_name}: {err}"]) from None
    card = model_card(run, meta, yaml.safe_dump(dict(sorted(run.data.params.items())), sort_keys=False))
    atomic_write_bytes(out / "README.md", card.encode("utf-8"))
    files.append(out / "README.md")
    run_tracker(store, run).set_tags(run.info.run_id, {"exported_to": str(out.resolve())})
    return run, files


def run_tracker(store: Store, run: Any) -> Any:
    """A Tracker on the store and experiment a run belongs to (to record on it after the submit)."""

    experiment = store.client.get_experiment(run.info.experiment_id).name
    return Tracker(store.uri, experiment, (store.runs_root or Path(".")) / "mlartifacts")


def evaluate_run(store: Store, ref: str, task: Any, batch_size: int, device: str, seed: int,
                 say: Any = None) -> tuple[Any, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Score a benchmark task on a run's final weights and record it on the run (its metrics, and its predictions
    as the artifact ``tasks/<name>.jsonl``); (run, checkpoint meta, the task's result)."""
    from llmcore.tasks import evaluate_task, read_questions

    questions = read_questions(task.path, task.format)
    run, model, tokenizer, meta = run_model(store, ref, device, say)
    out = (store.runs_root or Path(".")) / "reports" / run.info.run_id
    result = evaluate_task(model, tokenizer, questions, task, seed, out, batch_size, device)
    tracker = run_tracker(store, run)
    tracker.log_values(run.info.run_id, {f"task/{task.name}/{k}": v for k, v in result["metrics"].items()},
                       step=meta["step"])  # fmt: skip
    tracker.log_artifacts(run.info.run_id, [(out / f"{task.name}.jsonl", "tasks")])
    return run, meta, result


def model_card(run: Any, meta: dict[str, Any], params_yaml: str) -> str:
    """README.md of an exported model: what it is, how it was trained (the run's resolved spec), its final
    metrics, where it came from."""
    metrics = run.data.metrics
    shown = [k for k in ("val/bpb", "final/val_loss", "val/ppl", "model/params") if k in metrics]
    shown += sorted(k for k in metrics if k.startswith("task/"))
    rows = "\n".join(f"| {k} | {metrics[k]:.4f} |" if abs(metrics[k]) < 1000 else f"| {k} | {metrics[k]:,.0f} |"
                      for k in shown)  # fmt: skip
    return (
        f"---\nlibrary_name: transformers\ntags: [gptlab, causal-lm]\n---\n\n# {run.info.run_name}\n\n"
        f"A {meta['model'].get('n_layer')}-layer GPT trained with gptlab (checkpoint step "
        f"{meta['step']}), MLflow run `{run.info.run_id}`. Load it with\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained(".")\ntokenizer = AutoTokenizer.from_pretrained(".")\n```\n\n'
        f"## Final metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"## Training spec (the run's resolved settings)\n\n```yaml\n{params_yaml}```\n"
    )


def sample_run(
    store: Store,
    ref: str,
    prompt: str,
    num_samples: int = 1,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int = 1337,
    device: str = "auto",
    say: Any = None,
) -> tuple[Any, dict[str, Any], list[str]]:
    """(run, checkpoint meta, continuations) sampled from a run's newest committed checkpoint."""
    from llmcore.evaluate import sample
    from llmcore.hardware import resolve_device

    cfg = sample_config(prompt, num_samples, max_new_tokens, temperature, top_k, top_p)
    dev = resolve_device(device)
    run, model, tokenizer, meta = run_model(store, ref, dev, say)
    return run, meta, [s["text"] for s in sample(model, tokenizer, cfg, dev, seed)]
