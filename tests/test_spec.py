"""Spec loading: shipped specs validate, every kind of bad input is reported at once with field paths."""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import gpt2_folder, make_corpus, tiny_spec, write_spec

from workflows.checks import load_and_check
from workflows.spec import SpecError, gc_paused, load_spec, load_spec_tree, read_spec_file, run_name, sweep_points

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "specs").glob("*.yaml"))


def test_specs_directory_is_not_empty():
    names = {p.name for p in SPECS}
    assert {"quickstart.yaml", "shakespeare_char.yaml"} <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs_root is relative to the working directory
    corpus = make_corpus(tmp_path / "corpus", n_docs=40)  # enough text for block_size 256 (1024: a tail of 2.8 kB)
    overrides = []
    init = (read_spec_file(path).get("model") or {}).get("init_from")
    if init:  # a small GPT-2-shaped folder the test makes (a spec that starts from an earlier run: in its place)
        folder = gpt2_folder(tmp_path / "gpt2", corpus, n_positions=1024)
        overrides.append(f"model.init_from={{type: huggingface, path: {folder}}}" if init["type"] == "run"
                         else f"model.init_from.path={folder}")  # fmt: skip
    loaded = load_spec(path, overrides)
    assert loaded.runs, "a spec expands to at least one run"
    # Corpus files are checked too: point file sources at a small corpus the test makes.
    overrides += [
        f"data.sources.{i}.path={corpus}" for i, s in enumerate(loaded.spec.data.sources) if s.type == "files"
    ]
    # ... and task files (task sources, eval.tasks) at a small Kaggle CSV of the same format.
    exam = tmp_path / "exam.csv"
    exam.write_text("id,prompt,A,B,C,D,E,answer\n" + "".join(f"{i},Q{i}?,a,b,c,d,e,B\n" for i in range(20)))
    overrides += [f"data.sources.{i}.path={exam}" for i, s in enumerate(loaded.spec.data.sources)
                  if s.type == "task" and s.path is not None and s.format == "kaggle_science_exam"]  # fmt: skip
    overrides += [f"eval.tasks.{i}.path={exam}" for i, t in enumerate(loaded.spec.eval.tasks)
                  if t.path is not None and t.format == "kaggle_science_exam"]  # fmt: skip
    load_and_check(path, overrides)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_starts_with_the_command_that_runs_it(path):
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"gptlab submit specs/{path.name}" in header


def problems_of(tree, overrides=None, source="spec.yaml"):
    with pytest.raises(SpecError) as info:
        load_spec_tree(tree, source, overrides)
    return info.value.problems, str(info.value)


def test_unknown_key_wrong_type_and_bad_range_reported_together():
    problems, text = problems_of({"model": {"n_layers": 4, "n_embd": "wide"}, "train": {"lr": -1}})
    assert any(p.startswith("model.n_layers: unknown field") for p in problems)
    assert any(p.startswith("model.n_embd:") for p in problems)
    assert any(p.startswith("train.lr:") and "greater than 0" in p for p in problems)
    assert text.startswith("Invalid experiment spec spec.yaml (3 problems)")
    assert "\n" not in text  # one paragraph


def test_cross_field_problems_reported_together():
    problems, _ = problems_of(
        {
            "model": {"n_embd": 100, "n_head": 3},
            "train": {"lr": 1e-4, "min_lr": 1e-3, "warmup_steps": 50, "max_steps": 10},
        }
    )
    joined = " | ".join(problems)
    assert "model.n_head: must divide model.n_embd" in joined
    assert "train.min_lr: must be <= train.lr" in joined
    assert "train.warmup_steps: must be <= train.max_steps" in joined


def test_schema_and_cross_field_problems_reported_together():
    """A schema error elsewhere does not hide a cross-field problem of a section that is valid on its own; a
    section a sweep changes is left to the per-point check (the sweep may fix it)."""
    problems, text = problems_of({"model": {"n_embd": 100, "n_head": 3}}, ["train.lr=fast"])
    assert [p.split(":")[0] for p in problems] == ["model.n_head", "train.lr"]  # in the order of the sections
    assert text.startswith("Invalid experiment spec spec.yaml (2 problems)")
    problems, _ = problems_of(
        {"model": {"n_embd": 100, "n_head": 3}, "sweep": {"model.n_head": [4]}}, ["train.lr=fast"]
    )
    assert [p.split(":")[0] for p in problems] == ["train.lr"]


def test_vocab_must_fit_the_shard_dtype():
    problems, _ = problems_of({"tokenizer": {"vocab_size": 70000}, "data": {"token_dtype": "uint16"}})
    assert any(p.startswith("data.token_dtype: uint16 holds at most 65536") for p in problems)


