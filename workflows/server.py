"""Is an MLflow tracking server there? Asked once, fast, before any MLflow call to it.

MLflow's own client retries a server that is not there with backoff for minutes, saying nothing. gptlab asks once,
with short timeouts and no retries, and turns every way of not answering into one sentence naming
``tracking.uri`` and what to do.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path


class TrackingStoreError(RuntimeError):
    """The MLflow store cannot be written: its disk is full, over quota or read-only, or no MLflow tracking
    server answers at its URI. Nothing is lost: committed stages stay committed, and a submit after fixing it
    resumes the runs."""


PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"
PROBE_CONNECT_SECONDS = 5.0
PROBE_READ_SECONDS = 15.0  # a busy server still answers a one-experiment search well within this
_answered: set[str] = set()  # URIs whose server answered in this process
_probe_lock = threading.Lock()


def check_tracking_server(uri: str) -> None:
    """Raise :class:`TrackingStoreError` (one sentence naming ``tracking.uri``) unless an MLflow tracking server
    answers at ``uri``; a no-op for local stores and, after the first answer, for the same URI.

    The probe is a GET of MLflow's REST experiment search for one experiment, sent through MLflow's own HTTP
    helper (its credentials, TLS and header settings) but once, without retries, with short timeouts. A server
    that answers with a transient error (429, 5xx) or denies access to this one call (403) passes: MLflow's
    own retries and errors deal with those."""
    if not uri.lower().startswith(("http://", "https://")) or uri in _answered:  # only servers over HTTP
        return
    with _probe_lock:
        if uri in _answered:
            return
        problem = _probe(uri)
        if problem is not None:
            raise TrackingStoreError(f"tracking.uri {uri}: {problem}")
        _answered.add(uri)


def _probe(uri: str) -> str | None:
    """None when an MLflow server answers at ``uri``, else what is wrong and what to do, in words."""
    from urllib.parse import urlsplit

    import requests
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    fix = "or point tracking.uri (--uri for status, compare and sample) at a running one"
    try:
        parts = urlsplit(uri)
        host, port = parts.hostname or "?", parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as exc:
        return f"not a valid URL ({exc}); fix tracking.uri"
    start = f"start one there (`mlflow server --host {host} --port {port}`) {fix}"
    try:
        resp = http_request(
            get_default_host_creds(uri),
            PROBE_ENDPOINT,
            "GET",
            max_retries=0,
            backoff_factor=0,
            timeout=(PROBE_CONNECT_SECONDS, PROBE_READ_SECONDS),
            raise_on_status=False,
            params={"max_results": 1},
        )
    except Exception as exc:  # MLflow wraps every requests error in an MlflowException: look down the chain
        import urllib3

        chain, todo = [], [exc]
        while todo:
            e = todo.pop()
            if isinstance(e, BaseException) and not any(e is c for c in chain):
                chain.append(e)  # urllib3 keeps the error beneath a MaxRetryError in .reason, requests in args
                todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args[:1]]
        if any(isinstance(e, ConnectionRefusedError) for e in chain):
            return f"no MLflow server answers (connection refused: nothing listens on port {port} of {host}); {start}"
        if any(isinstance(e, socket.gaierror) for e in chain):
            return f"no MLflow server answers (host name {host!r} is not known); fix tracking.uri"
        connect_timeout = (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)
        if any(isinstance(e, connect_timeout) for e in chain):
            return (
                f"no MLflow server answers (no connection within {PROBE_CONNECT_SECONDS:g} s: the host is down "
                f"or a firewall drops the connection); {start}"
            )
        if any(isinstance(e, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError)) for e in chain):
            return (
                f"the server accepted a connection but sent no answer within {PROBE_READ_SECONDS:g} s: it is "
                f"hung, or not an HTTP server; restart it {fix}"
            )
        if any(isinstance(e, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)) for e in chain):
            return (
                "the TLS handshake failed; for a server with its own certificate set "
                "MLFLOW_TRACKING_SERVER_CERT_PATH (or MLFLOW_TRACKING_INSECURE_TLS=true), or fix tracking.uri"
            )
        if any(isinstance(e, requests.exceptions.ConnectionError) for e in chain):
            reason = next((str(e.args[0]) for e in reversed(chain) if isinstance(e, OSError) and e.args), "")
            return f"no MLflow server answers (cannot connect{': ' + reason[:200] if reason else ''}); {start}"
        return f"cannot reach an MLflow server ({str(exc)[:300]}); {start}"
    code = resp.status_code
    if code == 401:
        return (
            "the MLflow server refuses these credentials (HTTP 401); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or fix tracking.uri"
        )
    if code in (403, 429) or code >= 500:
        return None  # a server that is there: denied this one call, or busy; MLflow retries and reports those
    try:
        answer = resp.json() if code == 200 else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        kind = (resp.headers.get("Content-Type") or "no content type").split(";")[0]
        return (
            f"something answers there, but not an MLflow tracking server (HTTP {code}, {kind}, for "
            f"{PROBE_ENDPOINT}); point tracking.uri (--uri for status, compare and sample) at an MLflow "
            "server's address (its port, and its path prefix behind a proxy)"
        )
    return None


# ------------------------------------------------------------------ `gptlab ui`: served to its owner only

UI_DIR = ".gptlab-ui"  # under runs_root, 0700: the UI's auth config and auth database, 0600


class PrivateUI:
    """What `gptlab ui` needs to serve a store to its owner only, with MLflow's own basic-auth app
    (``mlflow server --app-name basic-auth``): an auth config file and an auth database in ``<runs_root>/.gptlab-ui``
    (directory 0700, files 0600), one admin account named after the Unix user, with a password generated once and
    kept in that config file for the next `gptlab ui`. Another user of the machine can connect to the port, but
    every request without the password is answered 401; the owner logs in with the user name and password
    `gptlab ui` prints (the browser asks for them), or opens the login link it prints once.

    A secret never goes on a command line (``ps`` shows those to every user): the password is in the 0600 file,
    the Flask secret key in the server's environment (readable by its owner only)."""

    def __init__(self, runs_root: Path):
        import configparser
        import getpass
        import secrets

        self.dir = runs_root.resolve() / UI_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.config_path, db = self.dir / "basic_auth.ini", self.dir / "auth.db"
        config = configparser.ConfigParser(interpolation=None)
        if self.config_path.is_file():
            config.read(self.config_path)
        section = config["mlflow"] if config.has_section("mlflow") else None
        if section is None or not section.get("admin_password") or not db.is_file():
            db.unlink(missing_ok=True)  # a password is only taken when the admin is created: start both afresh
            config["mlflow"] = {
                "default_permission": "NO_PERMISSIONS",
                "database_uri": f"sqlite:///{db}",
                "admin_username": _ui_user_name(getpass.getuser()),
                "admin_password": secrets.token_urlsafe(18),
                "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
                "flask_secret_key": secrets.token_hex(32),
            }
            fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                config.write(f)
        os.chmod(self.config_path, 0o600)
        section = config["mlflow"]
        self.user, self.password = section["admin_username"], section["admin_password"]
        self.secret_key = section.get("flask_secret_key") or secrets.token_hex(32)
        # The auth database MLflow creates inherits the umask: keep it the owner's (created empty, 0600, first).
        if not db.exists():
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(db, 0o600)

    def env(self) -> dict[str, str]:
        """The server's environment: MLflow reads its auth config and Flask secret key from these."""
        return {"MLFLOW_AUTH_CONFIG_PATH": str(self.config_path), "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key}

    def login_url(self, base: str) -> str:
        """A URL that logs a browser in: the owner's credentials in it, on an API page that asks for them, so the
        browser keeps them for the UI's other pages. (The UI's own pages must be opened without credentials in the
        URL: its scripts cannot fetch from a page whose address holds them.)"""
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{self.user}:{self.password}@{rest}{LOGIN_PATH}"


LOGIN_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


def _ui_user_name(name: str) -> str:
    """The Unix user name as an MLflow account name (letters, digits, ``._-`` kept, so it stays URL-safe)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "owner"
