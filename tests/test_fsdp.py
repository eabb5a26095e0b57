"""Sharded training (train.parallelism: fsdp), for real: 2 ranks through mpiexec on CPU over gloo, fp32, checked
against 2-rank DDP and 1 rank with 2 micro-batches (the same data streams, so the same curve up to float
summation order); activation checkpointing; sharded checkpoints that resume exactly, on 2 ranks or on 1, and
that are skipped when torn; the consolidated model; the memory estimate against what torch allocates.

One module fixture launches the reference runs once (each mpiexec launch costs seconds of torch import).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import child_env, free_port, records, require_mpiexec, run_shell, train_command

from llmcore.checkpoint import CheckpointError, checkpoints, latest_checkpoint, load_model, read_checkpoint
from llmcore.config import ConfigError, ModelConfig, TrainConfig
from llmcore.distributed import mpiexec_prefix
from llmcore.memory import count_params, estimate_memory
from llmcore.model import GPT
from llmcore.parallel import state_bytes
from llmcore.shards import TokenSplit, fixed_batches
from llmcore.train import RunConfig, estimate_loss, main, train

MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
STEPS = 40
TRAIN = dict(
    batch_size=4,
    max_steps=STEPS,
    lr_decay_steps=STEPS,
    warmup_steps=5,
    lr=3e-3,
    min_lr=3e-4,
    eval_interval=10,
    eval_batches=3,  # not a multiple of 2 ranks: FSDP's evaluation must keep the ranks in step
    checkpoint_interval=10,
    device="cpu",
    precision="fp32",
)
SEED = 5
TOL = 1e-5  # absolute, on losses around 2-4: float summation order only
FSDP = dict(parallelism="fsdp", ranks_per_node=2)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TRAIN, **kw})


def write_config(path: Path, train_cfg: TrainConfig) -> Path:
    path.write_text(json.dumps({"model": MODEL.model_dump(), "train": train_cfg.model_dump(), "seed": SEED}))
    return path


def launch(tmp: Path, name: str, train_cfg: TrainConfig, shards: Path, out: Path | None = None):
    """`mpiexec -n 2 --ppn 2 python -m llmcore.train ...` as the driver runs it (GPTLAB_RANKS=2); the result."""
    config = write_config(tmp / f"{name}.json", train_cfg)
    command = f"{mpiexec_prefix(2, 2)} {train_command(config, shards, out or tmp / name)}"
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPTLAB_RANKS="2")
    return run_shell(command, env, timeout=240)


def curve(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out)}


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b), f"steps differ: {sorted(a)} vs {sorted(b)}"
    return max(abs(a[s] - b[s]) for s in a)


@pytest.fixture(scope="module")
def runs(llm_shards, tmp_path_factory):
    """The reference curves: 1 rank x 2 micro-batches (in this process, one thread, as each rank has), 2-rank DDP
    and FSDP, each also with activation checkpointing (FSDP's also keeping the gathered weights from forward to
    backward)."""
    require_mpiexec()
    tmp = tmp_path_factory.mktemp("fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(MODEL, cfg(grad_accum=2), llm_shards, tmp / "one", seed=SEED)
    out = {"one": tmp / "one"}
    for name, train_cfg in (
        ("ddp", cfg(ranks_per_node=2)),
        ("ddp_ac", cfg(ranks_per_node=2, activation_checkpointing=True)),
        ("fsdp", cfg(**FSDP)),
        ("fsdp_ac", cfg(**FSDP, activation_checkpointing=True, reshard_after_forward=False)),
    ):
        proc = launch(tmp, name, train_cfg, llm_shards)
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stderr}"
        out[name] = tmp / name
        (tmp / name / "stdout.txt").write_text(proc.stdout)
    yield out
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ the same curve


@pytest.mark.mpi
def test_fsdp_equals_ddp_and_one_rank_with_two_micro_batches(runs):
    one, ddp, fsdp = curve(runs["one"]), curve(runs["ddp"]), curve(runs["fsdp"])
    assert sorted(fsdp) == list(range(1, STEPS + 1))
    diffs = {"fsdp-ddp": max_diff(fsdp, ddp), "fsdp-one": max_diff(fsdp, one), "ddp-one": max_diff(ddp, one)}
    print(f"max |loss difference| over {STEPS} steps: {diffs}")
    assert max(diffs.values()) <= TOL, diffs
    assert fsdp[STEPS] < fsdp[1] - 0.5  # it learns
    # evaluation (3 batches over 2 ranks) and the global gradient norm (clipped on DTensor shards)
    val = {name: [r["val_loss"] for r in records(runs[name], "eval")] for name in ("one", "ddp", "fsdp")}
    assert val["fsdp"] == pytest.approx(val["ddp"], abs=TOL) and val["fsdp"] == pytest.approx(val["one"], abs=TOL)
    norms = {name: [r["grad_norm"] for r in records(runs[name])] for name in ("one", "fsdp")}
    assert norms["fsdp"] == pytest.approx(norms["one"], rel=1e-4)
    params = [json.loads((runs[name] / "summary.json").read_text())["params"] for name in ("fsdp", "one")]
    assert params[0] == params[1]  # the whole model's count, not a shard's


@pytest.mark.mpi
def test_with_several_ranks_rank_0_alone_writes(runs):
    """One summary on stdout, each metrics line once, tokens counted over every rank, the same files as the 1-rank
    run (its checkpoints aside, whose layout differs under fsdp)."""
    for name in ("ddp", "fsdp"):
        out = runs[name]
        summaries = [json.loads(x) for x in (out / "stdout.txt").read_text().splitlines() if x.startswith("{")]
        assert len(summaries) == 1 and summaries[0] == json.loads((out / "summary.json").read_text()), name
        assert (
            summaries[0]["steps"] == STEPS
            and records(out)[-1]["tokens_seen"] == records(runs["one"])[-1]["tokens_seen"]
        )
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == len(set(lines)) == len(records(runs["one"])) + len(records(runs["one"], "eval"))
        top = lambda d: sorted(p.name for p in d.iterdir() if p.name not in ("stdout.txt", "checkpoints"))
        assert top(out) == top(runs["one"]), name


@pytest.mark.mpi
def test_activation_checkpointing_gives_the_same_losses(runs):
    """Recomputing each block in backward changes no number, under DDP and under FSDP (2 ranks each)."""
    ddp = max_diff(curve(runs["ddp_ac"]), curve(runs["ddp"]))
    fsdp = max_diff(curve(runs["fsdp_ac"]), curve(runs["fsdp"]))
    print(f"activation checkpointing, max |loss difference| over {STEPS} steps: ddp {ddp:.3g}, fsdp {fsdp:.3g}")
    assert ddp <= TOL and fsdp <= TOL


@pytest.mark.mpi
@pytest.mark.slow
def test_fsdp_with_torch_compile_follows_the_eager_curve(runs, llm_shards, tmp_path):
    """torch.compile over the sharded model, with activation checkpointing (Inductor on CPU: about 40 s of
    compiling): its first steps equal the eager FSDP run's (the same schedule: lr_decay_steps stays 40)."""
    short = cfg(**FSDP, compile=True, activation_checkpointing=True, max_steps=6, checkpoint_interval=6)
    proc = launch(tmp_path, "compiled", short, llm_shards)
    assert proc.returncode == 0, proc.stderr
    eager = {s: v for s, v in curve(runs["fsdp"]).items() if s <= 6}
    diff = max_diff(curve(tmp_path / "compiled"), eager)
    print(f"torch.compile vs eager (fsdp), max |loss difference| over 6 steps: {diff:.3g}")
    assert diff <= 1e-4


