"""Bad input, fuzzed: malformed specs and `--set` overrides through the real CLI (`gptlab submit`).

Every one must exit with code 2 and one paragraph naming each bad field, never a traceback, and never start a
stage. Invalid values are derived from the spec's own schema (types, literals, bounds, patterns), so a field
added later is fuzzed too. Corpus problems are here as well (docs/reliability.md lists what is promised).
"""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import pytest
import yaml
from helpers import make_corpus, tiny_spec, write_spec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from llmcore.config import FilesSource
from workflows.cli import app
from workflows.spec import ExperimentSpec, set_dotted

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ----------------------------------------------------------------------------- invalid values per field


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, list[Any]]]:
    out = []
    for name, f in model.model_fields.items():
        path, ann = prefix + name, f.annotation
        if path == "data.sources":
            out += _leaves(FilesSource, "data.sources.0.")
            continue
        if path == "sweep.grid":  # written flat: the grid's keys are the sweep's own keys
            continue
        out.append((path, ann, list(f.metadata)))
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, path + ".")
    return out


def invalid_values(ann: Any, metadata: list[Any]) -> list[Any]:
    """Values the field must reject: wrong types, unknown literals, out-of-bounds numbers, bad patterns."""
    if get_origin(ann) in (Union, types.UnionType):  # Optional[X]: None is valid, X's invalid values are not
        ann = next(a for a in get_args(ann) if a is not type(None))
    if get_origin(ann) is Annotated:  # a tagged union of sections (model.init_from)
        ann = get_args(ann)[0]
    origin, args = get_origin(ann), get_args(ann)
    sections = args if origin in (Union, types.UnionType) else (ann,)
    if all(isinstance(a, type) and issubclass(a, BaseModel) for a in sections):
        return [7, "text", [1, 2]]
    if origin is Literal:
        return ["zz-not-an-option", [args[0]]]
    if origin is list:
        return ["just a string", {"k": "v"}, [{"k": "v"}]]
    if origin is dict:
        return ["text", [1], {"model.n_layer": []}]
    values: list[Any] = {
        bool: ["maybe", 7, [True]],
        int: ["abc", 1.5, [1], {"a": 1}],
        float: ["fast", [1.0], {"a": 1.0}],
        str: [12, [1], {"a": 1}],
    }[ann]
    for m in metadata:
        if isinstance(m, at.Ge):
            values.append(m.ge - 1)
        elif isinstance(m, at.Gt):
            values.append(m.gt)
        elif isinstance(m, at.Lt):
            values.append(m.lt)
        elif isinstance(m, at.Le):
            values.append(m.le + 1)
        elif isinstance(m, at.MinLen) and m.min_length > 0:
            values.append("")
        elif isinstance(m, at.MaxLen):
            values.append("x" * (m.max_length + 1))
        elif getattr(m, "pattern", None):
            values.append("bad value!")
    return values


FIELDS = {path: invalid_values(ann, meta) for path, ann, meta in _leaves(ExperimentSpec)}


def test_every_field_of_the_spec_is_fuzzed():
    assert len(FIELDS) > 70 and all(FIELDS.values())
    assert {"train.lr", "model.n_head", "data.sources.0.path", "site.walltime", "sweep", "name"} <= set(FIELDS)


@st.composite
def field_errors(draw) -> list[tuple[str, Any]]:
    """1-3 (field path, invalid value) pairs on fields none of which contains another."""
    drawn = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True))
    # A bad union tag hides the other fields of that source (which model would judge them?): scope it wider.
    scope = {"data.sources.0.type": "data.sources.0"}
    paths: list[str] = []
    for p in drawn:  # keep the first of two nested paths (`model` and `model.n_layer`)
        a = scope.get(p, p)
        if not any(a.startswith(scope.get(q, q) + ".") or scope.get(q, q).startswith(a + ".") for q in paths):
            paths.append(p)
    return [(p, draw(st.sampled_from(FIELDS[p]))) for p in paths]


def named(output: str, path: str) -> bool:
    """The message names the field: its path, or (a union's tag, a model replaced whole) its parent and name."""
    parent, _, leaf = path.rpartition(".")
    return f"{path}:" in output or f"{path}." in output or (parent and f"{parent}:" in output and leaf in output)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fuzz")
    corpus = make_corpus(tmp / "corpus", n_docs=5)
    return {"tmp": tmp, "tree": tiny_spec(corpus, tmp / "runs"), "runs": tmp / "runs"}


