"""The stage registry: every stage kind is defined once, its key covers exactly what its body receives, stage keys
of existing runs do not change, and every error a stage can raise crosses a process boundary intact."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from helpers import make_corpus, tiny_spec
from pydantic import BaseModel

from workflows.planning import plan
from workflows.spec import ExperimentSpec, load_spec_tree
from workflows.stages import STAGES, Facts

REPO = Path(__file__).resolve().parents[1]


def _leaves(model: type[BaseModel], value: BaseModel, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, annotation, current value) of every scalar field under a spec (lists of models: item 0)."""
    out = []
    for name, info in type(value).model_fields.items():
        v = getattr(value, name)
        path = f"{prefix}{name}"
        if isinstance(v, BaseModel):
            out += _leaves(type(v), v, path + ".")
        elif isinstance(v, list) and v and isinstance(v[0], BaseModel):
            out += _leaves(type(v[0]), v[0], f"{path}.0.")
        elif name != "sweep":
            out.append((path, info.annotation, v))
    return out


def _other_value(annotation: Any, value: Any) -> Any:
    """A different valid value for a field, or None when there is none to try."""
    args = typing.get_args(annotation)
    literals = [a for a in args if not isinstance(a, type)] if typing.get_origin(annotation) is typing.Literal else []
    if literals:
        return next((x for x in literals if x != value), None)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5
    if isinstance(value, str):
        return None  # names and paths: covered by the explicit cases below
    if value is None:
        inner = [a for a in args if a is not type(None)]
        if inner and inner[0] in (int, float):
            return inner[0](3)
    return None


def _configs(spec: ExperimentSpec, facts: Facts) -> dict[str, tuple[dict, dict]]:
    return {k.name: (k.configure(spec, facts), k.runtime(spec)) for k in STAGES.values()}


def test_a_field_outside_a_kinds_key_config_changes_neither_its_key_nor_what_its_body_receives(tmp_path):
    """For every stage kind and every spec field: a field outside the sections the kind reads (and outside its
    runtime settings) leaves its key config and its runtime settings (all its body receives) unchanged; a runtime
    setting changes what the body receives but never the key config."""
    tree = tiny_spec(make_corpus(tmp_path / "corpus", n_docs=4), tmp_path / "runs")
    base = ExperimentSpec.model_validate(tree)
    facts = Facts()
    before = _configs(base, facts)
    checked = 0
    for path, annotation, value in _leaves(ExperimentSpec, base):
        other = _other_value(annotation, value)
        if other is None:
            continue
        changed_tree = json.loads(base.model_dump_json())
        node = changed_tree
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        node[parts[-1]] = other
        try:
            changed = ExperimentSpec.model_validate(changed_tree)
        except ValueError:
            continue  # the other value breaks a rule of its section
        after = _configs(changed, facts)
        for kind in STAGES.values():
            config, runtime = after[kind.name]
            if path in kind.runtime_fields:
                assert config == before[kind.name][0], f"{path} is a runtime setting of {kind.name}: not in its key"
            elif path.split(".")[0] not in kind.reads:
                assert (config, runtime) == before[kind.name], f"{path} reaches stage kind {kind.name}"
                checked += 1
    assert checked > 100  # the walk really covered the spec


def test_a_field_a_kind_reads_changes_its_key(tmp_path):
    tree = tiny_spec(make_corpus(tmp_path / "corpus", n_docs=4), tmp_path / "runs")
    base = plan(load_spec_tree(tree, "s.yaml")).runs[0].stages
    for override, changed in [
        ("tokenizer.vocab_size=48", {"tokenizer", "shards", "train", "eval"}),
        ("data.val_fraction=0.3", {"shards", "train", "eval"}),
        ("model.n_layer=2", {"train", "eval"}),
        ("train.lr=0.01", {"train", "eval"}),
        ("train.seed=5", {"train", "eval"}),  # a training seed: the data stages stay shared
        ("eval.temperature=0.5", {"eval"}),
        ("seed=8", {"tokenizer", "shards", "train", "eval"}),
    ]:
        stages = plan(load_spec_tree(tree, "s.yaml", [override])).runs[0].stages
        assert {k for k in base if stages[k].key != base[k].key} == changed, override


