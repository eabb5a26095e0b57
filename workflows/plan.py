"""Planning: runs -> a graph of content-addressed stages, shared where their inputs are equal.

A stage's key is a hash of the canonical JSON of exactly the configuration it uses plus the keys of its
inputs, so two sweep points with the same tokenizer and data settings share one tokenizer stage and one
shards stage. A stage directory is complete only when its commit marker (``DONE.json``) exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcore.corpus import corpus_fingerprint
from llmcore.io import COMMIT_MARKER, is_committed, read_json
from workflows.spec import ExperimentSpec, LoadedSpec, gc_paused

# Bump a stage's version when its code changes what it writes: old stage directories are then not reused.
STAGE_VERSIONS = {"tokenizer": 1, "shards": 1, "train": 1, "eval": 1}
STAGE_KINDS = tuple(STAGE_VERSIONS)


def canonical_hash(obj: Any, length: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@dataclass(frozen=True)
class Stage:
    kind: str
    key: str
    config: dict[str, Any]
    deps: tuple[str, ...]
    dir: Path

    @property
    def done(self) -> bool:
        return is_committed(self.dir)

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.key}"

    def marker(self) -> dict[str, Any]:
        return read_json(self.dir / COMMIT_MARKER)


@dataclass
class RunPlan:
    """One sweep point: its name, the values it sweeps, its resolved spec and its four stages."""

    name: str
    point: dict[str, Any]
    spec: ExperimentSpec
    stages: dict[str, Stage]
    run_hash: str


@dataclass
class Plan:
    loaded: LoadedSpec
    runs_root: Path
    spec_hash: str
    runs: list[RunPlan]
    stages: dict[str, Stage] = field(default_factory=dict)  # key -> stage, in dependency order

    @property
    def spec(self) -> ExperimentSpec:
        return self.loaded.spec


def spec_identity(spec: ExperimentSpec) -> dict[str, Any]:
    """What makes two submissions 'the same experiment' (where it runs and is tracked excluded)."""
    return spec.model_dump(mode="json", exclude={"site", "tracking", "runs_root"})


def _data_configs(spec: ExperimentSpec, corpus: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Exactly the settings the tokenizer and shards stages use; settings that cannot change their output are
    left out."""
    data = spec.data.model_dump(mode="json", exclude={"num_workers"})
    return {
        "tokenizer": {
            "tokenizer": spec.tokenizer.model_dump(mode="json", exclude={"num_threads"}),
            "sources": data["sources"],
            "corpus": corpus,
            "seed": spec.seed,
        },
        "shards": {"data": data, "corpus": corpus, "seed": spec.seed},
    }


def _model_configs(spec: ExperimentSpec) -> dict[str, dict[str, Any]]:
    """Exactly the settings the train and eval stages use."""
    return {
        "train": {
            "model": spec.model.model_dump(mode="json"),
            "train": spec.train.model_dump(mode="json", exclude={"time_budget_s"}),
            "seed": spec.seed,
        },
        "eval": {"eval": spec.eval.model_dump(mode="json"), "seed": spec.seed},
    }


# Which earlier stages each stage reads.
STAGE_INPUTS = {
    "tokenizer": (),
    "shards": ("tokenizer",),
    "train": ("shards",),
    "eval": ("train", "shards", "tokenizer"),
}


def _add_stages(result: Plan, configs: dict[str, dict[str, Any]], stages: dict[str, Stage]) -> dict[str, Stage]:
    """Key the stages of ``configs`` (in order; their inputs are already in ``stages``) and add them to the plan,
    shared with an equal stage already there. Returns ``stages`` with them added."""
    root = result.runs_root / "stages"
    for kind, config in configs.items():
        deps = tuple(stages[d].key for d in STAGE_INPUTS[kind])
        key = canonical_hash({"kind": kind, "version": STAGE_VERSIONS[kind], "config": config, "inputs": deps})
        stage = result.stages.get(key)
        if stage is None:
            stage = result.stages[key] = Stage(kind, key, config, deps, root / f"{kind}-{key}")
        stages[kind] = stage
    return stages


def plan(loaded: LoadedSpec) -> Plan:
    """Build the stage graph for every run of a loaded spec (no side effects).

    The tokenizer and shards configs hold the corpus fingerprint (a row per corpus file, hundreds of them), so
    they are built and hashed once per distinct data, tokenizer and seed settings, not once per sweep point:
    hashing them per point dominated planning a large sweep.
    """
    spec = loaded.spec
    runs_root = Path(spec.runs_root).expanduser().resolve()
    result = Plan(loaded, runs_root, canonical_hash(spec_identity(spec)), [])
    fingerprints: dict[str, list[dict[str, Any]]] = {}  # data settings (JSON) -> corpus fingerprint
    upstream: dict[str, dict[str, Stage]] = {}  # data, tokenizer and seed (JSON) -> their tokenizer and shards stages
    with gc_paused():
        for name, point, run_spec in loaded.runs:
            data = run_spec.data.model_dump_json()
            if data not in fingerprints:
                fingerprints[data] = corpus_fingerprint(run_spec.data)
            shared = run_spec.model_dump_json(include={"data", "tokenizer", "seed"})
            if shared not in upstream:
                upstream[shared] = _add_stages(result, _data_configs(run_spec, fingerprints[data]), {})
            stages = _add_stages(result, _model_configs(run_spec), dict(upstream[shared]))
            run_hash = canonical_hash({"name": name, "stages": [s.key for s in stages.values()]})
            result.runs.append(RunPlan(name, point, run_spec, stages, run_hash))
    return result


def param_count(spec: ExperimentSpec, vocab_size: int) -> int:
    """Parameters of the run's model as training reports them (nanoGPT: position table excluded), built on
    torch's meta device (no memory, no init)."""
    import torch

    from llmcore.model import GPT

    with torch.device("meta"):
        return GPT(spec.model, vocab_size).num_params()
