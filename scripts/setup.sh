#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages and .venv.
# Used by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
dpkg -s libibverbs1 >/dev/null 2>&1 || need_apt+=(libibverbs1)   # Mooncake's non-CUDA build links it
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)  # the Redis store's tests
command -v tc >/dev/null 2>&1 || need_apt+=(iproute2)  # ip netns and tc: the emulated hosts (benchmark and test)
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# torch==2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
stamp=.venv/.sglang-mx-setup
want="$(cat pyproject.toml scripts/setup.sh scripts/sglang-*.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q --disable-pip-version-check -e ".[cpu,redis,test]" "torch==2.13.0" 2>&1 \
    | grep -v "^WARNING: Location" || true
  # matplotlib: only benchmarks/fleet.py --plot imports it.
  .venv/bin/pip install -q --disable-pip-version-check "matplotlib>=3.8" 2>&1 | grep -v "^WARNING: Location" || true
  # The real ModelExpress client, for the compatibility tests (its own deps are GPU-sized).
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "modelexpress==0.7.0" 2>&1 \
    | grep -v "^WARNING: Location" || true
  # SGLang 0.5.23 for the integration tests and the demo: --no-deps (its declared
  # dependencies are GPU-sized), then the runtime subset it needs on CPU.
  .venv/bin/pip install -q --disable-pip-version-check -c scripts/sglang-constraints.txt --no-deps \
    "$(grep '^sglang==' scripts/sglang-runtime.txt)" 2>&1 | grep -v "^WARNING: Location" || true
  grep -v -e '^sglang==' -e '^#' scripts/sglang-runtime.txt > .venv/sglang-runtime-deps.txt
  .venv/bin/pip install -q --disable-pip-version-check -c scripts/sglang-constraints.txt \
    -r .venv/sglang-runtime-deps.txt 2>&1 | grep -v -e "^WARNING: Location" -e "^ERROR: pip's dependency resolver" \
    -e "requires .*, but you have" -e "which is not installed" || true
  .venv/bin/python -c "import torch, mooncake.engine, grpc, sglang_mx, modelexpress.client"
  # SGLang imports torchvision, which needs the CPU workaround (scripts/sglang_cpu) on this torch.
  PYTHONPATH=scripts/sglang_cpu .venv/bin/python -c "import sglang"
  echo "$want" > "$stamp"
fi
