"""Training: schedule, resume to the same curve, crash safety of checkpoints, DDP on CPU, the CLI, hardware."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Evil, child_env, free_port, records

import llmcore.train as train_mod
from llmcore.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model
from llmcore.config import ConfigError, ModelConfig, TrainConfig
from llmcore.distributed import read_launch_env
from llmcore.hardware import peak_flops, peak_flops_for_name, resolve_device, resolve_precision
from llmcore.model import GPT
from llmcore.train import lr_at, main, train

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
STEPS = 40
BASE = dict(
    batch_size=4,
    max_steps=STEPS,
    lr_decay_steps=STEPS,
    warmup_steps=5,
    lr=3e-3,
    min_lr=3e-4,
    eval_interval=10,
    eval_batches=2,
    checkpoint_interval=10,
    device="cpu",
)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


def lines(out: Path, kind: str = "train") -> list[dict]:
    return records(out, kind)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in lines(out)}


def assert_same_curve(a: dict[int, float], b: dict[int, float], tol: float = 1e-4) -> None:
    assert sorted(a) == sorted(b)
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= tol, f"curves differ by {worst}"


@pytest.fixture(autouse=True)
def llm_one_thread():
    """Same thread count in every run (and in the subprocesses), so float reductions happen in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llm_reference(llm_shards, tmp_path_factory) -> Path:
    """One uninterrupted 40-step run that the resume tests compare against."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    summary = train(MODEL, cfg(), llm_shards, out, seed=3)
    assert summary["steps"] == STEPS and not summary["stopped_early"]
    return out


# --------------------------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_peak_and_end():
    c = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, c) == pytest.approx(1e-3 / 11)
    assert lr_at(9, c) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, c) == pytest.approx(1e-3)  # peak right after warmup
    assert lr_at(60, c) == pytest.approx(5.5e-4)  # half way down the cosine
    assert lr_at(110, c) == pytest.approx(1e-4) and lr_at(500, c) == pytest.approx(1e-4)
    c2 = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=1000, lr_decay_steps=100)
    assert lr_at(0, c2) == pytest.approx(1e-3) and lr_at(100, c2) == 0.0 and lr_at(999, c2) == 0.0
    constant = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, lr_schedule="constant")
    assert lr_at(5, constant) == lr_at(5, c) and lr_at(60, constant) == lr_at(109, constant) == 1e-3


def test_warmup_default_follows_max_steps():
    """A 20-step debug run works with the defaults: warmup is a tenth of max_steps, at most 100."""
    assert TrainConfig(max_steps=20).warmup_steps == 2
    assert TrainConfig(max_steps=5000).warmup_steps == 100
    assert TrainConfig(max_steps=20, warmup_steps=0).warmup_steps == 0


# ------------------------------------------------------------------------------------ runs and resuming


def test_run_writes_metrics_summary_and_keeps_two_checkpoints(llm_reference):
    train_rows = lines(llm_reference)
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    row = train_rows[-1]
    assert set(row) == {
        "kind",
        "step",
        "time",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "mfu",
        "peak_mem_mb",
        "elapsed_s",
        "tokens_seen",
        "gpu_util",
        "gpu_mem_mb",
    }
    assert row["mfu"] is None and row["peak_mem_mb"] is None and row["tokens_seen"] == STEPS * 4 * 16
    assert row["gpu_util"] is None and row["gpu_mem_mb"] is None  # a CPU run has no GPU figures
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    assert [r["step"] for r in lines(llm_reference, "eval")] == [10, 20, 30, 40]
    summary = json.loads((llm_reference / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_train_loss"] == row["loss"]
    assert summary["final_val_loss"] == lines(llm_reference, "eval")[-1]["val_loss"]
    assert sorted(p.name for p in (llm_reference / "checkpoints").iterdir()) == ["step_00000030", "step_00000040"]
    model, meta = load_model(llm_reference, "cpu")
    assert meta["step"] == STEPS and model.wte.weight is model.lm_head.weight


def test_resume_after_max_steps_continues_the_same_curve(llm_shards, llm_reference, tmp_path):
    first = train(MODEL, cfg(max_steps=15), llm_shards, tmp_path, seed=3)
    assert first["steps"] == 15
    again = train(MODEL, cfg(), llm_shards, tmp_path, seed=3)
    assert again["steps"] == STEPS
    assert_same_curve(losses(tmp_path), losses(llm_reference))
    assert again["final_val_loss"] == pytest.approx(
        json.loads((llm_reference / "summary.json").read_text())["final_val_loss"], abs=1e-4
    )
    # a finished run is not trained again
    assert train(MODEL, cfg(), llm_shards, tmp_path, seed=3)["steps"] == STEPS
    assert len(lines(tmp_path)) == STEPS


def test_time_budget_stops_cleanly_and_resumes(llm_shards, llm_reference, tmp_path, monkeypatch):
    ticks = iter(range(10**6))
    monkeypatch.setattr(train_mod, "_clock", lambda: 0.05 * next(ticks))  # every clock read is 50 ms later
    summary = train(MODEL, cfg(time_budget_s=2.0), llm_shards, tmp_path, seed=3)
    assert summary["stopped_early"] and 0 < summary["steps"] < STEPS
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_early"]
    assert latest_checkpoint(tmp_path).name == f"step_{summary['steps']:08d}"
    monkeypatch.undo()
    assert not train(MODEL, cfg(), llm_shards, tmp_path, seed=3)["stopped_early"]
    assert_same_curve(losses(tmp_path), losses(llm_reference))


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import llmcore.checkpoint as ck
from llmcore.config import ConfigError, ModelConfig, TrainConfig
from llmcore.train import train
real_marker = ck.write_commit_marker
def marker(directory, info):
    if info["step"] == 20:  # die while writing the second checkpoint: files written, no commit marker
        os.kill(os.getpid(), signal.SIGKILL)
    real_marker(directory, info)
ck.write_commit_marker = marker
args = sys.argv[1:]
train(ModelConfig.model_validate_json(args[0]), TrainConfig.model_validate_json(args[1]), Path(args[2]),
      Path(args[3]), 3)
"""


