#!/usr/bin/env bash
# A real PostgreSQL for the team-server tests (tests/test_team_server.py, tests/test_tracking_restart.py): installs
# Debian's postgresql when it is missing, creates a cluster of its own named `gptlab` (so the tests may restart it
# without touching any other cluster of the machine) on port ${GPTLAB_PG_PORT:-5439}, starts it with pg_ctlcluster,
# and creates the role `gptlab` (password ${GPTLAB_PG_PASSWORD:-gptlab}, CREATEDB: each test module makes its own
# database) and a database `gptlab`. Idempotent: a second run only makes sure the cluster is up.
# Prints the SQLAlchemy URI MLflow takes: postgresql+psycopg2://gptlab:...@127.0.0.1:PORT/gptlab
# The psycopg2 driver MLflow needs for that URI comes from the `test` (or `team`) extra. Needs root and apt.
set -euo pipefail
PORT="${GPTLAB_PG_PORT:-5439}"
PASSWORD="${GPTLAB_PG_PASSWORD:-gptlab}"
CLUSTER=gptlab

[ "$(id -u)" -eq 0 ] || { echo "postgres-up: needs root (apt-get, pg_createcluster)" >&2; exit 1; }
if ! command -v pg_createcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-cache show postgresql >/dev/null 2>&1 || apt-get update -q
    apt-get install -y -q --no-install-recommends postgresql
fi
VERSION="$(ls /usr/lib/postgresql | sort -V | tail -1)"

if ! pg_lsclusters --no-header | awk '{print $2}' | grep -qx "$CLUSTER"; then
    pg_createcluster "$VERSION" "$CLUSTER" --port "$PORT" >/dev/null
fi
VERSION="$(pg_lsclusters --no-header | awk -v c="$CLUSTER" '$2 == c {print $1}')"
PORT="$(pg_lsclusters --no-header | awk -v c="$CLUSTER" '$2 == c {print $3}')"
if ! pg_lsclusters --no-header | awk -v c="$CLUSTER" '$2 == c {print $4}' | grep -q online; then
    pg_ctlcluster "$VERSION" "$CLUSTER" start
fi
for _ in $(seq 60); do
    runuser -u postgres -- psql -p "$PORT" -qtAc "select 1" >/dev/null 2>&1 && break
    sleep 0.5
done

psql_admin() { runuser -u postgres -- psql -p "$PORT" -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ -z "$(psql_admin -c "select 1 from pg_roles where rolname = 'gptlab'")" ]; then
    psql_admin -c "create role gptlab login createdb password '$PASSWORD'"
fi
if [ -z "$(psql_admin -c "select 1 from pg_database where datname = 'gptlab'")" ]; then
    psql_admin -c "create database gptlab owner gptlab"
fi
echo "postgresql+psycopg2://gptlab:${PASSWORD}@127.0.0.1:${PORT}/gptlab (cluster $VERSION/$CLUSTER)"
