"""Tracking at scale: how many concurrent trainings one driver's metric forwarding keeps up with.

    python bench/tracking_scale.py [--quick] [--sizes 10,100,1000] [--seconds S] [--json PATH]
                                   [--uri URI | --postgres ADMIN_URI [--auth-cache-s S]] [--experiment-runs N]

N simulated trainings: writer processes append real ``llmcore.metrics`` records to N ``metrics.jsonl`` files at
a training's rate (a ``TrainLine`` with every field a CPU training writes every ``--every`` seconds, 2 by
default, and an ``EvalLine`` every tenth line), each file's first line at a random offset. This process is the
driver: it creates one MLflow run per training in a real store and runs the driver's own forwarding
(``workflows.tail.poll_all`` over one ``MetricsForwarder`` per training, every ``submit`` poll interval, with
``driver.FORWARD_EVERY``) for ``--seconds`` (60 by default), then once more at once. The store: SQLite under a
temporary runs_root (default); the tracking server at ``--uri``; or, with ``--postgres`` (a PostgreSQL admin URI,
as ``.ci/postgres-up.sh`` prints), a team server per N as the README's recipe starts it (basic-auth, served
artifacts, a new database) written to from a member's account. Figures per N: forwarding lag (a metric's
timestamp, when its line was written, to the moment its batch was committed to the store) p50 and p99, the
driver's CPU (its process CPU seconds over wall seconds: 1.0 is one core busy), the server's CPU (its process
tree's), lines written and sent, and the store's size. The ceiling of a store is the largest N whose p99 lag stays
under 30 s with the driver under one core. Also ``gptlab status`` and ``gptlab compare`` over an experiment of
``--experiment-runs`` runs (2,000) in SQLite. Results: bench/results/tracking_scale.json.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import figure, parser, write_report

LAG_TARGET_S = 30.0

WRITER = r"""
import random, sys, time
from pathlib import Path
from llmcore.metrics import EvalLine, MetricsWriter, TrainLine
files, every, until, seed = sys.argv[1].split(","), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
writers = [MetricsWriter(Path(f)) for f in files]
due = [time.time() + rng.uniform(0, every) for _ in files]
step = [0] * len(files)
while time.time() < until:
    now = time.time()
    for i, w in enumerate(writers):
        if due[i] <= now:
            step[i] += 10
            w.write(TrainLine(step=step[i], time=time.time(), loss=3.0 - step[i] * 1e-4, lr=3e-4, grad_norm=0.9,
                              tokens_per_sec=12345.0, tokens_seen=step[i] * 4096, elapsed_s=now))
            if step[i] % 100 == 0:
                w.write(EvalLine(step=step[i], time=time.time(), val_loss=3.1 - step[i] * 1e-4, elapsed_s=now))
            due[i] += every
    time.sleep(max(0.0, min(due) - time.time()))
for w in writers:
    w.close()
