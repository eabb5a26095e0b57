"""Crash-safe checkpoints that a resumed run can trust.

Layout: ``OUT/checkpoints/step_00001000/`` holding
  - ``model.safetensors``: the weights (tied weights stored once; safetensors cannot run code),
  - ``state.pt``: optimizer, loss scaler, RNG states (one per rank), data-loader cursor, step; plain tensors and
    Python types only, loaded with ``torch.load(weights_only=True)``,
  - ``meta.json``: model config, vocabulary size, step and whatever the trainer adds (losses, tokens seen),
  - ``DONE.json``: the commit marker, written last, with each file's size and sha256.

Every file is written atomically (temp file, fsync, rename). A directory without a marker, or whose files do
not match it, is never used; the newest ``keep`` committed checkpoints are kept, older ones are deleted only
after the new one is committed.

Sharded layout (``train.parallelism: fsdp``; ``meta.json`` says ``"layout": "sharded"``): every rank writes its
shard of the model and AdamW state with ``torch.distributed.checkpoint`` (DCP: ``__R_0.distcp`` per rank R and
DCP's ``.metadata``), keyed by parameter name, so they load on any number of ranks, sharded or not (DCP
reshards); ``state.pt`` holds the rest (step, every rank's RNG state, the data cursors; no optimizer). Each rank
hashes the shard files it wrote; rank 0 writes ``DONE.json`` last, listing every file, once all have reported.
The run's final checkpoint (``consolidate``) also holds the whole model as ``model.safetensors``; ``load_model``
reads the DCP files of the others in one process.

LoRA (``train.lora``; ``meta.json`` holds ``"lora"``: the adapted layers, r, alpha, and ``base_sha256``, the sha256
of the base weights file the adapters belong to): a checkpoint holds the adapters only, as ``lora.safetensors``
(sharded: only the adapters in the DCP files), and the optimizer state of the adapters; the run's final checkpoint
also holds the merged weights as a plain ``model.safetensors``, which every reader loads with no LoRA knowledge.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from llmcore.config import ModelConfig
from llmcore.io import COMMIT_MARKER, atomic_write_bytes, read_json, write_commit_marker
from llmcore.model import GPT

CHECKPOINTS = "checkpoints"
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.pt", "meta.json"
LORA_FILE = "lora.safetensors"  # the adapters of a LoRA training
FORMAT = 1
SHARDED = "sharded"  # meta.json "layout" of checkpoints every rank writes through DCP
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")  # DCP's file of rank R


class CheckpointError(ValueError):
    """A checkpoint is missing, torn, corrupt or unsafe; the message names the file."""


def unwrap(model: torch.nn.Module) -> GPT:
    """The GPT inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


# ------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, random) as tensors and plain types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ----------------------------------------------------------------------------------------------- saving


