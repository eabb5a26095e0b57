"""Searches and early stopping, on Optuna's ask-and-tell and its journal file storage.

A spec with ``search:`` asks an Optuna study (random or TPE sampler) for trials: each trial's values are set into
the spec and the result is a normal run (its content-addressed stages, its MLflow child run), launched by the
driver while fewer than ``max_parallel`` trials run; when the run ends, its metric is told to the study. A grid
with ``sweep.prune`` is a study too, with one trial per grid point (their values enqueued), so the same pruner
judges them.

Pruning (``prune: {method: asha}``): the driver reports every training's validation estimates (the ``eval`` lines
of its ``metrics.jsonl``, which it reads anyway) to the trial; when Optuna's successive-halving pruner says a
trial should stop, the driver writes a STOP file into its training directory: the training saves a checkpoint
and exits with ``exitcodes.STOP_REQUESTED``, and the run is recorded as pruned (MLflow status KILLED, tag
``gptlab.pruned``) with its last metrics. Its checkpoint stays: the same training submitted again without the
pruner (or with a later first rung) resumes it instead of starting over.

HyperBand (``prune: {method: hyperband}``, a search only): Optuna records the trials (no pruner of its own) and
the driver runs brackets of synchronous successive halving over them (``workflows.rungs.Hyperband``): each trial
pauses at its bracket's rungs with a checkpoint and the rung promotes the best ``1/reduction_factor`` of the
bracket's trials once all of them have reported. The study's trial budget is the brackets' (``Study.budget``).

The study lives in ``<runs_root>/studies/<spec hash>.journal``, written by the driver only: a re-submit of the same
spec continues it (finished trials are not redone; a trial a killed driver left running is run again, resuming
its training), and raising ``search.trials`` goes on from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcore.config import ConfigError
from site_configs import resolve
from workflows.pretrained import model_vocab
from workflows.processes import record_pruned, request_stop
from workflows.spec import Distribution, ExperimentSpec, LoadedSpec, PruneSpec, SpecError
from workflows.states import pruned_step

if TYPE_CHECKING:
    from workflows.planning import Plan, RunPlan

RUN_HASH = "run_hash"  # the trial's user attribute naming its run


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError:  # pragma: no cover - the test extra installs it
        raise ConfigError("search / sweep.prune: needs the `optuna` package: pip install 'gptlab[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distribution(d: Distribution) -> Any:
    """Optuna's distribution for a spec's."""
    optuna = optuna_module()
    D = optuna.distributions
    if d.log_uniform is not None:
        return D.FloatDistribution(*d.log_uniform, log=True)
    if d.uniform is not None:
        return D.FloatDistribution(*d.uniform)
    if d.int_uniform is not None:
        return D.IntDistribution(*d.int_uniform)
    return D.CategoricalDistribution(d.choice)


@dataclass
class Trial:
    """A trial and its run."""

    number: int
    params: dict[str, Any]
    run: RunPlan
    handle: Any  # optuna.Trial, for report / should_prune


class Study:
    """The Optuna study of one spec (a search, or a grid with a pruner), owned by its driver."""

    def __init__(self, p: Plan, max_parallel: int):
        optuna = optuna_module()
        spec = p.spec
        self.plan, self.spec = p, spec
        self.search = spec.search
        prune: PruneSpec | None = spec.search.prune if spec.search is not None else spec.sweep.prune
        self.metric = spec.search.metric if spec.search is not None else "val/bpb"
        self.maximize = spec.search is not None and spec.search.direction == "maximize"
        self.max_parallel = spec.search.max_parallel if spec.search and spec.search.max_parallel else max_parallel
        path = journal_path(p)
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        # hyperband's rungs are the driver's (workflows.rungs.Hyperband): Optuna only records the trials
        pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=prune.min_steps,
                                                         reduction_factor=prune.reduction_factor)
                  if prune is not None and prune.method == "asha" else optuna.pruners.NopPruner())  # fmt: skip
        self.study = optuna.create_study(study_name=p.spec_hash, storage=storage, pruner=pruner,
                                         direction="maximize" if self.maximize else "minimize",
                                         load_if_exists=True)  # fmt: skip
        # Seeded by the spec and by the trials the study holds: reproducible, and a re-submit that raises the budget
        # draws new values instead of the first submit's again.
        seed = spec.seed + len(self.study.get_trials(deepcopy=False))
        method = spec.search.method if spec.search is not None else "random"
        self.study.sampler = (optuna.samplers.TPESampler(seed=seed) if method == "tpe"
                              else optuna.samplers.RandomSampler(seed=seed))  # fmt: skip
        self.path = path
        # Trials in all: search.trials, or the trials of a hyperband search's brackets (set by its driver)
        self.budget = spec.search.trials if spec.search is not None else 0
        self.trials: dict[str, Trial] = {}  # run hash -> trial, for the runs of this submit
        self.rejected: list[str] = []  # why asked trials could not become runs (a spec their values break)

    # ---- trials to runs

    def grid_trials(self) -> None:
        """A grid with a pruner: one trial per grid point (made once; a re-submit finds them by run hash)."""
        optuna = optuna_module()
        by_hash = {t.user_attrs.get(RUN_HASH): t for t in self.study.get_trials(deepcopy=False)}
        space: dict[str, list[Any]] = {}  # every value each swept field takes (Optuna wants one space per field)
        for run in self.plan.runs:
            for k, v in run.point.items():
                space.setdefault(k, [])
                if _categorical(v) not in space[k]:
                    space[k].append(_categorical(v))
        dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in space.items()}
        for run in self.plan.runs:
            found = by_hash.get(run.run_hash)
            if found is not None:
                handle = optuna.trial.Trial(self.study, found._trial_id)
                self.trials[run.run_hash] = Trial(found.number, dict(run.point), run, handle)
                continue
            self.study.enqueue_trial({k: _categorical(v) for k, v in run.point.items()}, skip_if_exists=False)
            handle = self.study.ask(dists)
            handle.set_user_attr(RUN_HASH, run.run_hash)
            self.trials[run.run_hash] = Trial(handle.number, dict(run.point), run, handle)

    def resumable(self) -> list[RunPlan]:
        """The runs of a search's trials that an earlier submit asked for: finished ones (to report them),
        and those a killed driver left running (to run them again)."""
        optuna = optuna_module()
        runs = []
        for t in self.study.get_trials(deepcopy=False):
            if t.state in (optuna.trial.TrialState.WAITING,):
                continue
            run = self._run_of(t.number, t.params)
            if run is None:
                continue
            handle = optuna.trial.Trial(self.study, t._trial_id)
            self.trials[run.run_hash] = Trial(t.number, t.params, run, handle)
            runs.append(run)
        return runs

    def state(self, run: RunPlan) -> str:
        """The study's state of a run's trial: COMPLETE, PRUNED, FAIL, RUNNING."""
        trial = self.trials.get(run.run_hash)
        if trial is None:
            return "NONE"
        return self.study._storage.get_trial(trial.handle._trial_id).state.name

    def more(self, running: int) -> list[RunPlan]:
        """New trials to start now: as many as free slots and the trial budget allow (a search only)."""
        if self.search is None:
            return []
        optuna = optuna_module()
        total = self.asked()
        runs = []
        while total < self.budget and running + len(runs) < self.max_parallel:
            dists = {k: distribution(d) for k, d in self.search.space.items()}
            handle = self.study.ask(dists)
            total += 1
            run = self._run_of(handle.number, handle.params)
            if run is None:  # the values break a rule of the spec: a failed trial, the search goes on
                self.study.tell(handle, state=optuna.trial.TrialState.FAIL)
                continue
            handle.set_user_attr(RUN_HASH, run.run_hash)
            self.trials[run.run_hash] = Trial(handle.number, handle.params, run, handle)
            runs.append(run)
        return runs

    def asked(self) -> int:
        """How many trials the study has asked for (over every submit; failed ones included)."""
        optuna = optuna_module()
        return sum(t.state != optuna.trial.TrialState.WAITING for t in self.study.get_trials(deepcopy=False))

    def number(self, run: RunPlan) -> int:
        """The number of a run's trial."""
        return self.trials[run.run_hash].number

    def _run_of(self, number: int, params: dict[str, Any]) -> RunPlan | None:
        try:
            name, point, spec = self.plan.loaded.trial(number, params)
        except SpecError as err:
            self.rejected.append(f"trial {number} ({params}): {'; '.join(err.problems)}")
            return None
        return self.plan.add_run(name, point, spec)

    # ---- during and after a run

    def report(self, run: RunPlan, evals: dict[int, float]) -> bool:
        """Report a training's validation estimates (step -> loss) to its trial; whether it should stop now."""
        trial = self.trials.get(run.run_hash)
        if trial is None or not evals:
            return False
        # A resumed trial's earlier estimates are in the study already (its training's metrics.jsonl is read from
        # the start): Optuna would ignore each again with a UserWarning.
        known = self.study._storage.get_trial(trial.handle._trial_id).intermediate_values
        for step, loss in sorted(evals.items()):
            if step not in known:  # the pruner judges by the loss, lower better
                trial.handle.report(-loss if self.maximize else loss, step)
        return trial.handle.should_prune()

    def tell(self, run: RunPlan, status: str, metrics: dict[str, float]) -> None:
        """The run's end: its metric (FINISHED), PRUNED, or FAIL."""
        optuna = optuna_module()
        trial = self.trials.get(run.run_hash)
        if trial is None:
            return
        State = optuna.trial.TrialState
        if status == "FINISHED" and self.metric in metrics:
            self.study.tell(trial.handle, metrics[self.metric], skip_if_finished=True)
        elif status == "PRUNED":
            self.study.tell(trial.handle, state=State.PRUNED, skip_if_finished=True)
        elif status in ("FAILED", "FINISHED"):
            self.study.tell(trial.handle, state=State.FAIL, skip_if_finished=True)
        # KILLED (an interrupted submit): the trial stays RUNNING; the next submit runs it again

    def best(self) -> tuple[int, float, dict[str, Any]] | None:
        """(trial number, value, params) of the best finished trial, or None."""
        try:
            t = self.study.best_trial
        except ValueError:
            return None
        return t.number, float(t.value), dict(t.params)


