"""Hugging Face model folders, both ways: GPT-2, Llama and GPT-NeoX checkpoints in, gptlab models out.

Read with llmcore's own code (``config.json`` with the json module, weights with safetensors, or ``torch.load``
with ``weights_only=True`` for a ``pytorch_model.bin``), as nanoGPT's ``from_pretrained`` and litgpt's converters
do: an explicit name map from the foreign checkpoint to ours, transposes and concatenations spelled out, every
shape checked, nothing left over; the same map read backwards exports. ``transformers`` is never imported.

GPT-2 family (``GPT2LMHeadModel``: gpt2, gpt2-medium, distilgpt2, ...): learned positions, LayerNorm with biases,
tied embeddings, GELU (``gelu_new`` is the tanh approximation: ``mlp: gelu_tanh``), ``Conv1D`` weights stored
(in, out), so transposed. Llama family (``LlamaForCausalLM``: TinyLlama, SmolLM, ...): RoPE, RMSNorm, SwiGLU,
grouped-query attention, no biases, tied or untied embeddings; q, k, v and gate, up are separate matrices there
and one here. GPT-NeoX (``GPTNeoXForCausalLM``): what gptlab's RoPE + LayerNorm + GELU models export as, with
rotary over the whole head (``rotary_pct`` 1.0) and a sequential residual (``use_parallel_residual: false``);
its fused ``query_key_value`` holds q, k, v per head ((H, 3, D) rows) where ours holds all q, then all k, then all v
((3, H, D) rows), so the rows are permuted both ways; NeoX always has biases (zeros when ours has none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcore.config import ConfigError, ModelConfig

if TYPE_CHECKING:  # torch is imported by the functions that move tensors: reading a config.json needs none
    import torch

CONFIG = "config.json"
SAFETENSORS, BIN = "model.safetensors", "pytorch_model.bin"
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
#: What exports, and as what: the fields a model must have for each Hugging Face architecture.
EXPORTABLE = {
    "GPT2LMHeadModel": {"pos_encoding": ["learned"], "norm": ["layernorm"], "mlp": ["gelu", "gelu_tanh"]},
    "LlamaForCausalLM": {"pos_encoding": ["rope"], "norm": ["rmsnorm"], "mlp": ["swiglu"], "bias": [False]},
    "GPTNeoXForCausalLM": {"pos_encoding": ["rope"], "norm": ["layernorm"], "mlp": ["gelu", "gelu_tanh"]},
}
#: Architectures without grouped-query attention: n_kv_head must equal n_head to export as them.
MULTI_HEAD_ONLY = ("GPT2LMHeadModel", "GPTNeoXForCausalLM")
#: Fields that are training choices, not architecture: a spec may set them whatever the checkpoint says.
FREE_FIELDS = ("dropout", "attention", "init_from", "block_size")


class HFError(ConfigError):
    """A Hugging Face folder that cannot be read or written as asked; the message names the file and field."""


@dataclass(frozen=True)
class HFModel:
    """A Hugging Face model folder as far as gptlab needs it: its architecture as ModelConfig fields."""

    dir: Path
    family: str  # "gpt2", "llama" or "neox"
    fields: dict[str, Any]  # ModelConfig fields the checkpoint fixes (block_size: its largest context)
    vocab_size: int
    dropout: float
    bos_id: int | None
    eos_id: int | None
    source: Path | None = None  # the file the architecture was read from (default: dir / config.json)

    @property
    def n_positions(self) -> int:
        return self.fields["block_size"]

    @property
    def config_file(self) -> Path:
        return self.source or self.dir / CONFIG


# ---------------------------------------------------------------------------------------------- reading


def _config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not folder.is_dir():
        raise HFError(f"model.init_from.path: {folder} is not a directory (a Hugging Face model folder)")
    if not path.is_file():
        raise HFError(f"model.init_from.path: {path} is missing: a Hugging Face model folder holds config.json and "
                      "its weights (e.g. `huggingface-cli download gpt2 --local-dir DIR`)")  # fmt: skip
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFError(f"{path}: not a JSON object")
    return config


def read_model(folder: str | Path) -> HFModel:
    """The architecture of a GPT-2, Llama or GPT-NeoX folder, from its config.json alone (no weights read)."""
    folder = Path(folder).expanduser()
    c = _config(folder)
    path = folder / CONFIG
    kind = c.get("model_type")
    try:
        if kind == "gpt2":
            return _gpt2(folder, c, path)
        if kind == "llama":
            return _llama(folder, c, path)
        if kind == "gpt_neox":
            return _neox(folder, c, path)
    except KeyError as e:
        raise HFError(f"{path}: {e.args[0]}: field missing") from None
    archs = ", ".join(c.get("architectures") or []) or "none given"
    raise HFError(f"{path}: model_type {kind!r} (architectures: {archs}) is not one gptlab reads (gpt2: the GPT-2 "
                  "family; llama: the Llama family; gpt_neox: GPT-NeoX, full rotary)")  # fmt: skip


def _refuse(path: Path, problems: list[str]) -> None:
    if problems:
        raise HFError(f"{path}: " + "; ".join(problems))


def _gpt2(folder: Path, c: dict[str, Any], path: Path) -> HFModel:
    act = c.get("activation_function", "gelu_new")
    problems = []
    if act not in GPT2_ACTIVATIONS:
        problems.append(f"activation_function: {act!r} is not supported (gelu_new, gelu_pytorch_tanh, gelu)")
    if c.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx: true is not supported")
    if not c.get("scale_attn_weights", True):
        problems.append("scale_attn_weights: false is not supported")
    if c.get("add_cross_attention"):
        problems.append("add_cross_attention: true is not supported (a decoder-only model is)")
    _refuse(path, problems)
    C = c["n_embd"]
    inner = c.get("n_inner")
    fields = {
        "n_layer": c["n_layer"], "n_head": c["n_head"], "n_embd": C, "n_kv_head": None,
        "block_size": c.get("n_positions", c.get("n_ctx")), "pos_encoding": "learned", "norm": "layernorm",
        "bias": True, "mlp": GPT2_ACTIVATIONS.get(act, "gelu"), "mlp_hidden": None if inner in (None, 4 * C) else inner,
        "norm_eps": c.get("layer_norm_epsilon", 1e-5), "tie_embeddings": c.get("tie_word_embeddings", True),
    }  # fmt: skip
    if fields["block_size"] is None:
        raise HFError(f"{path}: n_positions: field missing")
    return HFModel(folder, "gpt2", fields, c["vocab_size"], c.get("resid_pdrop", 0.0), c.get("bos_token_id"),
                   c.get("eos_token_id"))  # fmt: skip


def _llama(folder: Path, c: dict[str, Any], path: Path) -> HFModel:
    C, H = c["hidden_size"], c["num_attention_heads"]
    problems = []
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act: {c['hidden_act']!r} is not supported (silu)")
    rope = c.get("rope_parameters") or {}  # transformers 5; before it: rope_theta and rope_scaling at the top
    if c.get("rope_scaling") not in (None, {}) or rope.get("rope_type", "default") != "default":
        problems.append(
            f"rope_scaling / rope_parameters: {c.get('rope_scaling') or rope} is not supported (plain RoPE)"
        )
    if c.get("attention_bias") or c.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias: biases are not supported in Llama models")
    if c.get("head_dim") not in (None, C // H):
        problems.append(f"head_dim: {c['head_dim']} differs from hidden_size / num_attention_heads ({C // H})")
    _refuse(path, problems)
    kv = c.get("num_key_value_heads") or H
    fields = {
        "n_layer": c["num_hidden_layers"], "n_head": H, "n_embd": C, "n_kv_head": None if kv == H else kv,
        "block_size": c["max_position_embeddings"], "pos_encoding": "rope", "norm": "rmsnorm", "bias": False,
        "mlp": "swiglu", "mlp_hidden": c["intermediate_size"], "norm_eps": c.get("rms_norm_eps", 1e-6),
        "rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        "tie_embeddings": c.get("tie_word_embeddings", False),
    }  # fmt: skip
    eos = c.get("eos_token_id")
    return HFModel(folder, "llama", fields, c["vocab_size"], c.get("attention_dropout", 0.0), c.get("bos_token_id"),
                   eos[0] if isinstance(eos, list) else eos)  # fmt: skip


def _neox(folder: Path, c: dict[str, Any], path: Path) -> HFModel:
    C = c["hidden_size"]
    rope = c.get("rope_parameters") or {}  # transformers 5; before it: rotary_pct and rotary_emb_base at the top
    problems = []
    act = c.get("hidden_act", "gelu")
    if act not in GPT2_ACTIVATIONS:
        problems.append(f"hidden_act: {act!r} is not supported (gelu, gelu_new, gelu_pytorch_tanh)")
    if c.get("use_parallel_residual", True):
        problems.append("use_parallel_residual: only the sequential residual (false) is supported")
    pct = rope.get("partial_rotary_factor", c.get("rotary_pct", 0.25))
    if pct != 1.0:
        problems.append(f"rotary_pct / partial_rotary_factor: {pct}; only rotary over the whole head (1.0) is read")
    if c.get("rope_scaling") not in (None, {}) or rope.get("rope_type", "default") != "default":
        problems.append(f"rope_scaling / rope_parameters: {c.get('rope_scaling') or rope}: only plain RoPE is read")
    if not c.get("attention_bias", True):
        problems.append("attention_bias: false is not supported")
    _refuse(path, problems)
    inner = c["intermediate_size"]
    fields = {
        "n_layer": c["num_hidden_layers"], "n_head": c["num_attention_heads"], "n_embd": C, "n_kv_head": None,
        "block_size": c["max_position_embeddings"], "pos_encoding": "rope", "norm": "layernorm", "bias": True,
        "mlp": GPT2_ACTIVATIONS[act], "mlp_hidden": None if inner == 4 * C else inner,
        "norm_eps": c.get("layer_norm_eps", 1e-5),
        "rope_theta": float(rope.get("rope_theta", c.get("rotary_emb_base", 10000.0))),
        "tie_embeddings": c.get("tie_word_embeddings", False),
    }  # fmt: skip
    return HFModel(folder, "neox", fields, c["vocab_size"], c.get("hidden_dropout", 0.0), c.get("bos_token_id"),
                   c.get("eos_token_id"))  # fmt: skip


def merge_config(spec: ModelConfig, hf: HFModel, tokenizer_vocab: int | None = None) -> ModelConfig:
    """The architecture a run gets: the checkpoint's; fields the spec sets must agree (every conflict listed in one
    error), fields it leaves unset take the checkpoint's. ``block_size`` may be smaller (the position table is
    cropped), not larger; ``dropout`` is a training choice (unset: the checkpoint's). ``tokenizer_vocab``: a
    ``tokenizer.vocab_size`` the spec sets, which must be the checkpoint's vocabulary too."""
    given = spec.model_fields_set
    differ = [k for k, v in hf.fields.items() if k in given and k not in FREE_FIELDS and getattr(spec, k) != v]
    conflicts = [f"model.{k}: {getattr(spec, k)!r} but {hf.config_file} has {hf.fields[k]!r}" for k in differ]
    if "block_size" in given and spec.block_size > hf.n_positions:
        conflicts.append(f"model.block_size: {spec.block_size} is beyond the checkpoint's {hf.n_positions} positions "
                         f"({hf.config_file}); at most {hf.n_positions}")  # fmt: skip
    if tokenizer_vocab is not None and tokenizer_vocab != hf.vocab_size:
        conflicts.append(f"tokenizer.vocab_size: {tokenizer_vocab} but {hf.config_file} has a vocabulary of "
                         f"{hf.vocab_size} (leave it unset: the checkpoint's tokenizer is the default)")  # fmt: skip
    if conflicts:
        raise HFError(
            f"model: the spec disagrees with the pretrained model ({len(conflicts)}): " + "; ".join(conflicts)
        )
    merged = {**spec.model_dump(exclude_unset=True), **{k: v for k, v in hf.fields.items() if k not in given}}
    merged["init_from"] = spec.init_from
    if "dropout" not in given:
        merged["dropout"] = hf.dropout
    return ModelConfig.model_validate(merged)


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a folder, in the order they are read: one safetensors or .bin file, or the shards an
    index names."""
    folder = Path(folder)
    for index in INDEXES:
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise HFError(f"{folder / index}: weight_map cannot be read ({e})") from None
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in (SAFETENSORS, BIN):
        if (folder / name).is_file():
            return [folder / name]
    raise HFError(f"model.init_from.path: {folder} has no weights ({SAFETENSORS}, {BIN} or a sharded *.index.json)")


def weights_problems(folder: str | Path) -> list[str]:
    """What is wrong with a folder's weight files, known without reading a tensor: none, a file an index names
    missing, a safetensors file whose header (an 8-byte length, then JSON) cannot be read or whose tensors end past
    the end of the file (a truncated download), a ``.bin`` that is not a readable zip archive."""
    try:
        files = weight_files(folder)
    except HFError as err:
        return [str(err)]
    problems = []
    for path in files:
        if not path.is_file():
            problems.append(f"{path}: missing (named by the folder's index)")
        elif path.suffix == ".safetensors":
            problems += _safetensors_problems(path)
        else:
            problems += _bin_problems(path)
    return problems


def _safetensors_problems(path: Path) -> list[str]:
    """A safetensors file's header: the JSON's length (8 bytes, little-endian), the JSON (name -> dtype, shape,
    data_offsets), then the data; the largest end offset must fit in the file."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                return [f"{path}: truncated or not a safetensors file ({size} bytes; its header says {n} bytes of JSON "
                        "follow the first 8)"]  # fmt: skip
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return [f"{path}: not a valid safetensors file (its header cannot be read: {e})"]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return [f"{path}: truncated: its header describes {need} bytes, the file has {size} (download it again)"]
    return []


def _bin_problems(path: Path) -> list[str]:
    """A ``pytorch_model.bin`` saved by torch 1.6 or later is a zip archive, whose directory is at its end: a
    truncated file has none. (An older pickle is only checked when loaded.)"""
    import zipfile

    try:
        with path.open("rb") as f:
            if f.read(2) != b"PK":
                return []
        with zipfile.ZipFile(path):
            return []
    except (OSError, zipfile.BadZipFile) as e:
        return [f"{path}: truncated or damaged (not a readable zip archive: {e}); download it again"]


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's weights, in fp32 on the CPU, keyed by its Hugging Face name."""
    import torch
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise HFError(f"{path}: missing (named by the folder's index)")
        if path.suffix == ".safetensors":
            try:
                part = load_file(str(path))
            except Exception as e:  # safetensors raises its own types
                raise HFError(f"{path}: not a valid safetensors file ({e})") from None
        else:
            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError for anything but plain tensors
                raise HFError(f"{path}: not plain weights: torch.load(weights_only=True) refused it ({e})") from None
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise HFError(f"{path}: not a mapping of tensor names to tensors")
        tensors.update({k: v.float() for k, v in part.items()})
    return tensors


# ---------------------------------------------------------------------------------------- the name maps
# One row per gptlab tensor: (our name, their name(s), how). "copy": the same tensor; "T": transposed (GPT-2's
# Conv1D stores (in, out)); "cat": theirs concatenated along dim 0, in order (Llama's q, k, v; gate, up).


def _gpt2_rows(cfg: ModelConfig) -> list[tuple[str, list[str], str]]:
    rows = [("wte.weight", ["wte.weight"], "copy"), ("wpe.weight", ["wpe.weight"], "copy")]
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs, how in (("ln_1", "ln_1", "copy"), ("attn.c_attn", "attn.c_attn", "T"),
                                  ("attn.c_proj", "attn.c_proj", "T"), ("ln_2", "ln_2", "copy"),
                                  ("mlp.c_fc", "mlp.c_fc", "T"), ("mlp.c_proj", "mlp.c_proj", "T")):  # fmt: skip
            rows.append((f"{b}{ours}.weight", [f"{h}{theirs}.weight"], how))
            rows.append((f"{b}{ours}.bias", [f"{h}{theirs}.bias"], "copy"))
    rows += [("ln_f.weight", ["ln_f.weight"], "copy"), ("ln_f.bias", ["ln_f.bias"], "copy")]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ["lm_head.weight"], "copy"))
    return rows