def test_source_fields_are_named_with_their_index():
    problems, _ = problems_of({"data": {"sources": [{"type": "python_stdlib"}, {"type": "files"}]}})
    assert problems == ["data.sources.1.path: required field is missing"]


def test_bad_overrides_are_named():
    problems, _ = problems_of({}, ["train.lr", "train.lr=fast", "model.depth=3"])
    assert "--set train.lr: expected KEY=VALUE, e.g. train.lr=3e-4" in problems
    assert any(p.startswith("train.lr:") and "'fast'" in p for p in problems)
    assert any(p.startswith("model.depth: unknown field") for p in problems)


def test_overrides_apply_with_yaml_types_and_list_indices():
    loaded = load_spec_tree(
        {"data": {"sources": [{"type": "files", "path": "a.txt"}]}},
        "s.yaml",
        ["train.lr=3e-4", "model.bias=true", "data.sources.0.path=b.txt", "eval.prompts=[x, y]"],
    )
    s = loaded.spec
    assert (s.train.lr, s.model.bias, s.data.sources[0].path, s.eval.prompts) == (3e-4, True, "b.txt", ["x", "y"])


def test_sweep_expands_to_named_runs():
    loaded = load_spec_tree({"sweep": {"model.n_layer": [2, 4], "train.lr": [1e-3, 3e-4]}}, "s.yaml")
    names = [name for name, _, _ in loaded.runs]
    assert names == ["n_layer=2,lr=0.001", "n_layer=2,lr=0.0003", "n_layer=4,lr=0.001", "n_layer=4,lr=0.0003"]
    assert [(s.model.n_layer, s.train.lr) for _, _, s in loaded.runs] == [(2, 1e-3), (2, 3e-4), (4, 1e-3), (4, 3e-4)]


def test_sweep_points_are_independent_and_leave_the_tree_unchanged():
    # Expansion copies only the containers on each swept path: points must not see each other's values.
    tree = {
        "data": {"sources": [{"type": "python_stdlib", "max_bytes": 100}], "val_fraction": 0.2},
        "eval": {"prompts": ["a"]},
        "sweep": {
            "data.sources.0.max_bytes": [1000, 2000],
            "eval.prompts": [["x"], ["y", "z"]],
            "model.dropout": [0.0, 0.1],
        },
    }
    before = copy.deepcopy(tree)
    runs = load_spec_tree(tree, "s.yaml").runs
    assert tree == before
    got = [(s.data.sources[0].max_bytes, s.eval.prompts, s.model.dropout, s.data.val_fraction) for _, _, s in runs]
    assert got == [(m, p, d, 0.2) for m in (1000, 2000) for p in (["x"], ["y", "z"]) for d in (0.0, 0.1)]


def test_gc_paused_restores_the_collector_state():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
    with pytest.raises(KeyError), gc_paused():
        raise KeyError("x")
    assert gc.isenabled()


def test_sweep_point_names_use_full_keys_when_leaves_clash():
    assert run_name({"train.lr": 1, "other.lr": 2}, "x") == "train.lr=1,other.lr=2"
    assert sweep_points({}) == [{}]


def test_sweep_errors_name_the_key_and_point():
    problems, _ = problems_of({"sweep": {"model.n_heads": [1], "site.name": ["local"]}})
    assert any(
        p.startswith("sweep.model.n_heads: 'n_heads' is not a field of 'model' (its fields: n_layer, n_head,")
        for p in problems
    )
    assert any(p.startswith("sweep.site.name:") for p in problems)
    problems, _ = problems_of({"model": {"n_embd": 96}, "sweep": {"model.n_head": [4, 5, 7]}})
    assert [p.split(":")[0] for p in problems] == ["sweep point n_head=5", "sweep point n_head=7"]
    problems, _ = problems_of({"sweep": {"model.n_layer": []}})
    assert problems == ["sweep: 'model.n_layer' has no values"]


def test_yaml_syntax_error_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: [1, 2\n")
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert str(bad) in str(info.value) and "(YAML) at line" in str(info.value)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match=r"\(top level\): is a list, not a mapping of sections"):
        load_spec(bad)
    bad.write_text("42\n")
    with pytest.raises(SpecError, match=r"is a single value \(int\), not a mapping"):
        load_spec(bad)
    for empty in ("", "# only a comment\n"):
        bad.write_text(empty)
        with pytest.raises(SpecError) as info:  # not an experiment of all defaults
            load_spec(bad)
        assert str(info.value) == (
            f"Invalid experiment spec {bad} (1 problem): (file): is empty; a spec is a mapping "
            "of sections (name, data, model, ...): copy one of specs/*.yaml to start."
        )
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")


