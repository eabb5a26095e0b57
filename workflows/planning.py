"""Planning: runs -> a graph of content-addressed stages, shared where their inputs are equal.

A stage's key is a hash of its kind, version, the canonical JSON of exactly the configuration it uses (its
kind's ``configure``, see ``workflows.stages``) and the keys of its inputs, so two sweep points with the same
tokenizer and data settings share one tokenizer stage and one shards stage. A stage directory is complete only
when its commit marker (``DONE.json``) exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcore.io import COMMIT_MARKER, is_committed, read_json
from workflows.spec import ExperimentSpec, LoadedSpec, gc_paused
from workflows.stages import LOCATE, STAGES, Facts, KeyConfig, StageKind


def canonical_hash(obj: Any, length: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@dataclass(frozen=True)
class Stage:
    """One stage instance: what it is, its key, the config that key hashes (its JSON form, ``KeyConfig.key_json``:
    what its ``config.json`` holds and its Parsl task carries; ``typed`` gives it back as its kind's model), where it
    lives."""

    kind: str
    key: str
    config: dict[str, Any]
    deps: tuple[str, ...]  # the keys of the stages it reads, in its kind's input order
    dir: Path
    runtime: dict[str, Any] = field(default_factory=dict, compare=False)  # speed-only settings, outside the key
    inputs: dict[str, Path] = field(default_factory=dict, compare=False)  # input kind -> its stage directory

    @property
    def done(self) -> bool:
        return is_committed(self.dir)

    @property
    def label(self) -> str:
        """The stage directory's name: ``train-3d517b8e4424603b``."""
        return f"{self.kind}-{self.key}"

    @property
    def definition(self) -> StageKind:
        return STAGES[self.kind]

    @property
    def typed(self) -> KeyConfig:
        """Its key config as its kind's model."""
        return self.definition.parse(self.config)

    def marker(self) -> dict[str, Any]:
        return read_json(self.dir / COMMIT_MARKER)


@dataclass
class RunPlan:
    """One sweep point: its name, the values it sweeps, its resolved spec and its stages (label -> stage, in
    dependency order)."""

    name: str
    point: dict[str, Any]
    spec: ExperimentSpec
    stages: dict[str, Stage]
    run_hash: str

    @property
    def training(self) -> Stage:
        """Its stage that runs as a process of its own (training)."""
        return next(s for s in self.stages.values() if s.definition.process)

    def stage_of(self, kind: StageKind) -> Stage:
        """Its (first) stage of a kind."""
        return next(s for s in self.stages.values() if s.definition is kind)


@dataclass
class Plan:
    loaded: LoadedSpec
    runs_root: Path
    spec_hash: str
    runs: list[RunPlan]
    stages: dict[str, Stage] = field(default_factory=dict)  # key -> stage, in dependency order
    planner: _Planner | None = field(default=None, repr=False)

    @property
    def spec(self) -> ExperimentSpec:
        return self.loaded.spec

    def add_run(self, name: str, point: dict[str, Any], spec: ExperimentSpec) -> RunPlan:
        """Plan one more run (a search's trial) into this plan: its stages are shared with equal ones already here."""
        assert self.planner is not None
        with gc_paused():
            stages = self.planner.stages_of(spec)
        identity = [s.key for s in stages.values() if s.definition.identity]
        run = RunPlan(name, point, spec, stages, canonical_hash({"name": name, "stages": identity}))
        self.runs.append(run)
        return run

    def users(self, stage: Stage) -> list[RunPlan]:
        """The runs that use a stage."""
        return [r for r in self.runs if any(s.key == stage.key for s in r.stages.values())]


def spec_identity(spec: ExperimentSpec) -> dict[str, Any]:
    """What makes two submissions 'the same experiment' (where it runs and is tracked excluded; settings added
    to gptlab later count only when set; a search's trial budget and parallelism excluded, so raising them
    continues the same study)."""
    identity = {k: v for k, v in spec.key_dict().items() if k not in ("site", "tracking", "runs_root")}
    if "eval" in identity:  # a task added to a finished experiment is recorded on the same runs
        identity["eval"] = {k: v for k, v in identity["eval"].items() if k not in ("tasks", "inspect")}
    if identity.get("search"):
        identity["search"] = {k: v for k, v in identity["search"].items() if k not in ("trials", "max_parallel")}
    return identity


class _Planner:
    def __init__(self, result: Plan):
        self.result, self.facts = result, Facts(result.loaded.sources)
        self.memo: dict[tuple[str, str, tuple[str, ...]], list[tuple[str, Stage]]] = {}

    def stages_of(self, spec: ExperimentSpec) -> dict[str, Stage]:
        stages: dict[str, Stage] = {}
        by_kind: dict[str, Stage] = {}
        for kind in STAGES.values():
            deps = tuple(by_kind[k].key for k in kind.inputs if k in by_kind)
            # Keyed once per distinct value of the sections it reads and of its inputs (the corpus fingerprint is
            # large: hashing it per sweep point dominated planning a 10,000-point sweep).
            memo = (kind.name, spec.model_dump_json(include=set(kind.reads)), deps)
            if memo not in self.memo:
                self.memo[memo] = [(label, self._stage(kind, config, deps, spec, by_kind))
                                   for label, config in kind.configure(spec, self.facts).items()]  # fmt: skip
            for label, stage in self.memo[memo]:
                stages[label] = stage
                by_kind.setdefault(kind.name, stage)
        return stages

    def _stage(self, kind: StageKind, typed: KeyConfig, deps: tuple[str, ...], spec: ExperimentSpec,
               by_kind: dict[str, Stage]) -> Stage:  # fmt: skip
        config = typed.key_json()
        hashed = {k: v for k, v in config.items() if k != LOCATE}  # where an input is found is not what it is
        key = canonical_hash({"kind": kind.name, "version": kind.version, "config": hashed, "inputs": deps})
        stage = self.result.stages.get(key)
        if stage is None:
            inputs = {k: by_kind[k].dir for k in kind.inputs if k in by_kind}
            stage = Stage(kind.name, key, config, deps, self.result.runs_root / "stages" / f"{kind.name}-{key}",
                          kind.runtime(spec), inputs)  # fmt: skip
            self.result.stages[key] = stage
        return stage


def plan(loaded: LoadedSpec) -> Plan:
    """Build the stage graph for every run of a loaded spec (no side effects)."""
    spec = loaded.spec
    runs_root = Path(spec.runs_root).expanduser().resolve()
    result = Plan(loaded, runs_root, canonical_hash(spec_identity(spec)), [])
    result.planner = _Planner(result)
    with gc_paused():
        for name, point, run_spec in loaded.runs:
            result.add_run(name, point, run_spec)
    return result


def param_count(spec: ExperimentSpec, vocab_size: int) -> int:
    """Parameters of a run's model as training reports them (``GPT.num_params``: tied weights once, the learned
    position table left out, as nanoGPT counts), by arithmetic (``llmcore.memory``): no torch, no model built."""
    from llmcore.memory import count_params

    counted = count_params(spec.model, vocab_size)
    return counted.total - counted.position
