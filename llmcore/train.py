"""Training: one process per rank, a nanoGPT-style loop, resumable to the same loss curve.

    python -m llmcore.train --config CONFIG.json --shards SHARDS_DIR --out OUT_DIR
    torchrun --nproc-per-node 4 -m llmcore.train ...      mpiexec -n 8 --ppn 4 python -m llmcore.train ...

CONFIG.json is ``{"model": {...}, "train": {...}, "seed": 0}`` (ModelConfig, TrainConfig). OUT_DIR receives
``metrics.jsonl`` (records of ``llmcore.metrics``), ``checkpoints/`` and, at the end, ``summary.json``. If
OUT_DIR holds a committed checkpoint, training continues from it. Rank 0 holds ``OUT_DIR/.lock`` (an
``flock``) for the whole run: a second training of the same OUT_DIR waits for the first to end (or die), then
resumes from its checkpoint instead of writing beside it.

Stopping: SIGTERM or SIGINT (a scheduler's walltime, Ctrl-C), or a file ``OUT_DIR/STOP`` written after the
training started (the driver's request: an interrupted submit, a pruned sweep point), make every rank save a
checkpoint at the next step boundary and exit with ``exitcodes.STOP_REQUESTED``; a second signal stops at once.
Exit codes are those of ``llmcore.exitcodes``.

Data: every optimiser step consumes ``world_size * grad_accum`` micro-batches, micro-step m of rank r drawing
from data stream ``r * grad_accum + m`` (its own seeded BatchSampler). So the curve depends on the global batch
only, not on how it is split between ranks and accumulation: 2 ranks x 1 micro-step == 1 rank x 2 micro-steps,
with ddp or fsdp (``llmcore.parallel``). fsdp checkpoints are sharded (``llmcore.checkpoint``): each rank writes
its part, and they resume on any number of ranks with the same number of data streams.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import random
import signal
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
from llmcore import exitcodes
from llmcore.checkpoint import (
    Checkpoint,
    CheckpointError,
    apply_checkpoint,
    checkpoints,
    load_weights,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    weights_sha256,
)
from llmcore.config import ConfigError, FieldError, ModelConfig, StrictModel, TrainConfig
from llmcore.hardware import DeviceError, GpuMonitor, enable_tf32, peak_flops, peak_memory_mb, resolve_precision
from llmcore.io import LOCK_FILE, atomic_write_json, file_lock, is_no_space
from llmcore.lora import apply_lora
from llmcore.metrics import METRICS_FILE, EvalLine, MetricsWriter, TrainLine, truncate_metrics
from llmcore.model import GPT
from llmcore.parallel import checkpoint_blocks, full_value, shard_model
from llmcore.shards import BatchSampler, ShardDamagedError, ShardError, TokenSplit, fixed_batches

SUMMARY = "summary.json"
STOP_FILE = "STOP"  # written into OUT_DIR to ask a running training to checkpoint and stop
#: The environment variable naming a submit's halt file: once that file exists (the driver was told to stop), a
#: training of that submit does not start, and one that runs checkpoints and stops, whenever it was launched.
HALT_ENV = "GPTLAB_HALT_FILE"
BUDGET_CHECK_EVERY = 10  # steps between stop decisions when several ranks must agree (a collective each)
_clock = time.perf_counter  # module-level so tests can drive the time budget with a fake clock


class RunConfig(StrictModel):
    """The file given to ``--config``."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and run-time options.")
    seed: int = Field(0, ge=0, description="Seed for initialisation, data order and dropout.")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update that follows `step` completed steps: linear warmup, then cosine to min_lr
    (or constant at lr)."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if step >= decay_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / (decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


