"""LoRA: low-rank adapters on a GPT's linear layers (Hu et al. 2021; litgpt's ``lora.py``, ``peft``'s LoRA layer).

An adapted layer computes ``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with W (out, in) fixed and only
A (r, in) and B (out, r) trained; B starts at zero, so training starts from the base model exactly. The fused
q/k/v projection ``attn.c_attn`` is adapted slice by slice (as litgpt's ``LoRAQKVLinear``): each of ``attn.q``,
``attn.k``, ``attn.v`` named in ``train.lora.targets`` gets its own A and B, adding to its rows of the output only.

Names: ``LoRALinear`` is an ``nn.Linear``, so the base weights keep their names (``blocks.0.attn.c_attn.weight``);
the adapters are ``<layer>.lora_A.<slice>`` and ``<layer>.lora_B.<slice>`` (slice ``q``, ``k``, ``v``, or ``all``
for a whole layer). ``merge_state_dict`` folds them into plain weights, ``W + (alpha / r) * B @ A`` on the slice's
rows, giving a state dict any plain GPT (or, exported, any Hugging Face model) loads.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from llmcore.config import LoraConfig
from llmcore.model import GPT

ADAPTER = ".lora_"  # in the name of every adapter tensor, and of nothing else


def is_adapter(name: str) -> bool:
    return ADAPTER in name


class LoRALinear(nn.Linear):
    """A linear layer with low-rank adapters on row slices of its output: ``slices`` {name: (start, stop)}."""

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a weight: take the base's instead
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices, self.r, self.scale = dict(slices), r, alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        dev = base.weight.device
        self.lora_A = nn.ParameterDict({k: nn.Parameter(torch.empty(r, self.in_features, device=dev)) for k in slices})
        self.lora_B = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(b - a, r, device=dev)) for k, (a, b) in slices.items()}
        )
        for a in self.lora_A.values():  # as peft and litgpt: kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        h = self.lora_dropout(x)  # (..., in)
        parts, at = [], 0
        for k, (a, b) in sorted(self.slices.items(), key=lambda kv: kv[1]):  # in row order
            if a > at:  # rows without an adapter
                parts.append(y.new_zeros(*y.shape[:-1], a - at))
            parts.append((h @ self.lora_A[k].t() @ self.lora_B[k].t()) * self.scale)  # (..., b - a)
            at = b
        if at < self.out_features:
            parts.append(y.new_zeros(*y.shape[:-1], self.out_features - at))
        return y + torch.cat(parts, dim=-1)

    def delta(self, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor]) -> torch.Tensor:
        """The merged update (out, in) from adapter tensors A, B (by slice)."""
        d = torch.zeros(self.out_features, self.in_features, dtype=next(iter(A.values())).dtype)
        for k, (a, b) in self.slices.items():
            d[a:b] = (B[k].float() @ A[k].float()) * self.scale
        return d

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora r={self.r}, scale={self.scale:g}, slices={self.slices}"


def _slices(model: GPT, name: str) -> tuple[str, str, tuple[int, int]]:
    """(layer name, slice name, rows) of a LoRA target such as ``blocks.3.attn.q``."""
    block, rest = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1:]
    if rest[0] == "attn" and rest[1] in ("q", "k", "v"):
        H, K, D = model.cfg.n_head, model.cfg.kv_heads, model.cfg.head_size
        rows = {"q": (0, H * D), "k": (H * D, (H + K) * D), "v": ((H + K) * D, (H + 2 * K) * D)}[rest[1]]
        return f"{block}.attn.c_attn", rest[1], rows
    layer = model.get_submodule(name)
    return name, "all", (0, layer.out_features)


def apply_lora(model: GPT, cfg: LoraConfig) -> list[str]:
    """Replace the targeted linear layers by LoRALinear and freeze everything but the adapters; returns the
    adapted targets (``blocks.0.attn.q``, ...). A target matching no layer is a FieldError naming it."""
    targets = list(cfg.layers(model.cfg))
    wanted: dict[str, dict[str, tuple[int, int]]] = {}
    for t in targets:
        layer, sl, rows = _slices(model, t)
        wanted.setdefault(layer, {})[sl] = rows
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, slices in wanted.items():
        parent, attr = layer.rsplit(".", 1)
        base = model.get_submodule(layer)
        setattr(model.get_submodule(parent), attr, LoRALinear(base, slices, cfg.r, cfg.alpha, cfg.dropout))
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{state-dict prefix: layer} of every adapted layer (wrappers such as checkpointing left out of the names)."""
    return {
        n.replace("_checkpoint_wrapped_module.", ""): m for n, m in model.named_modules() if isinstance(m, LoRALinear)
    }


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a state dict."""
    return {k: v for k, v in state.items() if is_adapter(k)}


def merge_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain GPT's state dict from a LoRA model's (``model`` tells the layers' slices and scale): each adapted
    weight is ``W + (alpha / r) * B @ A``, the adapters are dropped; every other tensor is the same object (so tied
    weights stay tied)."""
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for prefix, layer in lora_layers(model).items():
        A = {k: state[f"{prefix}.lora_A.{k}"] for k in layer.slices}
        B = {k: state[f"{prefix}.lora_B.{k}"] for k in layer.slices}
        w = state[f"{prefix}.weight"]
        out[f"{prefix}.weight"] = (w.float() + layer.delta(A, B).to(w.device)).to(w.dtype)
    return out


def merged_model(model: GPT) -> GPT:
    """A plain GPT (no LoRA layers) with the adapters merged into its weights."""
    plain = GPT(model.cfg, model.vocab_size)
    plain.load_state_dict(merge_state_dict(model.state_dict(), model))
    return plain