def _weights(model: GPT) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor stored once, and the aliases {dropped name: kept name}."""
    return _dedup(model.state_dict())


def _dedup(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step_{step:08d}"


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any = None,
    sampler_state: Any = None,
    extra: dict[str, Any] | None = None,
    *,
    rng_states: list[dict[str, Any]] | None = None,
    keep: int = 2,
    lora: dict[str, Any] | None = None,
    final: bool = False,
) -> Path:
    """Write a committed checkpoint for `step`; return its directory.

    sampler_state: the data-loader cursor (JSON-able; the trainer passes one per data stream).
    rng_states: one `rng_state()` per rank, in rank order; default: this process's only.
    extra: JSON-able facts stored in meta.json (the trainer keeps losses and counters there).
    lora: a LoRA model's adapters' description (meta.json's "lora"): only the adapters are written, and with
    `final` the merged weights as model.safetensors.
    """
    gpt = unwrap(model)
    path = step_dir(out_dir, step)
    if path.exists():  # a torn attempt (or an older run's) at this step: start clean
        shutil.rmtree(path)
    path.mkdir(parents=True)
    optim = optimizer.state_dict()
    rng = rng_states if rng_states is not None else [rng_state()]
    state = {k: v.detach().to("cpu") for k, v in gpt.state_dict().items()}
    files = _write_blobs(
        path,
        {
            **_weight_blobs(state, gpt, lora, final),
            STATE_FILE: _state_bytes(step, optim, scaler, rng, sampler_state),
            META_FILE: _meta_bytes(gpt, step, extra, **({"lora": lora} if lora else {})),
        },
    )
    write_commit_marker(path, {"step": step, "files": files})
    _prune(Path(out_dir), keep)
    return path


def _weight_blobs(state: dict[str, torch.Tensor], gpt: torch.nn.Module, lora: dict[str, Any] | None,
                  final: bool) -> dict[str, bytes]:  # fmt: skip
    """model.safetensors of a full state dict; of a LoRA model's: lora.safetensors (the adapters), and when
    `final` also the merged weights as model.safetensors."""
    from llmcore.lora import adapter_state_dict, merge_state_dict

    blobs = {}
    if lora is not None:
        adapters = {k: v.contiguous() for k, v in adapter_state_dict(state).items()}
        meta = {"aliases": "{}", "base_sha256": lora["base_sha256"]}
        blobs[LORA_FILE] = save_safetensors(adapters, metadata=meta)
        if not final:
            return blobs
        state = merge_state_dict(state, gpt)
    tensors, aliases = _dedup(state)
    blobs[MODEL_FILE] = save_safetensors({k: v.contiguous() for k, v in tensors.items()},
                                         metadata={"aliases": json.dumps(aliases)})  # fmt: skip
    return blobs


def save_weights(path: Path, model: torch.nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """A weights-only committed checkpoint (model.safetensors and meta.json, the marker last): what training
    starts from when the spec says ``model.init_from`` (imported from a Hugging Face folder or an earlier run)."""
    gpt = unwrap(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _weights(gpt)
    files = _write_blobs(path, {MODEL_FILE: save_safetensors(tensors, metadata={"aliases": json.dumps(aliases)}),
                                META_FILE: _meta_bytes(gpt, 0, extra)})  # fmt: skip
    write_commit_marker(path, {"step": 0, "files": files})
    return path


def _state_bytes(step: int, optim: Any, scaler: Any, rng: list[dict[str, Any]], sampler_state: Any) -> bytes:
    state = {
        "format": FORMAT,
        "step": step,
        "optimizer": optim,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng,
        "sampler": json.dumps(sampler_state),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _meta_bytes(gpt: GPT, step: int, extra: dict[str, Any] | None, **layout: Any) -> bytes:
    meta = {
        "format": FORMAT,
        "step": step,
        "model": gpt.cfg.model_dump(mode="json"),
        "vocab_size": gpt.vocab_size,
        "extra": extra or {},
        **layout,
    }
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def _write_blobs(path: Path, blobs: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """Write each blob atomically; return the marker's {name: {"bytes", "sha256"}}."""
    files = {}
    for name, data in blobs.items():
        atomic_write_bytes(path / name, data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def _sha256_file(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _tied(state_dict: dict[str, Any]) -> dict[str, str]:
    """{dropped name: kept name} for entries holding the same tensor object (the tied embedding and head)."""
    first: dict[int, str] = {}
    return {k: first[id(v)] for k, v in state_dict.items() if first.setdefault(id(v), k) != k}


def save_sharded_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler_state: Any,
    extra: dict[str, Any] | None,
    *,
    rng_states: list[dict[str, Any]],
    consolidate: bool,
    keep: int = 2,
    lora: dict[str, Any] | None = None,
) -> Path:
    """Write a committed sharded checkpoint for `step`; a collective: every rank calls it with its FSDP model.

    Each rank writes its shard of the model and optimizer (DCP) and hashes the files it wrote; rank 0 writes
    state.pt and meta.json, with `consolidate` also the full weights as model.safetensors (gathered to its CPU:
    parameters x 4 bytes of host memory), then, when every rank has reported its files, DONE.json. With `lora`
    only the adapters go to the DCP files, and the consolidated weights are merged.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    gpt, path = unwrap(model), step_dir(out_dir, step)
    if rank == 0 and path.exists():  # a torn attempt (or an older run's) at this step: start clean
        shutil.rmtree(path)
    dist.barrier()  # nobody writes into the directory rank 0 is clearing
    model_sd, optim_sd = get_state_dict(gpt, optimizer)
    aliases = _tied(model_sd)  # the tied head is stored once, as the embedding
    shards = {"model": _saved_keys(model_sd, aliases, lora), "optimizer": optim_sd}
    try:
        dcp.save(shards, checkpoint_id=path)
    except CheckpointException as e:  # every rank gets every rank's failure: a full disk stays an OSError
        raise next((exc for exc, _ in e.failures.values() if isinstance(exc, OSError)), e) from None
    full = {}
    if consolidate:  # every rank takes part in the gather; rank 0 alone receives the tensors
        full = get_model_state_dict(gpt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    blobs = {}
    if rank == 0:
        blobs = {
            STATE_FILE: _state_bytes(step, None, None, rng_states, sampler_state),
            META_FILE: _meta_bytes(
                gpt, step, extra, layout=SHARDED, world_size=world, **({"lora": lora} if lora else {})
            ),
        }
        if consolidate:
            if lora is not None:
                from llmcore.lora import merge_state_dict

                full = merge_state_dict(full, gpt)
            weights = {k: v.contiguous() for k, v in full.items() if k not in aliases}
            blobs[MODEL_FILE] = save_safetensors(weights, metadata={"aliases": json.dumps(aliases)})
    files = _gather_files(path, blobs, rank, world)
    if rank == 0:  # every rank has reported: every shard is complete
        write_commit_marker(path, {"step": step, "files": files})
        _prune(Path(out_dir), keep)
    return path


def _saved_keys(model_sd: dict[str, Any], aliases: dict[str, str], lora: dict[str, Any] | None) -> dict[str, Any]:
    """The model entries a sharded checkpoint holds: each tensor once; of a LoRA model, its adapters only."""
    from llmcore.lora import is_adapter

    return {k: v for k, v in model_sd.items() if k not in aliases and (lora is None or is_adapter(k))}


def _gather_files(path: Path, blobs: dict[str, bytes], rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Write `blobs` (rank 0's files), hash the files this rank wrote (rank 0 also DCP's .metadata), gather
    every rank's: the marker's {name: {"bytes", "sha256"}}. A collective; a write or read that fails on any
    rank raises the OSError on every rank, so that none waits for another in a later collective."""
    import torch.distributed as dist

    files: dict[str, dict[str, Any]] = {}
    failed = None
    try:
        files = _write_blobs(path, blobs)
        for f in sorted(path.iterdir()):
            if f.name not in files and _hashed_by(f.name, world) == rank:
                files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256_file(f)}
    except OSError as e:
        failed = (e.errno, e.strerror, e.filename)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (files, failed))
    errors = [err for _, err in everyone if err is not None]
    if errors:
        raise OSError(*errors[0])
    return dict(sorted((name, info) for part, _ in everyone for name, info in part.items()))


