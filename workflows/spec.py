"""The experiment spec: a YAML file validated by Pydantic, with `--set` overrides and a sweep.

Loading never runs code: YAML is read with ``yaml.safe_load`` and a spec holds only data. Every problem
found in a spec is collected and reported at once as a :class:`SpecError` naming the file and field path.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import gc
import itertools
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_serializer, model_validator

from llmcore.config import (
    ADDED_LATER,
    RULES_ERROR,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    StrictModel,
    TokenizerConfig,
    TrainConfig,
)
from site_configs.spec import SiteSpec
from workflows.pretrained import Sources, resolve
from workflows.rungs import min_trials

# Sections a sweep may not vary: they describe where and how the whole experiment runs, not a run.
UNSWEEPABLE = ("name", "runs_root", "sweep", "search", "site", "tracking")


class SpecError(Exception):
    """A spec (or override) is invalid. ``problems`` are ``field.path: message`` strings."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(str(self))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with both arguments (errors cross process boundaries)
        return type(self), (self.source, self.problems)

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"Invalid experiment spec {self.source} ({n} problem{'s' if n != 1 else ''}): "
        return head + "; ".join(self.problems) + "."


class InputError(SpecError):
    """Bad input that is not a spec: a command-line option, a run reference, a store. Same exit code (2)."""

    def __str__(self) -> str:
        return f"Bad input ({self.source}): " + "; ".join(self.problems) + "."


