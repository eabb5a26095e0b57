"""A team's tracking server for tests, real: `mlflow server --app-name basic-auth` on a PostgreSQL database of its
own (the cluster `.ci/postgres-up.sh` starts), artifacts served by it (`--serve-artifacts`, an artifacts folder),
one admin account, on a free loopback port. A test module takes it with ``team_server`` (module scope: one server per
module); :meth:`TeamServer.stop` and :meth:`TeamServer.start` restart it on the same port, and
:func:`restart_postgres` restarts the database under it.

Users are made as a team's admin would, through MLflow's auth API (``AuthServiceClient.create_user``); a user's
commands get their credentials from MLflow's own environment variables (:meth:`TeamServer.env`).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, stop_group

CLUSTER = "gptlab"  # the PostgreSQL cluster .ci/postgres-up.sh creates
ROLE, ROLE_PASSWORD = "gptlab", os.environ.get("GPTLAB_PG_PASSWORD", "gptlab")


def cluster() -> tuple[str, int]:
    """(version, port) of the running `gptlab` PostgreSQL cluster; fails naming the script that starts it."""
    try:
        out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        out = ""
    for line in out.splitlines():
        version, name, port, state, *_ = line.split()
        if name == CLUSTER:
            if state.startswith("online"):
                return version, int(port)
            break
    pytest.fail("no running PostgreSQL cluster `gptlab`: run .ci/postgres-up.sh (Debian's postgresql)")


def pg_uri(database: str, driver: str = "+psycopg2") -> str:
    """The database's URI; with the driver named, as SQLAlchemy (MLflow) takes it (SQLAlchemy 2.1's default
    driver for a bare postgresql:// is psycopg 3, which gptlab does not install)."""
    return f"postgresql{driver}://{ROLE}:{ROLE_PASSWORD}@127.0.0.1:{cluster()[1]}/{database}"


def create_database(prefix: str) -> str:
    """A new, empty database owned by the gptlab role, with a unique name; returns its name."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(pg_uri("gptlab", driver=""))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'create database "{name}"')
    conn.close()
    return name


def drop_database(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(pg_uri("gptlab", driver=""))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'drop database if exists "{name}" with (force)')
    conn.close()


def restart_postgres() -> None:
    """Restart the whole `gptlab` cluster (every connection of the server under test is cut)."""
    version, _ = cluster()
    subprocess.run(["pg_ctlcluster", version, CLUSTER, "restart"], check=True, capture_output=True, timeout=120)
    cluster()


class TeamServer:
    """One MLflow tracking server with basic-auth on PostgreSQL, its artifacts served from ``dir/artifacts``."""

    def __init__(self, tmp: Path):
        self.dir = tmp
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.databases = [create_database("mlflow"), create_database("mlflow_auth")]
        self.admin, self.admin_password = "admin", secrets.token_urlsafe(18)
        self.config = tmp / "basic_auth.ini"
        self.config.write_text(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {pg_uri(self.databases[1])}\n"
            f"admin_username = {self.admin}\n"
            f"admin_password = {self.admin_password}\n"
            "auth_cache_ttl_seconds = 300\n"  # as the README's recipe: else every request hashes the password
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        os.chmod(self.config, 0o600)
        self.secret_key = secrets.token_hex(32)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, seconds: float = 120) -> None:
        self.starts += 1
        log = (self.dir / f"server.{self.starts}.log").open("w")
        # fmt: off
        argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                "--backend-store-uri", pg_uri(self.databases[0]),
                "--serve-artifacts", "--artifacts-destination", str(self.dir / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port)]
        # fmt: on
        env = dict(
            os.environ,
            MLFLOW_WORKERS="1",
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # GenAI job workers: unused, ~250 MB each
            MLFLOW_AUTH_CONFIG_PATH=str(self.config),
            MLFLOW_FLASK_SERVER_SECRET_KEY=self.secret_key,
        )  # fmt: skip
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
            env.pop(name, None)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.wait_up(seconds)

    def wait_up(self, seconds: float) -> None:
        import urllib.request

        deadline = time.time() + seconds
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            assert time.time() < deadline, f"{self.uri} did not answer in {seconds:.0f} s:\n{self.log()}"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def log(self) -> str:
        return (self.dir / f"server.{self.starts}.log").read_text()

    def env(self, user: str | None = None, password: str | None = None) -> dict[str, str]:
        """The environment of a command run by ``user`` (default: the admin), credentials in MLflow's variables."""
        if user is None:
            user, password = self.admin, self.admin_password
        return dict(os.environ, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password or "")

    def add_user(self, user: str) -> str:
        """Create an account through MLflow's auth API, as the admin; returns its password."""
        from mlflow.server.auth.client import AuthServiceClient

        password = secrets.token_urlsafe(18)
        with as_user(self.admin, self.admin_password):
            AuthServiceClient(self.uri).create_user(user, password)
        return password

    def close(self) -> None:
        self.stop()
        for name in self.databases:
            drop_database(name)


class as_user:
    """MLflow's credential variables set to ``user`` in this process for the ``with`` block."""

    NAMES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

    def __init__(self, user: str, password: str):
        self.values = (user, password)

    def __enter__(self) -> None:
        self.saved = [os.environ.get(n) for n in self.NAMES]
        os.environ.update(zip(self.NAMES, self.values))

    def __exit__(self, *exc: Any) -> None:
        for name, value in zip(self.NAMES, self.saved):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """A running team server (see the module docstring), stopped and its databases dropped after the module."""
    cluster()
    server = TeamServer(tmp_path_factory.mktemp("team-server"))
    try:
        server.start()
        yield server
    finally:
        server.close()
