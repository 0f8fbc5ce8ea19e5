#!/usr/bin/env bash
# The prepared GPU check (one H100/H200, no network, no SGLang), about 4 minutes, at most 7 (the sum of
# the main step timeouts is 400 s; the import fallbacks add up to 3 min only when imports fail).
# Run from the repo root with the carried wheels in .whl/ (see the bottom of this file):
#     bash scripts/gpu_check.sh
# Steps: (0) install the carried wheels (and system libraries Mooncake needs, only where missing);
# (a) GPU and versions; (b) digest tests and benchmark on CUDA; (c) ceilings measured in this run (device
# copy, CUDA IPC copy, loopback socket, host<->device pinned and pageable) and seed -> target pulls over tcp
# and intra-node NVLink, each printing the transport Mooncake installed, the digests verified (48 of 48), a
# flipped byte caught and the regions registered per CUDA allocation (scripts/gpu_check.py).
# Every step is bounded by `timeout`; a failing step says so and the next one runs.
# All output is also written to $OUT/gpu_check.log when OUT is set.
set -u
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
  TEE_PID=$!
fi
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
check() {  # check SECONDS NAME CMD...: run CMD under a timeout, report its outcome
  local limit=$1 name=$2; shift 2
  timeout -k 5 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then echo "--- $name: ok"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "--- $name: TIMED OUT after ${limit} s"
  else echo "--- $name: FAILED (exit $rc)"; fi
  return 0
}

step "0. carried wheels -> /tmp/site"
if ls .whl/*.whl >/dev/null 2>&1; then
  check 50 "pip install" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
else
  echo "no .whl/*.whl here: was .whl named in carry?"
fi
export PYTHONPATH=/tmp/site:$PWD
# Mooncake's engine.so needs libibverbs, libmlx5, libnuma and libcurl from the system: link in the
# carried Debian 12 copies of any the image lacks (and of nothing else).
if ls .whl/debs/*.deb >/dev/null 2>&1; then
  mkdir -p /tmp/syslib/root /tmp/syslib/lib
  for f in .whl/debs/*.deb; do dpkg -x "$f" /tmp/syslib/root 2>/dev/null || echo "could not unpack $f"; done
  for so in $(find /tmp/syslib/root -name '*.so.*' \( -type f -o -type l \) -printf '%f\n' | sort -u); do
    [[ $so =~ \.so\.[0-9]+$ ]] || continue  # sonames only (libfoo.so.1, not libfoo.so.1.2.3)
    if ! ldconfig -p | grep -q "^[[:space:]]*$so "; then
      ln -sf "$(find /tmp/syslib/root -name "$so" | head -1)" /tmp/syslib/lib/"$so"
    fi
  done
  echo "system libraries linked in from the carried debs: $(ls /tmp/syslib/lib | tr '\n' ' ')"
  export LD_LIBRARY_PATH=/tmp/syslib/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
if ! timeout 60 $PY -c "import sglang_mx.client, sglang_mx.server" 2>/dev/null; then
  echo "sglang_mx does not import with the image's grpcio/protobuf; trying the carried fallback protobuf:"
  timeout 60 $PY -c "import sglang_mx.client, sglang_mx.server" 2>&1 | tail -3
  ls .whl/fallback/*.whl >/dev/null 2>&1 && check 60 "pip install fallback" $PY -m pip install -q --no-index \
    --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fallback/*.whl
fi

step "a. GPU, versions"
check 15 "nvidia-smi" nvidia-smi
check 40 "versions" $PY - <<'EOF'
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
for name in ("grpc", "google.protobuf", "xxhash", "safetensors", "triton", "grpc_health.v1.health"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', getattr(m, 'VERSION', ''))}")
    except Exception as e:
        print(f"{name}: NOT importable: {e}")
try:
    import mooncake.engine, mooncake
    print("mooncake.engine from", mooncake.__path__[0])
except Exception as e:
    print("mooncake.engine: NOT importable:", e)
import sglang_mx.client, sglang_mx.server, sglang_mx.digest
print("sglang_mx imports")
EOF
if ! timeout 60 $PY -c "import torch, mooncake.engine" >/dev/null 2>&1; then
  so=$(find /tmp/site/mooncake -name engine.so | head -1)
  [ -n "$so" ] && { echo "libraries engine.so misses:"; ldd "$so" | grep "not found"; }
fi

step "b. digest tests and benchmark on CUDA"
check 45 "pytest tests/test_digest.py" $PY -m pytest -q -p no:cacheprovider tests/test_digest.py
check 30 "digest benchmark" $PY benchmarks/digest_speed.py --device cuda --gb 1 --repeats 3

step "c. ceilings, then seed -> target over Mooncake on the GPU (tcp, nvlink_intra), digests verified"
check 220 "gpu_check.py" $PY scripts/gpu_check.py --device cuda --size-gb "${SIZE_GB:-4}" \
  --protocols "${PROTOCOLS:-tcp,nvlink_intra}" --run-timeout-s 60 --wait-s 50 --budget-s 150

step "done in $(( $(date +%s) - T0 )) s"
if [ -n "${TEE_PID:-}" ]; then exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null; fi  # let tee finish the log

# Preparing the carried files (on the development machine, in the repo root):
#   echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl mooncake-transfer-engine-cuda13==0.3.14
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl grpcio-health-checking==1.71.0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl/fallback protobuf==5.29.5
#   mkdir -p .whl/debs && (cd .whl/debs && apt-get download libibverbs1 ibverbs-providers libnl-3-200 \
#     libnl-route-3-200 libnuma1 libcurl4 libnghttp2-14 libidn2-0 librtmp1 libssh2-1 libpsl5 libbrotli1 \
#     libldap-2.5-0 libsasl2-2 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 \
#     libcom-err2 libgnutls30 libnettle8 libhogweed6 libgmp10 libp11-kit0 libtasn1-6 libunistring2 libffi8)
# then run it through the device tool with carry [".whl"].