def submit(base: dict[str, Any], tree: Any, *overrides: str, raw: bytes | None = None) -> str:
    """`gptlab submit` in-process; asserts the bad-input contract and returns the message."""
    spec = base["tmp"] / "spec.yaml"
    if raw is not None:
        spec.write_bytes(raw)
    else:
        write_spec(spec, tree)
    result = CliRunner().invoke(app, ["submit", str(spec), *(f"--set={o}" for o in overrides)])
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output and f"Invalid experiment spec {spec}" in output, output
    assert not (base["runs"] / "stages").exists(), "a stage directory was created"
    return output


def yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


# ---------------------------------------------------------------------------------------------- fuzzing


@FUZZ
@given(errors=field_errors())
def test_invalid_field_values_in_the_spec_file(base, errors):
    tree = yaml.safe_load(yaml.safe_dump(base["tree"]))
    for path, value in errors:
        set_dotted(tree, path, value)
    output = submit(base, tree)
    for path, _ in errors:
        assert named(output, path), (path, output)


@FUZZ
@given(errors=field_errors())
def test_invalid_field_values_as_overrides(base, errors):
    output = submit(base, base["tree"], *(f"{path}={yaml_value(value)}" for path, value in errors))
    for path, _ in errors:
        assert named(output, path), (path, output)


IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
SECTIONS = ["", "data.", "data.sources.0.", "tokenizer.", "model.", "train.", "eval.", "site.", "tracking."]


@FUZZ
@given(
    section=st.sampled_from(SECTIONS),
    key=IDENT,
    value=st.sampled_from([1, "x", [1], {"a": 1}, None]),
    as_override=st.booleans(),
)
def test_unknown_keys_are_named(base, section, key, value, as_override):
    assume(f"{section}{key}" not in FIELDS and key not in ("type",))
    if as_override:
        output = submit(base, base["tree"], f"{section}{key}={yaml_value(value)}")
    else:
        tree = yaml.safe_load(yaml.safe_dump(base["tree"]))
        set_dotted(tree, f"{section}{key}", value)
        output = submit(base, tree)
    assert f"{section}{key}: unknown field" in output, output


TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30)


@FUZZ
@given(
    kind=st.sampled_from(["no equals", "bad key", "bad yaml", "no such item"]), text=TEXT, index=st.integers(1, 10**6)
)
def test_malformed_overrides_are_named(base, kind, text, index):
    if kind == "no equals":
        assume("=" not in text)
        override = text
    elif kind == "bad key":
        assume(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", text.split("=")[0].strip()))
        override = f"{text.split('=')[0]}=1"
    elif kind == "bad yaml":
        override = "train.lr=" + "[{"[index % 2] + text.replace("]", "").replace("}", "")
        try:
            yaml.safe_load(override.split("=", 1)[1])
            assume(False)
        except yaml.YAMLError:
            pass
    else:
        override = f"data.sources.{index}.path=x"
    output = submit(base, base["tree"], override)
    assert f"--set {override}:" in output, output


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_garbage_spec_files(base, raw):
    try:
        tree: Any = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        tree = "unreadable"
    else:  # an empty file is the default spec (valid); a mapping of known sections may be valid too
        assume(tree is not None)
        assume(not isinstance(tree, dict) or any(k not in ExperimentSpec.model_fields for k in tree))
    output = submit(base, None, raw=raw)
    if isinstance(tree, dict):
        bad = next(k for k in tree if k not in ExperimentSpec.model_fields)
        assert str(bad) in output, output
    else:
        assert any(w in output for w in ("(file):", "(YAML)", "(top level):")), output


CROSS_FIELD = [
    ({"model.n_embd": 30, "model.n_head": 4}, "model.n_head"),
    ({"train.lr": 0.1, "train.min_lr": 1.0}, "train.min_lr"),
    ({"train.max_steps": 10, "train.warmup_steps": 100}, "train.warmup_steps"),
    ({"train.device": "cpu", "train.precision": "fp16"}, "train.precision"),
    ({"eval.prompts": [], "eval.max_new_tokens": 5}, "eval.prompts"),
    ({"data.token_dtype": "uint16", "tokenizer.vocab_size": 70000}, "data.token_dtype"),
    ({"train.nodes": 2}, "train.nodes"),
    ({"site.name": "polaris", "site.account": "YOUR_ACCOUNT"}, "site.account"),
    ({"sweep": {"model.n_heads": [1]}}, "sweep.model.n_heads"),
    ({"sweep": {"site.name": ["local"]}}, "sweep.site.name"),
    ({"sweep": {"model.n_head": [2, 3]}}, "sweep point n_head=3: model.n_head"),
    ({"data.sources.0.path": "/nonexistent/corpus.txt"}, "data.sources.0.path"),
    ({"data.sources.0.path": "/nonexistent/*.txt"}, "data.sources.0.path"),
]


@pytest.mark.parametrize("changes, field", CROSS_FIELD, ids=[f for _, f in CROSS_FIELD])
def test_cross_field_sweep_site_and_corpus_problems_are_named(base, changes, field):
    tree = yaml.safe_load(yaml.safe_dump(base["tree"]))
    for path, value in changes.items():
        set_dotted(tree, path, value)
    assert f"{field}:" in submit(base, tree)


# ---------------------------------------------------------------------------------- corpus problems


def corpus_case(tmp: Path, case: str) -> str:
    d = tmp / case
    d.mkdir()
    if case == "missing":
        return str(d / "nope.txt")
    if case == "glob matches nothing":
        return str(d / "*.txt")
    if case == "empty files":
        (d / "a.txt").write_text("")
        (d / "b.txt").write_text("")
        return str(d)
    if case == "binary file":
        make_corpus(d, n_docs=3)
        (d / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
        return str(d)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", "no such file or directory"),
        ("glob matches nothing", "matches no files"),
        ("empty files", "corpus is empty"),
        ("binary file", "image.txt is binary, not text"),
    ],
)
def test_corpus_problems_are_named_before_anything_runs(base, tmp_path, case, words):
    tree = yaml.safe_load(yaml.safe_dump(base["tree"]))
    tree["data"]["sources"][0]["path"] = corpus_case(tmp_path, case)
    output = submit(base, tree)
    assert words in output and ("data.sources.0.path:" in output or "data.sources:" in output), output


