"""Runs that start from pretrained weights (``model.init_from``): what their spec resolves to before planning.

The architecture comes from the weights: a Hugging Face folder's config.json, or an earlier gptlab run's final
checkpoint. Fields the spec sets must agree with it (every conflict in one error); fields it leaves unset take the
checkpoint's. The tokenizer defaults to the checkpoint's own (a pretrained tokenizer with the folder's files, or
the earlier run's tokenizer stage). Both are read here, once per distinct source, at validate time: no weights are
loaded (they are hashed into the keys by planning and converted by the ``init`` stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmcore.config import ConfigError, ModelConfig, RunInit, TokenizerConfig
from workflows.spec import ExperimentSpec


@dataclass(frozen=True)
class Source:
    """Where a run's initial weights come from, resolved."""

    kind: str  # "huggingface" or "run"
    weights: Path  # a Hugging Face folder, or the earlier run's checkpoint directory
    tokenizer: Path  # what the tokenizer defaults to
    model: Any  # llmcore.hf.HFModel: the architecture, vocabulary and special ids


def resolve(spec: ExperimentSpec) -> ExperimentSpec:
    """The run spec with its model resolved against its pretrained weights and its tokenizer defaulted to theirs
    (unchanged without ``model.init_from``). Raises ConfigError naming the field."""
    init = spec.model.init_from
    if init is None:
        return spec
    from llmcore.hf import merge_config

    source = source_of(spec)
    vocab = spec.tokenizer.vocab_size if "vocab_size" in spec.tokenizer.model_fields_set else None
    model = merge_config(spec.model, source.model, tokenizer_vocab=vocab)
    tokenizer = spec.tokenizer
    if "type" not in tokenizer.model_fields_set:  # unset: the checkpoint's own tokenizer
        tokenizer = TokenizerConfig(type="pretrained", path=str(source.tokenizer))
    return spec.model_copy(update={"model": model, "tokenizer": tokenizer})


def model_vocab(spec: ExperimentSpec) -> int:
    """A run's model vocabulary as known before any stage ran: the pretrained weights', else the configured size."""
    if spec.model.init_from is not None:
        return source_of(spec).model.vocab_size
    return spec.tokenizer.vocab_size


def source_of(spec: ExperimentSpec) -> Source:
    init = spec.model.init_from
    if isinstance(init, RunInit):
        return _run_source(init.run, str(Path(spec.runs_root).expanduser().resolve()), spec.tracking.uri)
    return _hf_source(str(Path(init.path).expanduser().resolve()))


@lru_cache(maxsize=64)
def _hf_source(folder: str) -> Source:
    """A Hugging Face folder: its config.json read, its weight files' headers checked (no tensor read), so a folder
    without weights or with a truncated file is refused by `validate`, not by a stage after the tokenizer ran."""
    from llmcore.hf import HFError, read_model, weights_problems

    try:
        model = read_model(folder)
    except HFError as err:
        raise HFError(_at_field(str(err))) from None
    problems = weights_problems(folder)
    if problems:
        raise HFError("; ".join(_at_field(p) for p in problems))
    return Source("huggingface", Path(folder), Path(folder), model)


def _at_field(problem: str) -> str:
    """A problem of the folder, under the spec field that names it."""
    field = "model.init_from.path: "
    return problem if problem.startswith(field) else field + problem


@lru_cache(maxsize=64)
def _run_source(ref: str, runs_root: str, uri: str | None) -> Source:
    """An earlier run of the spec's store (any experiment), found as `gptlab sample` finds one: its newest
    committed checkpoint and its tokenizer stage."""
    from llmcore.checkpoint import latest_checkpoint, read_meta
    from llmcore.hf import HFModel
    from workflows.query import open_store, stage_dirs
    from workflows.spec import SpecError

    try:
        store = open_store(None, None, Path(runs_root), uri)
        from workflows.query import find_run

        run = find_run(store, ref)
    except SpecError as err:
        raise ConfigError(f"model.init_from.run: {'; '.join(err.problems)}") from None
    dirs = stage_dirs(run, store.runs_root)
    checkpoint = latest_checkpoint(dirs["train"]) if "train" in dirs else None
    if checkpoint is None or "tokenizer" not in dirs:
        raise ConfigError(f"model.init_from.run: run {run.info.run_name} ({run.info.run_id}) has no committed "
                          "checkpoint or tokenizer on this machine")  # fmt: skip
    meta = read_meta(checkpoint)
    cfg = ModelConfig.model_validate(meta["model"])
    names = ("n_layer", "n_head", "n_embd", "n_kv_head", "block_size", "pos_encoding", "norm", "bias", "mlp",
             "mlp_hidden", "norm_eps", "rope_theta", "tie_embeddings", "attention")  # fmt: skip
    fields = {k: getattr(cfg, k) for k in names}
    model = HFModel(checkpoint, "gptlab", fields, meta["vocab_size"], cfg.dropout, None, None,
                    source=checkpoint / "meta.json")  # fmt: skip
    return Source("run", checkpoint, dirs["tokenizer"], model)
