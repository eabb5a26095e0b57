"""The stage registry: one definition per stage kind (in the spirit of Marin's ``ExecutorStep``).

A :class:`StageKind` says in one place what a stage is: its version (bump it when its code changes what it
writes), the stages it reads, the slice of a run's spec its key hashes (``configure``), the settings that change
only how fast it runs (``runtime``), its body, the executor that runs it, and what it reports to MLflow. Planning,
launching, the live table, ``gptlab status``, the CLI and the benchmarks iterate over :data:`STAGES`. A body
receives exactly the config that was hashed, its runtime settings and its input directories, so a cache key
always covers what the stage reads (``tests/test_plan.py`` checks it field by field).

Adding a stage kind: one ``StageKind(...)`` in ``STAGES`` and one body function.

A key config is a Pydantic model per kind (:class:`KeyConfig`: ``TrainKey``, ``EvalKey``, ...) whose sections are
llmcore's config models; its JSON form is what the key hashes, byte for byte what the dict configs of earlier
versions hashed (``tests/test_stage_keys.py``), so stages finished by them are found again.

Bodies run on Parsl workers (a thread here, a process on a compute node elsewhere): a Parsl task carries a key
config as JSON, validated once by :func:`run_stage`, so a body receives the typed config, its runtime settings (a
dict) and its input directories, and imports nothing from Parsl or MLflow. Each runs holding its stage directory's lock
(``<stage>/.lock``, an ``flock``), as the training process does for its whole run: two submits of one spec at
once never work in one stage directory together; the second waits, then finds the stage committed.
"""

from __future__ import annotations

import copy
import hashlib
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from llmcore.config import (
    DataConfig,
    EvalConfig,
    InspectConfig,
    ModelConfig,
    Source,
    StrictModel,
    TaskConfig,
    TokenizerConfig,
    TrainConfig,
)
from llmcore.io import LOCK_FILE, atomic_write_json, file_lock, is_committed, read_json, write_commit_marker
from workflows.pretrained import Sources
from workflows.processes import halted, resume_step
from workflows.spec import ExperimentSpec

# --------------------------------------------------------------------------------------------- the types