def test_non_utf8_bytes_and_one_huge_line_are_handled(tmp_path):
    """Documented handling: invalid UTF-8 (a Latin-1 file) is read with U+FFFD in place of each bad byte, and a
    corpus that is one 2 MB line with no newline trains a tokenizer and shards like any other."""
    from llmcore.config import DataConfig, TokenizerConfig
    from llmcore.corpus import check_corpus, iter_documents
    from llmcore.shards import TokenSplit, write_shards
    from llmcore.tokenizer import Tokenizer, train_tokenizer

    (tmp_path / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1"))
    line = " ".join(f"word{i % 97}" for i in range(250_000))  # about 2 MB, no newline
    (tmp_path / "huge.txt").write_text(line)
    data = DataConfig(sources=[FilesSource(path=str(tmp_path / "*.txt"))], split="tail", num_workers=1)
    assert check_corpus(data) == []
    huge, latin = list(iter_documents(data))
    assert latin == "caf\ufffd cr\ufffdme br\ufffdl\ufffde\n" and huge == line
    train_tokenizer(data, TokenizerConfig(model_type="char", vocab_size=64, num_threads=1), tmp_path / "tok", 0)
    manifest = write_shards(data, tmp_path / "tok" / "tokenizer.model", tmp_path / "shards", 0)
    assert manifest["splits"]["train"]["tokens"] > 100_000 and TokenSplit(tmp_path / "shards", "val").tokens > 0
    tok = Tokenizer.load(tmp_path / "tok" / "tokenizer.model")
    assert tok.decode(tok.encode(line[:5000])) == line[:5000]


# -------------------------------------------------------------------------------- the real command


@pytest.mark.parametrize(
    "contents, args, field",
    [
        ("model:\n  n_layr: 2\n", [], "model.n_layr: unknown field"),
        ("train:\n  lr: 1e-3\n", ["--set", "train.lr=fast"], "train.lr: Input should be a valid number"),
        ("model: {n_layer: [1, 2\n", [], "(YAML) at line"),
    ],
)
def test_real_gptlab_process_exits_2_naming_the_field(tmp_path, contents, args, field):
    spec = tmp_path / "bad.yaml"
    spec.write_text(contents + f"runs_root: {tmp_path / 'runs'}\n")
    r = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "submit", str(spec), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and field in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout and not (tmp_path / "runs").exists()
