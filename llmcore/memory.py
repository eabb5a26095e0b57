"""Per-rank GPU memory of a training run, estimated by arithmetic alone (no torch): does it fit the card?

Notation: P parameters (the tied embedding/head once), N ranks, L blocks, C width, H heads, V vocabulary,
B = ``train.batch_size`` sequences of T = ``model.block_size`` tokens per micro-batch, ``a`` bytes per activation
(2 with bf16/fp16 autocast, 4 in fp32).

Model state (what ``bench/fsdp.py`` measures; exact up to FSDP's padding of each tensor to N rows):
  - ddp: every rank holds fp32 weights 4P, fp32 gradients 4P (DDP's buckets are the gradients), AdamW's two
    fp32 moments 8P plus a 4-byte step counter per parameter tensor: 16P in all.
  - fsdp: each rank holds 1/N of each: 16P / N (the step counters are replicated).

Working memory, alive during a step only:
  - ddp with bf16 autocast: a bf16 copy of every matmul weight, cast in forward and kept for backward (2 bytes
    per weight of the linear layers and the output head).
  - fsdp: gathered weights in the compute dtype (bf16 with the mixed-precision policy, else fp32): the root unit
    (embedding = output head, positions, final norm) for the whole step, plus two blocks (the running one and
    the prefetched next) with ``reshard_after_forward``, or every block from forward until its backward without
    it; and two blocks' unsharded gradients before their reduce-scatter. With ``grad_accum`` > 1 the gradients
    are not reduced between micro-batches (``set_requires_gradient_sync(False)``, DDP's no_sync): each rank
    accumulates the whole unsharded gradient in fp32, 4P.

Activations, per micro-batch (freed by its backward, so independent of ``grad_accum``), counted as the tensors
autograd saves (checked against ``torch.autograd.graph.saved_tensors_hooks`` in fp32 on CPU):
  - per block and token: the two norm inputs in fp32 (8C; RMSNorm also keeps its normalised input: 16C) and
    the inputs of every matmul and of attention in ``a`` bytes: norm outputs 2C, the q/k/v projection 3C and
    the attention output C (RoPE: 3C more, the rotated q and k and a copy of the output), MLP hidden 8C (GELU:
    4C before and after the activation; SwiGLU with hidden h: 2h + h + h); dropout masks 2C bytes when
    dropout > 0; ``plain`` attention keeps its own copies of q, k, v (4C in all) and the T x T probabilities.
  - head, per token: final norm input 4C and output aC, fp32 log-probabilities 4V, token ids and targets 16.
  - activation checkpointing keeps only each block's input (4C per token) and recomputes one block at a time in
    backward: L x 4C + one block + head, instead of L x block + head.
Not counted: the CUDA context and NCCL buffers (outside torch's allocator) and fragmentation: ``fits`` keeps
10% of the card plus 1 GiB free for them. Frozen parameters (``train.freeze``) are counted as trained: an
upper bound.

LoRA (``train.lora``): the frozen base weights have no gradients and no AdamW state; the adapters (A (r, in) and
B (out, r) per adapted layer, Pa parameters in all) have both. ddp: 4P + 16Pa (+ a step counter per adapter
tensor); fsdp: the same over N. FSDP's unsharded gradients are the adapters' only. Activations are counted as for
full training (the adapters add their r-wide intermediates and a dropout copy of each adapted input: small).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.config import LoraConfig, ModelConfig, TrainConfig

GIB = 2**30
A100_40GB = 40 * GIB  # Polaris: 4 x NVIDIA A100-SXM4-40GB per node
HEADROOM_FRACTION, HEADROOM_BYTES = 0.10, GIB  # fragmentation; CUDA context and NCCL buffers


@dataclass(frozen=True)
class ParamCount:
    total: int  # every parameter, the tied embedding/head once (= GPT.num_params(non_embedding=False))
    position: int  # the learned position table (0 for sinusoidal or RoPE)
    tensors: int  # parameter tensors (AdamW keeps a step counter for each)
    root: int  # outside the blocks: embedding/head, position table, final norm (FSDP's root unit)
    block: int  # one transformer block
    linear: int  # weights of matmuls (block linears and the output head): what autocast casts

    @property
    def non_embedding(self) -> int:
        """= GPT.num_params(): the position table left out, the token embedding kept (it is the output head)."""
        return self.total - self.position


def count_params(model: ModelConfig, vocab_size: int) -> ParamCount:
    """The parameters of ``llmcore.model.GPT(model, vocab_size)``, by shape."""
    C, L, bias, D = model.n_embd, model.n_layer, model.bias, model.head_size
    norm = C * (2 if model.norm == "layernorm" and bias else 1)
    norm_tensors = 2 if model.norm == "layernorm" and bias else 1
    hidden = model.hidden
    qkv = (model.n_head + 2 * model.kv_heads) * D
    fc_out = 2 * hidden if model.mlp == "swiglu" else hidden
    linear = C * qkv + C * C + C * fc_out + hidden * C  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    biases = (qkv + C + fc_out + C) if bias else 0
    block = 2 * norm + linear + biases
    position = model.block_size * C if model.pos_encoding == "learned" else 0
    head = 0 if model.tie_embeddings else vocab_size * C  # an untied output layer of its own
    root = vocab_size * C + position + norm + head
    tensors = L * (2 * norm_tensors + 4 * (2 if bias else 1)) + 1 + (position > 0) + norm_tensors + (head > 0)
    return ParamCount(
        total=root + L * block,
        position=position,
        tensors=tensors,
        root=root,
        block=block,
        linear=L * linear + vocab_size * C + head,
    )


def count_adapters(model: ModelConfig, lora: LoraConfig) -> tuple[int, int]:
    """(parameters, tensors) of the LoRA adapters: r x (in + out) and an A and a B per adapted layer (or slice)."""
    layers = lora.layers(model, strict=False)  # a target matching nothing is training's error to report
    return sum(lora.r * (i + o) for i, o in layers.values()), 2 * len(layers)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank of one training run (see the module docstring for the derivation)."""

    parallelism: str
    world_size: int
    params: ParamCount
    param_bytes: int  # fp32 weights this rank holds
    grad_bytes: int  # fp32 gradients this rank holds after a step
    optimizer_bytes: int  # AdamW moments and step counters
    working_bytes: int  # gathered or cast weights and unsharded gradients, during a step
    activation_bytes: int  # saved for backward, one micro-batch
    activation_bytes_without_checkpointing: int
    activation_bytes_with_checkpointing: int
    trainable: int | None = None  # LoRA: the adapters' parameters (None: every parameter trains)

    @property
    def state_bytes(self) -> int:
        """Model state kept between steps: weights, gradients, optimizer."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.working_bytes + self.activation_bytes

    def fits(self, gpu_bytes: int = A100_40GB) -> bool:
        """Whether the estimate leaves the headroom free on a card of `gpu_bytes` (default: Polaris' A100)."""
        return self.total_bytes <= gpu_bytes * (1 - HEADROOM_FRACTION) - HEADROOM_BYTES

    def summary(self) -> str:
        """One line for ``gptlab plan``: ``fsdp x16: 9.1 GiB/rank (state 2.7 GiB, working 1.5 GiB, activations
        4.9 GiB)``."""
        lora = f", LoRA: {self.trainable:,} trainable" if self.trainable is not None else ""
        return (
            f"{self.parallelism} x{self.world_size}: {size(self.total_bytes)}/rank (state {size(self.state_bytes)}, "
            f"working {size(self.working_bytes)}, activations {size(self.activation_bytes)}{lora})"
        )


def size(n: int) -> str:
    """Bytes in GiB (one decimal), or in MiB below one GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def activation_bytes(model: ModelConfig, vocab_size: int, batch_size: int, act: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward for one micro-batch of `batch_size` sequences (`act`: activation bytes)."""
    C, H, T, L = model.n_embd, model.n_head, model.block_size, model.n_layer
    tokens = batch_size * T
    hidden = model.hidden
    mlp = 4 * hidden if model.mlp == "swiglu" else 2 * hidden
    rms = model.norm == "rmsnorm"
    norm = 4 * C * (2 if rms else 1) + (4 if rms else 8)  # fp32 input (RMSNorm: and its normalised copy), stats
    if model.attention == "plain":  # copies of q, k, v and of the output; fp32 probabilities (and a cast copy)
        attn, probs = 4 * C, batch_size * H * T * T * (4 + (act if act != 4 else 0))
    else:  # the q/k/v projection (RoPE: rotated q and k, and a copy of the output), output, log-sum-exp
        attn, probs = (7 if model.pos_encoding == "rope" else 4) * C, tokens * 4 * H
    drop = 1 if model.dropout > 0 else 0  # dropout masks, a byte per element
    block = tokens * (2 * norm + act * (2 * C + attn + mlp) + drop * 2 * C) + probs
    head = tokens * (norm + act * C + 4 * vocab_size + 16 + drop * C)  # final norm, head input, log-probs, ids
    if checkpointing:
        return L * tokens * 4 * C + block + head
    return L * block + head


def estimate_memory(
    model: ModelConfig, vocab_size: int, train: TrainConfig, world_size: int | None = None
) -> MemoryEstimate:
    """Per-rank memory of training `model` with `train` on `world_size` ranks (default: nodes x ranks_per_node).

    ``precision: auto`` is taken as bf16 unless ``device`` is cpu (an A100 resolves it so)."""
    world = world_size or train.nodes * train.ranks_per_node
    p = count_params(model, vocab_size)
    half = train.precision in ("bf16", "fp16") or (train.precision == "auto" and train.device != "cpu")
    act = 2 if half else 4
    counters = 4 * p.tensors
    fsdp = train.parallelism == "fsdp"
    held, trained, block_grads = p.total, p.total, p.block  # weights held; with gradients and AdamW state
    if train.lora is not None:  # the frozen base has neither gradients nor AdamW state
        trained, n_adapters = count_adapters(model, train.lora)
        held, counters, block_grads = p.total + trained, 4 * n_adapters, trained / model.n_layer
    if fsdp:
        gathered = p.root + (2 if train.reshard_after_forward else model.n_layer) * p.block
        working = act * gathered + 2 * (act + 4) * block_grads + (4 * trained if train.grad_accum > 1 else 0)
        param, grad, optim = 4 * held / world, 4 * trained / world, 8 * trained / world + counters
    else:
        working = 2 * p.linear if half else 0
        param, grad, optim = 4 * held, 4 * trained, 8 * trained + counters
    acts = {ck: activation_bytes(model, vocab_size, train.batch_size, act, ck) for ck in (False, True)}
    return MemoryEstimate(
        parallelism=train.parallelism,
        world_size=world,
        params=p,
        param_bytes=int(param),
        grad_bytes=int(grad),
        optimizer_bytes=int(optim),
        working_bytes=int(working),
        activation_bytes=acts[train.activation_checkpointing],
        activation_bytes_without_checkpointing=acts[False],
        activation_bytes_with_checkpointing=acts[True],
        trainable=trained if train.lora is not None else None,
    )
