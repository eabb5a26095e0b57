"""FSDP against DDP at 2 ranks through mpiexec: model-state bytes each rank holds, and step time.

    python bench/fsdp.py [--quick] [--steps N] [--json PATH]        (from the repository root)

A ~50M-parameter GPT (10 blocks, 640 wide, 10 heads, block 128; a char vocabulary) on this CPU, fp32, 2 ranks
over gloo, launched as gptlab launches multi-rank trainings (``mpiexec -n 2 --ppn 2`` in front of the command;
here this script in ``--worker`` mode). Each rank builds llmcore's real ``Trainer`` (ddp; fsdp; fsdp with
``reshard_after_forward: false``), runs warmup steps, then times ``Trainer.train_step`` (ranks start each step
together). After backward and the optimizer step, before the gradients are dropped, each rank measures the
tensors it holds (``llmcore.parallel.state_bytes``: parameters, gradients and AdamW state by storage, a DTensor
by its local shard: not RSS). The ddp run also times the collectives a step needs on their own (gloo all-reduce
of the gradients; all-gather and reduce-scatter of all the weights), which explains FSDP's overhead. The
estimate of ``llmcore.memory`` is reported beside the measurement. Results: bench/results/fsdp.json.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import REPO, figure, parser, ratio_pct, write_report

WORLD = 2
FULL = dict(n_layer=10, n_head=10, n_embd=640, block_size=128, batch_size=2, steps=5, warmup=2)
QUICK = dict(n_layer=2, n_head=2, n_embd=128, block_size=64, batch_size=2, steps=3, warmup=1)
MODES = {
    "ddp": {},
    "fsdp": {"parallelism": "fsdp"},
    "fsdp-keep": {"parallelism": "fsdp", "reshard_after_forward": False},
}


def configs(size: dict, mode: str):
    from llmcore.config import ModelConfig, TrainConfig

    model = ModelConfig(**{k: size[k] for k in ("n_layer", "n_head", "n_embd", "block_size")})
    train = TrainConfig(
        batch_size=size["batch_size"], device="cpu", precision="fp32", ranks_per_node=WORLD, **MODES[mode]
    )
    return model, train


# ------------------------------------------------------------------------------------- one rank (worker)


def worker(mode: str, size: dict, shards: Path, out: Path, result: Path) -> None:
    """One rank of one mode: time the steps, measure the state; rank 0 writes every rank's figures."""
    import torch
    import torch.distributed as dist

    from llmcore import distributed as D
    from llmcore.parallel import state_bytes
    from llmcore.train import Trainer, lr_at

    model_cfg, train_cfg = configs(size, mode)
    trainer = Trainer(model_cfg, train_cfg, shards, out, seed=1337)
    measured: list[dict[str, int]] = []
    zero_grad = trainer.optimizer.zero_grad

    def measuring_zero_grad(*args, **kwargs):  # the step's last call: gradients and AdamW state still held
        measured.append(state_bytes(trainer.model, trainer.optimizer))
        zero_grad(*args, **kwargs)

    trainer.optimizer.zero_grad = measuring_zero_grad
    times = []
    for i in range(size["warmup"] + size["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        loss, _ = trainer.train_step(lr_at(i, train_cfg))
        loss.item()
        if i >= size["warmup"]:
            times.append(time.perf_counter() - t0)
    mine = {"times": times, "state": measured[-1], "loss": loss.item(), "params": trainer.model.num_params(False)}
    if mode == "ddp":
        mine["collectives"] = time_collectives(mine["params"], torch)
    everyone = D.all_gather_objects(mine)
    if trainer.dist.is_main:
        result.write_text(json.dumps(everyone))
    D.cleanup()


def time_collectives(n: int, torch) -> dict[str, float]:
    """Seconds (median of 3) of one gloo collective over all n fp32 parameters: DDP's all-reduce of the
    gradients, FSDP's all-gather of the weights and reduce-scatter of the gradients (per step FSDP does the
    all-gather once in forward, once more in backward when it reshards after forward, and one reduce-scatter)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    shard = -(-n // world)
    full, part = torch.ones(shard * world), torch.ones(shard)
    ops = {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather": lambda: dist.all_gather_into_tensor(full, part),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
    }
    out = {}
    warnings.filterwarnings("ignore", category=FutureWarning)  # *_into_tensor: renamed *_single in torch 2.13
    for name, op in ops.items():
        runs = []
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            op()
            runs.append(time.perf_counter() - t0)
        out[name] = statistics.median(runs)
    return out


# ------------------------------------------------------------------------------------------- the driver


def launch(mode: str, size: dict, shards: Path, tmp: Path) -> list[dict]:
    from llmcore.distributed import mpiexec_prefix

    result = tmp / f"{mode}.json"
    cmd = [sys.executable, __file__, "--worker", mode, "--size", json.dumps(size), "--shards", str(shards)]
    cmd += ["--out", str(tmp / mode), "--result", str(result)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",  # one core per rank
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "GPTLAB_RANKS": str(WORLD),
    }
    command = f"{mpiexec_prefix(WORLD, WORLD)} {shlex.join(cmd)}"
    print(f"  {mode}: {command}", flush=True)
    subprocess.run(["bash", "-c", command], check=True, cwd=REPO, env=env)
    return json.loads(result.read_text())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = parser("fsdp", __doc__)
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    p.add_argument("--worker", choices=list(MODES), help=argparse_hidden())
    p.add_argument("--size", help=argparse_hidden())
    p.add_argument("--shards", type=Path, help=argparse_hidden())
    p.add_argument("--out", type=Path, help=argparse_hidden())
    p.add_argument("--result", type=Path, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(args.size), args.shards, args.out, args.result)
        return 0

    from train_step import build_shards

    from llmcore.memory import estimate_memory

    size = dict(QUICK if args.quick else FULL)
    if args.steps:
        size["steps"] = args.steps
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-fsdp-") as tmp:
        shards, corpus = build_shards(Path(tmp))
        vocab = json.loads((shards / "manifest.json").read_text())["vocab_size"]
        ranks = {mode: launch(mode, size, shards, Path(tmp)) for mode in MODES}
    return report(args, size, corpus, vocab, ranks, estimate_memory)


def report(args, size: dict, corpus: str, vocab: int, ranks: dict[str, list[dict]], estimate_memory) -> int:
    state = {mode: max(sum(r["state"].values()) for r in rs) for mode, rs in ranks.items()}
    step = {mode: statistics.median(max(ts) for ts in zip(*(r["times"] for r in rs))) for mode, rs in ranks.items()}
    comm = ranks["ddp"][0]["collectives"]
    params = ranks["ddp"][0]["params"]
    mb = 1e6
    est = {}
    for mode in ("ddp", "fsdp"):
        model_cfg, train_cfg = configs(size, mode)
        est[mode] = estimate_memory(model_cfg, vocab, train_cfg)
    ratio = state["fsdp"] / state["ddp"]
    figures = [
        figure("model parameters", params / 1e6, "M"),
        figure("DDP model state per rank (params + grads + AdamW)", state["ddp"] / mb, "MB"),
        figure("FSDP model state per rank (largest rank)", state["fsdp"] / mb, "MB"),
        figure("FSDP / DDP model state per rank", ratio, "x", "<= 0.55", ratio <= 0.55),
        figure("  estimate (llmcore.memory): DDP state per rank", est["ddp"].state_bytes / mb, "MB"),
        figure("  estimate (llmcore.memory): FSDP state per rank", est["fsdp"].state_bytes / mb, "MB"),
        figure("DDP step (median)", step["ddp"], "s"),
        figure("FSDP step (median)", step["fsdp"], "s"),
        figure("FSDP step-time overhead over DDP", ratio_pct(step["fsdp"], step["ddp"]), "%"),
        figure("FSDP without resharding after forward: step (median)", step["fsdp-keep"], "s"),
        figure("  gloo all-reduce of all gradients (DDP, once a step)", comm["all_reduce"], "s"),
        figure("  gloo all-gather of all weights (FSDP, 2x a step)", comm["all_gather"], "s"),
        figure("  gloo reduce-scatter of all gradients (FSDP, once)", comm["reduce_scatter"], "s"),
    ]
    details = {
        "size": size,
        "world_size": WORLD,
        "corpus": corpus,
        "vocab_size": vocab,
        "per_rank": ranks,
        "launch": f"mpiexec -n {WORLD} --ppn {WORLD} python bench/fsdp.py --worker MODE ...",
    }
    write_report("fsdp", args, figures, details)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
