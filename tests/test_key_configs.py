"""Typed key configs: each stage kind's key config is a Pydantic model (``StageKind.config``) whose sections are
llmcore's config models; its JSON form is what the key hashes and what ``config.json`` and a Parsl task hold, and
reads back as the same config; a body receives the typed config, never a dict."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from pydantic import BaseModel
from test_stage_keys import root, specs  # noqa: F401 - root: a fixture

from llmcore.config import EvalConfig, InspectConfig, ModelConfig, StrictModel, TaskConfig, TrainConfig
from llmcore.io import read_json
from workflows.planning import plan
from workflows.spec import load_spec_tree
from workflows.stages import (
    LOCATE,
    STAGES,
    TRAIN_CONFIG,
    DerivedTaskKey,
    EvalKey,
    Facts,
    FileTaskKey,
    KeyConfig,
    PretrainedTokenizerKey,
    TrainKey,
    prepare_stage,
    run_stage,
    write_train_config,
)


@pytest.fixture(scope="module")
def plans(root):  # noqa: F811
    return {name: plan(load_spec_tree(tree, "s.yaml")) for name, tree in specs(root).items()}


def test_every_key_config_reads_back_from_its_json_as_the_config_planning_made(plans):
    seen = set()
    for p in plans.values():
        facts = Facts(p.loaded.sources)
        for run in p.runs:
            for label, stage in run.stages.items():
                made = stage.definition.configure(run.spec, facts)[label]
                assert isinstance(made, KeyConfig) and isinstance(made, typing_args(stage.definition.config))
                assert stage.typed == made, label
                assert stage.typed.key_json() == stage.config, label
                seen.add(type(made).__name__)
    assert seen == {"TrainedTokenizerKey", "PretrainedTokenizerKey", "ShardsKey", "InitKey", "TrainKey", "EvalKey",
                    "FileTaskKey", "DerivedTaskKey", "InspectKey"}  # fmt: skip


def typing_args(config):
    return tuple(getattr(config, "__args__", (config,)))


def test_sections_are_llmcore_models_and_fields_outside_the_key_hold_their_defaults(plans):
    stages = plans["tasks-inspect"].runs[0].stages
    train, ev = stages["train"].typed, stages["eval"].typed
    assert isinstance(train, TrainKey) and isinstance(train.model, ModelConfig) and isinstance(train.train, TrainConfig)
    assert train.train.time_budget_s is None and train.train.pause_at is None and train.train.seed is None
    assert isinstance(ev, EvalKey) and isinstance(ev.eval, EvalConfig)
    assert ev.eval.tasks == [] and ev.eval.inspect is None
    file, derived = stages["task:file"].typed, stages["task:derived"].typed
    assert isinstance(file, FileTaskKey) and isinstance(file.task, TaskConfig) and file.task.path is None
    assert file.locate.path == str(Path(file.locate.path).resolve()) and file.task.num_fewshot == 1
    assert isinstance(derived, DerivedTaskKey) and derived.data.num_workers == 0 and derived.task.limit == 5
    assert isinstance(stages["inspect"].typed.inspect, InspectConfig)
    pretrained = plans["pretrained"].runs[0].stages
    tok, init = pretrained["tokenizer"].typed, pretrained["init"].typed
    assert isinstance(tok, PretrainedTokenizerKey) and tok.vocab == 292 and LOCATE in pretrained["tokenizer"].config
    assert init.model.dropout == 0.0 and init.model.attention == "sdpa" and init.model.init_from is None
    assert pretrained["train"].typed.train.lora.r == 4 and pretrained["train"].typed.seed == 5


def test_a_body_receives_its_typed_config_validated_once_from_the_json_a_task_carries(plans, tmp_path, monkeypatch):
    got = {}
    for name, kind in STAGES.items():
        if kind.body is not None:
            fake = dataclasses.replace(kind, body=lambda d, config, inputs, runtime, n=name: got.setdefault(n, config)
                                       and {})  # fmt: skip
            monkeypatch.setitem(STAGES, name, fake)
    stages = {s.key: s for p in plans.values() for s in p.stages.values() if s.definition.body is not None}
    for stage in stages.values():
        d = tmp_path / stage.dir.name
        prepare_stage(d, stage.config)
        assert read_json(d / "config.json") == stage.config
        run_stage(stage.kind, str(d), read_json(d / "config.json"), {}, stage.runtime)
        assert got[stage.kind] == stage.typed and not isinstance(got[stage.kind], dict)
        del got[stage.kind]
    assert {s.kind for s in stages.values()} == {k.name for k in STAGES.values() if k.body is not None}


@pytest.mark.parametrize("kind", [k for k in STAGES.values() if k.body is not None], ids=lambda k: k.name)
def test_no_body_validates_or_indexes_a_dict_config(kind):
    source = inspect.getsource(kind.body)
    assert "model_validate" not in source and "config[" not in source and "config.get(" not in source


def test_train_json_reads_as_the_training_process_config(plans, tmp_path):
    from llmcore.train import load_run_config

    stage = plans["pretrained"].runs[0].training
    write_train_config(tmp_path, stage.config, {**stage.runtime, "pause_at": 10})
    run, problems = load_run_config(tmp_path / TRAIN_CONFIG)
    assert problems == [] and run is not None
    typed = stage.typed
    assert run.model == typed.model and run.seed == typed.seed
    assert run.train == typed.train.model_copy(update={"time_budget_s": 100.0, "pause_at": 10})


def test_key_configs_forbid_unknown_fields_and_document_every_field():
    for kind in STAGES.values():
        for model in typing_args(kind.config):
            assert model.model_config.get("extra") == "forbid", model
            for name, info in model.model_fields.items():
                assert info.description, f"{model.__name__}.{name}"
                annotation = info.annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    assert issubclass(annotation, StrictModel) or annotation.model_config.get("extra") == "forbid"
