"""Small corpora and specs that tests build themselves (no downloads, no shared data)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wise owls watch quietly from old oak trees "
    "and every river runs to the sea under a pale moon"
).split()


def make_corpus(directory: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """Write ``n_docs`` small text files of pseudo-English into ``directory``; returns the directory."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
            for _ in range(rng.randint(8, 16))
        ]
        (directory / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def tiny_spec(corpus: Path, runs_root: Path, **sections: Any) -> dict[str, Any]:
    """A spec tree that runs end to end in seconds: char tokenizer, one-layer model, 30 steps."""
    tree: dict[str, Any] = {
        "name": "tiny",
        "seed": 7,
        "runs_root": str(runs_root),
        "data": {"sources": [{"type": "files", "path": str(corpus)}], "val_fraction": 0.2, "num_workers": 1},
        "tokenizer": {"model_type": "char", "vocab_size": 64, "num_threads": 1},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "train": {
            "batch_size": 8,
            "max_steps": 30,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 5,
            "eval_interval": 10,
            "eval_batches": 2,
            "checkpoint_interval": 15,
            "device": "cpu",
        },
        "eval": {"batches": 4, "batch_size": 8, "prompts": ["The "], "max_new_tokens": 20},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key].update(value)
        else:
            tree[key] = value
    return tree


def write_spec(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def wait_for_json(url: str, proc: Any, seconds: float, log: Callable[[], str]) -> Any:
    """Poll ``url`` until it answers JSON; fail with the server's log if ``proc`` dies or time runs out."""
    import json
    import time
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.load(resp)
        except OSError:
            assert proc.poll() is None, log()
            assert time.time() < deadline, f"{url} did not answer in {seconds:.0f} s:\n{log()}"
            time.sleep(0.5)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: Any) -> None:
    """SIGTERM a server's process group (started with start_new_session=True: the server, its workers, their
    children), SIGKILL what lingers."""
    import os
    import signal
    import time

    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + grace
        while time.time() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)  # anything left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.wait(timeout=10)


class Evil:
    """A pickle that, if ever unpickled, creates the file at ``path``: what a malicious checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling this would create the file


# ------------------------------------------------------------------------------- processes the tests start

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
#: Every launcher's rank variables: none may leak from the environment pytest runs in (inside salloc, under
#: mpiexec; RANK would win over PMI_RANK).
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PMI_RANK",
    "PMI_SIZE",
    "PMI_LOCAL_RANK",
    "PMI_FD",
    "PMI_PORT",
    "PMI_ID",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
    "PALS_RANKID",
    "PALS_LOCAL_RANKID",
    "PBS_NODEFILE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "GPTLAB_RANKS",
)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this repository first on the path, one thread per process (so
    float reductions happen in the same order in every run), no launcher variables, unbuffered output."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("OMPI_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def gptlab(*args: Any, timeout: float = 300, **popen: Any) -> Any:
    """Run the `gptlab` command line (as `python -m workflows.cli`) to the end; the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "workflows.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **popen)  # fmt: skip


def wait_for(predicate: Callable[[], Any], seconds: float, what: str, every: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something true (returned); fail naming ``what`` after ``seconds``."""
    import time

    deadline = time.time() + seconds
    while not (found := predicate()):
        assert time.time() < deadline, f"timed out after {seconds:.0f} s waiting for {what}"
        time.sleep(every)
    return found


def records(stage_dir: Any, kind: str = "train") -> list[dict[str, Any]]:
    """A training's metrics.jsonl records of one kind, as dicts (read with llmcore's reader)."""
    from llmcore.metrics import jsonable, read_metrics

    return [jsonable(r) for r in read_metrics(stage_dir / "metrics.jsonl") if r.kind == kind]


def trainings(stage_dir: Any) -> list[Any]:
    """The live `python -m llmcore.train` processes writing into ``stage_dir``."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if "llmcore.train" in cmd and str(stage_dir) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def kill_everything_under(root: Any, procs: list[Any]) -> None:
    """Test cleanup: our drivers, and any process (orphaned training, stopped or not) working under ``root``."""
    import os

    import psutil

    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    for p in psutil.process_iter(["cmdline"]):
        if str(root) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def require_mpiexec() -> str:
    import shutil

    import pytest

    path = shutil.which("mpiexec")
    if path is None:
        pytest.fail(
            "mpiexec is not on PATH: run .ci/mpi-up.sh (installs Debian's mpich) before the MPI tests", pytrace=False
        )
    return path


def run_shell(command: str, env: dict[str, str], timeout: float = 120) -> Any:
    """Run a shell command line as a Parsl bash app would; on timeout kill its whole process group (mpiexec and
    its ranks), not just the shell."""
    import os
    import signal
    import subprocess

    import pytest

    proc = subprocess.Popen(["bash", "-c", command], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {command}\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def train_command(config: Any, shards: Any, out: Any) -> str:
    """``python -m llmcore.train`` on one config, shards directory and output directory, shell-quoted."""
    import shlex
    import sys

    return shlex.join(
        [sys.executable, "-m", "llmcore.train", "--config", str(config), "--shards", str(shards), "--out", str(out)]
    )


def byte_level_bpe(files: list[Any], vocab_size: int) -> Any:
    """A GPT-2-style byte-level BPE trained with the `tokenizers` library, with <|endoftext|> as a special token."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet
    )
    tok.train([str(f) for f in files], trainer)
    return tok


def gpt2_folder(root: Any, corpus: Any, n_positions: int = 64) -> Any:
    """A GPT-2-shaped model with random weights and a byte-level BPE trained on the corpus, as from the hub."""
    import json

    import torch
    import transformers

    tok = byte_level_bpe(sorted(corpus.glob("*.txt")), 320)
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    )
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=32, n_layer=2,
                                  n_head=4, bos_token_id=0, eos_token_id=0)  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root)
    return root
