"""FSDP against DDP at 2 ranks through mpiexec: model-state bytes each rank holds, and step time.

    python bench/fsdp.py [--quick] [--steps N] [--json PATH]        (from the repository root)

A ~50M-parameter GPT (10 blocks, 640 wide, 10 heads, block 128; a char vocabulary) on this CPU, fp32, 2 ranks
over gloo, launched as gptlab launches multi-rank trainings (``mpiexec -n 2 --ppn 2`` in front of the command;
here this script in ``--worker`` mode). Each rank builds llmcore's real ``Trainer`` three times (ddp; fsdp;
fsdp with ``reshard_after_forward: false``) and times ``Trainer.train_step`` of each, interleaved (round r runs
the three in an order rotated by r; ranks start each step together) so that the changing load of a shared
machine hits them alike; warmup rounds first, then the median. After backward and the optimizer step, before
the gradients are dropped, each rank measures the tensors it holds (``llmcore.parallel.state_bytes``:
parameters, gradients and AdamW state by storage, a DTensor by its local shard: not RSS), beside the estimate
of ``llmcore.memory``. The collectives a step needs are also timed on their own (gloo all-reduce of all
gradients; all-gather and reduce-scatter of all weights), which accounts for FSDP's overhead. Results:
bench/results/fsdp.json.
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


def worker(size: dict, shards: Path, out: Path, result: Path) -> None:
    """One rank: a Trainer per mode in this process, their steps interleaved (each round in a rotated order,
    the ranks starting each step together) so that drifting load on a shared machine hits every mode alike;
    the state each holds; rank 0 writes every rank's figures."""
    import torch

    from llmcore import distributed as D
    from llmcore.train import Trainer, lr_at

    trainers = {}
    for mode in MODES:
        model_cfg, train_cfg = configs(size, mode)
        trainers[mode] = Trainer(model_cfg, train_cfg, shards, out / mode, seed=1337)
    measured = {mode: measure_state(t) for mode, t in trainers.items()}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    losses: dict[str, float] = {}
    names = list(MODES)
    for i in range(size["warmup"] + size["steps"]):
        for mode in names[i % len(names) :] + names[: i % len(names)]:
            torch.distributed.barrier()
            t0 = time.perf_counter()
            loss, _ = trainers[mode].train_step(lr_at(i, trainers[mode].cfg))
            losses[mode] = loss.item()
            if i >= size["warmup"]:
                times[mode].append(time.perf_counter() - t0)
    params = trainers["ddp"].model.num_params(non_embedding=False)
    mine = {
        mode: {"times": times[mode], "state": measured[mode][-1], "loss": losses[mode], "params": params}
        for mode in MODES
    }
    for mode in MODES:  # one more step each, under the profiler: where the time goes
        mine[mode]["profile"] = profile_step(trainers[mode], lr_at(i + 1, trainers[mode].cfg))
    mine["collectives"] = time_collectives(params, torch)
    everyone = D.all_gather_objects(mine)
    if trainers["ddp"].dist.is_main:
        result.write_text(json.dumps(everyone))
    D.cleanup()


def measure_state(trainer) -> list[dict[str, int]]:
    """Record ``state_bytes`` at each step's last call, zero_grad: gradients and AdamW state still held."""
    from llmcore.parallel import state_bytes

    seen: list[dict[str, int]] = []
    zero_grad = trainer.optimizer.zero_grad

    def measuring_zero_grad(*args, **kwargs):
        seen.append(state_bytes(trainer.model, trainer.optimizer))
        zero_grad(*args, **kwargs)

    trainer.optimizer.zero_grad = measuring_zero_grad
    return seen


def profile_step(trainer, lr: float) -> dict[str, float]:
    """One step under the profiler: seconds in FSDP's copies of parameters and gradients into and out of its
    communication buffers; gloo calls and their seconds (these include waiting for the other rank, and with
    DDP overlap backward: details only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(lr)
    events = prof.key_averages()
    copies = ("fsdp::all_gather_copy_in", "fsdp::split_with_sizes_copy", "fsdp::chunk_cat")
    return {
        "gloo": sum(e.cpu_time_total for e in events if e.key.startswith("gloo:")) / 1e6,
        "fsdp_copies": sum(e.cpu_time_total for e in events if e.key in copies) / 1e6,
        "gloo_calls": {e.key: e.count for e in events if e.key.startswith("gloo:")},
    }


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


def launch(size: dict, shards: Path, tmp: Path) -> list[dict]:
    """Both ranks through mpiexec, as gptlab launches a multi-rank training; every rank's figures."""
    from llmcore.distributed import mpiexec_prefix

    result = tmp / "ranks.json"
    cmd = [sys.executable, __file__, "--worker", "--size", json.dumps(size), "--shards", str(shards)]
    cmd += ["--out", str(tmp / "runs"), "--result", str(result)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",  # one core per rank
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "GPTLAB_RANKS": str(WORLD),
    }
    command = f"{mpiexec_prefix(WORLD, WORLD)} {shlex.join(cmd)}"
    print(f"  {command}", flush=True)
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
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--size", help=argparse_hidden())
    p.add_argument("--shards", type=Path, help=argparse_hidden())
    p.add_argument("--out", type=Path, help=argparse_hidden())
    p.add_argument("--result", type=Path, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.size), args.shards, args.out, args.result)
        return 0

    from train_step import build_shards

    from llmcore.memory import estimate_memory

    size = dict(QUICK if args.quick else FULL)
    if args.steps:
        size["steps"] = args.steps
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-fsdp-") as tmp:
        shards, corpus = build_shards(Path(tmp))
        vocab = json.loads((shards / "manifest.json").read_text())["vocab_size"]
        everyone = launch(size, shards, Path(tmp))
    ranks = {mode: [r[mode] for r in everyone] for mode in MODES}
    return report(args, size, corpus, vocab, ranks, everyone[0]["collectives"], estimate_memory)


def report(args, size: dict, corpus: str, vocab: int, ranks: dict[str, list[dict]], comm: dict, estimate_memory) -> int:
    state = {mode: max(sum(r["state"].values()) for r in rs) for mode, rs in ranks.items()}
    step = {mode: statistics.median(max(ts) for ts in zip(*(r["times"] for r in rs))) for mode, rs in ranks.items()}
    params = ranks["ddp"][0]["params"]
    prof = ranks["fsdp"][0]["profile"]
    extra = 2 * comm["all_gather"] + comm["reduce_scatter"] - comm["all_reduce"]
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
        figure("  FSDP's extra communication: 2 all-gathers + reduce-scatter - all-reduce", extra, "s"),
        figure("  FSDP's copies into and out of its communication buffers (profiled)", prof["fsdp_copies"], "s"),
    ]
    details = {
        "size": size,
        "world_size": WORLD,
        "corpus": corpus,
        "vocab_size": vocab,
        "per_rank": ranks,
        "collectives_s": comm,
        "launch": f"mpiexec -n {WORLD} --ppn {WORLD} python bench/fsdp.py --worker ...",
    }
    write_report("fsdp", args, figures, details)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
