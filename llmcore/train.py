"""Training: one process per rank, a nanoGPT-style loop, resumable to the same loss curve.

    python -m llmcore.train --config CONFIG.json --shards SHARDS_DIR --out OUT_DIR
    torchrun --nproc-per-node 4 -m llmcore.train ...      mpiexec -n 8 --ppn 4 python -m llmcore.train ...

CONFIG.json is ``{"model": {...}, "train": {...}, "seed": 0}`` (ModelConfig, TrainConfig). OUT_DIR receives
``metrics.jsonl`` (one JSON object per line, ``"kind": "train"`` or ``"eval"``), ``checkpoints/`` and, at the
end, ``summary.json``. If OUT_DIR holds a committed checkpoint, training continues from it. Rank 0 holds
``OUT_DIR/.lock`` (an ``flock``) for the whole run: a second training of the same OUT_DIR waits for the first
to end (or die), then resumes from its checkpoint instead of writing beside it.

Data: every optimiser step consumes ``world_size * grad_accum`` micro-batches, micro-step m of rank r drawing
from data stream ``r * grad_accum + m`` (its own seeded BatchSampler). So the curve depends on the global batch
only, not on how it is split between ranks and accumulation: 2 ranks x 1 micro-step == 1 rank x 2 micro-steps.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationError
from torch.nn.parallel import DistributedDataParallel as DDP

from llmcore import distributed as D
from llmcore.checkpoint import CheckpointError, checkpoints, load_checkpoint, rng_state, save_checkpoint
from llmcore.config import ModelConfig, StrictModel, TrainConfig
from llmcore.hardware import DeviceError, enable_tf32, peak_flops, peak_memory_mb, resolve_precision
from llmcore.io import LOCK_FILE, atomic_write_bytes, atomic_write_json, file_lock, is_no_space
from llmcore.model import GPT
from llmcore.shards import BatchSampler, ShardDamagedError, ShardError, TokenSplit, fixed_batches

METRICS, SUMMARY = "metrics.jsonl", "summary.json"
_clock = time.perf_counter  # module-level so tests can drive the time budget with a fake clock


class RunConfig(StrictModel):
    """The file given to ``--config``."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and run-time options.")
    seed: int = Field(0, ge=0, description="Seed for initialisation, data order and dropout.")


