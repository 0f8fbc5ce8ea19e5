#!/usr/bin/env bash
# The main job: set up, then an SGLang seed and target on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/sglang_demo.py "$@"
