"""mpiexec, for real: a 2-rank training launched the way Polaris launches it (``mpiexec -n R --ppn P`` in
front of ``python -m llmcore.train``, as a shell command line) with Debian's MPICH, on CPU with gloo, checked
against the single-rank run with twice the micro-batches.

Needs ``mpiexec`` on PATH: ``.ci/mpi-up.sh`` installs Debian's mpich. Without it the MPI tests FAIL (a skip
would hide a launch path that no longer works).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from helpers import child_env, free_port, records, require_mpiexec, run_shell, train_command

from llmcore.config import ModelConfig, TrainConfig
from llmcore.distributed import mpiexec_prefix, read_launch_env

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
STEPS = 12
TRAIN = dict(
    batch_size=4,
    max_steps=STEPS,
    lr_decay_steps=STEPS,
    warmup_steps=5,
    lr=3e-3,
    min_lr=3e-4,
    eval_interval=6,
    eval_batches=2,
    checkpoint_interval=6,
    device="cpu",
)
REL_TOL = 1e-5  # 2 ranks (gloo all-reduce) vs 2 micro-batches (accumulation): float summation order only


def assert_close(a: list[float], b: list[float], what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} values"
    worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    assert worst <= REL_TOL, f"{what}: relative difference {worst:.3g} > {REL_TOL}\n2 ranks: {a}\n1 rank:  {b}"


# ------------------------------------------------------------------------------------ pure: no mpiexec


def test_mpiexec_prefix_is_the_polaris_command_line():
    assert mpiexec_prefix(2, 2) == "mpiexec -n 2 --ppn 2"
    assert mpiexec_prefix(8, 4) == "mpiexec -n 8 --ppn 4"
    assert mpiexec_prefix(8, 4, " --depth 8 --cpu-bind depth ") == "mpiexec -n 8 --ppn 4 --depth 8 --cpu-bind depth"
    for bad in ((0, 1), (2, 0)):
        with pytest.raises(ValueError):
            mpiexec_prefix(*bad)


def test_launch_env_of_hydra_and_pals():
    # MPICH Hydra (Debian's mpich) sets no PMI_LOCAL_RANK, but MPI_LOCALRANKID
    hydra = read_launch_env(
        {"PMI_RANK": "5", "PMI_SIZE": "8", "PMI_FD": "6", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
    )
    assert (hydra.rank, hydra.local_rank, hydra.world_size) == (5, 1, 8)
    pals = read_launch_env({"PMI_RANK": "5", "PMI_SIZE": "8", "PMI_LOCAL_RANK": "1", "PALS_LOCAL_RANKID": "1"})
    assert (pals.rank, pals.local_rank, pals.world_size) == (5, 1, 8)
    assert read_launch_env({"PMI_RANK": "5", "PMI_SIZE": "8", "PALS_LOCAL_RANKID": "3"}).local_rank == 3
    assert read_launch_env({"PMI_RANK": "1", "PMI_SIZE": "2"}).local_rank == 1  # nothing else: the global rank


# ------------------------------------------------------------------------------------- real mpiexec


@pytest.mark.mpi
@pytest.mark.parametrize(
    "ppn, extra, local_ranks",
    [
        (2, "", [0, 1]),  # one node, two ranks on it
        # two "nodes" (Hydra forks both locally) with one rank each: rank 1 is local rank 0 (MPI_LOCALRANKID)
        (1, "-launcher fork -hosts localhost,127.0.0.1", [0, 0]),
    ],
    ids=["one-node", "two-nodes"],
)
def test_mpiexec_ranks_see_their_launch_env(ppn, extra, local_ranks, tmp_path):
    """What `mpiexec -n 2 --ppn P` gives each rank is read as ranks 0 and 1 of 2 with the right local ranks."""
    require_mpiexec()
    probe = (  # a file per rank: Hydra forwards the ranks' output as it comes, one rank's inside the other's
        "import json, os; from llmcore.distributed import read_launch_env as r; e = r(); "
        "open(os.path.join(os.environ['OUT'], f'rank-{e.rank}.json'), 'w').write("
        "json.dumps([e.rank, e.local_rank, e.world_size, e.master_addr, e.master_port]))"
    )
    proc = run_shell(
        f"{mpiexec_prefix(2, ppn, extra)} {shlex.join([sys.executable, '-c', probe])}",
        child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT="4321", OUT=str(tmp_path)),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    seen = sorted(json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json"))
    assert seen == [[r, local_ranks[r], 2, "127.0.0.1", 4321] for r in range(2)], proc.stdout + proc.stderr


@pytest.mark.mpi
def test_mpiexec_ranks_agree_on_the_launch_and_on_the_time_budget(llm_shards, tmp_path):
    """As the driver launches them (GPTLAB_RANKS=2): a launch whose world differs from what was asked is exit 2
    on every rank; a time budget that runs out stops both ranks together (exit 75, one checkpoint) and the next
    launch resumes it to the end."""
    require_mpiexec()
    budget = TrainConfig(**{**TRAIN, "checkpoint_interval": STEPS}, time_budget_s=0.001)
    (tmp_path / "b.json").write_text(json.dumps({"model": MODEL.model_dump(), "train": budget.model_dump(), "seed": 5}))
    command = f"{mpiexec_prefix(2, 2)} {train_command(tmp_path / 'b.json', llm_shards, tmp_path / 'out')}"

    wrong = run_shell(command, child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPTLAB_RANKS="3"))
    assert wrong.returncode == 2 and wrong.stderr.count("launched as 3 ranks but its process sees a world of 2") == 2
    assert not (tmp_path / "out" / "metrics.jsonl").exists()

    stopped = run_shell(command, child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPTLAB_RANKS="2"))
    assert stopped.returncode == 75, stopped.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] < STEPS

    budget = budget.model_copy(update={"time_budget_s": None})
    (tmp_path / "b.json").write_text(json.dumps({"model": MODEL.model_dump(), "train": budget.model_dump(), "seed": 5}))
    resumed = run_shell(command, child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPTLAB_RANKS="2"))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in records(tmp_path / "out", "train")] == list(range(1, STEPS + 1))


@pytest.mark.mpi
@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_mpiexec_damaged_shard_stops_every_rank_with_exit_2(llm_shards, tmp_path, damage):
    """Only local rank 0 verifies the shards (sizes, sha256). When a shard is damaged every rank stops at once
    with exit 2, the file named: a truncated one each rank sees itself; an altered byte only the verifying rank
    sees, and the other is told so (no rank is left waiting in a collective for one that has gone)."""
    require_mpiexec()
    shards = tmp_path / "shards"
    shutil.copytree(llm_shards, shards)
    victim = next(shards.glob("train-*.bin"))
    data = bytearray(victim.read_bytes())
    if damage == "truncated":
        del data[-10:]
    else:
        data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    (tmp_path / "c.json").write_text(
        json.dumps({"model": MODEL.model_dump(), "train": TrainConfig(**TRAIN).model_dump()})
    )
    proc = run_shell(
        f"{mpiexec_prefix(2, 2)} {train_command(tmp_path / 'c.json', shards, tmp_path / 'out')}",
        child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPTLAB_RANKS="2"),
        timeout=90,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # One error per rank, each naming the shards (counted, not split into lines: the two ranks' stderr can
    # interleave mid-line through mpiexec).
    err = proc.stderr
    assert err.count("error: ") == 2 and err.count(f"error: {shards}") == 2, err
    if damage == "truncated":
        assert err.count(f"error: {victim}") == 2, err
    else:
        assert f"error: {victim}: sha256" in err and f"error: {shards}: another rank found the shards unusable" in err