def test_stage_keys_of_existing_runs_are_unchanged():
    """Keys, run hashes and the spec hash of a spec planned by gptlab before the stage registry (commit 48bf2fb),
    with the corpus at a fixed path and mtime: an old runs_root's stages and MLflow runs are found again."""
    d = Path("/tmp/gptlab-key-stability")
    d.mkdir(parents=True, exist_ok=True)
    (d / "corpus.txt").write_text("hello world\n" * 50)
    os.utime(d / "corpus.txt", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    tree = {
        "name": "keys", "seed": 7, "runs_root": str(d / "runs"),
        "data": {"sources": [{"type": "files", "path": str(d / "corpus.txt")}], "split": "tail", "val_fraction": 0.2},
        "tokenizer": {"model_type": "char", "vocab_size": 64},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "train": {"batch_size": 8, "max_steps": 30, "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 5, "device": "cpu"},
        "eval": {"batches": 4, "prompts": ["The "], "max_new_tokens": 20},
        "sweep": {"model.pos_encoding": ["learned", "rope"]},
    }  # fmt: skip
    p = plan(load_spec_tree(tree, "s.yaml"))
    keys = {r.name: {k: s.key for k, s in r.stages.items()} | {"run_hash": r.run_hash} for r in p.runs}
    assert keys == {
        "pos_encoding=learned": {"tokenizer": "f72fb34d2c427dec", "shards": "81bf8aff23de0259",
                                 "train": "f0353936c9240978", "eval": "3590d4ff4ebee693",
                                 "run_hash": "06613a4e8a972f4b"},
        "pos_encoding=rope": {"tokenizer": "f72fb34d2c427dec", "shards": "81bf8aff23de0259",
                              "train": "ce2f7df67d363135", "eval": "41f27ae963142d38", "run_hash": "e54163f06c10bfa1"},
    }  # fmt: skip
    assert p.spec_hash == "e8e97fed1d637d93"


def _exception_classes() -> list[type[BaseException]]:
    import importlib
    import pkgutil

    found = []
    for package in ("llmcore", "workflows", "site_configs"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            module = importlib.import_module(f"{package}.{info.name}")
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found.append(obj)
    return found


def test_every_error_of_llmcore_workflows_and_site_configs_survives_pickling():
    """Errors cross process boundaries (Parsl worker processes send them to the driver, whose result thread died
    on one that could not be unpickled): each keeps its type, message and fields through a pickle round trip."""
    classes = _exception_classes()
    assert {"CorpusError", "TokenizerError", "SpecError", "ShardDamagedError", "TrackingStoreError"} <= {
        c.__name__ for c in classes
    }
    for cls in classes:
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        positional = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                               p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
        args: list[Any] = [["first problem", "second"] if p.name == "problems" else f"{p.name} value"
                           for p in positional] if positional else ["a message"]  # fmt: skip
        error = cls(*args)
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is cls and str(again) == str(error), cls
        assert vars(again) == vars(error), cls


def test_site_configs_import_nothing_from_workflows():
    code = "import site_configs, site_configs.polaris, site_configs.slurm, site_configs.local, sys; " \
           "print(sorted(m for m in sys.modules if m.startswith('workflows')))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_package_api_is_functions_with_their_real_signatures():
    code = (
        "import inspect, workflows.driver, workflows.planning\n"
        "from workflows import plan, submit\n"
        "assert inspect.isfunction(plan) and inspect.isfunction(submit), (plan, submit)\n"
        "print(list(inspect.signature(submit).parameters))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == str(
        ["spec", "overrides", "site", "quiet", "poll_interval", "report", "fail_fast", "display"]
    )
    import workflows

    assert "SIGINT or SIGTERM stops the submit cleanly" in (workflows.submit.__doc__ or "")


@pytest.mark.parametrize("kind", list(STAGES))
def test_every_kind_names_its_inputs_before_it(kind):
    order = list(STAGES)
    assert all(order.index(i) < order.index(kind) for i in STAGES[kind].inputs)