class Pruning:
    """The driver's side of early stopping: reports each training's new validation estimates to its trial and,
    when the pruner says a running training should stop, records the decision in its directory (before anything
    else, so an interrupt never loses it) and asks it to checkpoint and stop."""

    def __init__(self, study: Study, say: Any):
        self.study, self.say = study, say
        self.reported: dict[str, int] = {}  # run hash -> the last validation step reported to its trial

    def observe(self, run: RunPlan, evals: dict[int, float], running: bool) -> None:
        """New estimates of one run (of runs that ended too: the pruner judges later trials against them)."""

        train = run.training.dir
        if pruned_step(train) is not None:
            return
        new = {s: v for s, v in evals.items() if s > self.reported.get(run.run_hash, -1)}
        if not new:
            return
        self.reported[run.run_hash] = max(new)
        if self.study.report(run, new) and running:
            record_pruned(train, max(new), "its validation loss is not among the best at this rung")
            request_stop(train)
            self.say(f"[{run.name}] pruned at step {max(new)} (its validation loss is not among the best at this "
                     "rung): its training saves a checkpoint and stops")  # fmt: skip


def _categorical(value: Any) -> Any:
    """Optuna's categorical values are None, bool, int, float or str: a list or mapping goes as its YAML."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip()


def default_parallel(spec: ExperimentSpec) -> int:
    """Trials at once by default: the site's workers (local: max_workers or one per core; batch sites: jobs x
    nodes x GPUs per node)."""
    import os

    site = resolve(spec.site)
    if site.name in ("local", "local-processes"):
        return site.max_workers or os.cpu_count() or 1
    return max(1, site.max_jobs * site.nodes_per_job * (site.gpus_per_node or 1))


def space_lines(spec: ExperimentSpec) -> list[str]:
    """The search space, one line per field, for `gptlab plan`."""
    if spec.search is None:
        return []
    out = []
    for key, d in spec.search.space.items():
        kind = next(k for k in type(d).model_fields if getattr(d, k) is not None)
        out.append(f"  {key}: {kind} {list(getattr(d, kind))}")
    return out


def journal_path(p: Plan) -> Path:
    """Where a spec's study lives: one journal file per spec identity under runs_root."""
    return p.runs_root / "studies" / f"{p.spec_hash}.journal"