"""


def simulate(n: int, seconds: float, every: float, tmp: Path, server: dict | None = None) -> dict:
    """N trainings for ``seconds`` into a SQLite store under ``tmp``, or into ``server`` (``{"uri"}``, and
    from :func:`team_server` ``size_mb`` and ``cpu_s``)."""
    import inspect

    from workflows import submit
    from workflows.driver import FORWARD_EVERY
    from workflows.store import Tracker, default_tracking_uri
    from workflows.tail import MetricsForwarder, poll_all

    poll = float(inspect.signature(submit).parameters["poll_interval"].default)
    root = tmp / f"n{n}"
    root.mkdir()
    server = server or {}
    uri, experiment = server.get("uri") or default_tracking_uri(root), f"scale-{n}-{int(time.time())}"
    tracker = Tracker(uri, experiment, root / "mlartifacts")
    lags: list[float] = []
    written_at: list[float] = []  # each lag's line's time (for the lag over the run)
    sends: list[float] = []  # each send's round trip, seconds
    send = tracker.log_batch_once  # the one call the forwarder sends a batch with

    def timed(run_id, metrics, tags):  # the moment a batch is committed is when its lines are visible
        t0 = time.time()
        send(run_id, metrics, tags)
        now = time.time()
        sends.append(now - t0)
        lags.extend(now - m.timestamp / 1000 for m in metrics if m.key == "train/loss")
        written_at.extend(m.timestamp / 1000 for m in metrics if m.key == "train/loss")

    tracker.log_batch_once = timed
    files = [root / f"t{i:05d}" / "metrics.jsonl" for i in range(n)]
    forwarders = []
    for i, f in enumerate(files):
        f.parent.mkdir()
        forwarders.append(MetricsForwarder(tracker, tracker.create_run(f"t{i:05d}", {"role": "sweep_point"}), f))
    until = time.time() + seconds
    procs = max(1, min(8, n // 50))
    chunks = [files[i::procs] for i in range(procs)]
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, ",".join(map(str, c)), str(every), str(until), str(i)],
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
               for i, c in enumerate(chunks)]  # fmt: skip
    cpu0, wall0, server_cpu0 = time.process_time(), time.time(), server["cpu_s"]() if "cpu_s" in server else 0.0
    while time.time() < until:
        t0 = time.time()
        poll_all(forwarders, FORWARD_EVERY, poll)  # what the driver's loop calls
        time.sleep(max(0.0, poll - (time.time() - t0)))
    for w in writers:
        w.wait()
    poll_all(forwarders, 0.0)  # the trainings have ended: the driver sends the rest at once
    cpu, wall = time.process_time() - cpu0, time.time() - wall0
    server_cpu = (server["cpu_s"]() - server_cpu0) / wall if "cpu_s" in server else None
    written = sum(1 for f in files for line in f.read_bytes().splitlines() if b'"train"' in line)
    db = root / "mlflow.db"
    size = server["size_mb"]() if "size_mb" in server else db.stat().st_size / 2**20 if db.exists() else None
    by_10s: dict[int, list[float]] = {}  # lines written in each 10 s of the run: their p99 lag
    for at, lag in zip(written_at, lags):
        by_10s.setdefault(int((at - wall0) // 10) * 10, []).append(lag)
    lags.sort()
    return {
        "n": n, "seconds": wall, "lines_written": written, "lines_sent": len(lags),
        "lag_p50_s": statistics.median(lags) if lags else None,
        "lag_p99_s": lags[int(0.99 * (len(lags) - 1))] if lags else None,
        "driver_cpu_cores": cpu / wall, "server_cpu_cores": server_cpu, "store_mb": size,
        "lag_p99_by_10s": {k: sorted(v)[int(0.99 * (len(v) - 1))] for k, v in sorted(by_10s.items())},
        "sends_per_s": len(sends) / wall, "send_ms_p50": 1000 * statistics.median(sends) if sends else None,
    }  # fmt: skip


@contextlib.contextmanager
def team_server(pg: str, tmp: Path, auth_cache_s: int) -> Iterator[dict]:
    """A team server as the README's recipe starts it: MLflow's basic-auth app (``auth_cache_ttl_seconds`` set to
    ``auth_cache_s``; 0 checks the password hash at every request, MLflow's default) with its runs and its accounts
    in two new databases of the PostgreSQL server that the admin URI ``pg`` names, artifacts served, MLflow's default
    workers, on a free loopback port. Yields ``{"uri", "size_mb" (the runs database's size, a function), "cpu_s"
    (the server's process tree's CPU seconds so far, a function)}``; this process is a member meanwhile (an
    account the admin makes)."""
    import secrets
    import socket
    import urllib.request
    import uuid

    import psutil
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(pg)
    dbs = [f"bench_scale_{uuid.uuid4().hex[:8]}", f"bench_scale_auth_{uuid.uuid4().hex[:8]}"]
    admin = psycopg2.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
    admin.autocommit = True

    def sql(query: str):
        with admin.cursor() as cur:
            cur.execute(query)
            return cur.fetchall() if cur.description else None

    for db in dbs:
        sql(f'create database "{db}"')
    uri_of = [url.set(database=db).render_as_string(hide_password=False) for db in dbs]
    password = secrets.token_urlsafe(18)
    (tmp / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = {uri_of[1]}\nadmin_username = admin\n"
        f"admin_password = {password}\nauth_cache_ttl_seconds = {auth_cache_s}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # (no job runner: MLflow's GenAI job workers are unused here, as in gptlab ui)
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # fmt: skip
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                               "--backend-store-uri", uri_of[0], "--serve-artifacts", "--artifacts-destination",
                               str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
    tree = psutil.Process(server.pid)

    def cpu_s() -> float:
        procs = [tree, *tree.children(recursive=True)]
        return sum(sum(p.cpu_times()[:4]) for p in procs if p.is_running())

    try:
        for _ in range(240):
            assert server.poll() is None, (tmp / "server.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        from mlflow.server.auth.client import AuthServiceClient

        member = secrets.token_urlsafe(18)  # a member's account: its permission checks are the server's work too
        AuthServiceClient(f"http://127.0.0.1:{port}").create_user("member", member)
        os.environ.update(MLFLOW_TRACKING_USERNAME="member", MLFLOW_TRACKING_PASSWORD=member)
        size = lambda: sql(f"select pg_database_size('{dbs[0]}')")[0][0] / 2**20
        yield {"uri": f"http://127.0.0.1:{port}", "size_mb": size, "cpu_s": cpu_s}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        for db in dbs:
            sql(f'drop database if exists "{db}" with (force)')
        admin.close()


def big_experiment(n: int, tmp: Path) -> dict:
    """``gptlab status`` and ``gptlab compare`` over an experiment of ``n`` finished sweep-point runs (each with
    its params, final metrics and a 10-point loss curve) in a SQLite store: seconds each."""
    from mlflow.entities import Metric, Param, RunTag

    from workflows.store import Tracker, default_tracking_uri

    root = tmp / f"big{n}"
    root.mkdir()
    tracker = Tracker(default_tracking_uri(root), "big", root / "mlartifacts")
    client, now = tracker.client, int(time.time() * 1000)
    parent = tracker.create_run("big", {"role": "parent", "spec_hash": "h"})
    client.log_batch(parent, params=[Param("sweep", "{train.lr: [...]}"), Param("swept", "[train.lr]")])
    t0 = time.time()
    for i in range(n):
        run = tracker.create_run(f"lr={i}", {"role": "sweep_point", "spec_hash": "h", "parent": parent})
        curve = [Metric(k, 3.0 - s / 100, now, s) for s in range(0, 100, 10) for k in ("train/loss", "val/loss")]
        client.log_batch(run, metrics=[*curve, Metric("val/bpb", 1.9 + i / n, now, 100)],
                         params=[Param("train.lr", str(i))], tags=[RunTag("mlflow.parentRunId", parent)])  # fmt: skip
        client.set_terminated(run, "FINISHED")
    made = time.time() - t0
    out = {"runs": n, "create_s": made}
    for command in (["status", "--runs-root", str(root)], ["compare", "--runs-root", str(root), "--out",
                                                              str(root / "report")]):  # fmt: skip
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "workflows.cli", *command], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        out[f"{command[0]}_s"] = time.time() - t0
    return out


def run_sizes(args, sizes: list[int], seconds: float, tmp: Path) -> list[dict]:
    """One simulation per N: into a SQLite store, the server at ``--uri``, or a team server of its own per N on
    the PostgreSQL server ``--postgres`` names (a fresh database each)."""
    rows = []
    for n in sizes:
        here = tmp / f"server{n}"
        here.mkdir()
        if args.postgres:
            with team_server(args.postgres, here, args.auth_cache_s) as server:
                r = simulate(n, seconds, args.every, tmp, server)
        else:
            r = simulate(n, seconds, args.every, tmp, {"uri": args.uri} if args.uri else None)
        rows.append(r)
        server_cpu = f", server {r['server_cpu_cores']:.2f} cores" if r["server_cpu_cores"] is not None else ""
        lag = f"p50 {r['lag_p50_s']:.2f} s, p99 {r['lag_p99_s']:.2f} s" if r["lag_p50_s"] is not None else "no lag"
        print(f"  N={n}: {lag}, driver {r['driver_cpu_cores']:.2f} cores{server_cpu}, "
              f"{r['lines_sent']}/{r['lines_written']} lines, {r['sends_per_s']:.1f} sends/s "
              f"(p50 {r['send_ms_p50'] or 0:.0f} ms)", flush=True)  # fmt: skip
    return rows


def size_figures(store: str, rows: list[dict]) -> list[dict]:
    figures = []
    for r in rows:
        ok = r["lag_p99_s"] is not None and r["lag_p99_s"] < LAG_TARGET_S and r["driver_cpu_cores"] < 1.0
        figures += [
            figure(f"{store}, N={r['n']}: forwarding lag p50", r["lag_p50_s"], "s"),
            figure(f"{store}, N={r['n']}: forwarding lag p99", r["lag_p99_s"], "s", f"< {LAG_TARGET_S:g} s", ok),
            figure(f"{store}, N={r['n']}: driver CPU (cores)", r["driver_cpu_cores"], "cores", "< 1"),
            figure(f"{store}, N={r['n']}: lines sent / written", r["lines_sent"], f"of {r['lines_written']}"),
        ]
        if r["server_cpu_cores"] is not None:
            figures.append(figure(f"{store}, N={r['n']}: server CPU (cores)", r["server_cpu_cores"], "cores"))
        if r["store_mb"] is not None:
            figures.append(figure(f"{store}, N={r['n']}: store size", r["store_mb"], "MiB"))
    ceiling = max((r["n"] for r in rows if r["lag_p99_s"] is not None and r["lag_p99_s"] < LAG_TARGET_S
                   and r["driver_cpu_cores"] < 1.0), default=0)  # fmt: skip
    return [*figures, figure(f"{store}: the largest N measured within the target", ceiling, "trainings")]


def main(argv: list[str] | None = None) -> int:
    p = parser("tracking_scale", __doc__)
    p.add_argument("--sizes", default=None, help="comma-separated N (default 10,100,1000; --quick: 10,50)")
    p.add_argument("--seconds", type=float, default=None, help="seconds each N runs (default 60; --quick: 15)")
    p.add_argument("--every", type=float, default=2.0, help="seconds between a training's lines")
    p.add_argument("--uri", default=None, help="a tracking server (default: a SQLite store per N)")
    p.add_argument("--postgres", default=None, help="a PostgreSQL admin URI (.ci/postgres-up.sh prints one): a "
                   "basic-auth team server on a new database of it per N")  # fmt: skip
    p.add_argument("--auth-cache-s", type=int, default=300, help="the team server's auth_cache_ttl_seconds")
    p.add_argument("--experiment-runs", type=int, default=None, help="status/compare over this many runs "
                   "(default 2000; --quick: 100; 0: skip)")  # fmt: skip
    args = p.parse_args(argv)
    sizes = [int(x) for x in (args.sizes or ("10,50" if args.quick else "10,100,1000")).split(",")]
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    random.seed(0)
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-scale-") as tmp:
        rows = run_sizes(args, sizes, seconds, Path(tmp))
        big = args.experiment_runs if args.experiment_runs is not None else (100 if args.quick else 2000)
        listed = big_experiment(big, Path(tmp)) if big else None
    figures = []
    if listed:
        print(f"  {big} runs: status {listed['status_s']:.1f} s, compare {listed['compare_s']:.1f} s", flush=True)
        figures += [figure(f"gptlab status over {big} runs (SQLite)", listed["status_s"], "s"),
                    figure(f"gptlab compare over {big} runs (SQLite)", listed["compare_s"], "s")]  # fmt: skip
    store = (f"PostgreSQL server (auth cache {args.auth_cache_s} s)" if args.postgres
             else "server" if args.uri else "SQLite")  # fmt: skip
    figures += size_figures(store, rows)
    details = {"store": store, "rows": rows, "every_s": args.every, "seconds": seconds, "experiment": listed}
    write_report("tracking_scale", args, figures, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
