"""`gptlab ui` serves a store to its owner only: a second, real Unix user of this machine (made with `useradd`, its
requests sent with `runuser -u ... -- curl`, as a new user of a login node would) connects to the port on loopback
and gets 401 for the runs search and for a run's `spec.yaml`, with no credentials and with guessed ones, and cannot
read the file that holds the owner's password; the owner, with what `gptlab ui` printed, reads both.

The test runs as root (it creates the user) and needs `runuser`, `useradd` and `curl` (Debian's util-linux, passwd
and curl)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import free_port, make_corpus, stop_group, tiny_spec, wait_for, write_spec

from workflows import submit

pytestmark = pytest.mark.slow

OTHER = "gptlab-other"  # the second Unix user


def as_other(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", OTHER, "--", *argv], capture_output=True, text=True, timeout=60)


def other_curl(url: str, *extra: str) -> tuple[int, str]:
    """HTTP status and body of a GET sent by the second user."""
    r = as_other("curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "30", *extra, url)
    body, _, code = r.stdout.rpartition("\n")
    assert code.isdigit(), (r.stdout, r.stderr)
    return int(code), body


@pytest.fixture(scope="module")
def other_user():
    missing = [t for t in ("useradd", "runuser", "curl") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(f"needs root and {', '.join(missing) or 'useradd, runuser, curl'} to make a second Unix user")
    if subprocess.run(["id", OTHER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER], check=True)
    assert as_other("id", "-un").stdout.strip() == OTHER
    return OTHER


@pytest.fixture(scope="module")
def private_ui(other_user, tmp_path_factory):
    # runs_root in a folder every user may enter (as a project directory on a shared file system): the credentials
    # file is then protected by its own mode, not by a private parent.
    top = Path(tempfile.mkdtemp(prefix="gptlab-ui-"))
    os.chmod(top, 0o755)
    tmp = tmp_path_factory.mktemp("ui")
    proc = None
    try:
        corpus = make_corpus(tmp / "corpus")
        result = submit(write_spec(tmp / "s.yaml", tiny_spec(corpus, top / "runs")), quiet=True, poll_interval=0.5)
        assert result.ok, [r.error for r in result.runs]
        port = free_port()
        log_path = tmp / "ui.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workflows.cli", "ui", "--runs-root", str(top / "runs"), "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, MLFLOW_WORKERS="1"),
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, log_path.read_text()
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/health"],
                               capture_output=True, text=True)  # fmt: skip
            return r.stdout == "200"

        wait_for(up, 120, f"gptlab ui on {base}", every=0.5)
        printed = log_path.read_text()
        yield {"base": base, "printed": printed, "result": result, "runs_root": top / "runs"}
    finally:
        if proc is not None:
            stop_group(proc)
        shutil.rmtree(top, ignore_errors=True)


def owner_credentials(printed: str) -> tuple[str, str, str]:
    """User, password and the login link, from what `gptlab ui` printed."""
    m = re.search(r"for you only: user (\S+), password (\S+) \(kept in .*open (\S+) first", printed)
    assert m, printed
    return m.group(1), m.group(2), m.group(3)


def rest(base: str, run_id: str, experiment_id: str) -> dict[str, tuple[str, list[str]]]:
    """The requests a reader of the runs makes: runs search (REST) and the download of a run's spec.yaml."""
    search = json.dumps({"experiment_ids": [experiment_id], "max_results": 10})
    return {
        "search": (
            f"{base}/api/2.0/mlflow/runs/search",
            ["-X", "POST", "-H", "Content-Type: application/json", "--data", search],
        ),  # fmt: skip
        "artifact": (f"{base}/get-artifact?path=spec.yaml&run_uuid={run_id}", []),
    }


def test_the_owner_reads_runs_and_spec_with_what_gptlab_ui_printed(private_ui):
    user, password, login = owner_credentials(private_ui["printed"])
    parts = urlsplit(login)
    assert (parts.username, parts.password) == (user, password), "the login link carries the owner's credentials"
    urls = [line.split(": ", 1)[1] for line in private_ui["printed"].splitlines() if line.startswith("  tiny: ")]
    assert len(urls) == 1 and urls[0].startswith(private_ui["base"] + "/#/experiments/"), private_ui["printed"]
    result = private_ui["result"]
    run_id = result.runs[0].run_id
    for name, (endpoint, extra) in rest(private_ui["base"], run_id, result.experiment_id).items():
        r = subprocess.run(["curl", "-s", "-u", f"{user}:{password}", "-w", "\n%{http_code}", *extra, endpoint],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        body, _, code = r.stdout.rpartition("\n")
        assert code == "200", (name, r.stdout)
        if name == "search":
            assert run_id in {run["info"]["run_id"] for run in json.loads(body)["runs"]}
        else:
            assert "name: tiny" in body and "runs_root:" in body, body[:300]


def test_another_unix_user_cannot_read_a_run_through_the_ui(private_ui, other_user):
    user, password, _ = owner_credentials(private_ui["printed"])
    result = private_ui["result"]
    run_id = result.runs[0].run_id
    for name, (endpoint, extra) in rest(private_ui["base"], run_id, result.experiment_id).items():
        for creds in ([], ["-u", f"{user}:not-{password}"], ["-u", f"{other_user}:{password}"]):
            code, body = other_curl(endpoint, *extra, *creds)
            assert code == 401, (name, creds, code, body[:300])
            assert run_id not in body and "runs_root" not in body, (name, body[:300])
    # Nor can that user read the owner's password off the disk.
    ui_dir = private_ui["runs_root"] / ".gptlab-ui"
    assert stat.S_IMODE(ui_dir.stat().st_mode) == 0o700
    for f in ui_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    r = as_other("cat", str(ui_dir / "basic_auth.ini"))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stdout + r.stderr
    # The same request with the owner's credentials, sent by the other user, works: the port is reachable, it is
    # the password that keeps them out.
    code, _ = other_curl(f"{private_ui['base']}/get-artifact?path=spec.yaml&run_uuid={run_id}", "-u",
                         f"{user}:{password}")  # fmt: skip
    assert code == 200


def test_insecure_says_what_it_opens(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mlflow.db").write_bytes(b"")
    # An unusable port: the UI itself fails to start after the warning is printed.
    r = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "ui", "--runs-root", str(tmp_path / "runs"), "--insecure",
         "--port", "70000"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "WITHOUT a password (--insecure): every user who can connect to port 70000" in r.stdout, r.stdout
    assert not (tmp_path / "runs" / ".gptlab-ui").exists()
