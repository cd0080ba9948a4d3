#!/usr/bin/env bash
# The main job: set up .venv on first use, then start target, draft worker and orchestrator on this
# machine with the real Qwen2.5-Coder pair, print where to connect and a sample, and serve until Ctrl-C.
# Arguments go to `python -m orchestrator.launch_local` (e.g. --small, --exit-after-sample, --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/bootstrap.sh

# DeepSpeed otherwise probes for a GPU and prints a warning on every import.
export DS_ACCELERATOR=cpu
# The tokenizers library warns (and may deadlock) when a process forks after using its threads.
export TOKENIZERS_PARALLELISM=false

exec .venv/bin/python -m orchestrator.launch_local "$@"