class TrackingSpec(StrictModel):
    """Where MLflow records the runs."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI (`http://host:5000`, `sqlite:///path.db`); null means a SQLite store "
        "at `<runs_root>/mlflow.db`.",
    )
    experiment: str | None = Field(None, description="MLflow experiment name; null means the spec's `name`.")
    log_model: bool = Field(
        True, description="Log the final weights (safetensors) as an artifact; turn off for large models."
    )
    outage_report_s: float = Field(
        120.0,
        gt=0,
        description="Seconds a tracking server may stay unreachable while trainings run before the driver reports "
        "it (in its output, and as the run tag `gptlab.tracking_outage` once the server is back). Nothing is "
        "dropped meanwhile: the metrics wait in each training's metrics.jsonl and are sent, exactly once, when "
        "the server answers again.",
    )
    outage_wait_s: float = Field(
        600.0,
        gt=0,
        description="Seconds a submit whose trainings have all ended waits for an unreachable tracking server "
        "to close their runs before it stops (exit 2, naming tracking.uri). Nothing is lost: the metrics stay in "
        "each metrics.jsonl, and submitting the spec again sends them, exactly once, and closes the runs.",
    )


class PruneSpec(StrictModel):
    """Early stopping of clearly losing trainings at rungs of ``min_steps * reduction_factor**k`` steps.

    ``asha`` (Optuna's asynchronous successive halving): each training's validation estimates
    (``train.eval_interval``) are reported as they come; a training not among the best ``1 / reduction_factor`` of
    those that reached its rung *so far* is asked to stop (it saves a resumable checkpoint) and is recorded as
    pruned. Nothing waits, but what is pruned depends on the order trainings come in.
    ``sha`` (a grid only; ``workflows.rungs``): every point trains to the rung and pauses there with a checkpoint;
    once all have reported, the best ``1 / reduction_factor`` resume to the next rung and the rest are pruned. The
    result does not depend on the order, for the cost of waiting at each rung.
    ``hyperband`` (a search only; Li et al.): the trials are shared between brackets of sha, bracket ``s`` starting
    its trials at ``max_steps * reduction_factor**-s`` steps, for s = s_max .. 0 with ``s_max =
    floor(log_reduction_factor(max_steps / min_steps))``; ``search.trials`` counts the trials of all brackets."""

    method: Literal["asha", "sha", "hyperband"] = Field(
        "asha",
        description="asha: asynchronous successive halving (Optuna); sha: synchronous, pausing at each rung (a grid); "
        "hyperband: brackets of sha over a search's trials.",
    )
    min_steps: int = Field(
        ..., ge=1, description="Steps every training runs before it can be stopped (the first rung)."
    )
    reduction_factor: int = Field(3, ge=2, description="Keep the best 1/reduction_factor at each rung.")


class SweepSpec(StrictModel):
    """A grid over dotted fields, written flat: ``{model.n_layer: [2, 4], train.lr: [1e-3, 3e-4]}``, plus two
    settings: ``replicates`` (run every point with that many training seeds) and ``prune`` (stop clearly losing
    points early)."""

    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted field -> the values it takes.")
    replicates: int = Field(
        1, ge=1, description="Training seeds per grid point (train.seed = the point's seed + 0, 1, ...); the data "
        "stages are shared. compare shows each point's mean, standard deviation and n.",
    )  # fmt: skip
    prune: PruneSpec | None = Field(
        None, description="Stop clearly losing points early (sha: each rung waits for every point; asha: it does not); "
        "null: run all.",
    )  # fmt: skip

    @field_validator("prune")
    @classmethod
    def _not_hyperband(cls, value: PruneSpec | None) -> PruneSpec | None:
        if value is not None and value.method == "hyperband":
            raise ValueError("method hyperband shares a search's trials between brackets: use it under search, and "
                             "sha (or asha) for a grid")  # fmt: skip
        return value

    @model_validator(mode="before")
    @classmethod
    def _from_flat(cls, value: Any) -> Any:
        if isinstance(value, dict) and "grid" not in value:
            settings = {k: value[k] for k in ("replicates", "prune") if k in value}
            return {"grid": {k: v for k, v in value.items() if k not in settings}, **settings}
        return value

    @field_validator("grid")
    @classmethod
    def _lists_non_empty(cls, grid: dict[str, Any]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not isinstance(values, list):
                raise ValueError(f"'{key}' must be a list of values (got {values!r})")
            if not values:
                raise ValueError(f"'{key}' has no values")
        return grid

    @model_serializer(mode="wrap")
    def _to_flat(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {**data["grid"], **{k: data[k] for k in ("replicates", "prune") if data[k] != SWEEP_DEFAULTS[k]}}

    def key_dict(self) -> dict[str, Any]:
        """The flat form (what stage keys and spec hashes of sweeps before these settings hashed)."""
        return self.model_dump(mode="json")

    def __bool__(self) -> bool:
        return bool(self.grid) or self.replicates > 1

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        return {
            "type": "object",
            "description": cls.__doc__.split("\n\n")[0].replace("\n", " "),
            "properties": {
                "replicates": {"type": "integer", "minimum": 1, "default": 1,
                               "description": cls.model_fields["replicates"].description},
                "prune": {"anyOf": [handler(PruneSpec.__pydantic_core_schema__), {"type": "null"}], "default": None,
                          "description": cls.model_fields["prune"].description},
            },
            "additionalProperties": {"type": "array", "minItems": 1, "description": "A dotted field's values."},
        }  # fmt: skip


SWEEP_DEFAULTS = {"replicates": 1, "prune": None}


class Distribution(StrictModel):
    """Where a searched field's values come from: exactly one of the four."""

    log_uniform: tuple[float, float] | None = Field(None, description="[low, high], both > 0: uniform in log space.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: uniform.")
    int_uniform: tuple[int, int] | None = Field(None, description="[low, high]: an integer, both ends included.")
    choice: list[Any] | None = Field(None, min_length=1, description="One of these values.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of log_uniform, uniform, int_uniform, choice (got {given or 'none'})")
        low_high = self.log_uniform or self.uniform or self.int_uniform
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{given[0]}: the low bound must be below the high one (got {list(low_high)})")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError(f"log_uniform: bounds must be > 0 (got {list(self.log_uniform)})")
        return self

    def values_to_check(self) -> list[Any]:
        """The values whose specs must validate: both bounds, or every choice."""
        return list(self.choice if self.choice is not None else (self.log_uniform or self.uniform or self.int_uniform))


class SearchSpec(StrictModel):
    """A search over a space of dotted fields with Optuna (ask and tell), as an alternative to a grid. Every trial
    is a normal run (its stages, its MLflow child run); the study lives in a journal file under runs_root, so a
    re-submit continues it (finished trials are not redone) and raising ``trials`` goes on."""

    method: Literal["random", "tpe"] = Field("tpe", description="Optuna's sampler: random, or TPE (Bayesian).")
    trials: int = Field(..., ge=1, description="Trials in the study, counting those earlier submits ran.")
    metric: str = Field("val/bpb", min_length=1, description="The run metric the search optimises.")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Lower or higher metric is better.")
    max_parallel: int | None = Field(
        None, ge=1, description="Trials running at once; null: as many as the site has workers."
    )
    space: dict[str, Distribution] = Field(
        ..., min_length=1, description="Dotted field -> its distribution, e.g. `train.lr: {log_uniform: [1e-4, 1e-2]}`."
    )
    prune: PruneSpec | None = Field(
        None, description="Stop clearly losing trials early (asha, or hyperband: brackets of sha); null: run all."
    )

    @field_validator("prune")
    @classmethod
    def _not_sha(cls, value: PruneSpec | None) -> PruneSpec | None:
        if value is not None and value.method == "sha":
            raise ValueError("method sha waits for every point at each rung, so it needs the whole grid up front: "
                             "use it under sweep, or hyperband (brackets of sha) or asha for a search")  # fmt: skip
        return value


class ExperimentSpec(StrictModel):
    """One experiment: a corpus, a tokenizer, a model, how to train and evaluate it, and a sweep."""

    name: str = Field(
        "experiment",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        max_length=100,
        description="Experiment name (letters, digits, `_`, `.`, `-`); the MLflow experiment by default.",
    )
    seed: int = Field(1337, ge=0, description="Seed for data splits, initialisation, batches and sampling.")
    runs_root: str = Field(
        "runs",
        min_length=1,
        description="Directory for stage outputs and the default MLflow store; relative to the working directory.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus sources, split and sharding.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="SentencePiece tokenizer.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="GPT architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and training run.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Final evaluation and samples.")
    sweep: SweepSpec = Field(
        default_factory=SweepSpec,
        description="Grid over dotted fields, e.g. `model.n_layer: [2, 4]`; one run per combination (times "
        "`replicates`); `prune` stops clearly losing points early.",
    )
    search: SearchSpec | None = Field(
        None, description="Search a space with Optuna (random or TPE) instead of a grid; null: no search.",
        json_schema_extra=ADDED_LATER,
    )  # fmt: skip
    site: SiteSpec = Field(default_factory=SiteSpec, description="Where the stages run.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow tracking target.")

    @model_validator(mode="after")
    def _search_or_grid(self) -> ExperimentSpec:
        if self.search is not None and self.sweep:
            raise ValueError("search: give a search or a sweep grid (with replicates), not both")
        prune = self.search.prune if self.search is not None else None
        if prune is not None and prune.method == "hyperband":
            self._check_hyperband(prune)
        return self

    def _check_hyperband(self, prune: PruneSpec) -> None:
        problems = []
        if "train.max_steps" in self.search.space:
            problems.append("search.space.train.max_steps: hyperband's rungs are steps of train.max_steps, so it "
                            "cannot be searched with prune.method hyperband")  # fmt: skip
        brackets = min_trials(prune.min_steps, prune.reduction_factor, self.train.max_steps)
        if self.search.trials < brackets:
            problems.append(f"search.trials: hyperband with min_steps {prune.min_steps}, reduction_factor "
                            f"{prune.reduction_factor} and train.max_steps {self.train.max_steps} has {brackets} "
                            f"brackets and needs at least one trial in each: give at least {brackets} trials "
                            f"(got {self.search.trials})")  # fmt: skip
        if problems:
            raise ValueError("; ".join(problems))


# ------------------------------------------------------------------------------------- loading helpers


def _format_loc(loc: tuple[Any, ...]) -> str:
    # Pydantic puts the union tag in the location of discriminated unions (sources.0.files.path), and the sweep's
    # grid is written flat in a spec (sweep.model.n_layer, not sweep.grid.model.n_layer): drop both.
    tags = ("files", "python_stdlib", "huggingface", "run")
    grid = [i for i, p in enumerate(loc) if p == "grid" and i and loc[i - 1] == "sweep"]
    parts = [str(p) for i, p in enumerate(loc) if not (isinstance(p, str) and p in tags) and i not in grid]
    return ".".join(parts)


def format_validation_error(err: ValidationError | list[Any], prefix: str = "") -> list[str]:
    """One ``field.path: message`` line per error (of a ValidationError, or a list of its ``errors()``), with the
    offending value where it is short."""
    lines = []
    for e in err.errors() if isinstance(err, ValidationError) else err:
        loc = _format_loc(e["loc"])
        if e["type"] == RULES_ERROR:  # a section's own rules: one line per broken rule, named by its field
            lines += [f"{prefix}{loc + '.' if loc else ''}{problem}" for problem in e["ctx"]["problems"]]
            continue
        path = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")  # a validator's own message says what is wrong
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _fields_at(e["loc"][:-1]), n=1, cutoff=0.6)
            msg = (
                f"unknown field (did you mean {close[0]}?)"
                if close
                else ("unknown field (check the spelling; `gptlab schema` lists every field)")
            )
        elif e["type"] == "missing":
            msg = "required field is missing"
        value = e.get("input")
        if e["type"] not in ("extra_forbidden", "missing") and isinstance(value, (int, float, str, bool)):
            shown = repr(value)
            if len(shown) <= 60:
                msg = f"{msg} (got {shown})"
        lines.append(f"{path}: {msg}")
    return lines


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section at ``loc`` in a spec (``("model",)`` -> ModelConfig's fields), or []."""
    candidates: list[Any] = [ExperimentSpec]  # the models the location may hold
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: the item's models are the list's
        owner = next((m for m in candidates if part in m.model_fields), None)
        if owner is not None:
            candidates = _models_in(owner.model_fields[part].annotation)
        else:  # a discriminated union's tag (sources.0.files.path) names the member
            candidates = [m for m in candidates if "type" in m.model_fields and m.model_fields["type"].default == part]
        if not candidates:
            return []
    return sorted({name for m in candidates for name in m.model_fields})


def _models_in(annotation: Any) -> list[Any]:
    """The pydantic models inside an annotation (``list[A | B]``, ``X | None``, ``Annotated[...]``)."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` -> (key path, YAML-parsed value). Raises ValueError with a reason."""
    if "=" not in text:
        raise ValueError("expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise ValueError(f"'{key}' is not a dotted field path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"value is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][0][c] = value`` for ``key = 'a.b.0.c'``, creating missing mappings."""
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"'{'.'.join(parts[:i])}' has no item {part}")
            idx: Any = int(part)
        elif isinstance(node, dict):
            idx = part
            if not last and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
        else:
            raise ValueError(f"'{'.'.join(parts[:i])}' is not a section")
        if last:
            node[idx] = value
        else:
            node = node[idx]


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Read YAML safely; any read or syntax problem is a SpecError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), ["(file): no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"(file): cannot be read ({exc.__class__.__name__}: {exc})"]) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise SpecError(str(path), [f"(YAML){where}: {problem}"]) from None
    if tree is None:
        raise SpecError(
            str(path),
            [
                "(file): is empty; a spec is a mapping of sections (name, data, model, ...): "
                "copy one of specs/*.yaml to start"
            ],
        )
    if not isinstance(tree, dict):
        kind = "a list" if isinstance(tree, list) else f"a single value ({type(tree).__name__})"
        raise SpecError(str(path), [f"(top level): is {kind}, not a mapping of sections (name, data, model, ...)"])
    return tree


# ------------------------------------------------------------------------------------ cross-field checks


CHECKED_SECTIONS = ("tokenizer", "data")


def cross_field_problems(spec: ExperimentSpec, prefix: str = "") -> list[str]:
    """Rules between sections (a section's own rules are checked by its model). Returns every problem."""
    return _cross_field({name: getattr(spec, name) for name in CHECKED_SECTIONS}, prefix)


def _cross_field(sections: dict[str, Any], prefix: str = "") -> list[str]:
    """The rules between sections over whichever sections are given (a rule needing a missing one is skipped)."""
    p: list[str] = []
    tok, d = (sections.get(name) for name in CHECKED_SECTIONS)
    if d is not None and tok is not None and d.token_dtype == "uint16" and tok.vocab_size > 2**16:
        p.append(f"{prefix}data.token_dtype: uint16 holds at most 65536 tokens (tokenizer.vocab_size={tok.vocab_size})")
    return p


def _valid_section_problems(tree: dict[str, Any]) -> list[str]:
    """For a spec that failed schema validation: the problems between sections that are valid on their own, so
    that every problem is reported at once. Sections a sweep changes are left to the per-point check (a sweep
    may fix the base value)."""
    sweep = tree.get("sweep") or {}
    if not isinstance(sweep, dict):
        return []
    sections = {}
    for name in CHECKED_SECTIONS:
        if _swept(name, sweep):
            continue
        try:
            sections[name] = ExperimentSpec.model_fields[name].annotation.model_validate(tree.get(name) or {})
        except ValidationError:
            continue
    return _cross_field(sections)


def _swept(section: str, sweep: dict[str, Any]) -> bool:
    return any(str(k) == section or str(k).startswith(section + ".") for k in sweep)


# ------------------------------------------------------------------------------------- sweep expansion


def sweep_points(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the sweep in key order: [{key: value, ...}, ...] (one empty point if no sweep)."""
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return re.sub(r"\s+", "", str(value))
    return str(value)


def run_name(point: dict[str, Any], default: str) -> str:
    """`n_layer=4,lr=0.0003`: the last path component of each key, or the full key where they clash."""
    if not point:
        return default
    leaves = [k.rsplit(".", 1)[-1] for k in point]
    names = [leaf if leaves.count(leaf) == 1 else key for leaf, key in zip(leaves, point)]
    return ",".join(f"{n}={_short(v)}" for n, v in zip(names, point.values()))


def _known_path(key: str) -> str | None:
    """Why a sweep key does not name a spec field, or None when it does."""
    top = key.split(".")[0]
    if top in UNSWEEPABLE:
        return f"'{top}' describes the whole experiment and cannot be swept"
    model: Any = ExperimentSpec
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return None  # inside a list or free-form value: validation of the run spec decides
        if part not in fields:
            where = f"'{'.'.join(parts[:i])}'" if i else "a spec"
            return f"'{part}' is not a field of {where} (its fields: {', '.join(fields)})"
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
        if model is None:
            return None
    return None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many long-lived objects (the run specs of a large
    sweep, their stages): they form no reference cycles, and the collector would rescan everything built so far
    again and again (most of the time of expanding 10,000 points). Reference counting still frees memory."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _copy_path(tree: dict[str, Any], key: str) -> dict[str, Any]:
    """A shallow copy of ``tree`` whose containers on the dotted path ``key`` are copied too, so that
    ``set_dotted(copy, key, value)`` leaves ``tree`` unchanged. Everything off the path is shared: one sweep
    point costs a few small copies instead of a deep copy of the whole spec (and of the sweep's value lists)."""
    root = dict(tree)
    node: Any = root
    for part in key.split(".")[:-1]:
        if isinstance(node, dict) and isinstance(node.get(part), (dict, list)):
            idx: Any = part
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            idx = int(part)
            if not isinstance(node[idx], (dict, list)):
                break
        else:
            break  # set_dotted creates (or rejects) the rest of the path
        node[idx] = copy.copy(node[idx])
        node = node[idx]
    return root


def expand(
    tree: dict[str, Any], sweep: SweepSpec, experiment: str, source: str, sources: Sources
) -> list[tuple[str, dict[str, Any], ExperimentSpec]]:
    """One (run name, swept values, run spec) per sweep point (times ``sweep.replicates``, each with its own
    ``train.seed``); every invalid point is reported at once (a problem every point has, once, without naming the
    points)."""
    problems = [f"sweep.{k}: {why}" for k in sweep.grid if (why := _known_path(k))]
    if problems:
        raise SpecError(source, problems)
    runs = []
    per_point: list[tuple[str, dict[str, Any]]] = []  # (point name, its problems without the point's name)
    base = copy.deepcopy({k: v for k, v in tree.items() if k != "sweep"})
    points = sweep_points(sweep.grid)
    with gc_paused():
        for point in points:
            run_tree = base
            for key, value in point.items():
                run_tree = _copy_path(run_tree, key)
                set_dotted(run_tree, key, value)
            name = run_name(point, experiment)
            try:
                run_spec = resolve_pretrained(ExperimentSpec.model_validate(run_tree), sources)
            except ValidationError as err:
                per_point.append((name, format_validation_error(err)))
                continue
            except ConfigError as err:  # the pretrained weights the run starts from
                per_point.append((name, [str(err)]))
                continue
            if found := cross_field_problems(run_spec):
                per_point.append((name, found))
            runs += _replicates(name, point, run_spec, sweep.replicates)
    if per_point:
        raise SpecError(source, _merge_point_problems(per_point, n_points=len(points)))
    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise SpecError(source, ["sweep: two sweep points have the same values (a value is listed twice)"])
    return runs


def resolve_pretrained(spec: ExperimentSpec, sources: Sources) -> ExperimentSpec:
    """A run starting from pretrained weights: its architecture and tokenizer from them (workflows.pretrained)."""
    return resolve(spec, sources) if spec.model.init_from is not None else spec


REPLICATE_KEY = "train.seed"


def _replicates(
    name: str, point: dict[str, Any], spec: ExperimentSpec, n: int
) -> list[tuple[str, dict[str, Any], ExperimentSpec]]:
    """The point itself (n = 1), or n copies with training seeds seed, seed + 1, ... (named ``...,seed=S``)."""
    if n == 1:
        return [(name, point, spec)]
    first = spec.train.seed if spec.train.seed is not None else spec.seed
    out = []
    for r in range(n):
        seed = first + r
        train = spec.train.model_copy(update={"seed": seed})
        rep = {**point, REPLICATE_KEY: seed}
        out.append(
            (run_name(rep, spec.name) if point else f"seed={seed}", rep, spec.model_copy(update={"train": train}))
        )
    return out


def swept_keys(spec: ExperimentSpec) -> list[str]:
    """The dotted fields that tell a spec's runs apart: the grid's keys, the training seed of replicates, the
    search's space."""
    if spec.search is not None:
        return list(spec.search.space)
    return list(spec.sweep.grid) + ([REPLICATE_KEY] if spec.sweep.replicates > 1 else [])


def replicate_keys(spec: ExperimentSpec) -> list[str]:
    """The swept fields that only repeat a point with another seed: replicates, or a grid over a seed."""
    return [k for k in swept_keys(spec) if k in ("seed", REPLICATE_KEY)]


def _merge_point_problems(per_point: list[tuple[str, list[str]]], n_points: int) -> list[str]:
    """Each problem once: without a point's name when every point has it, else once per point that has it."""
    counts: dict[str, int] = {}
    for _, found in per_point:
        for problem in dict.fromkeys(found):
            counts[problem] = counts.get(problem, 0) + 1
    shared = [problem for problem, n in counts.items() if n == n_points]
    own = [f"sweep point {name}: {problem}" for name, found in per_point for problem in found if problem not in shared]
    return list(dict.fromkeys(shared + own))


# ------------------------------------------------------------------------------------------- loading


class LoadedSpec:
    """A validated spec with its source, the overrides applied, and its expanded runs."""

    def __init__(self, source: str, tree: dict[str, Any], spec: ExperimentSpec | None, overrides: list[str],
                 sources: Sources | None = None):  # fmt: skip
        """``spec`` None: the base spec breaks a rule that every sweep point overrides; the first point (with the
        sweep) stands for the experiment. ``sources``: how runs' initial weights are found (Hugging Face folders
        only, unless the caller may open the store: ``workflows.checks.load_and_check``)."""
        self.source = source
        self.sources = sources if sources is not None else Sources()
        self.tree = tree
        self.overrides = overrides
        sweep = spec.sweep if spec is not None else SweepSpec.model_validate(tree["sweep"])
        name = spec.name if spec is not None else tree.get("name", ExperimentSpec.model_fields["name"].default)
        self.runs = expand(tree, sweep, name, source, self.sources)
        self.spec = spec if spec is not None else self.runs[0][2].model_copy(update={"sweep": sweep})
        changed = _changed_by(overrides)
        if not sweep and changed:  # one run with --set values: named after what they change, as a sweep point is
            self.runs = [(run_name(changed, name), {}, self.runs[0][2])]
        self.base = self.runs[0][2]  # the spec every trial of a search starts from
        if self.spec.search is not None:
            problems = search_problems(self)
            if problems:
                raise SpecError(source, problems)
            self.runs = []  # a search's runs come from its study, trial by trial

    def trial(self, number: int, values: dict[str, Any]) -> tuple[str, dict[str, Any], ExperimentSpec]:
        """(run name, values, run spec) of a search's trial; SpecError when the values break a rule of the spec."""
        run_tree = copy.deepcopy({k: v for k, v in self.tree.items() if k not in ("sweep", "search")})
        for key, value in values.items():
            set_dotted(run_tree, key, value)
        try:
            spec = resolve_pretrained(ExperimentSpec.model_validate(run_tree), self.sources)
        except ValidationError as err:
            raise SpecError(self.source, format_validation_error(err)) from None
        except ConfigError as err:
            raise SpecError(self.source, [str(err)]) from None
        if found := cross_field_problems(spec):
            raise SpecError(self.source, found)
        return f"trial={number}", dict(values), spec


#: The run metrics a search can optimise, besides the benchmark tasks' (``task/<name>/acc`` ...).
FINAL_METRICS = ("val/bpb", "final/val_loss", "val/ppl")


def search_problems(loaded: LoadedSpec) -> list[str]:
    """A search's fields must name spec fields outside the experiment-wide sections, its values must make valid
    specs (both bounds, every choice), and its metric must be one its runs report."""
    search = loaded.spec.search
    problems = [f"search.space.{k}: {why}" for k in search.space if (why := _known_path(k))]
    if problems:
        return problems
    for key, d in search.space.items():
        for value in d.values_to_check():
            try:
                loaded.trial(0, {key: value})
            except SpecError as err:
                problems.append(
                    f"search.space.{key}: the value {value!r} makes an invalid spec ({'; '.join(err.problems)})"
                )
            if d.choice is not None and not (value is None or isinstance(value, (bool, int, float, str))):
                problems.append(f"search.space.{key}.choice: {value!r} is not a number, string or boolean")
    tasks = loaded.base.eval.tasks
    known = [*FINAL_METRICS, *(f"task/{t.name}/{m}" for t in tasks for m in ("acc", "acc_norm", "map3"))]
    if search.metric not in known:
        problems.append(f"search.metric: runs of this spec report no metric {search.metric!r} (they report: "
                        f"{', '.join(known)})")  # fmt: skip
    return problems


def _changed_by(overrides: list[str]) -> dict[str, Any]:
    """{key: value} of the overrides that change what a run computes (not where it runs or is tracked)."""
    changed = {}
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ValueError:
            continue
        if key.split(".")[0] not in UNSWEEPABLE:
            changed[key] = value
    return changed


def load_spec(path: str | Path, overrides: list[str] | None = None, sources: Sources | None = None) -> LoadedSpec:
    """Read, override, validate and expand a spec file (no store, no network: an ``init_from`` run is found by
    ``sources``, see ``workflows.pretrained.Sources``). Raises SpecError listing every problem."""
    overrides = list(overrides or [])
    tree = read_spec_file(path)
    return load_spec_tree(tree, str(path), overrides, sources)


def load_spec_tree(tree: dict[str, Any], source: str, overrides: list[str] | None = None,
                   sources: Sources | None = None) -> LoadedSpec:  # fmt: skip
    overrides = list(overrides or [])
    tree = copy.deepcopy(tree)
    problems = []
    for text in overrides:
        try:
            key, value = parse_override(text)
            if key.startswith("sweep.") and len(key) > 6:  # a sweep's keys are dotted paths themselves
                if not isinstance(tree.get("sweep"), dict):
                    tree["sweep"] = {}
                tree["sweep"][key[len("sweep.") :]] = value
            else:
                set_dotted(tree, key, value)
        except ValueError as exc:
            problems.append(f"--set {text}: {exc}")
    try:
        spec = ExperimentSpec.model_validate(tree)
    except ValidationError as err:
        # A section the sweep changes may break its rules in the base: each point is checked on its own in expand()
        sweep = tree.get("sweep") if isinstance(tree.get("sweep"), dict) else {}
        errors = [
            e for e in err.errors() if not (e["type"] == RULES_ERROR and e["loc"] and _swept(str(e["loc"][0]), sweep))
        ]
        if problems or errors:
            raise SpecError(
                source, problems + format_validation_error(errors) + _valid_section_problems(tree)
            ) from None
        spec = None
    if problems:
        raise SpecError(source, problems)
    # Cross-field checks run per sweep point in expand(): a sweep may override the base values.
    return LoadedSpec(source, tree, spec, overrides, sources)


def json_schema() -> dict[str, Any]:
    return ExperimentSpec.model_json_schema()
