#!/usr/bin/env bash
# The main job: set up, then server + seed + target on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sglang-mx demo "$@"