def test_killed_mid_checkpoint_resumes_from_last_committed(llm_shards, llm_reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            MODEL.model_dump_json(),
            cfg().model_dump_json(),
            str(llm_shards),
            str(out),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    torn = out / "checkpoints" / "step_00000020"
    assert (torn / "model.safetensors").exists() and not (torn / "DONE.json").exists()
    assert max(losses(out)) == 20  # metrics ran ahead of the last committed checkpoint
    assert latest_checkpoint(out).name == "step_00000010"
    train(MODEL, cfg(), llm_shards, out, seed=3)
    assert [r["step"] for r in lines(out)] == list(range(1, STEPS + 1))  # no duplicated steps
    assert_same_curve(losses(out), losses(llm_reference))


def test_truncated_or_uncommitted_newest_checkpoint_is_skipped(llm_shards, llm_reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(llm_reference, out)
    newest, older = out / "checkpoints" / "step_00000040", out / "checkpoints" / "step_00000030"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    assert latest_checkpoint(out) == older
    (newest / "model.safetensors").write_bytes(data)
    assert latest_checkpoint(out) == newest
    (newest / "DONE.json").unlink()  # never committed
    assert latest_checkpoint(out) == older
    summary = train(MODEL, cfg(), llm_shards, out, seed=3)  # resumes at 30, redoes 31..40
    assert summary["steps"] == STEPS
    assert [r["step"] for r in lines(out)] == list(range(1, STEPS + 1))
    assert_same_curve(losses(out), losses(llm_reference))


def test_corrupt_checkpoint_is_an_error_naming_the_file_and_resume_falls_back(llm_shards, llm_reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(llm_reference, out)
    newest = out / "checkpoints" / "step_00000040"
    f = newest / "state.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    f.write_bytes(bytes(data))
    model = GPT(MODEL, 26)
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(newest, model)
    with pytest.warns(UserWarning, match="state.pt"):
        train(MODEL, cfg(), llm_shards, out, seed=3)
    assert_same_curve(losses(out), losses(llm_reference))


def test_malicious_pickle_in_state_is_refused(llm_reference, tmp_path):
    ckpt = tmp_path / "step_00000040"
    shutil.copytree(llm_reference / "checkpoints" / "step_00000040", ckpt)
    pwned = tmp_path / "pwned"
    torch.save({"optimizer": Evil(str(pwned))}, ckpt / "state.pt")
    # forge the commit marker too, so only weights_only=True stands between the file and its payload
    marker = json.loads((ckpt / "DONE.json").read_text())
    data = (ckpt / "state.pt").read_bytes()
    marker["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "DONE.json").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(ckpt, GPT(MODEL, 26))
    assert not pwned.exists()


# ------------------------------------------------------------------------------------------ distributed


def test_two_ranks_equal_one_rank_with_twice_the_micro_batches(llm_shards, tmp_path):
    """2 ranks x batch B (gloo) vs 1 rank x 2 micro-batches of B: the same data streams and the same averaged
    gradient, so the curves agree up to float summation order (DDP all-reduce vs accumulation)."""
    steps = dict(max_steps=12, lr_decay_steps=12, eval_interval=6, checkpoint_interval=6)
    (tmp_path / "ddp.json").write_text(
        json.dumps({"model": MODEL.model_dump(), "train": cfg(**steps).model_dump(), "seed": 5})
    )
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmcore.train",
                "--config",
                str(tmp_path / "ddp.json"),
                "--shards",
                str(llm_shards),
                "--out",
                str(tmp_path / "ddp"),
            ],
            env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    train(MODEL, cfg(grad_accum=2, **steps), llm_shards, tmp_path / "one", seed=5)
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert_same_curve(ddp, one, tol=1e-4)
    assert lines(tmp_path / "ddp")[-1]["tokens_seen"] == lines(tmp_path / "one")[-1]["tokens_seen"] == 12 * 2 * 4 * 16
    val_ddp = [r["val_loss"] for r in lines(tmp_path / "ddp", "eval")]
    val_one = [r["val_loss"] for r in lines(tmp_path / "one", "eval")]
    assert val_ddp == pytest.approx(val_one, abs=1e-4)
    # the checkpoint holds both ranks' RNG and all data streams: a 1-rank x 2 run can resume it
    summary = train(
        MODEL,
        cfg(grad_accum=2, **{**steps, "max_steps": 14, "lr_decay_steps": 12}),
        llm_shards,
        tmp_path / "ddp",
        seed=5,
    )
    assert summary["steps"] == 14


def test_launch_env_torchrun_mpi_and_pbs(tmp_path):
    assert read_launch_env({}) == read_launch_env({"UNRELATED": "1"})
    single = read_launch_env({})
    assert (single.rank, single.world_size, single.master_addr, single.master_port) == (0, 1, "127.0.0.1", 29500)
    tr = read_launch_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    )
    assert (tr.rank, tr.local_rank, tr.world_size, tr.master_addr, tr.master_port) == (3, 1, 8, "node7", 1234)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x3004c0s1b0n0.hsn.cm.polaris.alcf.anl.gov\nx3004c0s1b1n0\n")
    mpi = read_launch_env({"PMI_RANK": "5", "PMI_SIZE": "8", "PMI_LOCAL_RANK": "1", "PBS_NODEFILE": str(nodefile)})
    assert (mpi.rank, mpi.local_rank, mpi.world_size) == (5, 1, 8)
    assert mpi.master_addr == "x3004c0s1b0n0.hsn.cm.polaris.alcf.anl.gov" and mpi.master_port == 29500
    # Under Parsl's MPIExecutor the task's own nodes come first: rank 0 runs on the first of them.
    parsl_task = read_launch_env(
        {
            "PMI_RANK": "0",
            "PMI_SIZE": "8",
            "PBS_NODEFILE": str(nodefile),
            "PARSL_MPI_NODELIST": "x3004c0s1b1n0,x3004c0s7b0n0",
        }
    )
    assert parsl_task.master_addr == "x3004c0s1b1n0"
    ompi = read_launch_env(
        {
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "MASTER_PORT": "4000",
        }
    )
    assert (ompi.rank, ompi.local_rank, ompi.world_size, ompi.master_port) == (2, 0, 4, 4000)
    with pytest.raises(ValueError):
        read_launch_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_launch_env_follows_what_gptlab_launched():
    """A one-rank training started by a Parsl worker inherits the worker pool's PMI_* (mpiexec started the pool,
    one process per node): GPTLAB_RANKS=1 makes it rank 0 of 1, not rank 1 of the pool's 2. srun without PMI
    sets only SLURM_*: read under a multi-rank gptlab launch, ignored otherwise (inside salloc they describe the
    job). A launch whose variables disagree with GPTLAB_RANKS is an error, not a silent one-rank run."""
    from llmcore.distributed import LaunchError

    pool = {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_LOCAL_RANK": "0"}
    assert read_launch_env(pool).world_size == 2
    alone = read_launch_env({**pool, "GPTLAB_RANKS": "1"})
    assert (alone.rank, alone.local_rank, alone.world_size) == (0, 0, 1)
    srun = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}
    assert read_launch_env(srun).world_size == 1
    ranked = read_launch_env({**srun, "GPTLAB_RANKS": "4"})
    assert (ranked.rank, ranked.local_rank, ranked.world_size) == (3, 1, 4)
    with pytest.raises(LaunchError, match="launched as 4 ranks but its process sees a world of 1"):
        read_launch_env({"GPTLAB_RANKS": "4"})


# --------------------------------------------------------------------------------------------- the CLI


def test_cli_bad_config_exits_2_with_every_problem(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"n_head": 3, "n_embd": 32}, "train": {"lr": -1, "bogus": 1}}))
    proc = subprocess.run(
        [sys.executable, "-m", "llmcore.train", "--config", str(bad), "--shards", "x", "--out", str(tmp_path / "out")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "train.bogus" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    cross = tmp_path / "cross.json"
    cross.write_text(json.dumps({"model": {"n_head": 3, "n_embd": 32}, "train": {"lr": 1e-4, "min_lr": 1e-3}}))
    assert main(["--config", str(cross), "--shards", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.n_head" in err and "train.min_lr" in err
    assert main(["--config", str(tmp_path / "missing.json"), "--shards", "x", "--out", "y"]) == 2
    (tmp_path / "notjson.json").write_text("{")
    assert main(["--config", str(tmp_path / "notjson.json"), "--shards", "x", "--out", "y"]) == 2


def test_cli_trains(llm_shards, tmp_path, capsys):
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "model": MODEL.model_dump(),
                "train": cfg(max_steps=3, lr_decay_steps=None, warmup_steps=1).model_dump(),
                "seed": 1,
            }
        )
    )
    assert main(["--config", str(tmp_path / "c.json"), "--shards", str(llm_shards), "--out", str(tmp_path / "o")]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    # A shards directory without a manifest is bad input: exit 2, which the workflow never retries.
    assert main(["--config", str(tmp_path / "c.json"), "--shards", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    # So is a device the machine lacks (CUDA hidden here, so on a GPU machine too): not retried 3 times.
    (tmp_path / "gpu.json").write_text(
        json.dumps(
            {
                "model": MODEL.model_dump(),
                "train": cfg(max_steps=3, lr_decay_steps=None, warmup_steps=1, device="cuda").model_dump(),
            }
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcore.train",
            "--config",
            str(tmp_path / "gpu.json"),
            "--shards",
            str(llm_shards),
            "--out",
            str(tmp_path / "o3"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**child_env(), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: train.device / train.precision: device 'cuda' requested but CUDA is not available" in proc.stderr
    # A one-rank training among a worker pool's inherited PMI_* variables trains alone (before: it waited for a
    # rank 0 that never came).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcore.train",
            "--config",
            str(tmp_path / "c.json"),
            "--shards",
            str(llm_shards),
            "--out",
            str(tmp_path / "o4"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**child_env(), "PMI_RANK": "1", "PMI_SIZE": "2", "GPTLAB_RANKS": "1"},
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["steps"] == 3, proc.stderr


def test_cli_exits_75_when_the_time_budget_stops_it(llm_shards, tmp_path, monkeypatch, capsys):
    import llmcore.train as T

    clock = iter(range(0, 10**6, 100))  # every reading of the clock is 100 s later: the budget runs out at once
    monkeypatch.setattr(T, "_clock", lambda: float(next(clock)))
    (tmp_path / "c.json").write_text(
        json.dumps(
            {"model": MODEL.model_dump(), "train": cfg(max_steps=50, time_budget_s=1000).model_dump(), "seed": 1}
        )
    )
    assert main(["--config", str(tmp_path / "c.json"), "--shards", str(llm_shards), "--out", str(tmp_path / "o")]) == 75
    assert json.loads(capsys.readouterr().out)["stopped_early"] is True


def test_tokens_per_second_leaves_out_evaluation_and_checkpoints(llm_shards, tmp_path, monkeypatch):
    """tokens/s (and so MFU) measure training steps: a slow evaluation or checkpoint (here 100 s on a fake clock
    that otherwise ticks 1 s per reading) does not show as a slow step after it."""
    import llmcore.train as T

    now = [0.0]

    def tick() -> float:
        now[0] += 1.0
        return now[0]

    def slow(fn):
        def wrapped(*args, **kwargs):
            now[0] += 100.0
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(T, "_clock", tick)
    monkeypatch.setattr(T, "estimate_loss", slow(T.estimate_loss))
    monkeypatch.setattr(T.Trainer, "save", slow(T.Trainer.save))
    train(
        MODEL,
        cfg(max_steps=8, eval_interval=2, checkpoint_interval=4, lr_decay_steps=None),
        llm_shards,
        tmp_path,
        seed=1,
    )
    rates = [r["tokens_per_sec"] for r in lines(tmp_path)]
    assert len(rates) == 8 and max(rates) / min(rates) < 5, rates  # with the 100 s counted: over 30


# -------------------------------------------------------------------------------------------- hardware


def test_hardware_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu)
    assert peak_flops(cpu) is None
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("Some Future GPU") is None
    assert peak_flops_for_name("NVIDIA L40") == 181e12 and peak_flops_for_name("NVIDIA L4") == 121e12
    assert peak_flops_for_name("NVIDIA H200 NVL") == 835e12 and peak_flops_for_name("Tesla V100-SXM2-16GB") == 125e12
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


# ----------------------------------------------------------------------------------- stop requests, freezing


def test_stop_file_or_sigterm_checkpoints_stops_with_76_and_resumes_the_curve(llm_shards, tmp_path):
    """What the driver and a scheduler do to a running training: a STOP file (an interrupted submit, a pruned
    sweep point) or SIGTERM (walltime) stops it at a step boundary with a committed checkpoint and exit code 76;
    running it again continues the uninterrupted curve. A STOP file older than the training is ignored."""
    import signal
    import time

    long = cfg(max_steps=400, lr_decay_steps=400, checkpoint_interval=50)
    reference = tmp_path / "reference"
    train(MODEL, long, llm_shards, reference, seed=3)
    (tmp_path / "c.json").write_text(json.dumps({"model": MODEL.model_dump(), "train": long.model_dump(), "seed": 3}))
    args = [sys.executable, "-m", "llmcore.train", "--config", str(tmp_path / "c.json"), "--shards", str(llm_shards)]
    for how in ("stop-file", "sigterm"):
        out = tmp_path / how
        proc = subprocess.Popen([*args, "--out", str(out)], env=child_env(), stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and len(lines(out)) >= 5):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.01)
        if how == "stop-file":
            (out / "STOP").write_text("stop\n")
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 76, proc.stderr.read()
        err = proc.stderr.read()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stop_reason"] == "requested" and 5 <= summary["steps"] < 400, err
        assert latest_checkpoint(out).name == f"step_{summary['steps']:08d}"
        assert f"stopped at step {summary['steps']}" in err and "Traceback" not in err
        # the STOP file is still there, but older than the next run: it resumes to the end, on the same curve
        assert subprocess.run([*args, "--out", str(out)], env=child_env(), timeout=300).returncode == 0
        assert_same_curve(losses(out), losses(reference))


def test_freeze_keeps_matching_parameters_fixed(llm_shards, tmp_path):
    train(MODEL, cfg(max_steps=10, freeze=["wte.*", "blocks.0.ln_*"]), llm_shards, tmp_path, seed=3)
    trained, _ = load_model(tmp_path)
    torch.manual_seed(3)  # the run's initial weights: seeded the same way before its model is built
    fresh = GPT(MODEL, trained.vocab_size)
    before, after = dict(fresh.named_parameters()), dict(trained.named_parameters())
    for name in after:
        same = torch.equal(before[name], after[name])
        frozen = name == "wte.weight" or name.startswith("blocks.0.ln_")
        assert same == frozen, name  # the tied embedding (also lm_head) and block 0's norms did not move
    with pytest.raises(ConfigError, match=r"train.freeze: 'nothing\.\*' matches no parameter"):
        train(MODEL, cfg(max_steps=2, warmup_steps=0, freeze=["nothing.*"]), llm_shards, tmp_path / "bad", seed=3)
    (tmp_path / "c.json").write_text(
        json.dumps({"model": MODEL.model_dump(), "train": cfg(max_steps=2, warmup_steps=0, freeze=["x*"]).model_dump()})
    )
    proc = subprocess.run(
        [
            *[sys.executable, "-m", "llmcore.train", "--config", str(tmp_path / "c.json")],
            "--shards",
            str(llm_shards),
            "--out",
            str(tmp_path / "cli"),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "train.freeze: 'x*' matches no parameter" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_metrics_records_round_trip_and_skip_torn_or_foreign_lines(tmp_path):
    from llmcore.metrics import EvalLine, MetricsWriter, TrainLine, read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        for step in (1, 2, 3):
            w.write(TrainLine(step=step, time=100.0 + step, loss=2.0 / step, lr=1e-3, tokens_seen=8 * step))
        w.write(EvalLine(step=3, time=104.0, val_loss=1.5))
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 4, "time": 105.0, "loss": 0.4, "lr": 0.001, "future_field": 1}\n')
        f.write('{"kind": "eval", "step": 5, "val_lo')  # torn by a crash
    records = read_metrics(path)
    assert [(r.kind, r.step) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4)]
    assert records[0].metrics() == {"train/loss": 2.0, "train/lr": 1e-3, "train/tokens_seen": 8.0}
    assert records[3].metrics() == {"val/loss": 1.5}
    truncate_metrics(path, 2)
    assert [(r.kind, r.step) for r in read_metrics(path)] == [("train", 1), ("train", 2)]


def test_pause_at_stops_at_the_rung_with_an_estimate_and_resumes_the_same_curve(llm_shards, tmp_path):
    """Successive halving's rung (``train.pause_at``): the training stops exactly at that step with a validation
    estimate there and a committed checkpoint (exit 76 from the CLI); launched again with the same rung it trains
    no further step; launched to the end it continues the uninterrupted curve."""
    long = cfg(max_steps=60, lr_decay_steps=60, checkpoint_interval=50, eval_interval=50)
    reference = tmp_path / "reference"
    train(MODEL, long, llm_shards, reference, seed=3)
    out = tmp_path / "halving"
    paused = long.model_copy(update={"pause_at": 17})
    config = {"model": MODEL.model_dump(), "seed": 3}
    (tmp_path / "rung.json").write_text(json.dumps({**config, "train": paused.model_dump()}))
    (tmp_path / "end.json").write_text(json.dumps({**config, "train": long.model_dump()}))
    argv = [sys.executable, "-m", "llmcore.train", "--shards", str(llm_shards), "--out", str(out), "--config"]
    run = lambda c: subprocess.run([*argv, str(tmp_path / c)], env=child_env(), timeout=300).returncode
    assert run("rung.json") == 76
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "paused" and summary["steps"] == 17
    assert latest_checkpoint(out).name == "step_00000017"
    assert [r["step"] for r in records(out, "eval")] == [17]  # judged at the rung, not at eval_interval
    trained = len(lines(out))
    assert train(MODEL, paused, llm_shards, out, seed=3)["steps"] == 17  # the same rung again: no step trained
    assert len(lines(out)) == trained
    assert run("end.json") == 0  # promoted to the end
    assert_same_curve(losses(out), losses(reference))
