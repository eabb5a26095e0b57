"""How a model is spread over the ranks: per-block activation checkpointing and FSDP2 sharding.

Applied in torchtitan's order (``parallelize_llama``): activation checkpointing wraps each block, then
``fully_shard`` makes each block one FSDP unit and the root module (token embedding tied to the output head,
position table, final norm) the last one. The training loop then compiles and, for ddp, wraps in DDP.

With ``train.parallelism: fsdp`` each rank keeps 1/N of every parameter, gradient and AdamW moment (DTensors
sharded on dim 0). A block's full weights exist only while it runs: gathered before its forward (all-gather),
freed after it (``reshard_after_forward``), gathered again for its backward, whose gradients are
reduce-scattered so each rank receives the mean gradient of its own shard. The optimizer steps on the shards.
"""

from __future__ import annotations

import torch

from llmcore.config import ConfigError
from llmcore.model import GPT


def fully_shard_api():
    """torch's FSDP2 (``fully_shard``, ``MixedPrecisionPolicy``); a ConfigError naming train.parallelism when
    this torch lacks it (public since torch 2.6)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as e:
        raise ConfigError(
            f"train.parallelism: fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this torch is "
            f"{torch.__version__} ({e})"
        ) from None
    return fully_shard, MixedPrecisionPolicy


def checkpoint_blocks(model: GPT) -> None:
    """Wrap every transformer block so that backward recomputes its activations (non-reentrant
    ``torch.utils.checkpoint``; dropout masks are replayed from the saved RNG state). Parameter names in
    ``state_dict()`` stay as they were; ``named_parameters()`` gains ``_checkpoint_wrapped_module.``."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)


def shard_model(model: GPT, device: torch.device, param_dtype: torch.dtype | None, reshard_after_forward: bool) -> None:
    """FSDP2 over all ranks: one unit per block, then the root (whatever is left: the tied embedding and head,
    positions, final norm). The model may be on the CPU: each rank moves only its shards to `device`.

    param_dtype: bf16 computes with bf16 weights gathered from fp32 shards and reduces gradients in fp32
    (``MixedPrecisionPolicy``); None (fp32) uses no policy. The root is never resharded after forward: its
    weights (the output head first of all) are needed again at once by backward.
    """
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy = fully_shard_api()
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    common = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **common)
    fully_shard(model, reshard_after_forward=False, **common)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when `model` (or the module a compile wrapper holds) is an FSDP2 module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 has no sharded modules
        return False
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (the global norm FSDP's clip returns is replicated), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of model state this rank holds, measured: parameters, gradients, optimizer state. A DTensor
    counts its local shard; tensors are counted by storage, once (gradients that are views into one
    communication buffer, tied weights), with any padding FSDP adds."""

    def storages(tensors) -> int:
        seen: dict[int, int] = {}
        for t in tensors:
            if t is not None:
                s = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    params = list(model.parameters())
    moments = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return {"params": storages(params), "grads": storages(p.grad for p in params), "optimizer": storages(moments)}