@dataclass
class Report:
    """What a committed stage adds to its run in MLflow."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)  # (file, artifact directory)
    step: int = 0  # the step the metrics are logged at


class Facts:
    """What planning reads from disk, read once per submit however many sweep points share it."""

    def __init__(self, sources: Sources | None = None) -> None:
        self.sources = sources if sources is not None else Sources()  # where runs' initial weights come from
        self._corpus: dict[str, list[dict[str, Any]]] = {}
        self._digests: dict[tuple[str, int, int], str] = {}

    def corpus(self, spec: ExperimentSpec) -> list[dict[str, Any]]:
        """The corpus fingerprint (a row per file: path, size, mtime) of a run's data settings."""
        from llmcore.corpus import corpus_fingerprint

        key = spec.data.model_dump_json()
        if key not in self._corpus:
            self._corpus[key] = corpus_fingerprint(spec.data)
        return self._corpus[key]

    def digest(self, path: Path) -> str:
        """sha256 of a file's content (remembered per path, size and mtime within this submit)."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
            self._digests[key] = h.hexdigest()
        return self._digests[key]


Body = Callable[[Path, Any, dict[str, Path], dict[str, Any]], dict[str, Any]]  # (dir, key config, inputs, runtime)


@dataclass(frozen=True)
class StageKind:
    """One kind of stage. ``configure(spec, facts)`` gives ``{instance label: key config}`` for one run: one
    instance for most kinds (labelled with the kind's name), one per item for kinds such as benchmark tasks,
    none when the run has no such stage. A key config is an instance of ``config`` (a :class:`KeyConfig`, or a
    union of them for a kind keyed in two forms)."""

    name: str
    version: int
    inputs: tuple[str, ...]  # kinds whose directories it reads; a kind the run lacks is left out
    configure: Callable[[ExperimentSpec, Facts], dict[str, Any]]
    body: Body | None  # None: the stage is a process of its own (training), see TRAIN below
    report: Callable[[Path, dict[str, Any]], Report]
    reads: tuple[str, ...]  # the spec sections configure reads: a kind's stages are keyed once per value of these
    config: Any = field(kw_only=True)  # the type of its key configs (what configure returns, what its body gets)
    executor: str = "cpu"  # "cpu": the CPU/single-GPU executor; "train": training's executor
    runtime_fields: tuple[str, ...] = ()  # spec fields that change only its speed: passed beside the config
    describe: str = ""
    # Whether its key is part of its run's identity in MLflow (a kind that is not, such as benchmark tasks, is
    # added to a finished run instead of starting another).
    identity: bool = True
    # A stage that is a process of its own: the log it writes from its first moment (it has started once the log
    # grew since its launch), and the step a resume would continue from (its newest committed checkpoint).
    log: str | None = None
    resume: Callable[[Path], int | None] | None = None
    # What `validate` checks of a run's spec for this kind beyond the schema (files it will read): problems as
    # ``field: message``; given the run spec and where its initial weights come from.
    preflight: Callable[[ExperimentSpec, Sources], list[str]] | None = None

    @property
    def process(self) -> bool:
        """Whether its stages run as processes of their own (training) rather than as a Python body."""
        return self.body is None

    def parse(self, config: dict[str, Any]) -> Any:
        """A key config from its JSON form (``KeyConfig.key_json``: a Parsl task's argument, a ``config.json``)."""
        return _adapter(self.config).validate_python(config)

    def runtime(self, spec: ExperimentSpec) -> dict[str, Any]:
        """The runtime settings (``train.time_budget_s`` -> ``{"time_budget_s": ...}``), outside the key."""
        out = {}
        for path in self.runtime_fields:
            value: Any = spec
            for part in path.split("."):
                value = getattr(value, part)
            out[path.rsplit(".", 1)[-1]] = value
        return out


@cache
def _adapter(config: Any) -> TypeAdapter:
    return TypeAdapter(config)


#: A key in a stage's config that says where to find an input whose content is already in the key (a pretrained
#: folder's path): passed to the body, left out of the hash, so a folder that moves is the same stage.
LOCATE = "locate"
INIT_WEIGHTS = "weights"  # the init stage's weights-only checkpoint
TRAIN_CONFIG = "train.json"  # what the training process reads: the stage's config with its runtime settings
TRAIN_LOG = "train.log"  # the process's stdout and stderr, every try appended


class Result(BaseModel):
    """A committed stage's result, as its body returned it (its marker's ``result``): the fields reports read."""

    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------------------------------ the bodies


def tokenizer_body(stage_dir: Path, config: TokenizerKey, inputs: dict[str, Path], runtime: dict[str, Any]):
    from llmcore.tokenizer import import_tokenizer, train_tokenizer

    if isinstance(config, PretrainedTokenizerKey):  # import and check, instead of training
        cfg = TokenizerConfig(type="pretrained", path=config.locate.path)
        return import_tokenizer(cfg, stage_dir, config.vocab)
    cfg = config.tokenizer.model_copy(update=runtime)
    return train_tokenizer(DataConfig(sources=config.sources), cfg, stage_dir, config.seed)


class TokenizerResult(Result):
    vocab_size: int


def tokenizer_report(stage_dir: Path, result: dict[str, Any]) -> Report:
    from llmcore.tokenizer import HF_FILES, SP_MODEL

    return Report(artifacts=[(stage_dir / f, "tokenizer") for f in (SP_MODEL, *HF_FILES) if (stage_dir / f).is_file()])


def init_body(stage_dir: Path, config: InitKey, inputs: dict[str, Path], runtime: dict[str, Any]):
    """The weights a run starts from, as a weights-only checkpoint in ``<stage>/weights``: a Hugging Face folder
    converted (its names mapped, its Conv1D weights transposed, its position table cropped), or an earlier run's
    final weights."""
    from llmcore.checkpoint import load_model, save_weights
    from llmcore.hf import load_pretrained

    cfg, source = config.model, Path(config.locate.path)
    if config.init.type == "huggingface":
        model, hf = load_pretrained(source, cfg)
        vocab = hf.vocab_size
    else:
        model, meta = load_model(source)
        if cfg.block_size < model.cfg.block_size:
            model.crop_block_size(cfg.block_size)
        model.cfg, vocab = cfg, meta["vocab_size"]
    save_weights(stage_dir / INIT_WEIGHTS, model, {"source": str(source)})
    return {"params": model.num_params(), "vocab_size": vocab, "source": str(source)}


def init_report(stage_dir: Path, result: dict[str, Any]) -> Report:
    return Report({"model/init_params": result["params"]})


def shards_body(stage_dir: Path, config: ShardsKey, inputs: dict[str, Path], runtime: dict[str, Any]):
    from llmcore.shards import write_shards

    manifest = write_shards(config.data.model_copy(update=runtime), inputs["tokenizer"], stage_dir, config.seed)
    return {
        "vocab_size": manifest["vocab_size"],
        "dtype": manifest["dtype"],
        "tokens": {k: v["tokens"] for k, v in manifest["splits"].items()},
        "bytes_per_token": manifest["bytes_per_token"],
    }


class ShardsResult(Result):
    vocab_size: int
    tokens: dict[str, int]
    bytes_per_token: dict[str, float]


def shards_report(stage_dir: Path, result: dict[str, Any]) -> Report:
    return Report({"tokenizer/bytes_per_token": ShardsResult.model_validate(result).bytes_per_token["val"]})


class TrainResult(Result):
    steps: int
    params: int
    seconds: float
    stopped_early: bool = False


def train_report(stage_dir: Path, result: dict[str, Any]) -> Report:
    from llmcore.checkpoint import MODEL_FILE, latest_checkpoint

    r = TrainResult.model_validate(result)
    checkpoint = latest_checkpoint(stage_dir)
    files = [(checkpoint / MODEL_FILE, "model"), (checkpoint / "meta.json", "model")] if checkpoint else []
    return Report({"model/params": r.params}, files, r.steps)


def eval_body(stage_dir: Path, config: EvalKey, inputs: dict[str, Path], runtime: dict[str, Any]):
    from llmcore.evaluate import evaluate

    return evaluate(inputs["train"], inputs["shards"], inputs["tokenizer"], config.eval, stage_dir, config.seed,
                    runtime["device"])  # fmt: skip


class EvalResult(Result):
    val_loss: float
    val_ppl: float
    val_bpb: float
    step: int


def eval_report(stage_dir: Path, result: dict[str, Any]) -> Report:
    r = EvalResult.model_validate(result)
    metrics = {"final/val_loss": r.val_loss, "val/ppl": r.val_ppl, "val/bpb": r.val_bpb}
    return Report(metrics, [(stage_dir / "eval.json", "eval"), (stage_dir / "samples.txt", "eval")], r.step)


def task_body(stage_dir: Path, config: TaskKey, inputs: dict[str, Path], runtime: dict[str, Any]):
    """Score one benchmark task on the run's final weights; a derived task first writes its questions."""
    from llmcore.checkpoint import load_model
    from llmcore.hardware import resolve_device
    from llmcore.tasks import derived_questions, evaluate_task, read_questions, write_questions
    from llmcore.tokenizer import load_tokenizer

    cfg = config.task
    if isinstance(config, FileTaskKey):
        questions = read_questions(config.locate.path, cfg.format)
    else:
        questions = derived_questions(config.data, config.seed, cfg)
        write_questions(questions, stage_dir / f"{cfg.name}.questions.jsonl")
    device = resolve_device(runtime["device"])
    model, meta = load_model(inputs["train"], device)
    tok = load_tokenizer(inputs["tokenizer"])
    result = evaluate_task(model, tok, questions, cfg, config.seed, stage_dir, runtime["batch_size"], device)
    return {**result, "step": meta["step"]}


class TaskResult(Result):
    name: str
    metrics: dict[str, float]
    step: int


def task_report(stage_dir: Path, result: dict[str, Any]) -> Report:
    r = TaskResult.model_validate(result)
    files = [stage_dir / f"{r.name}.jsonl", stage_dir / f"{r.name}.questions.jsonl"]
    metrics = {f"task/{r.name}/{k}": v for k, v in r.metrics.items()}
    return Report(metrics, [(f, "tasks") for f in files if f.is_file()], r.step)


def inspect_body(stage_dir: Path, config: InspectKey, inputs: dict[str, Path], runtime: dict[str, Any]):
    """Look inside the final weights: attention maps, position encodings and the logit lens for each prompt, the
    loss of each token of a validation passage; one HTML report and its PNGs in the stage directory."""
    from llmcore.checkpoint import load_model
    from llmcore.hardware import resolve_device
    from llmcore.inspect import compute, passage_ids, write_report
    from llmcore.shards import TokenSplit
    from llmcore.tokenizer import load_tokenizer

    cfg = config.inspect
    model, meta = load_model(inputs["train"], resolve_device(runtime["device"]))
    tok = load_tokenizer(inputs["tokenizer"])
    passage = None
    if cfg.passage_chars:
        val = TokenSplit(inputs["shards"], "val")
        passage = passage_ids(tok, val.read(0, min(val.tokens, cfg.passage_chars)), cfg.passage_chars)
    views = compute(model.eval(), tok, cfg.prompts, passage)
    c = model.cfg
    title = f"Inside the model: {c.n_layer} layers x {c.n_head} heads, {c.pos_encoding} positions, step {meta['step']}"
    summary = write_report(model, tok, views, stage_dir, title)
    return {"step": meta["step"], "files": summary["files"], "passage": summary.get("passage")}


class InspectResult(Result):
    step: int
    files: list[str]
    passage: dict[str, float] | None = None


def inspect_report(stage_dir: Path, result: dict[str, Any]) -> Report:
    r = InspectResult.model_validate(result)
    metrics = {"inspect/passage_loss": r.passage["mean_loss"]} if r.passage else {}
    return Report(metrics, [(stage_dir / f, "inspect") for f in r.files], r.step)


# ---------------------------------------------------------------------------------- the key configs


class KeyConfig(BaseModel):
    """A stage kind's key config, typed: exactly the slice of a run's spec (and the digests of what it reads from
    disk) its stage's key hashes, which is exactly what its body receives.

    Its JSON form (:meth:`key_json`) is what the key hashes (less ``locate``), what the stage directory's
    ``config.json`` holds and what a Parsl task carries; a body gets it back validated (:meth:`StageKind.parse`),
    never as a dict. Sections are llmcore's config models, keyed in their key form (``StrictModel.key_dict``: a
    field added later is left out at its default) less the fields ``omit`` names, which an instance holds at their
    defaults (:meth:`build`), so ``parse(key_json())`` gives the same config back."""

    model_config = ConfigDict(extra="forbid")

    #: Per section: its fields outside the key (speed-only settings, or what another stage keys).
    omit: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def build(cls, **fields: Any) -> Self:
        """An instance with the fields ``omit`` names reset to their defaults in each section."""
        for name, omitted in cls.omit.items():
            fields[name] = fields[name].model_copy(update=copy.deepcopy(_defaults(type(fields[name]), omitted)))
        return cls(**fields)

    def key_json(self) -> dict[str, Any]:
        """The JSON form: sections in their key form less what ``omit`` names, the other fields as JSON."""
        sections = {n for n in type(self).model_fields if isinstance(getattr(self, n), StrictModel)}
        plain = self.model_dump(mode="json", exclude=sections)
        return {n: _without(getattr(self, n).key_dict(), *self.omit.get(n, ())) if n in sections else plain[n]
                for n in type(self).model_fields}  # fmt: skip


@cache
def _defaults(section: type[BaseModel], names: tuple[str, ...]) -> dict[str, Any]:
    """The defaults of some fields of a section (read once: pydantic inspects a default factory each time)."""
    return {n: section.model_fields[n].get_default(call_default_factory=True) for n in names}


class Locate(BaseModel):
    """Where to find an input whose content is in the key (``LOCATE``): outside the hash."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="The folder or file, absolute.")


class Digests(BaseModel):
    """Files read by a stage, keyed by their content."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="What the files are: `pretrained` (a tokenizer), `huggingface` or `run` (weights).")
    files: dict[str, str] = Field(description="File name -> sha256 of its content.")


Corpus = list[dict[str, Any]]  # the corpus fingerprint, a row per file (llmcore.corpus.corpus_fingerprint)


class TrainedTokenizerKey(KeyConfig):
    """A SentencePiece tokenizer trained on the corpus."""

    omit: ClassVar[dict[str, tuple[str, ...]]] = {"tokenizer": ("num_threads",)}
    tokenizer: TokenizerConfig = Field(description="Its training settings (num_threads: a runtime setting).")
    sources: list[Source] = Field(description="The corpus sources (data.sources, every field).")
    corpus: Corpus = Field(description="The corpus fingerprint.")
    seed: int = Field(description="The spec's seed.")


class PretrainedTokenizerKey(KeyConfig):
    """A pretrained tokenizer imported as it is: the content of its files and the vocabulary of the weights it goes
    with; where its folder is, outside the key."""

    tokenizer: Digests = Field(description="Its files (type `pretrained`).")
    vocab: int | None = Field(description="The vocabulary of the weights the run starts from; null: none.")
    locate: Locate = Field(description="Its folder or file.")


TokenizerKey = TrainedTokenizerKey | PretrainedTokenizerKey


class ShardsKey(KeyConfig):
    omit: ClassVar[dict[str, tuple[str, ...]]] = {"data": ("num_workers",)}
    data: DataConfig = Field(description="The data settings (num_workers: a runtime setting).")
    corpus: Corpus = Field(description="The corpus fingerprint.")
    seed: int = Field(description="The spec's seed.")


class InitKey(KeyConfig):
    """Pretrained weights a run starts from: their content and the architecture they are loaded into."""

    omit: ClassVar[dict[str, tuple[str, ...]]] = {"model": ("init_from", "dropout", "attention")}
    init: Digests = Field(description="The weight files (a Hugging Face folder's config.json and weights, or an "
                          "earlier checkpoint's model.safetensors and meta.json).")  # fmt: skip
    model: ModelConfig = Field(description="The architecture (resolved against the weights).")
    locate: Locate = Field(description="The folder or checkpoint.")


class TrainKey(KeyConfig):
    """What a training reads besides its inputs; with its runtime settings, the ``train.json`` its process reads
    (``llmcore.train.RunConfig``)."""

    omit: ClassVar[dict[str, tuple[str, ...]]] = {"model": ("init_from",),
                                                  "train": ("time_budget_s", "seed", "pause_at")}  # fmt: skip
    model: ModelConfig = Field(description="The architecture (init_from: the run's `init` input).")
    train: TrainConfig = Field(description="The training settings (time_budget_s, pause_at: runtime settings; "
                               "seed: the seed below).")  # fmt: skip
    seed: int = Field(description="Training's seed: train.seed, else the spec's.")


class EvalKey(KeyConfig):
    omit: ClassVar[dict[str, tuple[str, ...]]] = {"eval": ("tasks", "inspect")}
    eval: EvalConfig = Field(description="The evaluation settings (tasks and inspect: stages of their own).")
    seed: int = Field(description="The spec's seed.")


class FileTaskKey(KeyConfig):
    """A benchmark task read from a file: its settings and the file's content; where the file is, outside the key."""

    omit: ClassVar[dict[str, tuple[str, ...]]] = {"task": ("path",)}
    task: TaskConfig = Field(description="The task's settings (path: `locate`).")
    seed: int = Field(description="The spec's seed.")
    file: str = Field(description="sha256 of the task file.")
    locate: Locate = Field(description="The task file.")


class DerivedTaskKey(KeyConfig):
    """A benchmark task derived from the run's own corpus (next_line without a file)."""

    omit: ClassVar[dict[str, tuple[str, ...]]] = {"data": ("num_workers",)}
    task: TaskConfig = Field(description="The task's settings.")
    seed: int = Field(description="The spec's seed.")
    data: DataConfig = Field(description="The data settings its questions are derived from.")
    corpus: Corpus = Field(description="The corpus fingerprint.")


TaskKey = FileTaskKey | DerivedTaskKey


class InspectKey(KeyConfig):
    inspect: InspectConfig = Field(description="What to look at.")


def _without(d: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in names}


def tokenizer_config(spec: ExperimentSpec, facts: Facts) -> dict[str, TokenizerKey]:
    if spec.tokenizer.type == "pretrained":
        return {"tokenizer": pretrained_tokenizer_config(spec, facts)}
    return {"tokenizer": TrainedTokenizerKey.build(tokenizer=spec.tokenizer, sources=spec.data.sources,
                                                   corpus=facts.corpus(spec), seed=spec.seed)}  # fmt: skip


def shards_config(spec: ExperimentSpec, facts: Facts) -> dict[str, ShardsKey]:
    return {"shards": ShardsKey.build(data=spec.data, corpus=facts.corpus(spec), seed=spec.seed)}


def pretrained_tokenizer_config(spec: ExperimentSpec, facts: Facts) -> PretrainedTokenizerKey:
    """A pretrained tokenizer's key: the content of its files (a folder that moves is the same tokenizer) and the
    vocabulary of the weights it goes with; its path is where to find it, outside the key."""
    from llmcore.tokenizer import tokenizer_files

    path = Path(spec.tokenizer.path).expanduser().resolve()
    files = {f.name: facts.digest(f) for f in tokenizer_files(path)}
    vocab = facts.sources.of(spec).model.vocab_size if spec.model.init_from is not None else None
    return PretrainedTokenizerKey(tokenizer=Digests(type="pretrained", files=files), vocab=vocab,
                                  locate=Locate(path=str(path)))  # fmt: skip


def init_config(spec: ExperimentSpec, facts: Facts) -> dict[str, InitKey]:
    """Runs that start from pretrained weights: the weights' content (a Hugging Face folder's config.json and
    weight files, or the earlier checkpoint's files) and the architecture they are loaded into."""
    init = spec.model.init_from
    if init is None:
        return {}
    from llmcore.hf import CONFIG, weight_files

    source = facts.sources.of(spec)
    if source.kind == "huggingface":
        files = [source.weights / CONFIG, *weight_files(source.weights)]
    else:
        files = sorted(f for f in source.weights.iterdir() if f.name in ("model.safetensors", "meta.json"))
    digests = Digests(type=init.type, files={f.name: facts.digest(f) for f in files})
    return {"init": InitKey.build(init=digests, model=spec.model, locate=Locate(path=str(source.weights)))}


def train_seed(spec: ExperimentSpec) -> int:
    """Training's seed: ``train.seed``, else the spec's (data stages always use the spec's)."""
    return spec.train.seed if spec.train.seed is not None else spec.seed


def train_config(spec: ExperimentSpec, facts: Facts) -> dict[str, TrainKey]:
    # (the weights a run starts from are its `init` input: their content, not their path, is in the key)
    return {"train": TrainKey.build(model=spec.model, train=spec.train, seed=train_seed(spec))}


def eval_config(spec: ExperimentSpec, facts: Facts) -> dict[str, EvalKey]:
    return {"eval": EvalKey.build(eval=spec.eval, seed=spec.seed)}  # tasks and inspect: stages of their own


def inspect_config(spec: ExperimentSpec, facts: Facts) -> dict[str, InspectKey]:
    inspect = spec.eval.inspect
    return {} if inspect is None else {"inspect": InspectKey(inspect=inspect)}


def task_config(spec: ExperimentSpec, facts: Facts) -> dict[str, TaskKey]:
    """One stage per benchmark task: the task's settings and its file's content (a derived task: the corpus it is
    derived from), keyed beside the trained weights; where the file is is outside the key."""
    out: dict[str, TaskKey] = {}
    for task in spec.eval.tasks:
        if task.path is not None:
            path = Path(task.path).expanduser().resolve()
            out[f"task:{task.name}"] = FileTaskKey.build(task=task, seed=spec.seed, file=facts.digest(path),
                                                         locate=Locate(path=str(path)))  # fmt: skip
        else:
            out[f"task:{task.name}"] = DerivedTaskKey.build(task=task, seed=spec.seed, data=spec.data,
                                                            corpus=facts.corpus(spec))  # fmt: skip
    return out


# --------------------------------------------------------------------------------- preflight checks


def pretrained_problems(spec: ExperimentSpec, sources: Sources) -> list[str]:
    """A pretrained tokenizer must load, and match the vocabulary of the weights the run starts from."""
    if spec.tokenizer.type != "pretrained":
        return []
    from llmcore.config import ConfigError
    from llmcore.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(spec.tokenizer.path)
        tok.eos_id  # noqa: B018 - raises when the tokenizer knows no end-of-text token
    except ConfigError as err:
        return [str(err)]
    if spec.model.init_from is None:
        return []
    vocab = sources.of(spec).model.vocab_size
    if tok.vocab_size != vocab:
        return [f"tokenizer.path: {spec.tokenizer.path} has {tok.vocab_size} tokens, but the model's vocabulary has "
                f"{vocab}: a tokenizer and a model must match"]  # fmt: skip
    return []


def task_problems(spec: ExperimentSpec, sources: Sources) -> list[str]:
    """Every task file must read as its format (the first defect: file, line and field), with enough other
    questions for its few-shot examples."""
    from llmcore.tasks import TaskError, read_questions

    problems = []
    for i, task in enumerate(spec.eval.tasks):
        if task.path is None:
            continue
        try:
            questions = read_questions(task.path, task.format)
        except TaskError as err:
            problems.append(f"eval.tasks.{i}.path: {err}")
            continue
        if task.num_fewshot >= len(questions):
            problems.append(f"eval.tasks.{i}.num_fewshot: {task.num_fewshot} examples asked, but {task.path} has "
                            f"{len(questions)} questions (the examples never include the question scored)")  # fmt: skip
    return problems


# ------------------------------------------------------------------------------------------ the registry

TOKENIZER = StageKind(
    "tokenizer", 1, (), tokenizer_config, tokenizer_body, tokenizer_report, ("data", "tokenizer", "seed", "model"),
    config=TokenizerKey, runtime_fields=("tokenizer.num_threads",), preflight=pretrained_problems,
    describe="train a SentencePiece tokenizer on the corpus",
)  # fmt: skip
SHARDS = StageKind(
    "shards", 1, ("tokenizer",), shards_config, shards_body, shards_report, ("data", "seed"), config=ShardsKey,
    runtime_fields=("data.num_workers",), describe="encode the corpus into verified train/val token shards",
)  # fmt: skip
INIT = StageKind(
    "init", 1, (), init_config, init_body, init_report, ("model", "tracking", "runs_root"), config=InitKey,
    describe="convert the pretrained weights a run starts from (model.init_from)",
)  # fmt: skip
TRAIN = StageKind(
    "train", 1, ("shards", "init"), train_config, None, train_report, ("model", "train", "seed"), executor="train",
    config=TrainKey, runtime_fields=("train.time_budget_s",), log=TRAIN_LOG, resume=resume_step,
    describe="train the model: `python -m llmcore.train` in a process of its own, one per rank",
)  # fmt: skip
EVAL = StageKind(
    "eval", 1, ("train", "shards", "tokenizer"), eval_config, eval_body, eval_report, ("eval", "seed"), config=EvalKey,
    runtime_fields=("train.device",), describe="validation loss, perplexity, bits per byte and samples",
)  # fmt: skip

TASK = StageKind(
    "task", 1, ("train", "tokenizer"), task_config, task_body, task_report, ("eval", "seed", "data"), config=TaskKey,
    runtime_fields=("train.device", "eval.batch_size"), identity=False, preflight=task_problems,
    describe="score a multiple-choice benchmark task (eval.tasks) on the final weights, one stage per task",
)  # fmt: skip

INSPECT = StageKind(
    "inspect", 1, ("train", "shards", "tokenizer"), inspect_config, inspect_body, inspect_report, ("eval",),
    config=InspectKey, runtime_fields=("train.device",), identity=False,
    describe="attention maps, position encodings, logit lens and per-token loss (eval.inspect): an HTML report",
)  # fmt: skip

#: Every stage kind, in dependency order (a kind's inputs come before it).
STAGES: dict[str, StageKind] = {k.name: k for k in (TOKENIZER, SHARDS, INIT, TRAIN, EVAL, TASK, INSPECT)}


def kind_of(stage_dir: Path) -> StageKind:
    """The kind of a stage from its directory's name (``train-3d517b8e4424603b``)."""
    return STAGES[Path(stage_dir).name.rsplit("-", 1)[0]]


def dir_of(dirs: dict[str, Path], kind: StageKind) -> Path | None:
    """The directory of a run's stage of one kind, among its stage directories (label -> directory)."""
    return next((d for d in dirs.values() if kind_of(d) is kind), None)


# -------------------------------------------------------------------------------------- running a stage


def commit(stage_dir: Path, kind: str, started: float, result: dict[str, Any]) -> dict[str, Any]:
    """Write the stage's commit marker (last, atomically); returns it."""
    info = {"kind": kind, "seconds": round(time.time() - started, 3), "finished_at": time.time(), "result": result}
    write_commit_marker(stage_dir, info)
    return info


def prepare_stage(stage_dir: Path, config: dict[str, Any]) -> None:
    """Create the stage directory and record the exact config its key was computed from."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / "config.json", config)


def run_stage(
    kind: str, stage_dir: str, config: dict[str, Any], input_dirs: dict[str, str], runtime: dict[str, Any],
    inputs: list[Any] = (), halt: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The Parsl app of every Python stage: run ``kind``'s body in ``stage_dir`` unless the stage is already
    committed (by an earlier submit, or by another one while this one waited for the lock); returns the marker.
    ``inputs`` (Parsl's) only orders the task after the stages it reads. A stage whose submit was halted before
    it started (``halt``, see ``workflows.processes.Halt``) returns ``{"halted": True}`` without doing anything."""
    d = Path(stage_dir)
    if is_committed(d):
        return read_json(d / "DONE.json")
    if halted(halt):  # its submit was told to stop while this task waited for a worker: do nothing
        return {"halted": True}
    with file_lock(d / LOCK_FILE, f"stage {d.name}"):
        if is_committed(d):
            return read_json(d / "DONE.json")
        started = time.time()
        body = STAGES[kind].body
        assert body is not None, f"stage kind {kind} runs as a process"
        typed = STAGES[kind].parse(config)  # the JSON a Parsl task carries, validated once, here
        return commit(d, kind, started, body(d, typed, {k: Path(v) for k, v in input_dirs.items()}, runtime))


# ------------------------------------------------------------------------------------ the training process


def write_train_config(stage_dir: Path, config: dict[str, Any], runtime: dict[str, Any]) -> None:
    """Write ``train.json``: a training stage's key config in its JSON form (``TrainKey.key_json``, as planned) with
    its runtime settings in its ``train`` section; the training process validates it once, as
    ``llmcore.train.RunConfig`` (the same model, train and seed sections), at its own boundary."""
    atomic_write_json(stage_dir / TRAIN_CONFIG, {**config, "train": {**config["train"], **runtime}})


def train_command(stage_dir: str, shards_dir: str, env: dict[str, str], launcher: str = "",
                  init_dir: str | None = None, halt: str | None = None) -> str:  # fmt: skip
    """The shell command that trains one run. ``launcher`` starts the ranks: empty for one process,
    ``$PARSL_MPI_PREFIX`` under Parsl's MPIExecutor, an ``mpiexec ...`` prefix on local sites. Every
    argument is shell-quoted; only the launcher (built by gptlab, never from a spec) is left to the shell.
    ``halt``: the submit's halt file: the command does not start once it exists, and the training stops when
    it appears (``GPTLAB_HALT_FILE``)."""
    from llmcore.exitcodes import STOP_REQUESTED

    if halt:
        env = {**env, "GPTLAB_HALT_FILE": halt}
    args = [sys.executable, "-m", "llmcore.train", "--config", f"{stage_dir}/{TRAIN_CONFIG}", "--shards", shards_dir,
            "--out", stage_dir]  # fmt: skip
    if init_dir:
        args += ["--init", f"{init_dir}/{INIT_WEIGHTS}"]
    env_args = [f"{k}={v}" for k, v in sorted(env.items())]
    command = " ".join(shlex.quote(a) for a in (["env", *env_args] if env_args else []) + args)
    command = f"{launcher} {command}" if launcher else command
    return f"if [ -e {shlex.quote(halt)} ]; then exit {STOP_REQUESTED}; fi; {command}" if halt else command


def train_app(
    stage_dir: str, input_dirs: dict[str, str], env: dict[str, str], launcher: str = "",
    inputs: list[Any] = (), stdout: str | None = None, stderr: str | None = None,
    parsl_resource_specification: dict[str, Any] | None = None, halt: str | None = None,
) -> str:  # fmt: skip
    """Body of the training bash app (module level, so every executor can ship it by reference): the command
    for a training stage reading ``input_dirs`` (its kind's inputs: the shards, and the init weights if any)."""
    return train_command(stage_dir, input_dirs["shards"], env, launcher, input_dirs.get("init"), halt)


def commit_train(stage_dir: str, inputs: list[Any] = ()) -> dict[str, Any]:
    """Commit a training stage once its process exited 0 and wrote a complete summary."""
    d = Path(stage_dir)
    with file_lock(d / LOCK_FILE, f"stage {d.name}"):
        if is_committed(d):
            return read_json(d / "DONE.json")
        summary = read_json(d / "summary.json")
        if summary.get("stopped_early"):
            raise RuntimeError(
                f"training in {d} stopped after {summary['steps']} steps; submit again to resume from its checkpoint"
            )
        return commit(d, "train", time.time() - float(summary["seconds"]), summary)
