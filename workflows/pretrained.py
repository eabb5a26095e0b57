"""Runs that start from pretrained weights (``model.init_from``): what their spec resolves to before planning.

The architecture comes from the weights: a Hugging Face folder's config.json, or an earlier gptlab run's final
checkpoint. Fields the spec sets must agree with it (every conflict in one error); fields it leaves unset take the
checkpoint's. The tokenizer defaults to the checkpoint's own (a pretrained tokenizer with the folder's files, or
the earlier run's tokenizer stage). Both are read here, once per distinct source, at validate time: no weights are
loaded (they are hashed into the keys by planning and converted by the ``init`` stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmcore.config import ConfigError, ModelConfig, RunInit, TokenizerConfig


@dataclass(frozen=True)
class Source:
    """Where a run's initial weights come from, resolved."""

    kind: str  # "huggingface" or "run"
    weights: Path  # a Hugging Face folder, or the earlier run's checkpoint directory
    tokenizer: Path  # what the tokenizer defaults to
    model: Any  # llmcore.hf.HFModel: the architecture, vocabulary and special ids


class Sources:
    """Where runs' initial weights come from, each resolved once per loaded spec. A Hugging Face folder is read
    from disk; an earlier run is found in the tracking store by ``find_run`` (``(ref, runs_root, uri)`` ->
    ``(checkpoint dir, tokenizer dir)``, ``workflows.query.find_run_weights``): a step of its own, given by whoever
    may open the store (``validate``, ``plan``, ``submit``, ``status``), never by loading a spec as such."""

    def __init__(self, find_run: Callable[[str, str, str | None], tuple[Path, Path]] | None = None):
        self.find_run = find_run
        self._runs: dict[tuple[str, str, str | None], Source] = {}

    def of(self, spec: Any) -> Source:
        init = spec.model.init_from
        if not isinstance(init, RunInit):
            return _hf_source(str(Path(init.path).expanduser().resolve()))
        key = (init.run, str(Path(spec.runs_root).expanduser().resolve()), spec.tracking.uri)
        if key not in self._runs:
            if self.find_run is None:
                raise ConfigError("model.init_from.run: an earlier run is found in the tracking store, which loading a "
                                  "spec does not open: load the spec with workflows.checks.load_and_check (as "
                                  "validate, plan and submit do)")  # fmt: skip
            self._runs[key] = run_source(*self.find_run(*key))
        return self._runs[key]


def resolve(spec: Any, sources: Sources) -> Any:
    """The run spec with its model resolved against its pretrained weights and its tokenizer defaulted to theirs
    (unchanged without ``model.init_from``). Raises ConfigError naming the field."""
    init = spec.model.init_from
    if init is None:
        return spec
    from llmcore.hf import merge_config

    source = sources.of(spec)
    vocab = spec.tokenizer.vocab_size if "vocab_size" in spec.tokenizer.model_fields_set else None
    model = merge_config(spec.model, source.model, tokenizer_vocab=vocab)
    tokenizer = spec.tokenizer
    if "type" not in tokenizer.model_fields_set:  # unset: the checkpoint's own tokenizer
        tokenizer = TokenizerConfig(type="pretrained", path=str(source.tokenizer))
    return spec.model_copy(update={"model": model, "tokenizer": tokenizer})


def model_vocab(spec: Any, sources: Sources) -> int:
    """A run's model vocabulary as known before any stage ran: the pretrained weights', else the configured size."""
    if spec.model.init_from is not None:
        return sources.of(spec).model.vocab_size
    return spec.tokenizer.vocab_size


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


def run_source(checkpoint: Path, tokenizer: Path) -> Source:
    """An earlier gptlab run's final checkpoint (its architecture from its meta.json) and its tokenizer stage."""
    from llmcore.checkpoint import read_meta
    from llmcore.hf import HFModel

    meta = read_meta(checkpoint)
    cfg = ModelConfig.model_validate(meta["model"])
    names = ("n_layer", "n_head", "n_embd", "n_kv_head", "block_size", "pos_encoding", "norm", "bias", "mlp",
             "mlp_hidden", "norm_eps", "rope_theta", "tie_embeddings", "attention")  # fmt: skip
    fields = {k: getattr(cfg, k) for k in names}
    model = HFModel(checkpoint, "gptlab", fields, meta["vocab_size"], cfg.dropout, None, None,
                    source=checkpoint / "meta.json")  # fmt: skip
    return Source("run", checkpoint, tokenizer, model)
