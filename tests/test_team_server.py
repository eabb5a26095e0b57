"""A team's tracking server, real: MLflow with basic-auth on PostgreSQL, artifacts served by it (tests/teamserver.py,
on the cluster `.ci/postgres-up.sh` starts). Each member's `gptlab` commands get their credentials from MLflow's own
environment variables (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), accounts are made by the team's admin
through MLflow's auth API, and a member sees another member's experiment only once its owner grants it."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from helpers import gptlab, make_corpus, tiny_spec, write_spec
from mlflow.tracking import MlflowClient
from teamserver import as_user, team_server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


def spec_for(tmp, server, experiment: str, corpus=None):
    corpus = corpus or make_corpus(tmp / "corpus", n_docs=30)
    tree = tiny_spec(corpus, tmp / "runs", tokenizer={"model_type": "bpe", "vocab_size": 160},
                     tracking={"uri": server.uri, "experiment": experiment})  # fmt: skip
    tree["name"] = experiment
    return write_spec(tmp / f"{experiment}.yaml", tree), corpus


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def alice(team_server, tmp_path_factory):  # noqa: F811
    """A member with a finished submit in her experiment `alice-exp`."""
    tmp = tmp_path_factory.mktemp("alice")
    password = team_server.add_user("alice")
    env = team_server.env("alice", password)
    spec, corpus = spec_for(tmp, team_server, "alice-exp")
    out = ok(gptlab("submit", spec, "--quiet", env=env, timeout=600))
    return {"env": env, "password": password, "spec": spec, "tmp": tmp, "corpus": corpus, "submit": out}


def test_a_member_submits_and_reads_back_with_every_command(team_server, alice, tmp_path):  # noqa: F811
    env, spec = alice["env"], alice["spec"]
    assert not (alice["tmp"] / "runs" / "mlflow.db").exists(), "nothing goes to a local store"
    with as_user("alice", alice["password"]):
        client = MlflowClient(team_server.uri)
        exp = client.get_experiment_by_name("alice-exp")
        (run,) = client.search_runs([exp.experiment_id], "tags.`gptlab.role` != 'parent'")
        assert run.info.status == "FINISHED" and "val/bpb" in run.data.metrics
        assert exp.artifact_location.startswith("mlflow-artifacts:"), "artifacts are served by the server"
        assert {"spec.yaml", "model"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 31))
    assert list((team_server.dir / "artifacts").rglob("model.safetensors")), "stored under --artifacts-destination"

    assert "alice-exp" in ok(gptlab("status", "--uri", team_server.uri, env=env))
    ui = ok(gptlab("ui", "--uri", team_server.uri, env=env))  # the server's own UI: links, nothing started
    assert f"alice-exp: {team_server.uri}/#/experiments/{exp.experiment_id}/runs?" in ui and "as alice" in ui, ui
    assert ok(gptlab("status", spec, env=env)).count("FINISHED") >= 1
    assert "val/bpb" in ok(gptlab("compare", spec, "--out", tmp_path / "cmp", env=env))
    assert ok(gptlab("sample", run.info.run_name, "--spec", spec, "--max-new-tokens", "8", env=env)).strip()
    ok(gptlab("export", run.info.run_name, "--spec", spec, "--out", tmp_path / "hf", env=env))
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    task = tmp_path / "words.jsonl"
    task.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "context": "The quick", "choices": ["brown", "moon"], "answer": 0}) + "\n"
            for i in range(4)
        )  # fmt: skip
    )
    out = ok(gptlab("evaluate", run.info.run_name, "--spec", spec, "--task", task, "--format", "multiple_choice",
                    "--name", "words", env=env))  # fmt: skip
    assert "recorded on the run" in out, out
    with as_user("alice", alice["password"]):
        assert MlflowClient(team_server.uri).get_run(run.info.run_id).data.metrics["task/words/n"] == 4


@pytest.mark.parametrize("who", ["wrong password", "unknown user", "no credentials"])
def test_wrong_credentials_fail_naming_tracking_uri_before_any_stage(team_server, alice, tmp_path, who):  # noqa: F811
    env = {
        "wrong password": team_server.env("alice", "not-" + alice["password"]),
        "unknown user": team_server.env("mallory", alice["password"]),
        "no credentials": team_server.env("", ""),
    }[who]
    if who == "no credentials":
        del env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    spec, _ = spec_for(tmp_path, team_server, "alice-exp", alice["corpus"])
    r = gptlab("submit", spec, "--quiet", env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out
    assert f"tracking.uri {team_server.uri}: the MLflow server refuses these credentials (HTTP 401)" in r.stderr, out
    assert "MLFLOW_TRACKING_USERNAME" in r.stderr
    assert not (tmp_path / "runs" / "stages").exists(), "no stage was started"
    r = gptlab("ui", "--uri", team_server.uri, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"tracking.uri {team_server.uri}: the MLflow server refuses these credentials" in r.stderr, r.stderr


def test_two_members_do_not_see_or_overwrite_each_other_unless_permitted(team_server, alice, tmp_path):  # noqa: F811
    bob_password = team_server.add_user("bob")
    bob = team_server.env("bob", bob_password)
    spec, _ = spec_for(tmp_path, team_server, "bob-exp", alice["corpus"])
    ok(gptlab("submit", spec, "--quiet", env=bob))
    with as_user("alice", alice["password"]):
        alice_exp = MlflowClient(team_server.uri).get_experiment_by_name("alice-exp")
        alice_runs = MlflowClient(team_server.uri).search_runs([alice_exp.experiment_id])
    with as_user("bob", bob_password):
        client = MlflowClient(team_server.uri)
        assert {e.name for e in client.search_experiments()} == {"bob-exp"}, "bob sees only his own experiment"
        with pytest.raises(Exception, match="PERMISSION_DENIED|403"):
            client.get_run(alice_runs[0].info.run_id)
    with as_user("alice", alice["password"]):
        assert "bob-exp" not in {e.name for e in MlflowClient(team_server.uri).search_experiments()}
    status = ok(gptlab("status", "--uri", team_server.uri, env=bob))
    assert "bob-exp" in status and "alice-exp" not in status
    ui = ok(gptlab("ui", "--uri", team_server.uri, env=bob))
    assert "bob-exp: " in ui and "alice-exp" not in ui, ui

    # Bob may not write into Alice's experiment: a submit of his spec under her experiment's name is refused at
    # once, naming the experiment, and her runs are untouched.
    (tmp_path / "into").mkdir()
    into_alice, _ = spec_for(tmp_path / "into", team_server, "alice-exp", alice["corpus"])
    r = gptlab("submit", into_alice, "--quiet", env=bob)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert re.search(r"tracking\.experiment alice-exp: .*bob.* (no permission|not permitted)", r.stderr), r.stderr
    assert not (tmp_path / "into" / "runs" / "stages").exists()

    # Alice grants Bob READ on her experiment: he sees her runs (still cannot write them).
    from mlflow.server.auth.client import AuthServiceClient

    with as_user("alice", alice["password"]):
        AuthServiceClient(team_server.uri).grant_user_permission("bob", "experiment", alice_exp.experiment_id, "READ")
    with as_user("bob", bob_password):
        client = MlflowClient(team_server.uri)
        assert {e.name for e in client.search_experiments()} == {"bob-exp", "alice-exp"}
        assert client.get_run(alice_runs[0].info.run_id).info.run_id == alice_runs[0].info.run_id
    assert "alice-exp" in ok(gptlab("status", "--uri", team_server.uri, "-e", "alice-exp", env=bob))
    with as_user("alice", alice["password"]):
        after = MlflowClient(team_server.uri).search_runs([alice_exp.experiment_id])
    assert {(r.info.run_id, r.info.status) for r in after} == {(r.info.run_id, r.info.status) for r in alice_runs}
