#!/usr/bin/env bash
# GPU check of the paper recipe's stage-2 steps, attention backends and students at 512 px on
# one CUDA device (< 8 minutes on an H200; see bench/gpu_check.py for what it prints).
#   bash bench/gpu_check.sh          # on a CUDA machine, from the repository root or anywhere
#   bash bench/gpu_check.sh --dry    # tiny models on the CPU (the test suite runs this)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
if [ -x "$here/../.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$here/../.venv/bin/python"; fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# 8-minute budget: stop cleanly rather than overrun a rented machine
exec timeout --signal=INT 480 "$python" "$here/gpu_check.py" "$@"