def _llama_rows(cfg: ModelConfig) -> list[tuple[str, list[str], str]]:
    rows = [("wte.weight", ["model.embed_tokens.weight"], "copy")]
    for i in range(cfg.n_layer):
        m, b = f"model.layers.{i}.", f"blocks.{i}."
        rows += [
            (f"{b}ln_1.weight", [f"{m}input_layernorm.weight"], "copy"),
            (f"{b}attn.c_attn.weight", [f"{m}self_attn.{x}_proj.weight" for x in "qkv"], "cat"),
            (f"{b}attn.c_proj.weight", [f"{m}self_attn.o_proj.weight"], "copy"),
            (f"{b}ln_2.weight", [f"{m}post_attention_layernorm.weight"], "copy"),
            (f"{b}mlp.c_fc.weight", [f"{m}mlp.gate_proj.weight", f"{m}mlp.up_proj.weight"], "cat"),
            (f"{b}mlp.c_proj.weight", [f"{m}mlp.down_proj.weight"], "copy"),
        ]
    rows.append(("ln_f.weight", ["model.norm.weight"], "copy"))
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ["lm_head.weight"], "copy"))
    return rows


def _neox_rows(cfg: ModelConfig) -> list[tuple[str, list[str], str]]:
    rows = [("wte.weight", ["gpt_neox.embed_in.weight"], "copy")]
    for i in range(cfg.n_layer):
        m, b = f"gpt_neox.layers.{i}.", f"blocks.{i}."
        for ours, theirs in (("ln_1", "input_layernorm"), ("attn.c_attn", "attention.query_key_value"),
                             ("attn.c_proj", "attention.dense"), ("ln_2", "post_attention_layernorm"),
                             ("mlp.c_fc", "mlp.dense_h_to_4h"), ("mlp.c_proj", "mlp.dense_4h_to_h")):  # fmt: skip
            how = "heads" if ours == "attn.c_attn" else "copy"  # (3, H, D) rows here, (H, 3, D) there
            rows += [(f"{b}{ours}.{p}", [f"{m}{theirs}.{p}"], how) for p in ("weight", "bias")]
    rows += [("ln_f.weight", ["gpt_neox.final_layer_norm.weight"], "copy"),
             ("ln_f.bias", ["gpt_neox.final_layer_norm.bias"], "copy")]  # fmt: skip
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ["embed_out.weight"], "copy"))  # transformers 5 renames it lm_head.weight
    return rows