# ------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def estimate_loss(model, batches, ctx, device: torch.device, lockstep: bool = False) -> float:
    """Mean loss over `batches`, split between ranks (each evaluates batches[rank::world]). `lockstep`: every
    rank runs the same number of forward passes (an FSDP forward is a collective), repeating a batch it does
    not count where the batches do not divide evenly."""
    model.eval()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if D.is_distributed() else (0, 1)
    total = torch.zeros(2, device=device, dtype=torch.float64)
    mine = len(batches[rank::world])
    rounds = -(-len(batches) // world) if lockstep else mine
    for i in range(rounds):
        x, y = batches[(i * world + rank) if i < mine else 0]
        with ctx:
            _, loss = model(x.to(device), y.to(device))
        if i < mine:
            total[0] += loss.double()
            total[1] += 1
    if D.is_distributed():
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on every parameter whose name matches a glob pattern (tied parameters under any
    of their names); returns the frozen names. A pattern that matches nothing is a ConfigError naming it."""
    names = dict(model.named_parameters(remove_duplicate=False))
    frozen = []
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ConfigError(
                f"train.freeze: {pattern!r} matches no parameter (names look like {', '.join(list(names)[:4])}, ...)"
            )
        for n in matched:
            names[n].requires_grad_(False)
        frozen += matched
    return sorted(set(frozen))


class StopSignal:
    """SIGTERM / SIGINT while training: the first asks for a checkpoint and a clean stop at the next step
    boundary; a second one stops at once (the default action). A STOP file in the output directory newer than
    the training's start asks the same."""

    def __init__(self, out_dir: Path):
        self.stop_file = Path(out_dir) / STOP_FILE
        self.halt_file = Path(os.environ[HALT_ENV]) if os.environ.get(HALT_ENV) else None
        self.started = time.time()
        self.signalled: str | None = None
        self._previous: dict[int, Any] = {}
        try:  # a request left from an earlier run (read before this one started) is void
            if self.stop_file.stat().st_mtime < self.started - 1:
                self.stop_file.unlink()
        except FileNotFoundError:
            pass

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (training called from a thread): file requests only
                return

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signalled is not None:  # the second signal: stop now
            self.uninstall()
            os.kill(os.getpid(), signum)
            return
        self.signalled = signal.Signals(signum).name
        print(
            f"{self.signalled}: saving a checkpoint and stopping at the end of this step", file=sys.stderr, flush=True
        )

    @property
    def requested(self) -> str | None:
        """Why to stop (a signal's name, or the STOP file), or None."""
        if self.signalled is not None:
            return self.signalled
        if self.halt_file is not None and self.halt_file.exists():
            return f"{self.halt_file} requested it"
        try:
            if self.stop_file.stat().st_mtime >= self.started - 1:
                return f"{self.stop_file} requested it"
        except FileNotFoundError:
            pass
        return None


class Trainer:
    """State of one rank's training run; `run()` is the loop."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, shards_dir: Path, out_dir: Path, seed: int,
                 init: Path | None = None):  # fmt: skip
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
        longest = self.train_split.longest_answer  # task sources: an answer must fit one window
        if longest and longest["tokens"] > T:
            raise ConfigError(f"model.block_size: {T} tokens cannot hold an answer of {longest['tokens']} tokens (with "
                              f"EOS) of {longest['source']}; raise the block size or shorten the answers")  # fmt: skip
        self.val_batches = fixed_batches(val_split, cfg.eval_batches, cfg.batch_size, T, seed)
        n_streams = self.world * cfg.grad_accum
        self.samplers = [
            BatchSampler(
                self.train_split, cfg.batch_size, T, seed, rank=self.rank * cfg.grad_accum + m, world_size=n_streams
            )
            for m in range(cfg.grad_accum)
        ]
        self.tokens_per_step = cfg.batch_size * T * n_streams

        self.fsdp = cfg.parallelism == "fsdp"
        if self.fsdp and self.world == 1:
            raise ConfigError(
                "train.parallelism: fsdp needs several ranks, but this training runs as one process (launch it "
                "with train.nodes x train.ranks_per_node > 1, or use ddp)"
            )
        _seed_everything(seed)  # identical initial weights on every rank (built on the CPU, as with ddp)
        self.model = GPT(model_cfg, self.train_split.vocab_size)
        if init is not None:  # pretrained weights (model.init_from); a checkpoint of this run's own wins below
            load_weights(init, self.model)
        self.frozen = freeze_parameters(self.model, cfg.freeze)
        if self.frozen and self.dist.is_main:
            print(f"train.freeze: {len(self.frozen)} parameters kept fixed: {', '.join(self.frozen)}", file=sys.stderr)
        self.lora = self._apply_lora(init)  # None, or the description its checkpoints carry
        if cfg.activation_checkpointing:
            checkpoint_blocks(self.model)
        if self.fsdp:  # each rank moves only its shards to the device
            shard_model(self.model, self.device, self.dtype, cfg.reshard_after_forward)
        else:
            self.model.to(self.device)
        torch.manual_seed(seed + self.rank)  # dropout masks differ between ranks
        self.optimizer = self.model.configure_optimizer(
            cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), self.device.type
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.extra = 0, {"train_loss": None, "val_loss": None, "tokens_seen": 0, "elapsed_s": 0.0}
        self.resumed = self._resume()
        self.fwd = torch.compile(self.model) if cfg.compile else self.model  # used for eval too
        # The model's buffers (RoPE and sinusoidal tables) are constants: nothing to broadcast every forward.
        self.ddp = (
            DDP(
                self.fwd,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
                broadcast_buffers=False,
            )
            if self.world > 1 and not self.fsdp
            else None
        )
        self.flops_per_token = self.model.flops_per_token()
        self.peak = peak_flops(self.device)
        self.gpu = GpuMonitor(self.device) if self.dist.is_main else None
        self.stop = StopSignal(self.out_dir)

    def _apply_lora(self, init: Path | None) -> dict[str, Any] | None:
        """train.lora: adapters on the targeted layers, everything else frozen; returns what a checkpoint records
        (the adapted layers, r, alpha, and the sha256 of the base weights file)."""
        lora = self.cfg.lora
        if lora is None:
            return None
        if init is None:
            raise FieldError(
                "train.lora", "adapts pretrained weights: set model.init_from (a Hugging Face folder or a run)"
            )
        targets = apply_lora(self.model, lora)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.dist.is_main:
            print(f"train.lora: {len(targets)} adapted layers, {trainable:,} trainable parameters "
                  f"(r {lora.r}, alpha {lora.alpha:g})", file=sys.stderr)  # fmt: skip
        return {"base_sha256": weights_sha256(init), "targets": targets, "r": lora.r, "alpha": lora.alpha}

    # ------------------------------------------------------------------------------------- resume

    def _resume(self) -> bool:
        """Continue from the newest checkpoint that every rank finds intact and fitting (rank 0 lists them; each
        rank verifies its share, they agree, then all load the same one)."""
        path = None
        for candidate in D.broadcast_object(checkpoints(self.out_dir) if self.dist.is_main else None):
            try:
                ck = read_checkpoint(candidate, rank=self.rank, world=self.world)
                problem = self._misfit(ck)
            except CheckpointError as e:
                problem = str(e)
            problem = next((p for p in D.all_gather_objects(problem) if p), None)
            if problem is None:
                self._load(ck)
                path = str(candidate)
                break
            if self.dist.is_main:
                warnings.warn(f"skipping checkpoint: {problem}", stacklevel=2)
        if self.dist.is_main:
            truncate_metrics(self.out_dir / METRICS_FILE, self.step)
            if path is not None:
                print(f"resuming from checkpoint {path} (step {self.step})", file=sys.stderr, flush=True)
        return path is not None

    def _misfit(self, ck: Checkpoint) -> str | None:
        """Why this run cannot continue `ck` (another model, another number of data streams), or None."""
        if ModelConfig(**ck.meta["model"]) != self.model.cfg:
            return f"{ck.path / 'meta.json'}: model config differs from this run's"
        if ck.lora and self.lora and ck.lora["base_sha256"] != self.lora["base_sha256"]:
            return (f"{ck.path / 'meta.json'}: its LoRA adapters belong to base weights with sha256 "
                    f"{ck.lora['base_sha256']}, but this run's base (model.init_from) has "
                    f"{self.lora['base_sha256']}")  # fmt: skip
        if ck.lora != self.lora:
            return f"{ck.path / 'meta.json'}: train.lora differs from this run's ({ck.lora} here, {self.lora} now)"
        streams = len(json.loads(ck.state["sampler"]))
        if streams != len(self.samplers) * self.world:
            return (
                f"{ck.path / 'state.pt'}: {streams} data streams (world_size x grad_accum); this run has "
                f"{len(self.samplers) * self.world}"
            )
        return None

    def _load(self, ck: Checkpoint) -> None:
        state = apply_checkpoint(
            ck, self.model, self.optimizer, self.scaler, rank=self.rank, no_dist=not D.is_distributed()
        )
        streams = state["sampler_state"]
        for m, sampler in enumerate(self.samplers):
            sampler.load_state_dict(streams[self.rank * len(self.samplers) + m])
        self.step, self.extra = state["step"], state["meta"]["extra"]

    def save(self, final: bool = False) -> None:
        """All ranks contribute RNG and data cursors; with ddp rank 0 writes, with fsdp every rank writes its
        shards (and the `final` checkpoint also gets the consolidated model.safetensors)."""
        mine = {"rng": rng_state(), "samplers": [s.state_dict() for s in self.samplers]}
        everyone = D.all_gather_objects(mine)
        streams, rngs = [s for r in everyone for s in r["samplers"]], [r["rng"] for r in everyone]
        if self.fsdp:
            save_sharded_checkpoint(
                self.out_dir,
                self.step,
                self.model,
                self.optimizer,
                streams,
                self.extra,
                rng_states=rngs,
                consolidate=final,
                lora=self.lora,
            )
        elif self.dist.is_main:
            save_checkpoint(
                self.out_dir,
                self.step,
                self.model,
                self.optimizer,
                self.scaler,
                sampler_state=streams,
                extra=self.extra,
                rng_states=rngs,
                lora=self.lora,
                final=final,
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
                x, y = (
                    x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True),
                )
            sync = m == n - 1  # gradients are reduced across ranks after the last micro-batch only
            if self.fsdp:
                self.model.set_requires_gradient_sync(sync)
            no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()
            with no_sync:
                with self.ctx:
                    _, loss = model(x, y)
                loss_sum += loss.detach()
                self.scaler.scale(loss / n).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        # with fsdp the gradients are DTensor shards: the norm is the global one (a replicated DTensor)
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / n, grad_norm

    def _train_line(self, loss: float, grad_norm: torch.Tensor, tokens_per_sec: float) -> TrainLine:
        util, mem = self.gpu.sample() if self.gpu is not None else (None, None)
        return TrainLine(
            step=self.step,
            time=time.time(),
            loss=loss,
            lr=lr_at(self.step - 1, self.cfg),
            grad_norm=grad_norm.item(),
            tokens_per_sec=tokens_per_sec,
            mfu=self.flops_per_token * tokens_per_sec / (self.peak * self.world) if self.peak else None,
            peak_mem_mb=peak_memory_mb(self.device),
            elapsed_s=self.extra["elapsed_s"],
            tokens_seen=self.extra["tokens_seen"],
            gpu_util=util,
            gpu_mem_mb=mem,
        )

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        metrics = MetricsWriter(self.out_dir / METRICS_FILE if self.dist.is_main else None)

        def elapsed() -> float:  # over all attempts of this run
            return elapsed0 + _clock() - self.t_start

        elapsed0, t_log, steps_logged = self.extra["elapsed_s"], _clock(), self.step
        saved_step = self.step if self.resumed else -1
        step_time, save_time, stop_reason = 0.0, 0.0, None
        # Stop while the steps to the next check and a checkpoint still fit. Ranks must agree, which costs a
        # collective and a host sync: with several ranks, decide every BUDGET_CHECK_EVERY steps, not every step.
        every = 1 if self.world == 1 else BUDGET_CHECK_EVERY
        self.stop.install()
        try:
            while self.step < cfg.max_steps:
                if cfg.pause_at is not None and self.step >= cfg.pause_at:  # a rung of successive halving
                    stop_reason = "paused"
                    break
                if self.step % every == 0 and (stop_reason := self._should_stop(every, step_time, save_time)):
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
                    metrics.write(self._train_line(self.extra["train_loss"], grad_norm, tokens_per_sec))
                pause = self.step == cfg.pause_at and not last
                if self.step % cfg.eval_interval == 0 or last or pause:  # a pause is judged by its estimate
                    t_eval = _clock()
                    self.extra["val_loss"] = estimate_loss(
                        self.fwd, self.val_batches, self.ctx, self.device, lockstep=self.fsdp
                    )
                    metrics.write(
                        EvalLine(step=self.step, time=time.time(), val_loss=self.extra["val_loss"], elapsed_s=elapsed())
                    )
                    t_log += _clock() - t_eval  # tokens/s and MFU measure training steps, not evaluation
                if self.step % cfg.checkpoint_interval == 0 or last:
                    t_save = _clock()
                    self.save(final=last)
                    save_time, saved_step = _clock() - t_save, self.step
                    t_log += save_time
                step_time = max(0.8 * step_time, _clock() - t0)  # decays slowly: a cautious estimate
            if stop_reason is not None and saved_step != self.step:
                self.extra["elapsed_s"] = elapsed()
                self.save()
        finally:
            self.stop.uninstall()
            metrics.close()
        if stop_reason is not None and self.dist.is_main:
            print(
                f"stopped at step {self.step} ({stop_reason}); the checkpoint is committed: run again to resume",
                file=sys.stderr,
                flush=True,
            )
        return self._summary(stop_reason)

    def _should_stop(self, every: int, step_time: float, save_time: float) -> str | None:
        """Why every rank stops before this step ("time_budget" or "requested"), or None. With several ranks
        this is a collective: all ranks call it at the same steps."""
        cfg = self.cfg
        late = cfg.time_budget_s is not None and (
            _clock() - self.t_start + (every + 0.5) * step_time + save_time > cfg.time_budget_s
        )
        requested = self.stop.requested is not None
        if self.world > 1:
            late, requested = D.any_rank(late, self.device), D.any_rank(requested, self.device)
        return "requested" if requested else "time_budget" if late else None

    def _summary(self, stop_reason: str | None) -> dict[str, Any]:
        summary = {
            "steps": self.step,
            "final_train_loss": self.extra["train_loss"],
            "final_val_loss": self.extra["val_loss"],
            "params": self.model.num_params(),
            "tokens_seen": self.extra["tokens_seen"],
            "seconds": self.extra["elapsed_s"],
            "stopped_early": stop_reason is not None,
            "stop_reason": stop_reason,
            "frozen": len(self.frozen),
        }
        if self.dist.is_main:
            atomic_write_json(self.out_dir / SUMMARY, summary)
        return summary


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, shards_dir: Path, out_dir: Path, seed: int,
          init: Path | None = None) -> dict:  # fmt: skip
    """Train (or continue training) in out_dir; returns the summary also written to out_dir/summary.json.
    ``init``: a weights-only checkpoint to start from (``checkpoint.save_weights``) when out_dir has none."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # One training per out_dir at a time: rank 0 holds the lock from before it reads a checkpoint until the
    # summary is written (the other ranks wait for rank 0 at the rendezvous).
    lock = (
        file_lock(Path(out_dir) / LOCK_FILE, f"training in {out_dir}")
        if D.read_launch_env().rank == 0
        else nullcontext()
    )
    with lock:
        try:
            return Trainer(model_cfg, train_cfg, shards_dir, out_dir, seed, init).run()
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
        return None, [f"{path}: {p}" for p in config_error_lines(e)]
    return run, []


def config_error_lines(err: ValidationError) -> list[str]:
    """``field.path: message`` per problem (a section's broken rules one line each)."""
    from llmcore.config import RULES_ERROR

    lines = []
    for e in err.errors():
        loc = ".".join(map(str, e["loc"]))
        if e["type"] == RULES_ERROR:
            lines += [f"{loc + '.' if loc else ''}{p}" for p in e["ctx"]["problems"]]
        else:
            lines.append(f"{loc or '(top level)'}: {e['msg']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmcore.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="JSON with model, train and seed")
    parser.add_argument("--shards", type=Path, required=True, help="shards directory (with manifest.json)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (resumed if it has checkpoints)")
    parser.add_argument("--init", type=Path, help="weights to start from (a weights-only checkpoint directory)")
    args = parser.parse_args(argv)
    halt = os.environ.get(HALT_ENV)
    if halt and Path(halt).exists():  # launched after its submit was told to stop: do no work
        print(f"not started: {halt} says its submit was stopped", file=sys.stderr)
        return exitcodes.STOP_REQUESTED
    run, problems = load_run_config(args.config)
    if problems:
        print("invalid training config:\n  " + "\n  ".join(problems), file=sys.stderr)
        return exitcodes.BAD_INPUT
    try:
        summary = train(run.model, run.train, args.shards, args.out, run.seed, args.init)
    except ShardError as e:
        hint = (
            f"\nthe shards directory is damaged or incomplete: delete {args.shards} and submit again to rebuild it"
            if isinstance(e, ShardDamagedError)
            else ""
        )
        print(f"error: {e}{hint}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    except DeviceError as e:  # a spec asking for hardware this machine lacks: the same on every retry
        print(f"error: train.device / train.precision: {e}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    except (CheckpointError, D.LaunchError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    except OSError as e:
        if not is_no_space(e):
            raise
        print(
            f"error: cannot write {e.filename or args.out}: {e.strerror} (free space or raise the quota, then "
            "submit again: training resumes from its last committed checkpoint)",
            file=sys.stderr,
        )
        return exitcodes.NO_SPACE
    if D.read_launch_env().rank == 0:
        print(json.dumps(summary))
    codes = {None: exitcodes.OK, "time_budget": exitcodes.STOPPED_EARLY, "requested": exitcodes.STOP_REQUESTED,
             "paused": exitcodes.STOP_REQUESTED}  # fmt: skip
    return codes[summary["stop_reason"]]


if __name__ == "__main__":
    sys.exit(main())
