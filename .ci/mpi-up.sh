#!/usr/bin/env bash
# Makes `mpiexec` available for the MPI tests (tests/test_mpi.py, pytest -m mpi): installs Debian's MPICH
# (Hydra's mpiexec) when no mpiexec is on PATH. Idempotent: does nothing but report the version when one is.
# Needs root (or sudo) and apt; runs `apt-get update` only when the package is not yet in the apt lists.
set -euo pipefail

if ! command -v mpiexec >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "mpi-up: mpiexec is missing and this is not root (no sudo)" >&2; exit 1; }
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show mpich >/dev/null 2>&1; then
        $SUDO apt-get update -q
    fi
    $SUDO apt-get install -y -q --no-install-recommends mpich
    command -v mpiexec >/dev/null 2>&1 || { echo "mpi-up: mpich installed but no mpiexec on PATH" >&2; exit 1; }
fi

# first line (Hydra's is just "HYDRA build details:", so its second, the version, too)
echo "$(command -v mpiexec): $(mpiexec --version 2>&1 | head -n 2 | sed "s/[[:space:]]\+/ /g; s/^ //; s/ $//" | paste -sd " ")"
