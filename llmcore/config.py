"""Typed configuration for every llmcore step.

Each section of an experiment spec is one of these models. Defaults live here and only here: code reads
fields, never ``.get(key, default)``. Rules between fields of one section live with the section (its
``problems()``, checked on validation, every problem at once); only rules between sections live in
``workflows.spec``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

#: Pydantic error type of a section whose fields break its rules; ``ctx["problems"]`` holds one
#: ``field: message`` per broken rule (``workflows.spec`` prefixes each with the section's path).
RULES_ERROR = "config_rules"


class ConfigError(ValueError):
    """A setting valid on its own that does not fit the model, data or machine it meets; the message names the
    field (``train.freeze: 'x.*' matches no parameter``). Bad input: the same on every retry."""


#: ``json_schema_extra`` of a field added after stage keys were first fixed: at its default value it is left out
#: of stage keys (``StrictModel.key_dict``), so a new setting never invalidates stages that finished before it
#: existed; set to anything else, it is part of the key like every other field.
ADDED_LATER = {"added_later": True}


class FieldError(ConfigError):
    """A problem reported against the spec field it comes from (``data.sources.0.path: ...``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # pickled to the driver from worker processes: keep both arguments
        return type(self), (self.field, self.message)


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def key_dict(self) -> dict[str, Any]:
        """The JSON form stage keys hash: every field, except fields ``ADDED_LATER`` that hold their default."""
        return _key_form(self, self.model_dump(mode="json"))


def _key_form(model: Any, dumped: Any) -> Any:
    if isinstance(model, StrictModel) and type(model).key_dict is not StrictModel.key_dict:
        return model.key_dict()  # a section with a key form of its own
    if isinstance(model, BaseModel):
        out = {}
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("added_later") and value == info.get_default(call_default_factory=True):
                continue
            out[name] = _key_form(value, dumped[name])
        return out
    if isinstance(model, list):
        return [_key_form(m, d) for m, d in zip(model, dumped)]
    return dumped


class RuledModel(StrictModel):
    """A config with rules between its fields: ``problems()`` lists what is wrong, validation raises them all."""

    def problems(self) -> list[str]:
        """Every broken rule as ``field: message``."""
        return []

    def _fill_defaults(self) -> None:
        """Resolve defaults that depend on other fields (before the rules are checked)."""

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        self._fill_defaults()
        problems = self.problems()
        if problems:
            raise PydanticCustomError(RULES_ERROR, "{summary}", {"summary": "; ".join(problems), "problems": problems})
        return self


# ----------------------------------------------------------------------------------------------- data


class FilesSource(StrictModel):
    """Text from files on disk: one file, a glob, or a directory (searched recursively)."""

    type: Literal["files"] = Field("files", description="Source kind: files on disk.")
    path: str = Field(
        ...,
        min_length=1,
        description="A file, a glob (`data/*.txt`, `**` allowed) or a directory. Relative paths are resolved "
        "against the directory the command runs in.",
    )
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto",
        description="`text`: each file is one document. `jsonl`: each line is a JSON object and one document. "
        "`parquet`: each row is one document (needs `pip install 'gptlab[hf]'`). `auto`: `jsonl` for files ending "
        "in .jsonl, `parquet` for .parquet, else `text`.",
    )
    text_field: str = Field(
        "text", min_length=1, description="Key holding the document text in JSONL records; column in parquet files."
    )
    suffixes: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".py", ".jsonl", ".json", ".rst"],
        description="File suffixes taken when `path` is a directory (a directory of parquet files: `[.parquet]`).",
    )


class PythonStdlibSource(StrictModel):
    """The running Python's own standard library source (`*.py`): a corpus every machine has, no download."""

    type: Literal["python_stdlib"] = Field("python_stdlib", description="Source kind: the stdlib's .py files.")
    max_files: int | None = Field(
        None, gt=0, description="Take at most this many files (sorted by path); null for all of them."
    )
    max_bytes: int | None = Field(
        None, gt=0, description="Stop adding files once this many UTF-8 bytes are collected; null for no limit."
    )
    include_tests: bool = Field(False, description="Include the `test/` and `*/tests/` packages.")