# ----------------------------------------------------------------------------------------- checkpoints


@pytest.mark.mpi
def test_sharded_checkpoint_layout_and_consolidated_model(runs, llm_shards):
    """Each rank's shard is listed in the marker with size and sha256; the final checkpoint also holds the whole
    model as model.safetensors, which load_model reads and which gives the sharded model's eval loss; an
    intermediate checkpoint (shards only) loads too, in one process."""
    final, older = checkpoints(runs["fsdp"])
    assert (final.name, older.name) == ("step_00000040", "step_00000030")
    marker = json.loads((final / "DONE.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.pt", "meta.json", "model.safetensors"} <= set(
        marker["files"]
    )
    assert set(marker["files"]) == {p.name for p in final.iterdir()} - {"DONE.json"}
    assert all(len(info["sha256"]) == 64 and info["bytes"] > 0 for info in marker["files"].values())
    assert "model.safetensors" not in json.loads((older / "DONE.json").read_text())["files"]
    meta = json.loads((final / "meta.json").read_text())
    assert meta["layout"] == "sharded" and meta["world_size"] == 2

    val = TokenSplit(llm_shards, "val")
    batches = fixed_batches(val, cfg().eval_batches, cfg().batch_size, MODEL.block_size, SEED)
    evals = {r["step"]: r["val_loss"] for r in records(runs["fsdp"], "eval")}
    for path, step in ((runs["fsdp"], STEPS), (older, 30)):  # the run's directory: its latest checkpoint
        model, meta = load_model(path)
        assert meta["step"] == step and model.wte.weight is model.lm_head.weight
        loss = estimate_loss(model, batches, torch.autocast("cpu", enabled=False), torch.device("cpu"))
        assert loss == pytest.approx(evals[step], abs=TOL), (step, loss, evals[step])


@pytest.mark.mpi
def test_torn_sharded_checkpoint_is_skipped_and_resume_continues_the_curve(runs, llm_shards, tmp_path):
    """Copies of the FSDP run whose newest checkpoint lost its marker, a shard, or half a shard: it is not listed
    (sizes are checked before use), and training (here 1 rank x 2 micro-batches) resumes from step 30 on the
    uninterrupted curve. A byte flipped in a shard (same size) is found by the ranks' sha256 check: 2 ranks skip
    it with a warning naming the file and resume from step 30."""
    damages = {
        "marker": lambda d: (d / "DONE.json").unlink(),
        "missing": lambda d: (d / "__1_0.distcp").unlink(),
        "truncated": lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:100]),
    }
    for name, damage in damages.items():
        out = tmp_path / name
        shutil.copytree(runs["fsdp"], out)
        damage(out / "checkpoints" / "step_00000040")
        assert latest_checkpoint(out).name == "step_00000030", name
    # resumed on 1 rank (ddp, 2 micro-batches): DCP reshards the two ranks' shards into whole tensors
    out = tmp_path / "truncated"
    summary = train(MODEL, cfg(grad_accum=2), llm_shards, out, seed=SEED)
    assert summary["steps"] == STEPS and [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    assert max_diff(curve(out), curve(runs["fsdp"])) <= TOL

    flipped = tmp_path / "flipped"
    shutil.copytree(runs["fsdp"], flipped)
    shard = flipped / "checkpoints" / "step_00000040" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert latest_checkpoint(flipped).name == "step_00000040"  # same size: only the hash tells
    with pytest.raises(CheckpointError, match="__1_0.distcp is corrupt"):
        read_checkpoint(flipped / "checkpoints" / "step_00000040")
    more = cfg(**FSDP, max_steps=STEPS + 2, lr_decay_steps=STEPS)
    proc = launch(tmp_path, "flipped", more, llm_shards, out=flipped)
    assert proc.returncode == 0, proc.stderr
    assert "skipping checkpoint" in proc.stderr and "__1_0.distcp is corrupt" in proc.stderr
    assert "resuming from checkpoint" in proc.stderr and "(step 30)" in proc.stderr
    assert [r["step"] for r in records(flipped)] == list(range(1, STEPS + 3))
    assert max_diff({s: v for s, v in curve(flipped).items() if s <= STEPS}, curve(runs["fsdp"])) <= TOL


@pytest.mark.mpi
def test_stopped_fsdp_run_resumes_the_curve_on_two_ranks_and_on_one(runs, llm_shards, tmp_path):
    """A STOP file makes both ranks save a sharded checkpoint and exit 76 at a step boundary; launched again it
    continues the uninterrupted curve. The same checkpoint resumed on 1 rank with 2 micro-batches (the same
    data streams) gives the 2-rank run's loss at the next step."""
    out = tmp_path / "stopped"
    config = write_config(tmp_path / "stopped.json", cfg(**FSDP))
    command = f"{mpiexec_prefix(2, 2)} {train_command(config, llm_shards, out)}"
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPTLAB_RANKS="2")
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc = subprocess.Popen(["bash", "-c", command], env=env, **pipes)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.005)
        (out / "STOP").write_text("stop\n")  # ranks agree on stopping every 10 steps
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 76, err
    stopped = json.loads((out / "summary.json").read_text())["steps"]
    assert stopped in (10, 20, 30) and latest_checkpoint(out).name == f"step_{stopped:08d}", err
    copy = tmp_path / "one-rank"
    shutil.copytree(out, copy)

    (out / "STOP").unlink()
    proc = launch(tmp_path, "resumed", cfg(**FSDP), llm_shards, out=out)
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    assert max_diff(curve(out), curve(runs["fsdp"])) <= TOL

    (copy / "STOP").unlink()
    train(MODEL, cfg(grad_accum=2, max_steps=stopped + 1), llm_shards, copy, seed=SEED)
    first = curve(copy)[stopped + 1]
    assert abs(first - curve(runs["fsdp"])[stopped + 1]) <= TOL