def _rows(family: str, cfg: ModelConfig) -> list[tuple[str, list[str], str]]:
    return {"gpt2": _gpt2_rows, "llama": _llama_rows, "neox": _neox_rows}[family](cfg)


def _regroup_heads(t: torch.Tensor, n_head: int, to_neox: bool) -> torch.Tensor:
    """Fused q/k/v rows (weight or bias): ours (3, H, D) -> NeoX's (H, 3, D), or back."""
    first = (3, n_head) if to_neox else (n_head, 3)
    return t.reshape(*first, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


#: Tensors a checkpoint may hold that are not weights: causal-mask buffers, cached RoPE frequencies, a tied head.
DROPPED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def to_gptlab(theirs: dict[str, torch.Tensor], family: str, cfg: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    """Their state dict -> ours, every tensor accounted for."""
    import torch

    prefix = "transformer." if family == "gpt2" and any(k.startswith("transformer.") for k in theirs) else ""
    if family == "neox" and "lm_head.weight" in theirs:  # the output layer as transformers 5 names it
        theirs = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in theirs.items()}
    ours, used = {}, set()
    for name, sources, how in _rows(family, cfg):
        keys = [prefix + s if not s.startswith("lm_head") else s for s in sources]
        missing = [k for k in keys if k not in theirs]
        if missing:
            raise HFError(f"{where}: tensor {missing[0]} is missing (needed for {name})")
        parts = [theirs[k] for k in keys]
        ours[name] = parts[0].t() if how == "T" else torch.cat(parts, 0) if how == "cat" else parts[0]
        if how == "heads":
            ours[name] = _regroup_heads(parts[0], cfg.n_head, to_neox=False)
        used.update(keys)
    tied = {"lm_head.weight", "embed_out.weight"} if cfg.tie_embeddings else set()
    left = [k for k in theirs if k not in used and k not in tied and not k.endswith(DROPPED)]
    if left:
        raise HFError(f"{where}: {len(left)} tensor(s) this architecture has no place for, e.g. {left[0]}")
    return ours


def load_pretrained(folder: str | Path, cfg: ModelConfig | None = None) -> tuple[Any, HFModel]:
    """(a GPT with the folder's weights, the folder's description). ``cfg``: the run's architecture (from
    ``merge_config``; default the checkpoint's); a smaller block_size crops the position table."""
    import torch

    from llmcore.model import GPT

    hf = read_model(folder)
    cfg = cfg or merge_config(ModelConfig(), hf)
    full = cfg.model_copy(update={"block_size": hf.n_positions})
    with torch.device("meta"):
        model = GPT(full, hf.vocab_size)
    ours = to_gptlab(read_weights(folder), hf.family, full, hf.dir)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise HFError(f"{hf.dir}: {name} has shape {tuple(tensor.shape)}, the architecture in {CONFIG} needs "
                          f"{tuple(expected[name])}")  # fmt: skip
    missing = set(expected) - set(ours) - ({"lm_head.weight"} if full.tie_embeddings else set())
    missing -= {k for k in expected if k.endswith(".bias") and not full.bias}
    if missing:
        raise HFError(f"{hf.dir}: no tensor for {sorted(missing)[0]} ({len(missing)} missing)")
    model.load_state_dict(ours, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.wte.weight = model.lm_head.weight = torch.nn.Parameter(ours["wte.weight"])
    model.rebuild_buffers()
    if cfg.block_size < hf.n_positions:
        model.crop_block_size(cfg.block_size)
    model.cfg = cfg
    return model, hf


# ---------------------------------------------------------------------------------------------- exporting


def export_family(cfg: ModelConfig) -> str:
    """The Hugging Face architecture a model exports as, or an HFError naming what has no equivalent."""
    for arch, need in EXPORTABLE.items():
        if all(getattr(cfg, k) in v for k, v in need.items()) and (
            arch not in MULTI_HEAD_ONLY or cfg.kv_heads == cfg.n_head
        ):
            return arch
    wrong = {arch: [f"{k}={getattr(cfg, k)!r}" for k, v in need.items() if getattr(cfg, k) not in v]
             for arch, need in EXPORTABLE.items()}  # fmt: skip
    if cfg.kv_heads != cfg.n_head:
        for arch in MULTI_HEAD_ONLY:
            wrong[arch].append(f"n_kv_head={cfg.n_kv_head}")
    differs = "; ".join(f"as {arch}: {', '.join(w)}" for arch, w in wrong.items())
    combos = ("learned positions + layernorm + gelu or gelu_tanh -> GPT2LMHeadModel; rope + rmsnorm + swiglu "
              "without biases -> LlamaForCausalLM; rope + layernorm + gelu or gelu_tanh without grouped-query "
              "attention -> GPTNeoXForCausalLM")  # fmt: skip
    raise HFError(f"model: these fields have no Hugging Face equivalent ({differs}); what exports: {combos}")


def from_gptlab(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(their state dict, their config.json) of a GPT: the name map read backwards."""
    import torch

    cfg, V = model.cfg, model.vocab_size
    arch = export_family(cfg)
    family = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "GPTNeoXForCausalLM": "neox"}[arch]
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    theirs: dict[str, torch.Tensor] = {}
    prefix = "transformer." if family == "gpt2" else ""
    D, H, K = cfg.head_size, cfg.n_head, cfg.kv_heads
    for name, targets, how in _rows(family, cfg):
        tensor = state.get(name)
        if tensor is None:  # a bias the model does not have (bias: false): GPT-2 and NeoX have them, zeros are exact
            tensor = torch.zeros(state[name.removesuffix(".bias") + ".weight"].shape[0])
        keys = [t if t.startswith("lm_head") else prefix + t for t in targets]
        if how == "T":
            theirs[keys[0]] = tensor.t().contiguous()
        elif how == "heads":
            theirs[keys[0]] = _regroup_heads(tensor, H, to_neox=True)
        elif how == "cat":
            sizes = [H * D, K * D, K * D] if "c_attn" in name else [cfg.hidden, cfg.hidden]
            for key, part in zip(keys, torch.split(tensor, sizes, 0)):
                theirs[key] = part.contiguous()
        else:
            theirs[keys[0]] = tensor.contiguous()
    return theirs, _hf_config(arch, cfg, V)


def _hf_config(arch: str, cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    if arch == "GPT2LMHeadModel":
        return {
            "architectures": [arch], "model_type": "gpt2", "vocab_size": vocab_size, "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.mlp_hidden, "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
        }  # fmt: skip
    if arch == "GPTNeoXForCausalLM":
        rotary = {"rotary_pct": 1.0, "rotary_emb_base": cfg.rope_theta}  # transformers 4 reads these, 5 the dict
        return {
            "architectures": [arch], "model_type": "gpt_neox", "vocab_size": vocab_size, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "max_position_embeddings": cfg.block_size, "layer_norm_eps": cfg.norm_eps,
            "hidden_act": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu", "use_parallel_residual": False, **rotary,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
            "attention_bias": True, "attention_dropout": cfg.dropout, "hidden_dropout": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
        }  # fmt: skip
    return {
        "architectures": [arch], "model_type": "llama", "vocab_size": vocab_size, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5 reads this
        "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
    }  # fmt: skip


def export_model(model: Any, out_dir: str | Path, *, bos_id: int | None, eos_id: int | None) -> list[Path]:
    """Write config.json, model.safetensors and generation_config.json that transformers'
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads as this model; returns the files."""
    from safetensors.torch import save as save_safetensors

    from llmcore.io import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    theirs, config = from_gptlab(model)
    config.update(bos_token_id=bos_id, eos_token_id=eos_id)
    atomic_write_bytes(out / SAFETENSORS, save_safetensors(theirs, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG, config)
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    atomic_write_json(out / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
    return [out / SAFETENSORS, out / CONFIG, out / "generation_config.json"]