def recorded_trials(p: Plan) -> list[Any]:
    """The trials of a spec's study (Optuna FrozenTrials, by number), read from its journal without writing to it
    (the driver is its only writer): none before the first submit."""
    path = journal_path(p)
    if not path.is_file():  # Optuna's backend would create it
        return []
    optuna = optuna_module()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    try:
        study_id = storage.get_study_id_from_name(p.spec_hash)
    except KeyError:
        return []
    return sorted(storage.get_all_trials(study_id, deepcopy=False), key=lambda t: t.number)


def add_recorded_trials(p: Plan) -> None:
    """Plan the runs of a search's trials so far into ``p`` (a search's plan has none of its own), so that
    ``plan``, ``status`` and ``compare`` list every trial; trials whose values make no valid spec (told FAIL, no
    run) are left out."""
    if p.spec.search is None or p.runs:
        return
    for t in recorded_trials(p):
        if t.state.name == "WAITING":  # enqueued, never asked: no run yet
            continue
        try:
            name, point, spec = p.loaded.trial(t.number, t.params)
        except SpecError:
            continue
        p.add_run(name, point, spec)


def largest_trial(loaded: LoadedSpec) -> tuple[dict[str, Any], ExperimentSpec] | None:
    """(values, run spec) of the trial with the largest training memory the space allows: the corners of the space
    (each range's bounds, every choice) tried together, as far as there are at most ``MAX_CORNERS`` of them (else
    each numeric field at its largest value); None when no corner makes a valid spec."""
    from llmcore.memory import estimate_memory

    corners = _corners(loaded.spec.search.space)
    best: tuple[int, dict[str, Any], ExperimentSpec] | None = None
    for values in corners:
        try:
            _, _, spec = loaded.trial(0, values)
        except SpecError:
            continue
        vocab = model_vocab(spec, loaded.sources)
        total = estimate_memory(spec.model, vocab, spec.train).total_bytes
        if best is None or total > best[0]:
            best = (total, values, spec)
    return None if best is None else (best[1], best[2])


MAX_CORNERS = 256


def _corners(space: dict[str, Distribution]) -> list[dict[str, Any]]:
    import itertools

    options = {k: d.values_to_check() for k, d in space.items()}
    if math.prod(len(v) for v in options.values()) > MAX_CORNERS:
        options = {k: [max(v)] if all(_number(x) for x in v) else v[:1] for k, v in options.items()}
    return [dict(zip(options, combo)) for combo in itertools.product(*options.values())]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