@pytest.mark.mpi
def test_full_disk_during_a_sharded_checkpoint_stops_every_rank_with_74(llm_shards, tmp_path):
    """The output disk (a 1.2 MB tmpfs: two checkpoints fit) fills while the ranks write their shards: both ranks
    exit 74 (no rank left waiting in a collective), naming the directory; every checkpoint with a marker is
    whole, the torn one has none. Needs root to mount, as the disk-full tests of test_faults.py."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs and needs root (run it as .ci/run does)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)], check=True)
    try:
        proc = launch(tmp_path, "full", cfg(**FSDP, checkpoint_interval=5), llm_shards, out=disk / "run")
        assert proc.returncode == 74, proc.stderr
        assert proc.stderr.count("No space left on device") == 2 and "Traceback" not in proc.stderr, proc.stderr
        steps = sorted((disk / "run" / "checkpoints").iterdir())
        committed = checkpoints(disk / "run")
        assert committed and len(steps) == len(committed) + 1  # the one being written when the disk filled
        for path in committed:
            read_checkpoint(path)  # every file's size and sha256
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ------------------------------------------------------------------------------------------ bad input


def test_fsdp_on_one_rank_is_exit_2_naming_train_parallelism(llm_shards, tmp_path, capsys, monkeypatch):
    problems = TrainConfig.model_validate  # the rule: nodes x ranks_per_node must be > 1
    with pytest.raises(ValueError, match="parallelism: fsdp shards the model over several ranks"):
        problems({"parallelism": "fsdp"})
    with pytest.raises(ValueError, match="parallelism: fsdp does not scale fp16"):
        problems({"parallelism": "fsdp", "ranks_per_node": 2, "precision": "fp16", "device": "cuda"})
    with pytest.raises(ValueError, match="reshard_after_forward: applies to train.parallelism fsdp only"):
        problems({"reshard_after_forward": False})
    # the CLI: exit 2 with the field named
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": MODEL.model_dump(), "train": {**TRAIN, "parallelism": "fsdp"}}))
    assert main(["--config", str(bad), "--shards", str(llm_shards), "--out", str(tmp_path / "o")]) == 2
    assert "train.parallelism: fsdp shards the model over several ranks" in capsys.readouterr().err
    # a config for 2 ranks launched as one process: exit 2 too, before any training
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps({"model": MODEL.model_dump(), "train": {**TRAIN, **FSDP}}))
    assert main(["--config", str(alone), "--shards", str(llm_shards), "--out", str(tmp_path / "o2")]) == 2
    assert "error: train.parallelism: fsdp needs several ranks" in capsys.readouterr().err
    # a torch without FSDP2
    from llmcore.parallel import fully_shard_api

    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)
    with pytest.raises(ConfigError, match=r"train.parallelism: fsdp needs torch.distributed.fsdp.fully_shard"):
        fully_shard_api()


def test_new_fields_stay_out_of_stage_keys_at_their_defaults():
    keys = TrainConfig().key_dict()
    assert not {"parallelism", "reshard_after_forward", "activation_checkpointing"} & set(keys)
    assert TrainConfig(**FSDP).key_dict()["parallelism"] == "fsdp"
    assert RunConfig(train=TrainConfig(activation_checkpointing=True)).train.activation_checkpointing


# --------------------------------------------------------------------------------------- memory estimate


@pytest.mark.parametrize(
    "model",
    [
        MODEL,
        ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, bias=True, norm="rmsnorm", mlp="swiglu"),
        ModelConfig(n_layer=2, n_head=2, n_embd=48, block_size=16, pos_encoding="rope", attention="plain"),
        ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, pos_encoding="sinusoidal", bias=True),
    ],
    ids=["gpt2-like", "swiglu-rmsnorm-bias", "rope-plain", "sinusoidal"],
)
def test_memory_estimate_counts_what_torch_allocates(model):
    """Parameter counts equal the model's own; the one-rank state bytes equal what torch holds after a step
    (weights, gradients, fused AdamW's moments and step counters); activations equal the tensors autograd saves
    (fp32, within 1%)."""
    vocab = 70
    torch.manual_seed(0)
    gpt = GPT(model, vocab)
    counted = count_params(model, vocab)
    assert counted.total == gpt.num_params(non_embedding=False) and counted.non_embedding == gpt.num_params()
    assert counted.tensors == len(list(gpt.parameters()))

    train_cfg = TrainConfig(batch_size=3, device="cpu", precision="fp32")
    est = estimate_memory(model, vocab, train_cfg)
    opt = gpt.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, vocab, (3, model.block_size))
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = gpt(x, x.roll(1, dims=1))
    loss.backward()
    opt.step()
    measured = state_bytes(gpt, opt)
    assert measured == {"params": est.param_bytes, "grads": est.grad_bytes, "optimizer": est.optimizer_bytes}
    assert est.working_bytes == 0  # fp32 ddp: no cast copies
    weights = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
    acts = sum(n for ptr, n in saved.items() if ptr not in weights)
    assert est.activation_bytes == pytest.approx(acts, rel=0.01)


def test_memory_estimate_ddp_fsdp_and_checkpointing():
    """A 2.7B model on 4 Polaris nodes x 4 A100s: DDP's 16 bytes per parameter do not fit 40 GB, FSDP's 1/16 do;
    activation checkpointing, resharding and gradient accumulation move the figures the way the docstring says."""
    model = ModelConfig(n_layer=32, n_head=32, n_embd=2560, block_size=2048)
    polaris = lambda **kw: TrainConfig(**{"batch_size": 1, "device": "cuda", "nodes": 4, "ranks_per_node": 4, **kw})
    estimate = lambda **kw: estimate_memory(model, 50304, polaris(**kw))
    ddp, fsdp = estimate(), estimate(parallelism="fsdp")
    P = ddp.params.total
    assert 2.6e9 < P < 2.8e9 and ddp.state_bytes == 16 * P + 4 * ddp.params.tensors
    assert fsdp.state_bytes == pytest.approx(P, rel=1e-3) and fsdp.world_size == 16  # 16 bytes / 16 ranks
    assert not ddp.fits() and fsdp.fits()
    ac = estimate(parallelism="fsdp", batch_size=8, activation_checkpointing=True)
    assert ac.activation_bytes == ac.activation_bytes_with_checkpointing
    assert ac.activation_bytes < ac.activation_bytes_without_checkpointing / 4  # the head (4V per token) stays
    kept = estimate(parallelism="fsdp", reshard_after_forward=False)
    assert kept.working_bytes - fsdp.working_bytes == 2 * 30 * fsdp.params.block  # 30 more bf16 blocks gathered
    accumulating = estimate(parallelism="fsdp", grad_accum=4)
    assert accumulating.working_bytes - fsdp.working_bytes == 4 * P  # fp32 unsharded gradients between syncs
    assert fsdp.summary().startswith("fsdp x16: ") and "GiB/rank" in fsdp.summary()
    assert estimate_memory(model, 50304, polaris(parallelism="fsdp"), world_size=32).state_bytes < fsdp.state_bytes


def test_plan_says_when_ddp_does_not_fit_a_polaris_gpu_and_fsdp_would(tmp_path):
    """`gptlab plan --site polaris` for the 2.7B model above on 4 nodes x 4 GPUs: both estimates per rank, and
    the advice to switch to fsdp; nothing is submitted or written."""
    from helpers import gptlab, make_corpus, tiny_spec, write_spec

    corpus = make_corpus(tmp_path / "corpus", n_docs=3)
    tree = tiny_spec(corpus, tmp_path / "runs", model={"n_layer": 32, "n_head": 32, "n_embd": 2560, "block_size": 64},
                     train={"nodes": 4, "ranks_per_node": 4, "device": "cuda", "batch_size": 1})  # fmt: skip
    tree["site"] = {"name": "polaris", "account": "LLMlab"}
    r = gptlab("plan", write_spec(tmp_path / "s.yaml", tree), env=child_env(TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    row = [line for line in r.stdout.splitlines() if line.startswith("│ tiny")][-1]  # the memory table follows
    ddp, fsdp = (cell.strip() for cell in row.split("│")[3:5])
    assert ddp.endswith("does not fit *") and "(state 37.5 GiB" in ddp  # 16 bytes x 2.5B parameters
    assert "(state 2.3 GiB" in fsdp and "does not fit" not in fsdp  # a sixteenth of it
    assert "against 40 GiB GPUs" in r.stdout
    assert "[tiny] ddp does not fit a 40 GiB GPU but fsdp does: set train.parallelism: fsdp" in r.stdout
    assert not (tmp_path / "runs" / "mlflow.db").exists()


FSDP_STATE_SCRIPT = """
import json, os, torch, torch.distributed as dist
from llmcore.config import ModelConfig
from llmcore.model import GPT
from llmcore.parallel import shard_model, state_bytes
dist.init_process_group("gloo", rank=int(os.environ["PMI_RANK"]), world_size=int(os.environ["PMI_SIZE"]))
torch.manual_seed(0)
model = GPT(ModelConfig(**json.loads(os.environ["MODEL"])), 70)
shard_model(model, torch.device("cpu"), None, True)
opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
x = torch.randint(0, 70, (2, 16))
model(x, x)[1].backward()
opt.step()
open(os.path.join(os.environ["OUT"], f"state-{dist.get_rank()}.json"), "w").write(json.dumps(state_bytes(model, opt)))
dist.destroy_process_group()
"""


@pytest.mark.mpi
def test_fsdp_state_bytes_per_rank_match_the_estimate(tmp_path):
    """Each of 2 FSDP ranks holds half the weights, gradients and AdamW moments (measured after a step, by
    storage, padding included), as the estimate says, within FSDP's padding of each tensor to 2 rows."""
    require_mpiexec()
    model = ModelConfig(n_layer=2, n_head=2, n_embd=48, block_size=16)
    script = tmp_path / "state.py"
    script.write_text(FSDP_STATE_SCRIPT)
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), MODEL=model.model_dump_json(),
                    OUT=str(tmp_path))  # fmt: skip
    proc = run_shell(f"{mpiexec_prefix(2, 2)} {sys.executable} {script}", env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # a file per rank: Hydra forwards the ranks' output as it comes, and one rank's can land inside the other's
    ranks = [json.loads((tmp_path / f"state-{r}.json").read_text()) for r in range(2)]
    est = estimate_memory(model, 70, TrainConfig(device="cpu", precision="fp32", **FSDP))
    assert len(ranks) == 2
    for measured in ranks:
        assert measured["params"] == pytest.approx(est.param_bytes, rel=0.01)
        assert measured["grads"] == pytest.approx(est.grad_bytes, rel=0.01)
        assert measured["optimizer"] == pytest.approx(est.optimizer_bytes, rel=0.01)
