#!/usr/bin/env bash
# Run the test suite in the project's virtualenv; arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/bootstrap.sh

# One thread per process: the machines have 2 cores, and oversubscribed BLAS threads
# made a tiny forward 100x slower next to a busy neighbour.
export OMP_NUM_THREADS=1
# DeepSpeed otherwise probes for a GPU and prints a warning on every import.
export DS_ACCELERATOR=cpu
# Ray 2.60 turns token auth on by default; local test clusters do not need it.
export RAY_AUTH_MODE=disabled
# The tokenizers library warns (and may deadlock) when a process forks after using its threads.
export TOKENIZERS_PARALLELISM=false

exec .venv/bin/python -m pytest -q "$@"