def test_yaml_cannot_construct_python_objects(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(SpecError, match="YAML"):
        load_spec(evil)
    assert not (tmp_path / "pwned").exists()


def test_missing_and_empty_corpus_are_spec_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(tmp_path / "nothing-here", tmp_path / "runs"))
    with pytest.raises(SpecError) as info:
        load_and_check(spec)
    assert "data.sources.0.path" in str(info.value) and str(spec) in str(info.value)
    with pytest.raises(SpecError, match="empty"):
        load_and_check(spec, [f"data.sources.0.path={empty}"])


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_cli_validate_bad_spec_exits_2_without_traceback(tmp_path):
    spec = write_spec(tmp_path / "bad.yaml", {"model": {"n_embd": 100, "n_head": 3, "colour": "red"}})
    r = run_cli("validate", str(spec))
    assert r.returncode == 2
    assert str(spec) in r.stderr and "model.colour: unknown field" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_validate_reports_bad_set_and_good_spec(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=3)
    spec = write_spec(tmp_path / "ok.yaml", tiny_spec(corpus, tmp_path / "runs"))
    r = run_cli("validate", str(spec), "--set", "train.max_steps=0")
    assert r.returncode == 2 and "train.max_steps" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("validate", str(spec))
    assert r.returncode == 0, r.stderr
    assert "valid, 1 run" in r.stdout


def test_cli_schema_is_json_schema_of_every_section():
    r = run_cli("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert set(schema["properties"]) >= {
        "name",
        "seed",
        "runs_root",
        "data",
        "tokenizer",
        "model",
        "train",
        "eval",
        "sweep",
        "site",
        "tracking",
    }
    assert all("description" in v for v in schema["properties"].values())


def test_typos_suggest_the_closest_field():
    problems, _ = problems_of(
        {"model": {"n_embed": 64}, "data": {"sources": [{"type": "files", "path": "x", "txt_field": "body"}]}}
    )
    assert "model.n_embed: unknown field (did you mean n_embd?)" in problems
    assert "data.sources.0.txt_field: unknown field (did you mean text_field?)" in problems
    problems, _ = problems_of({"model": {"zzz": 1}})
    assert problems == ["model.zzz: unknown field (check the spelling; `gptlab schema` lists every field)"]


def test_a_problem_every_sweep_point_has_is_reported_once():
    problems, text = problems_of({"model": {"n_embd": 96, "n_head": 5}, "sweep": {"train.lr": [1e-3, 3e-3, 1e-2]}})
    assert problems == ["model.n_head: must divide model.n_embd (n_embd=96, n_head=5)"]
    assert "(1 problem)" in text


def test_set_can_add_a_sweep_key(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\n")
    loaded = load_spec(spec, ["sweep.model.n_layer=[1, 2, 4]", "sweep.train.lr=[0.001]"])
    assert [name for name, _, _ in loaded.runs] == ["n_layer=1,lr=0.001", "n_layer=2,lr=0.001", "n_layer=4,lr=0.001"]
    assert loaded.spec.sweep.grid == {"model.n_layer": [1, 2, 4], "train.lr": [0.001]}


def test_one_run_with_overrides_is_named_after_them(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: exp\n")
    assert [r[0] for r in load_spec(spec).runs] == ["exp"]
    named = load_spec(spec, ["train.max_steps=100", "model.n_layer=2", "site.name=local", "runs_root=elsewhere"])
    assert [r[0] for r in named.runs] == ["max_steps=100,n_layer=2"]  # where it runs is not what it is
    swept = load_spec(spec, ["train.max_steps=100", "sweep.model.n_layer=[1, 2]"])
    assert [r[0] for r in swept.runs] == ["n_layer=1", "n_layer=2"]


def test_validate_knows_a_one_document_corpus_cannot_be_split_by_document(tmp_path):
    (tmp_path / "one.txt").write_text("just one file of text\n" * 200)
    tree = tiny_spec(tmp_path / "one.txt", tmp_path / "runs", data={"split": "document"})
    spec = write_spec(tmp_path / "s.yaml", tree)
    with pytest.raises(SpecError) as info:
        load_and_check(spec)
    assert info.value.problems == [
        "data.split: the corpus is one document with `split: document` (whole documents go to train or val; "
        "val_fraction 0.2); use `data.split: tail` to hold out the end of every document instead"
    ]
    load_and_check(spec, ["data.split=tail"])  # the fix it names works


def test_validate_knows_when_a_split_is_certainly_too_short_for_the_context(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=6)
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(corpus, tmp_path / "runs", data={"split": "tail"}))
    with pytest.raises(SpecError) as info:
        load_and_check(spec, ["model.block_size=4096"])
    assert [p.split(" holds")[0] for p in info.value.problems] == [
        "model.block_size: the train split",
        "model.block_size: the val split",
    ]
    assert "fewer than block_size + 1 = 4097" in info.value.problems[1]
    load_and_check(spec, ["model.block_size=32"])  # an upper bound: only what is certain is an error