class HuggingFaceSource(StrictModel):
    """A dataset read with the `datasets` library (`pip install 'gptlab[hf]'`), one document per row: a folder written
    by `save_to_disk`, or whatever `datasets.load_dataset` loads (a Hub dataset, a local folder of data files)."""

    type: Literal["huggingface"] = Field("huggingface", description="Source kind: a Hugging Face dataset.")
    path: str = Field(
        ...,
        min_length=1,
        description="A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (read with "
        "`load_from_disk`); anything else goes to `datasets.load_dataset`: a Hub name (`roneneldan/TinyStories`, "
        "downloaded where the machine can reach the Hub) or a local folder of data files.",
    )
    name: str | None = Field(
        None, min_length=1, description="The dataset's configuration (`load_dataset`'s `name`); null: its default."
    )
    split: str = Field(
        "train", min_length=1, description="The split to read (a saved DatasetDict's key); a folder holding one "
        "saved Dataset is read whatever the split.",
    )  # fmt: skip
    text_field: str = Field("text", min_length=1, description="Column holding the document text (strings).")


class TaskSource(StrictModel):
    """Questions of a benchmark task as training data (supervised fine-tuning): each question becomes its prompt and
    its gold answer, rendered exactly as the task scorer reads them (``llmcore.sft``; README: Training on a task)."""

    type: Literal["task"] = Field("task", description="Source kind: the questions of a task file.")
    path: str | None = Field(
        None, min_length=1, description="The task file (relative paths: against the working directory). Omitted "
        "with format next_line: the questions are derived from the training documents of the spec's other sources.",
    )  # fmt: skip
    format: Literal["multiple_choice", "kaggle_science_exam", "hellaswag", "next_line"] = Field(
        "multiple_choice", description="The task file's format, as `eval.tasks[].format`: multiple_choice (JSONL: "
        "context, choices, answer), kaggle_science_exam (CSV: id, prompt, A-E, answer), hellaswag (HellaSwag JSONL) "
        "or next_line (JSONL as multiple_choice; the answer follows a newline).",
    )  # fmt: skip
    limit: int | None = Field(
        None, ge=1, description="Take the first N questions of the file (derived next_line: N drawn); null: all."
    )

    @model_validator(mode="after")
    def _needs_path(self) -> Any:
        if self.path is None and self.format != "next_line":
            raise PydanticCustomError("task_path", "path: format {fmt} needs a task file", {"fmt": self.format})
        return self


Source = Annotated[FilesSource | PythonStdlibSource | HuggingFaceSource | TaskSource, Field(discriminator="type")]


