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
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
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
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


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
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
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
) -> Path:
    """Write a committed checkpoint for `step`; return its directory.

    sampler_state: the data-loader cursor (JSON-able; the trainer passes one per data stream).
    rng_states: one `rng_state()` per rank, in rank order; default: this process's only.
    extra: JSON-able facts stored in meta.json (the trainer keeps losses and counters there).
    """
    gpt = unwrap(model)
    path = step_dir(out_dir, step)
    if path.exists():  # a torn attempt (or an older run's) at this step: start clean
        shutil.rmtree(path)
    path.mkdir(parents=True)
    tensors, aliases = _weights(gpt)
    state = {
        "format": FORMAT,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_states if rng_states is not None else [rng_state()],
        "sampler": json.dumps(sampler_state),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    meta = {
        "format": FORMAT,
        "step": step,
        "model": gpt.cfg.model_dump(mode="json"),
        "vocab_size": gpt.vocab_size,
        "extra": extra or {},
    }
    blobs = {
        MODEL_FILE: save_safetensors(tensors, metadata={"aliases": json.dumps(aliases)}),
        STATE_FILE: buf.getvalue(),
        META_FILE: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
    }
    files = {}
    for name, data in blobs.items():
        atomic_write_bytes(path / name, data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_commit_marker(path, {"step": step, "files": files})
    _prune(Path(out_dir), keep)
    return path


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


def _read_verified(path: Path, name: str) -> bytes:
    problem = _check_sizes(path)
    if problem:
        raise CheckpointError(problem)
    info = read_json(path / COMMIT_MARKER)["files"].get(name)
    f = path / name
    if info is None:
        raise CheckpointError(f"{f} is not listed in {path / COMMIT_MARKER}")
    data = f.read_bytes()
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CheckpointError(f"{f} is corrupt (sha256 differs from {COMMIT_MARKER})")
    return data


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(_read_verified(path, META_FILE))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path / META_FILE} is not valid JSON: {e}") from e


def load_weights(path: Path, model: torch.nn.Module) -> None:
    data = _read_verified(path, MODEL_FILE)
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        aliases = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["aliases"])
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path / MODEL_FILE} is not a valid safetensors file: {e}") from e
    for name, kept in aliases.items():
        tensors[name] = tensors[kept]
    try:
        unwrap(model).load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{path / MODEL_FILE} does not fit the model: {e}") from e


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    *,
    rank: int = 0,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load weights (and optimizer, scaler, this rank's RNG when given/asked) from a committed checkpoint.

    Returns {"step", "sampler_state", "meta"}. Any missing, truncated, corrupt or unsafe file raises
    CheckpointError naming it; nothing is executed from the files (safetensors + weights_only=True).
    """
    path = Path(path)
    meta = read_meta(path)
    load_weights(path, model)
    data = _read_verified(path, STATE_FILE)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, others for garbage
        raise CheckpointError(f"{path / STATE_FILE} cannot be loaded safely (weights_only=True): {e}") from e
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        if rank >= len(state["rng"]):
            raise CheckpointError(
                f"{path / STATE_FILE} holds RNG states for {len(state['rng'])} ranks; rank {rank} cannot resume"
            )
        set_rng_state(state["rng"][rank])
    return {"step": state["step"], "sampler_state": json.loads(state["sampler"]), "meta": meta}


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """(model in eval mode on `device`, meta) from a checkpoint directory or a training directory's latest one."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file():  # a training directory (it may hold its own stage marker)
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no committed checkpoint under {path / CHECKPOINTS}")
        path = found
    meta = read_meta(path)
    model = GPT(ModelConfig(**meta["model"]), meta["vocab_size"])
    load_weights(path, model)
    meta["path"] = str(path)
    return model.to(device).eval(), meta
