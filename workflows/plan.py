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
from workflows.spec import ExperimentSpec, LoadedSpec

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


def _stage_configs(spec: ExperimentSpec, corpus: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Exactly the settings each stage uses; settings that cannot change its output are left out."""
    data = spec.data.model_dump(mode="json", exclude={"num_workers"})
    return {
        "tokenizer": {
            "tokenizer": spec.tokenizer.model_dump(mode="json", exclude={"num_threads"}),
            "sources": data["sources"],
            "corpus": corpus,
            "seed": spec.seed,
        },
        "shards": {"data": data, "corpus": corpus, "seed": spec.seed},
        "train": {
            "model": spec.model.model_dump(mode="json"),
            "train": spec.train.model_dump(mode="json", exclude={"time_budget_s"}),
            "seed": spec.seed,
        },
        "eval": {"eval": spec.eval.model_dump(mode="json"), "seed": spec.seed},
    }


# Which earlier stages each stage reads.
STAGE_INPUTS = {"tokenizer": (), "shards": ("tokenizer",), "train": ("shards",), "eval": ("train", "shards", "tokenizer")}


def plan(loaded: LoadedSpec) -> Plan:
    """Build the stage graph for every run of a loaded spec (no side effects)."""
    spec = loaded.spec
    runs_root = Path(spec.runs_root).expanduser().resolve()
    result = Plan(loaded, runs_root, canonical_hash(spec_identity(spec)), [])
    fingerprints: dict[str, list[dict[str, Any]]] = {}
    for name, point, run_spec in loaded.runs:
        data_key = canonical_hash(run_spec.data.model_dump(mode="json"))
        if data_key not in fingerprints:
            fingerprints[data_key] = corpus_fingerprint(run_spec.data)
        configs = _stage_configs(run_spec, fingerprints[data_key])
        stages: dict[str, Stage] = {}
        for kind in STAGE_KINDS:
            deps = tuple(stages[d].key for d in STAGE_INPUTS[kind])
            key = canonical_hash({"kind": kind, "version": STAGE_VERSIONS[kind], "config": configs[kind], "inputs": deps})
            stage = result.stages.setdefault(key, Stage(kind, key, configs[kind], deps, runs_root / "stages" / f"{kind}-{key}"))
            stages[kind] = stage
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