def check_config(model: ModelConfig, train: TrainConfig) -> list[str]:
    """Cross-field problems that pydantic cannot see field by field, all of them."""
    problems = []
    if model.n_embd % model.n_head:
        problems.append(f"model.n_head: {model.n_head} does not divide model.n_embd ({model.n_embd})")
    elif model.pos_encoding == "rope" and (model.n_embd // model.n_head) % 2:
        problems.append(f"model.pos_encoding: rope needs an even head size, got {model.n_embd // model.n_head}")
    if train.min_lr > train.lr:
        problems.append(f"train.min_lr: {train.min_lr} is above train.lr ({train.lr})")
    return problems


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update that follows `step` completed steps: linear warmup, cosine to min_lr."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / (decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


# ------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def estimate_loss(model, batches, ctx, device: torch.device) -> float:
    """Mean loss over `batches`, split between ranks (each evaluates batches[rank::world])."""
    model.eval()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if D.is_distributed() else (0, 1)
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for x, y in batches[rank::world]:
        with ctx:
            _, loss = model(x.to(device), y.to(device))
        total[0] += loss.double()
        total[1] += 1
    if D.is_distributed():
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only whole lines with step <= last_step (the rest will be written again after resuming)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a crash
    atomic_write_bytes(path, "".join(kept).encode())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """State of one rank's training run; `run()` is the loop."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, shards_dir: Path, out_dir: Path, seed: int):
        self.t_start = _clock()  # the time budget counts from here
        self.cfg, self.out_dir, self.seed = cfg, Path(out_dir), seed
        self.dist = D.init_distributed(cfg.device)
        self.device, self.rank, self.world = self.dist.device, self.dist.rank, self.dist.world_size
        self.dtype = resolve_precision(cfg.precision, self.device)
        self.ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        if self.device.type == "cuda":
            enable_tf32()
            torch.cuda.reset_peak_memory_stats(self.device)

        verify = self.dist.local_rank == 0  # one verification per node is enough; the others trust it
        failed: ShardError | None = None
        try:
            self.train_split = TokenSplit(shards_dir, "train", verify=verify)
            val_split = TokenSplit(shards_dir, "val", verify=verify)
        except ShardError as e:
            failed = e
        # Every rank stops when one finds the shards unusable (the others would wait for it in a collective).
        if D.any_rank(failed is not None, self.device):
            if failed is not None:
                raise failed
            raise ShardError(f"{shards_dir}: another rank found the shards unusable (its error names the file)")
        T = model_cfg.block_size
        self.val_batches = fixed_batches(val_split, cfg.eval_batches, cfg.batch_size, T, seed)
        n_streams = self.world * cfg.grad_accum
        self.samplers = [
            BatchSampler(self.train_split, cfg.batch_size, T, seed, rank=self.rank * cfg.grad_accum + m,
                         world_size=n_streams)
            for m in range(cfg.grad_accum)
        ]
        self.tokens_per_step = cfg.batch_size * T * n_streams

        _seed_everything(seed)  # identical initial weights on every rank
        self.model = GPT(model_cfg, self.train_split.vocab_size).to(self.device)
        torch.manual_seed(seed + self.rank)  # dropout masks differ between ranks
        self.optimizer = self.model.configure_optimizer(
            cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), self.device.type
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.extra = 0, {"train_loss": None, "val_loss": None, "tokens_seen": 0, "elapsed_s": 0.0}
        self.resumed = self._resume()
        self.fwd = torch.compile(self.model) if cfg.compile else self.model  # used for eval too
        # The model's buffers (RoPE and sinusoidal tables) are constants: nothing to broadcast every forward.
        self.ddp = DDP(self.fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       gradient_as_bucket_view=True, broadcast_buffers=False) if self.world > 1 else None
        self.flops_per_token = self.model.flops_per_token()
        self.peak = peak_flops(self.device)

    # ------------------------------------------------------------------------------------- resume

    def _resume(self) -> bool:
        """Continue from the newest checkpoint that loads (rank 0 decides; all ranks load the same one)."""
        path = None
        if self.dist.is_main:
            for candidate in checkpoints(self.out_dir):
                try:
                    self._load(candidate)
                    path = str(candidate)
                    break
                except CheckpointError as e:
                    warnings.warn(f"skipping checkpoint: {e}")
        path = D.broadcast_object(path)
        if path is not None and not self.dist.is_main:
            self._load(Path(path))
        if self.dist.is_main:
            _truncate_metrics(self.out_dir / METRICS, self.step)
            if path is not None:
                print(f"resuming from checkpoint {path} (step {self.step})", file=sys.stderr, flush=True)
        return path is not None

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path, self.model, self.optimizer, self.scaler, rank=self.rank)
        saved = ModelConfig(**state["meta"]["model"])
        if saved != self.model.cfg:
            raise CheckpointError(f"{path / 'meta.json'}: model config differs from this run's")
        streams = state["sampler_state"]
        if len(streams) != len(self.samplers) * self.world:
            raise CheckpointError(
                f"{path / 'state.pt'}: {len(streams)} data streams (world_size x grad_accum); this run has "
                f"{len(self.samplers) * self.world}"
            )
        for m, sampler in enumerate(self.samplers):
            sampler.load_state_dict(streams[self.rank * len(self.samplers) + m])
        self.step, self.extra = state["step"], state["meta"]["extra"]

    def save(self) -> None:
        """All ranks contribute RNG and data cursors; rank 0 writes."""
        mine = {"rng": rng_state(), "samplers": [s.state_dict() for s in self.samplers]}
        everyone = D.all_gather_objects(mine)
        if self.dist.is_main:
            save_checkpoint(
                self.out_dir, self.step, self.model, self.optimizer, self.scaler,
                sampler_state=[s for r in everyone for s in r["samplers"]],
                extra=self.extra, rng_states=[r["rng"] for r in everyone],
            )

    # --------------------------------------------------------------------------------------- loop

    def train_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step over grad_accum micro-batches; returns (mean loss, grad norm) as tensors."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model = self.ddp or self.fwd
        loss_sum = torch.zeros((), device=self.device)
        n = len(self.samplers)
        for m, sampler in enumerate(self.samplers):
            x, y = sampler.next_batch()
            if self.device.type == "cuda":
                x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
            no_sync = self.ddp.no_sync() if self.ddp is not None and m < n - 1 else nullcontext()
            with no_sync:
                with self.ctx:
                    _, loss = model(x, y)
                loss_sum += loss.detach()
                self.scaler.scale(loss / n).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / n, grad_norm

    def _train_line(self, loss: float, grad_norm: torch.Tensor, tokens_per_sec: float) -> dict[str, Any]:
        return {
            "kind": "train", "step": self.step, "time": time.time(), "loss": loss, "lr": lr_at(self.step - 1, self.cfg),
            "grad_norm": grad_norm.item(), "tokens_per_sec": tokens_per_sec,
            "mfu": self.flops_per_token * tokens_per_sec / (self.peak * self.world) if self.peak else None,
            "peak_mem_mb": peak_memory_mb(self.device), "elapsed_s": self.extra["elapsed_s"],
            "tokens_seen": self.extra["tokens_seen"],
        }

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        metrics = open(self.out_dir / METRICS, "a", encoding="utf-8") if self.dist.is_main else None

        def write(line: dict) -> None:
            if metrics is not None:
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()

        def elapsed() -> float:  # over all attempts of this run
            return elapsed0 + _clock() - self.t_start

        elapsed0, t_log, steps_logged = self.extra["elapsed_s"], _clock(), self.step
        saved_step = self.step if self.resumed else -1
        step_time, save_time, stopped_early = 0.0, 0.0, False
        # Stop while the steps to the next check and a checkpoint still fit. Ranks must agree, which costs a
        # collective and a host sync: with several ranks, decide every BUDGET_CHECK_EVERY steps, not every step.
        every = 1 if self.world == 1 else BUDGET_CHECK_EVERY
        try:
            while self.step < cfg.max_steps:
                if cfg.time_budget_s is not None and self.step % every == 0:
                    late = _clock() - self.t_start + (every + 0.5) * step_time + save_time > cfg.time_budget_s
                    if D.any_rank(late, self.device):
                        stopped_early = True
                        break
                t0 = _clock()
                loss, grad_norm = self.train_step(lr_at(self.step, cfg))
                self.step += 1
                self.extra["tokens_seen"] += self.tokens_per_step
                last = self.step == cfg.max_steps
                if self.step % cfg.log_interval == 0 or last:
                    self.extra["train_loss"] = D.all_reduce_mean(loss).item()  # the only sync per logged step
                    now = _clock()
                    tokens_per_sec = self.tokens_per_step * (self.step - steps_logged) / (now - t_log)
                    t_log, steps_logged, self.extra["elapsed_s"] = now, self.step, elapsed()
                    write(self._train_line(self.extra["train_loss"], grad_norm, tokens_per_sec))
                if self.step % cfg.eval_interval == 0 or last:
                    t_eval = _clock()
                    self.extra["val_loss"] = estimate_loss(self.fwd, self.val_batches, self.ctx, self.device)
                    write({"kind": "eval", "step": self.step, "time": time.time(), "val_loss": self.extra["val_loss"],
                           "elapsed_s": elapsed()})
                    t_log += _clock() - t_eval  # tokens/s and MFU measure training steps, not evaluation
                if self.step % cfg.checkpoint_interval == 0 or last:
                    t_save = _clock()
                    self.save()
                    save_time, saved_step = _clock() - t_save, self.step
                    t_log += save_time
                step_time = max(0.8 * step_time, _clock() - t0)  # decays slowly: a cautious estimate
            if stopped_early and saved_step != self.step:
                self.extra["elapsed_s"] = elapsed()
                self.save()
        finally:
            if metrics is not None:
                metrics.close()
        return self._summary(stopped_early)

    def _summary(self, stopped_early: bool) -> dict[str, Any]:
        summary = {
            "steps": self.step,
            "final_train_loss": self.extra["train_loss"],
            "final_val_loss": self.extra["val_loss"],
            "params": self.model.num_params(),
            "tokens_seen": self.extra["tokens_seen"],
            "seconds": self.extra["elapsed_s"],
            "stopped_early": stopped_early,
        }
        if self.dist.is_main:
            atomic_write_json(self.out_dir / SUMMARY, summary)
        return summary


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, shards_dir: Path, out_dir: Path, seed: int) -> dict:
    """Train (or continue training) in out_dir; returns the summary also written to out_dir/summary.json."""
    problems = check_config(model_cfg, train_cfg)
    if problems:
        raise ValueError("; ".join(problems))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # One training per out_dir at a time: rank 0 holds the lock from before it reads a checkpoint until the
    # summary is written (the other ranks wait for rank 0 at the rendezvous).
    lock = file_lock(Path(out_dir) / LOCK_FILE, f"training in {out_dir}") if D.read_launch_env().rank == 0 \
        else nullcontext()
    with lock:
        try:
            return Trainer(model_cfg, train_cfg, shards_dir, out_dir, seed).run()
        finally:
            D.cleanup()


# ----------------------------------------------------------------------------------------------- CLI


def load_run_config(path: Path) -> tuple[RunConfig | None, list[str]]:
    """(config, []) or (None, every problem as `file: field.path: message`)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        return None, [f"{path}: cannot read: {e.strerror}"]
    except ValueError as e:
        return None, [f"{path}: not valid JSON: {e}"]
    try:
        run = RunConfig.model_validate(raw)
    except ValidationError as e:
        return None, [f"{path}: {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors()]
    return run, [f"{path}: {p}" for p in check_config(run.model, run.train)]


# Exit codes: 0 finished; 2 bad config or data (retrying cannot help); 74 (EX_IOERR) the output directory's
# file system is full, over quota or read-only (retrying cannot help until someone frees space; the last
# committed checkpoint stays usable); 75 (EX_TEMPFAIL) stopped at the time budget after a committed
# checkpoint, so running the same command again resumes it.
BUDGET_CHECK_EVERY = 10  # steps between time-budget decisions when several ranks must agree
EXIT_BAD_INPUT = 2
EXIT_NO_SPACE = 74
EXIT_STOPPED_EARLY = 75


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmcore.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="JSON with model, train and seed")
    parser.add_argument("--shards", type=Path, required=True, help="shards directory (with manifest.json)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (resumed if it has checkpoints)")
    args = parser.parse_args(argv)
    run, problems = load_run_config(args.config)
    if problems:
        print("invalid training config:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    try:
        summary = train(run.model, run.train, args.shards, args.out, run.seed)
    except ShardError as e:
        hint = (f"\nthe shards directory is damaged or incomplete: delete {args.shards} and submit again to "
                "rebuild it" if isinstance(e, ShardDamagedError) else "")
        print(f"error: {e}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DeviceError as e:  # a spec asking for hardware this machine lacks: the same on every retry
        print(f"error: train.device / train.precision: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except D.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        if not is_no_space(e):
            raise
        print(f"error: cannot write {e.filename or args.out}: {e.strerror} (free space or raise the quota, then "
              "submit again: training resumes from its last committed checkpoint)", file=sys.stderr)
        return EXIT_NO_SPACE
    if D.read_launch_env().rank == 0:
        print(json.dumps(summary))
    return EXIT_STOPPED_EARLY if summary["stopped_early"] else 0


if __name__ == "__main__":
    sys.exit(main())
