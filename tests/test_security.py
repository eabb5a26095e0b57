"""A spec can never run code: no shell interpretation of spec values, no Python objects or import paths, no
unsafe unpickling, outputs only under runs_root; the UI on loopback; Parsl worker traffic encrypted off-box."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import Evil, free_port, make_corpus, tiny_spec, write_spec

REPO = Path(__file__).resolve().parents[1]
# Each would create a file named pwned* if any shell ever interpreted it.
HOSTILE = ["r;touch pwned1;x", "$(touch pwned2)", "`touch pwned3`", "q'\"z 'e\" && touch pwned4 #", "|touch pwned5"]


def pwned(root: Path) -> list[Path]:
    return [p for p in root.rglob("pwned*") if p.is_file()]


def test_train_command_quotes_every_spec_derived_argument():
    from workflows.stages import train_command

    stage, shards = "/runs/" + "/".join(HOSTILE) + "/train-1", "/runs/" + HOSTILE[1] + "/shards-2"
    argv = shlex.split(train_command(stage, shards, {"OMP_NUM_THREADS": "2"}))
    assert argv == [
        "env",
        "OMP_NUM_THREADS=2",
        sys.executable,
        "-m",
        "llmcore.train",
        "--config",
        f"{stage}/train.json",
        "--shards",
        shards,
        "--out",
        stage,
    ]
    # only the launcher (built by gptlab, never from a spec) stays shell text
    assert shlex.split(train_command(stage, shards, {}, launcher="mpiexec -n 2 --ppn 2"))[:5] == [
        "mpiexec",
        "-n",
        "2",
        "--ppn",
        "2",
    ]


@pytest.mark.slow
def test_hostile_paths_reach_the_training_shell_command_as_data(tmp_path, monkeypatch):
    """A real submit whose runs_root and corpus path hold `;`, `$()`, backticks, quotes, `&&` and `|`: it
    finishes, no marker file appears (nothing was interpreted by bash), and every file it wrote lies under
    runs_root."""
    from workflows import submit

    monkeypatch.chdir(tmp_path)  # a shell that ran `touch pwned1` would create tmp_path/pwned1
    corpus = make_corpus(tmp_path / "corpus $(touch pwned6) `touch pwned7`", n_docs=20)
    runs_root = tmp_path.joinpath(*HOSTILE)
    spec = write_spec(
        tmp_path / "s.yaml",
        tiny_spec(corpus, runs_root, train={"max_steps": 8, "eval_interval": 4, "checkpoint_interval": 4}),
    )
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    result = submit(spec, quiet=True, poll_interval=0.3)
    assert result.ok, result.runs[0].error
    assert pwned(tmp_path) == [] and pwned(REPO) == []
    log = next((runs_root / "stages").glob("train-*")) / "train.log"
    assert HOSTILE[0] in log.read_text()  # the path really went through the bash app, as one argument
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and p not in before and runs_root not in p.parents]
    assert outside == []


def test_spec_paths_cannot_steer_outputs_outside_runs_root(tmp_path):
    """Stage directories are named by content hashes, reports by run hashes; names, sweep values and prompts
    with `../` never become paths. A name that looks like a path is rejected."""
    from workflows.planning import plan
    from workflows.spec import SpecError, load_spec_tree

    corpus = make_corpus(tmp_path / "corpus", n_docs=5)
    runs_root = tmp_path / "a" / ".." / "runs"
    tree = tiny_spec(
        corpus,
        runs_root,
        eval={"prompts": ["../../../../etc/passwd"]},
        sweep={"eval.prompts": [["../../x"], ["/etc/shadow"]]},
        tracking={"experiment": "../../../etc"},
    )
    p = plan(load_spec_tree(tree, "s.yaml"))
    root = (tmp_path / "runs").resolve()
    assert p.runs_root == root
    for stage in p.stages.values():
        assert stage.dir.parent == root / "stages" and stage.dir.name == f"{stage.kind}-{stage.key}"
    assert all(c in "0123456789abcdef" for r in p.runs for c in r.run_hash)  # reports/<run_hash>/ and no more
    with pytest.raises(SpecError, match="name: String should match pattern"):
        load_spec_tree({**tree, "name": "../../escape"}, "s.yaml")


def test_specs_hold_data_only_no_python_objects_or_import_paths(tmp_path):
    """Every section forbids unknown keys (so no `_target_`/`class_path` can slip in) and no field takes a
    callable or an import path; YAML tags that would build Python objects are refused before anything runs."""
    from typer.testing import CliRunner

    from workflows.cli import app
    from workflows.spec import json_schema

    schema = json_schema()
    objects = [schema, *schema["$defs"].values()]
    sweep = schema["$defs"]["SweepSpec"]  # its other keys are dotted spec fields (checked against the spec) to lists
    assert sweep["additionalProperties"]["type"] == "array"
    for obj in objects:
        if obj.get("type") == "object" and "properties" in obj and obj is not sweep:
            assert obj.get("additionalProperties") is False, obj.get("title")
    names = {n for obj in objects for n in obj.get("properties", {})}
    assert not names & {
        "_target_",
        "target",
        "class_path",
        "callable",
        "function",
        "module",
        "import",
        "factory",
        "hook",
        "command",
        "cmd",
    }
    corpus = make_corpus(tmp_path / "corpus", n_docs=5)
    cases = {
        "model._target_": {**tiny_spec(corpus, tmp_path / "runs"), "model": {"_target_": "os.system"}},
        "class_path": {**tiny_spec(corpus, tmp_path / "runs"), "class_path": "subprocess.Popen"},
    }
    for field, tree in cases.items():
        result = CliRunner().invoke(app, ["submit", str(write_spec(tmp_path / "s.yaml", tree))])
        assert result.exit_code == 2 and f"{field}: unknown field" in result.output, result.output
    evil = tmp_path / "evil.yaml"
    for payload in (
        "!!python/object/apply:os.system ['touch pwned8']",
        "!!python/name:os.system",
        "!!python/object/new:subprocess.Popen [['touch', 'pwned9']]",
    ):
        evil.write_text(f"name: {payload}\n")
        result = CliRunner().invoke(app, ["submit", str(evil)])
        assert result.exit_code == 2 and "(YAML)" in result.output and "Traceback" not in result.output
    assert pwned(tmp_path) == [] and pwned(Path.cwd()) == [] and not (tmp_path / "runs").exists()


def test_resume_refuses_a_planted_malicious_checkpoint_without_running_it(llm_shards, tmp_path):
    """tests/test_train.py shows load_checkpoint refusing a malicious state.pt; here training itself meets one
    as its newest checkpoint (marker forged to match): it skips it with a warning naming the file, resumes
    from the older checkpoint, and the payload never runs."""
    from llmcore.config import ModelConfig, TrainConfig
    from llmcore.train import train

    model = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    cfg = dict(batch_size=4, warmup_steps=2, eval_interval=5, eval_batches=1, checkpoint_interval=5, device="cpu")
    torch.set_num_threads(1)
    train(model, TrainConfig(max_steps=10, **cfg), llm_shards, tmp_path, seed=0)
    newest = tmp_path / "checkpoints" / "step_00000010"
    marker = tmp_path / "pwned10"
    torch.save({"optimizer": Evil(str(marker))}, newest / "state.pt")
    data = (newest / "state.pt").read_bytes()
    done = json.loads((newest / "DONE.json").read_text())
    done["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "DONE.json").write_text(json.dumps(done))
    with pytest.warns(UserWarning, match=r"step_00000010/state\.pt cannot be loaded safely"):
        summary = train(model, TrainConfig(max_steps=12, **cfg), llm_shards, tmp_path, seed=0)
    assert summary["steps"] == 12 and not marker.exists()


@pytest.mark.slow
def test_ui_listens_on_loopback_only_by_default(tmp_path):
    from workflows.store import Tracker

    Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "ui", tmp_path / "mlartifacts")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "ui", "--runs-root", str(tmp_path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not (
            listening := [
                c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            ]
        ):
            assert proc.poll() is None and time.time() < deadline, "the UI did not start listening"
            time.sleep(0.5)
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_parsl_worker_traffic_is_encrypted_off_box_and_loopback_only_on_box(tmp_path):
    from llmcore.config import TrainConfig
    from site_configs import SiteSpec, build_site

    multi = [TrainConfig(nodes=2, ranks_per_node=4, device="cuda"), TrainConfig()]
    for site in (SiteSpec(name="polaris", account="LLMlab"), SiteSpec(name="slurm", queue="gpu", gpus_per_node=4)):
        built = build_site(site, tmp_path / "parsl", multi, resolve_address=False)
        assert len(built.config.executors) == 2  # the HTEX and the MPI executor of multi-node training
        assert all(e.encrypted for e in built.config.executors), site.name
    local = build_site(SiteSpec(name="local-processes"), tmp_path / "parsl", [TrainConfig()]).config.executors[0]
    assert not local.encrypted and local.address == "127.0.0.1"  # interchange binds loopback: nothing leaves