class DataConfig(StrictModel):
    """Where the corpus comes from and how it is split and sharded."""

    sources: list[Source] = Field(
        default_factory=lambda: [PythonStdlibSource()],
        min_length=1,
        description="Corpus sources; their documents are concatenated in order.",
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Fraction of the corpus held out for validation.")
    split: Literal["document", "tail"] = Field(
        "document",
        description="`document`: each document goes wholly to train or val (seeded, deterministic). "
        "`tail`: the last `val_fraction` of every document is validation (nanoGPT's split; use it for "
        "single-file corpora).",
    )
    token_dtype: Literal["auto", "uint16", "uint32"] = Field(
        "auto", description="Token dtype in shards; `auto` picks uint16 when the vocabulary fits, else uint32."
    )
    shard_tokens: int = Field(2**26, gt=0, description="Maximum tokens per shard file (bounded shard size).")
    num_workers: int = Field(
        0, ge=0, description="Processes that encode the corpus in parallel; 0 means one per CPU core."
    )
    mask_prompt: bool = Field(
        True, description="With task sources: the loss counts only the answer tokens of each question (as litgpt's "
        "SFTDataset); false: its prompt too. Text sources' tokens always count.", json_schema_extra=ADDED_LATER,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ tokenizer


class TokenizerConfig(RuledModel):
    """The tokenizer: a SentencePiece model trained on the corpus (the default), or a pretrained one (Hugging Face
    tokenizer files, or a SentencePiece ``tokenizer.model``) imported as it is. The training options below apply to
    ``sentencepiece`` only."""

    type: Literal["sentencepiece", "pretrained"] = Field(
        "sentencepiece", description="`sentencepiece`: train one on the corpus. `pretrained`: import the one at "
        "`path` (with `model.init_from` of type huggingface, its folder's tokenizer is the default).",
        json_schema_extra=ADDED_LATER,
    )  # fmt: skip
    path: str | None = Field(
        None, description="`pretrained`: a folder (or file) with `tokenizer.json`, `vocab.json` + `merges.txt`, or a "
        "SentencePiece `tokenizer.model`.", json_schema_extra=ADDED_LATER,
    )  # fmt: skip
    model_type: Literal["bpe", "unigram", "char", "word"] = Field("bpe", description="SentencePiece model type.")
    vocab_size: int = Field(
        4096,
        ge=8,
        le=2**31,
        description="Vocabulary size, special tokens included. For `char` it is an upper bound: the vocabulary "
        "is the characters seen (plus specials) if that is smaller.",
    )
    character_coverage: float = Field(
        1.0, gt=0.0, le=1.0, description="Fraction of characters covered by the vocabulary (0.9995 for CJK)."
    )
    byte_fallback: bool = Field(False, description="Encode unknown characters as UTF-8 byte tokens, never <unk>.")
    user_defined_symbols: list[str] = Field(
        default_factory=list, description="Extra symbols that are always single tokens."
    )
    input_sentence_size: int = Field(
        2_000_000,
        ge=0,
        description="Sample at most this many lines (shuffled) to train on, so huge corpora stay bounded in time "
        "and memory; 0 uses every line.",
    )
    max_training_bytes: int = Field(
        200_000_000, gt=0, description="Stop reading the corpus for tokenizer training after this many bytes."
    )
    num_threads: int = Field(0, ge=0, description="Trainer threads; 0 means one per CPU core.")

    def reserved(self) -> int:
        """Vocabulary entries that are not learned pieces: 4 specials, the newline and the user symbols, and
        256 byte pieces with byte_fallback."""
        symbols = len(dict.fromkeys(["\n", *self.user_defined_symbols]))
        return 4 + symbols + (256 if self.byte_fallback else 0)

    def problems(self) -> list[str]:
        if self.type == "pretrained":
            return [] if self.path else ["path: a pretrained tokenizer needs the folder or file to import"]
        if self.path is not None:
            return ["path: only a pretrained tokenizer reads one (set tokenizer.type: pretrained)"]
        if self.vocab_size <= self.reserved():
            return [
                f"vocab_size: {self.vocab_size} leaves no room for pieces: {self.reserved()} entries are reserved "
                "for special tokens, the newline, user-defined symbols and (with byte_fallback) 256 byte pieces"
            ]
        return []


# ------------------------------------------------------------------------------------------------ model


class HuggingFaceInit(StrictModel):
    """Start from a Hugging Face model folder (GPT-2 or Llama family): ``config.json`` and its weights."""

    type: Literal["huggingface"] = Field("huggingface", description="Source kind: a local Hugging Face folder.")
    path: str = Field(..., min_length=1, description="The folder (`huggingface-cli download gpt2 --local-dir DIR`).")


class RunInit(StrictModel):
    """Start from a finished gptlab run's final weights (continued pre-training, fine-tuning on another corpus)."""

    type: Literal["run"] = Field("run", description="Source kind: an earlier gptlab run.")
    run: str = Field(..., min_length=1, description="Its run name, MLflow run id, or a unique id prefix.")


InitFrom = Annotated[HuggingFaceInit | RunInit, Field(discriminator="type")]


class ModelConfig(RuledModel):
    """GPT architecture. The vocabulary size comes from the tokenizer."""

    n_layer: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block; must divide `n_embd`.")
    n_embd: int = Field(128, ge=1, description="Width of the residual stream.")
    block_size: int = Field(256, ge=1, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention, residual and embeddings.")
    bias: bool = Field(False, description="Biases in linear layers and norms (GPT-2: true; faster: false).")
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = Field(
        "learned", description="Positional encoding: learned table, fixed sinusoids, or rotary (RoPE)."
    )
    rope_theta: float = Field(10000.0, gt=0.0, description="RoPE base frequency.")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalisation in pre-norm blocks.")
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = Field(
        "gelu", description="MLP: GELU (exact, 4x), GPT-2's tanh-approximated GELU (4x), or SwiGLU (8/3x)."
    )
    attention: Literal["sdpa", "plain"] = Field(
        "sdpa",
        description="`sdpa`: torch's scaled_dot_product_attention (flash on GPU). `plain`: explicit softmax "
        "attention, for teaching; numerically the same.",
    )
    n_kv_head: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention, Llama); null: n_head (multi-head).",
        json_schema_extra=ADDED_LATER,
    )  # fmt: skip
    mlp_hidden: int | None = Field(
        None, ge=1, description="MLP hidden width (Llama's intermediate_size); null: 4 x n_embd (GELU) or 8/3 x n_embd "
        "rounded up to a multiple of 64 (SwiGLU).", json_schema_extra=ADDED_LATER,
    )  # fmt: skip
    norm_eps: float = Field(1e-5, gt=0.0, description="Epsilon of the norms.", json_schema_extra=ADDED_LATER)
    tie_embeddings: bool = Field(
        True, description="One matrix for the token embedding and the output layer (GPT-2); false: two (TinyLlama).",
        json_schema_extra=ADDED_LATER,
    )  # fmt: skip
    init_from: InitFrom | None = Field(
        None, description="Start from pretrained weights: `{type: huggingface, path: DIR}` or `{type: run, run: "
        "NAME}`. The architecture comes from them: fields set here must agree, fields left unset take theirs.",
        json_schema_extra=ADDED_LATER,
    )  # fmt: skip

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        """The MLP's hidden width."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 64 * -(-8 * self.n_embd // (3 * 64)) if self.mlp == "swiglu" else 4 * self.n_embd

    def problems(self) -> list[str]:
        p = []
        if self.n_embd % self.n_head:
            p.append(f"n_head: must divide model.n_embd (n_embd={self.n_embd}, n_head={self.n_head})")
        elif self.pos_encoding == "rope" and self.head_size % 2:
            p.append(f"pos_encoding: rope needs an even head size (n_embd/n_head = {self.head_size})")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            p.append(f"n_embd: sinusoidal encoding needs an even width (got {self.n_embd})")
        if self.n_head % self.kv_heads:
            p.append(f"n_kv_head: must divide model.n_head (n_head={self.n_head}, n_kv_head={self.kv_heads})")
        return p


# --------------------------------------------------------------------------------------------- training


#: The layers of a block LoRA may adapt, by their name within the block: q, k and v are the query, key and value
#: rows of the fused ``attn.c_attn`` projection (adapted each on its own, as litgpt's ``LoRAQKVLinear``).
LORA_LAYERS = ("attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
#: Blocks a spec's LoRA targets are checked against before the model is known (training checks the model's own).
LORA_CHECKED_BLOCKS = 256


class LoraConfig(RuledModel):
    """Low-rank adapters (Hu et al. 2021, as litgpt's ``finetune/lora.py`` and ``peft``): each adapted weight W
    (out, in) gets ``W + (alpha / r) * B @ A`` with A (r, in) and B (out, r); only A and B train, W stays fixed."""

    r: int = Field(8, ge=1, description="Rank of the adapters.")
    alpha: float = Field(16.0, gt=0.0, description="Scale: the update B @ A is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapters' input (training only).")
    targets: list[str] = Field(
        default_factory=lambda: ["attn.q", "attn.v"],
        min_length=1,
        description="Layers to adapt: glob patterns over a block's layers (`attn.q`, `attn.k`, `attn.v`: the query, "
        "key and value rows of the fused projection; `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`), matching in every "
        "block, or over full names (`blocks.0.attn.*`). Each pattern must match a layer.",
    )

    def problems(self) -> list[str]:
        names = [f"blocks.{i}.{n}" for i in range(LORA_CHECKED_BLOCKS) for n in LORA_LAYERS]  # n_layer comes later
        return [f"targets: {t!r} matches no layer (layers: {', '.join(LORA_LAYERS)}, in every block; or full names "
                f"such as blocks.0.attn.q)" for t in self.targets if not self._matches(t, names)]  # fmt: skip

    @staticmethod
    def _matches(pattern: str, names: list[str]) -> list[str]:
        """Names a pattern matches, as a full name or as a name within its block."""
        import fnmatch

        return [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.split(".", 2)[2], pattern)]

    def layers(self, model: ModelConfig, strict: bool = True) -> dict[str, tuple[int, int]]:
        """The adapted layers of a model: {full name (``blocks.3.attn.q``): (in, out)}; with `strict` a FieldError
        names a pattern that matches none of them (the memory estimate counts what matches: training refuses)."""
        D, C = model.head_size, model.n_embd
        sizes = {"attn.q": (C, model.n_head * D), "attn.k": (C, model.kv_heads * D), "attn.v": (C, model.kv_heads * D),
                 "attn.c_proj": (C, C), "mlp.c_fc": (C, model.hidden * (2 if model.mlp == "swiglu" else 1)),
                 "mlp.c_proj": (model.hidden, C)}  # fmt: skip
        every = {f"blocks.{i}.{n}": sizes[n] for i in range(model.n_layer) for n in LORA_LAYERS}
        chosen: dict[str, tuple[int, int]] = {}
        for t in self.targets:
            found = self._matches(t, list(every))
            if not found and strict:
                raise FieldError("train.lora.targets", f"{t!r} matches no layer of this {model.n_layer}-block model")
            chosen.update({n: every[n] for n in found})
        return {n: chosen[n] for n in every if n in chosen}  # in model order


class TrainConfig(RuledModel):
    """Optimisation and run-time options for training."""

    batch_size: int = Field(12, ge=1, description="Sequences per micro-batch per rank.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    max_steps: int = Field(2000, ge=1, description="Optimiser steps.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    min_lr: float = Field(1e-4, ge=0.0, description="Learning rate at the end of cosine decay.")
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear warmup steps from 0 to `lr`; null: a tenth of `max_steps`, at most 100 "
        "(so a 20-step debug run warms up for 2).",
    )
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine",
        description="After warmup: `cosine` decay to `min_lr`, or `constant` at `lr` (fine-tuning).",
        json_schema_extra=ADDED_LATER,
    )
    lr_decay_steps: int | None = Field(
        None, ge=1, description="Step at which cosine decay reaches `min_lr`; null means `max_steps`."
    )
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (applied to matrices only).")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this; 0 disables.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` uses CUDA when available.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype; `auto` is bf16 on GPUs that support it, else fp32."
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    eval_interval: int = Field(
        250, ge=1, description="Estimate validation loss every this many steps (and at the end)."
    )
    eval_batches: int = Field(20, ge=1, description="Batches per validation estimate during training.")
    log_interval: int = Field(1, ge=1, description="Write a metrics line every this many steps.")
    checkpoint_interval: int = Field(500, ge=1, description="Save a checkpoint every this many steps (and at the end).")
    nodes: int = Field(1, ge=1, description="Nodes one training run spans (multi-node needs an MPI site).")
    ranks_per_node: int = Field(
        1, ge=1, description="Training processes per node: one per GPU on GPU nodes (Polaris: 4)."
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="Save a checkpoint and stop cleanly before this many seconds; null: no limit."
    )
    pause_at: int | None = Field(
        None,
        ge=1,
        description="Stop at this step with a validation estimate and a committed checkpoint (exit 76), to be "
        "resumed later; set by successive halving (`prune.method: sha`) for each rung, not in specs. null: never.",
        json_schema_extra=ADDED_LATER,
    )
    seed: int | None = Field(
        None,
        ge=0,
        description="Seed for initialisation, batch order and dropout; null: the spec's `seed`. A "
        "seed sweep over `train.seed` shares the tokenizer and shard stages.",
        json_schema_extra=ADDED_LATER,
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Parameters kept fixed: glob patterns over parameter names (`wte.*`, `blocks.0.*`, "
        "`*.ln_*`); `gptlab plan` and the training log list the matches. Each pattern must match a parameter.",
        json_schema_extra=ADDED_LATER,
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How the ranks share the model. `ddp`: every rank holds the whole model, its gradients and "
        "AdamW state (16 bytes per parameter in fp32), gradients are all-reduced. `fsdp`: FSDP2 shards parameters, "
        "gradients and AdamW state over the ranks (each holds 1/N) and gathers each block's weights just before it "
        "runs: for models whose training state does not fit one GPU. Needs several ranks.",
        json_schema_extra=ADDED_LATER,
    )
    reshard_after_forward: bool = Field(
        True,
        description="fsdp: free each block's gathered weights after its forward pass and gather them again for "
        "backward (least memory); false keeps them until backward (one all-gather less per block, more memory).",
        json_schema_extra=ADDED_LATER,
    )
    activation_checkpointing: bool = Field(
        False,
        description="Keep only each transformer block's input and recompute its activations during backward: "
        "activation memory drops to about one block's, for about a third more compute. ddp and fsdp.",
        json_schema_extra=ADDED_LATER,
    )
    lora: LoraConfig | None = Field(
        None,
        description="Train low-rank adapters instead of the weights (`{}` for litgpt's defaults: r 8, alpha 16, "
        "dropout 0.05, targets attn.q and attn.v); needs `model.init_from`. Checkpoints hold the adapters only; "
        "the final one also holds the merged weights, which evaluation, sample and export read. null: full training.",
        json_schema_extra=ADDED_LATER,
    )

    def _fill_defaults(self) -> None:
        if self.warmup_steps is None:  # the default follows max_steps; stored as a number (it is part of the key)
            self.__dict__["warmup_steps"] = min(100, self.max_steps // 10)

    def problems(self) -> list[str]:
        p = []
        if self.min_lr > self.lr and self.lr_schedule == "cosine":  # (a constant schedule never reaches min_lr)
            p.append(f"min_lr: must be <= train.lr ({self.min_lr} > {self.lr})")
        if self.warmup_steps > self.max_steps:
            p.append(f"warmup_steps: must be <= train.max_steps ({self.warmup_steps} > {self.max_steps})")
        if self.lr_decay_steps is not None and self.lr_decay_steps < self.warmup_steps:
            p.append(f"lr_decay_steps: must be >= train.warmup_steps ({self.lr_decay_steps} < {self.warmup_steps})")
        if self.precision == "fp16" and self.device == "cpu":
            p.append("precision: fp16 needs a CUDA device (use bf16 or fp32 on cpu)")
        if self.parallelism == "fsdp":
            if self.nodes * self.ranks_per_node == 1:
                p.append(
                    "parallelism: fsdp shards the model over several ranks, but train.nodes x train.ranks_per_node "
                    "is 1 (use ddp on one rank, or more ranks)"
                )
            if self.precision == "fp16":
                p.append("parallelism: fsdp does not scale fp16 gradients over shards; use train.precision bf16")
        elif not self.reshard_after_forward:
            p.append("reshard_after_forward: applies to train.parallelism fsdp only")
        if self.lora is not None and self.freeze:
            p.append("freeze: LoRA already keeps every weight but its adapters fixed; use train.lora or train.freeze")
        return p


# ------------------------------------------------------------------------------------------- evaluation


TaskFormat = Literal["multiple_choice", "kaggle_science_exam", "hellaswag", "next_line"]
TASK_FORMATS: tuple[str, ...] = get_args(TaskFormat)


class TaskConfig(StrictModel):
    """One multiple-choice benchmark task, scored on the run's final weights by a stage of its own."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=64,
        description="The task's name in metric names: task/<name>/acc, task/<name>/acc_norm, task/<name>/map3.",
    )
    path: str | None = Field(
        None,
        min_length=1,
        description="The task file (relative paths: against the working directory). Omitted with format next_line: "
        "the questions are derived from the run's own validation documents (README: Benchmark tasks).",
    )
    format: TaskFormat = Field(
        "multiple_choice",
        description="multiple_choice (JSONL: context, choices, answer), kaggle_science_exam (CSV: id, prompt, A-E, "
        "answer), hellaswag (HellaSwag JSONL) or next_line (JSONL as multiple_choice, a newline before each choice).",
    )
    limit: int | None = Field(
        None, ge=1, description="Score the first N questions only (derived next_line tasks: N questions, default 1000)."
    )
    num_fewshot: int = Field(0, ge=0, description="Solved examples from the same file (seeded) before each question.")


class InspectConfig(StrictModel):
    """What ``eval.inspect`` looks at inside the trained model (a stage of its own, after training): attention maps,
    position encodings and the logit lens for each prompt, and the loss of each token of a validation passage."""

    prompts: list[str] = Field(
        default_factory=lambda: ["The model reads this sentence one token at a time."],
        min_length=1,
        description="Texts whose attention maps (every layer x head) and logit lens the report draws; each is cut to "
        "its last block_size tokens (short prompts give readable axes: 10 to 30 tokens).",
    )
    passage_chars: int = Field(
        2000, ge=0, description="Characters of the validation split (from its start) scored token by token, shown as "
        "coloured text; 0: none.",
    )  # fmt: skip


class EvalConfig(RuledModel):
    """Final evaluation of a trained model."""

    batches: int = Field(
        50, ge=0, description="Seeded random validation batches to average; 0 evaluates the whole split."
    )
    batch_size: int = Field(16, ge=1, description="Sequences per evaluation batch.")
    prompts: list[str] = Field(default_factory=lambda: ["\n"], description="Prompts to sample continuations for.")
    max_new_tokens: int = Field(200, ge=0, description="Tokens to sample per prompt.")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature; 0 is greedy (the most likely token).")
    top_k: int | None = Field(200, ge=1, description="Sample from the k most likely tokens; null for all.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling threshold; null disables.")
    tasks: list[TaskConfig] = Field(
        default_factory=list,
        description="Multiple-choice benchmark tasks scored on the final weights, each by a stage of its own.",
        json_schema_extra=ADDED_LATER,
    )
    inspect: InspectConfig | None = Field(
        None, description="Look inside the trained model (attention maps, position encodings, logit lens, per-token "
        "loss): an HTML report and PNGs per run, MLflow artifacts under inspect/; null: no inspect stage.",
        json_schema_extra=ADDED_LATER,
    )  # fmt: skip

    def problems(self) -> list[str]:
        problems = []
        if not self.prompts and self.max_new_tokens > 0:
            problems.append("prompts: give at least one prompt, or set eval.max_new_tokens to 0")
        names = [t.name for t in self.tasks]
        problems += [f"tasks: two tasks are named '{n}'" for n in sorted({n for n in names if names.count(n) > 1})]
        problems += [f"tasks.{i}.path: format {t.format} needs a task file" for i, t in enumerate(self.tasks)
                     if t.path is None and t.format != "next_line"]  # fmt: skip
        return problems