def _hashed_by(name: str, world: int) -> int:
    """The rank that hashes a file of a sharded checkpoint: the one that wrote it, else rank 0."""
    m = _RANK_FILE.match(name)
    return int(m.group(1)) if m and int(m.group(1)) < world else 0


def _step_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _prune(out_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` committed checkpoints, and any torn directories."""
    committed = 0
    for _, p in _step_dirs(out_dir):
        if (p / COMMIT_MARKER).is_file() and committed < keep:
            committed += 1
        else:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- finding


def _check_sizes(path: Path) -> str | None:
    """Why `path` is not a usable committed checkpoint (cheap: marker and file sizes), or None."""
    marker = path / COMMIT_MARKER
    if not marker.is_file():
        return f"{marker} is missing (checkpoint not committed)"
    try:
        files = read_json(marker)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{marker} is unreadable: {e}"
    for name, info in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            return f"{f} is missing or truncated"
    return None


def checkpoints(out_dir: Path) -> list[Path]:
    """Committed checkpoints whose files have the recorded sizes, newest first."""
    return [p for _, p in _step_dirs(out_dir) if _check_sizes(p) is None]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest committed checkpoint under out_dir (torn or truncated ones are skipped), or None."""
    found = checkpoints(out_dir)
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------- loading


def _listed(path: Path) -> dict[str, dict[str, Any]]:
    """The files DONE.json lists, after checking every size; CheckpointError if torn."""
    problem = _check_sizes(path)
    if problem:
        raise CheckpointError(problem)
    return read_json(path / COMMIT_MARKER)["files"]


def _read_verified(path: Path, name: str) -> bytes:
    info = _listed(path).get(name)
    f = path / name
    if info is None:
        raise CheckpointError(f"{f} is not listed in {path / COMMIT_MARKER}")
    data = f.read_bytes()
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CheckpointError(f"{f} is corrupt (sha256 differs from {COMMIT_MARKER})")
    return data


def _verify_files(path: Path, names: list[str]) -> None:
    """sha256 of each named file (read in chunks: shards can be large) against DONE.json."""
    listed = _listed(path)
    for name in names:
        if _sha256_file(path / name) != listed[name]["sha256"]:
            raise CheckpointError(f"{path / name} is corrupt (sha256 differs from {COMMIT_MARKER})")


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(_read_verified(path, META_FILE))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path / META_FILE} is not valid JSON: {e}") from e


def _read_weights(path: Path, name: str = MODEL_FILE) -> dict[str, torch.Tensor]:
    """model.safetensors (or `name`), verified, with the tied names restored."""
    data = _read_verified(path, name)
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        aliases = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["aliases"])
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path / name} is not a valid safetensors file: {e}") from e
    for name, kept in aliases.items():
        tensors[name] = tensors[kept]
    return tensors


def _apply_weights(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    try:
        unwrap(model).load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{path / MODEL_FILE} does not fit the model: {e}") from e


def _apply_adapters(path: Path, model: torch.nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    """A LoRA checkpoint's adapters into a LoRA model (its base weights loaded already): every adapter of the
    model, nothing else."""
    from llmcore.lora import is_adapter

    gpt = unwrap(model)
    want = {k for k in gpt.state_dict() if is_adapter(k)}
    if set(adapters) != want:
        odd = sorted(set(adapters) ^ want)
        raise CheckpointError(f"{path / LORA_FILE}: its adapters do not fit this model's LoRA layers ({odd[0]}, ...)")
    try:
        gpt.load_state_dict(adapters, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path / LORA_FILE} does not fit the model: {e}") from e


def weights_sha256(path: Path) -> str:
    """The sha256 of a committed checkpoint's model.safetensors, as its DONE.json records it (what a LoRA
    checkpoint names as its base)."""
    info = _listed(Path(path)).get(MODEL_FILE)
    if info is None:
        raise CheckpointError(f"{Path(path) / MODEL_FILE} is not listed in {Path(path) / COMMIT_MARKER}")
    return info["sha256"]


def load_weights(path: Path, model: torch.nn.Module) -> None:
    _apply_weights(path, model, _read_weights(path))


def _read_state(path: Path) -> dict[str, Any]:
    data = _read_verified(path, STATE_FILE)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, others for garbage
        raise CheckpointError(f"{path / STATE_FILE} cannot be loaded safely (weights_only=True): {e}") from e


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, no_dist: bool,
                  lora: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Read a sharded checkpoint's DCP files into `model` (sharded or not) and `optimizer`: each rank reads
    what its tensors need, whatever the number of ranks that wrote them. A collective unless `no_dist`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    gpt = unwrap(model)
    model_sd, optim_sd = get_state_dict(gpt, optimizer) if optimizer is not None else (get_model_state_dict(gpt), None)
    aliases = _tied(model_sd)
    wanted: dict[str, Any] = {"model": _saved_keys(model_sd, aliases, lora)}
    if optimizer is not None:
        wanted["optimizer"] = optim_sd
    try:
        with warnings.catch_warnings():  # DCP warns that it assumes one process, which is what no_dist says
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wanted, checkpoint_id=path, no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # DCP's (a BaseException) wraps every rank's read error
        raise CheckpointError(f"{path}: the sharded checkpoint does not load into this model: {e}") from e
    model_sd = {
        **wanted["model"],
        **{k: wanted["model"][kept] for k, kept in aliases.items() if kept in wanted["model"]},
    }
    options = StateDictOptions(strict=lora is None)  # a LoRA checkpoint holds the adapters, not the base weights
    if optimizer is None:
        set_model_state_dict(gpt, model_sd, options=options)
    else:
        set_state_dict(gpt, optimizer, model_state_dict=model_sd, optim_state_dict=wanted["optimizer"], options=options)


@dataclass
class Checkpoint:
    """A committed checkpoint read and verified (`read_checkpoint`), not yet applied (`apply_checkpoint`)."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any]  # step, optimizer (single-file layout), scaler, rng (one per rank), sampler (JSON)
    weights: dict[str, torch.Tensor] | None  # single-file layout (LoRA: the adapters); None: sharded (DCP files)

    @property
    def sharded(self) -> bool:
        return self.meta.get("layout") == SHARDED

    @property
    def lora(self) -> dict[str, Any] | None:
        """A LoRA checkpoint's description (adapted layers, r, alpha, base_sha256); None for full weights."""
        return self.meta.get("lora")


def read_checkpoint(path: Path, *, rank: int = 0, world: int = 1) -> Checkpoint:
    """Read and verify a committed checkpoint without touching any model: every file's size, and the sha256 of
    meta.json, state.pt and the single-file weights. Of a sharded checkpoint's model and optimizer files this
    rank hashes its share (every `world`-th): the ranks together check them all and must agree (a problem on
    any rank means no rank uses it). Raises CheckpointError naming the file."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("layout") == SHARDED:
        shards = sorted(n for n in _listed(path) if n not in (META_FILE, STATE_FILE))
        _verify_files(path, shards[rank::world])
        weights = None
    else:
        weights = _read_weights(path, LORA_FILE if meta.get("lora") else MODEL_FILE)
    return Checkpoint(path, meta, _read_state(path), weights)


def apply_checkpoint(
    ck: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    *,
    rank: int = 0,
    restore_rng: bool = True,
    no_dist: bool = True,
) -> dict[str, Any]:
    """Load `ck` into the model (and optimizer, scaler, this rank's RNG when given/asked); returns {"step",
    "sampler_state", "meta"}. A sharded checkpoint loads into a plain or an FSDP model (a collective over the
    ranks unless `no_dist`); a single-file one into a plain model only."""
    from llmcore.parallel import is_sharded

    if restore_rng and rank >= len(ck.state["rng"]):
        raise CheckpointError(
            f"{ck.path / STATE_FILE} holds RNG states for {len(ck.state['rng'])} ranks; rank {rank} cannot resume"
        )
    if ck.sharded:
        _load_sharded(ck.path, model, optimizer, no_dist, ck.lora)
    elif is_sharded(model):
        raise CheckpointError(f"{ck.path}: a single-file (ddp) checkpoint cannot resume an fsdp training")
    elif ck.lora:
        _apply_adapters(ck.path, model, ck.weights)
        if optimizer is not None:
            optimizer.load_state_dict(ck.state["optimizer"])
    else:
        _apply_weights(ck.path, model, ck.weights)
        if optimizer is not None:
            optimizer.load_state_dict(ck.state["optimizer"])
    if scaler is not None and ck.state["scaler"] is not None:
        scaler.load_state_dict(ck.state["scaler"])
    if restore_rng:
        set_rng_state(ck.state["rng"][rank])
    return {"step": ck.state["step"], "sampler_state": json.loads(ck.state["sampler"]), "meta": ck.meta}


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    *,
    rank: int = 0,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load weights (and optimizer, scaler, this rank's RNG when given/asked) from a committed checkpoint, in
    one process. Returns {"step", "sampler_state", "meta"}. Any missing, truncated, corrupt or unsafe file
    raises CheckpointError naming it, before anything is loaded; nothing is executed from the files
    (safetensors + weights_only=True)."""
    return apply_checkpoint(read_checkpoint(path), model, optimizer, scaler, rank=rank, restore_rng=restore_rng)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """(model in eval mode on `device`, meta) from a checkpoint directory or a training directory's latest one.
    A sharded checkpoint without the consolidated model.safetensors is read from its DCP files (verified)."""
    path = Path(path)
    if not (path / META_FILE).is_file():  # a training directory (it may hold its own stage marker)
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no committed checkpoint under {path / CHECKPOINTS}")
        path = found
    meta = read_meta(path)
    model = GPT(ModelConfig(**meta["model"]), meta["vocab_size"])
    listed = _listed(path)
    if meta.get("lora") and MODEL_FILE not in listed:
        raise CheckpointError(f"{path}: a LoRA checkpoint holding the adapters only ({LORA_FILE}, for base weights "
                              f"with sha256 {meta['lora']['base_sha256'][:12]}...); the run's final checkpoint holds "
                              "the merged weights: let the training finish")  # fmt: skip
    if MODEL_FILE in listed or meta.get("layout") != SHARDED:
        load_weights(path, model)
    else:
        _verify_files(path, sorted(n for n in listed if n not in (META_FILE, STATE_FILE)))
        _load_sharded(path, model, None, no_dist=True)
    meta["path"] = str(path)
    return model.to(device).eval(), meta
