"""`sglang-mx patch` against the real SGLang 0.5.10 release, in its own venv.

The venv (.venv-sglang-0510, see venv0510.py) is built on first use, about
2.5 minutes, and reused. Tests run in file order: apply, what the patched
SGLang does, a second apply, revert.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import subprocess
import sys

import pytest

from sglang_mx.sglang import patching
from tests.sglang.legacy import venv0510

pytestmark = pytest.mark.slow

MODEL_CONFIG = {  # enough of a checkpoint for ServerArgs (it reads config.json only)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1024,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
}


def _files() -> list[str]:
    return [fp.path for fp in patching._load_patch(patching.Install("0.5.10", venv0510.SITE))]


def _hashes(site) -> dict[str, str]:
    return {rel: hashlib.sha256((site / rel).read_bytes()).hexdigest() for rel in _files()}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang_mx.cli", "patch", *args, "--site-packages",
                           str(venv0510.SITE)], capture_output=True, text=True, timeout=60)


def _probe(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(venv0510.ROOT), str(venv0510.CPU_ENV)]),
               HF_HUB_OFFLINE="1")
    done = subprocess.run([str(venv0510.PYTHON), str(venv0510.ROOT / "tests" / "sglang" / "legacy" / "probe_0510.py"), *args],
                          capture_output=True, text=True, timeout=180, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, f"probe failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("PROBE "))


@pytest.fixture(scope="module")
def site():
    try:
        venv0510.ensure()
    except venv0510.PyPIUnreachable as e:
        pytest.skip(str(e))
    if _cli("check").returncode == 0:  # an earlier run stopped while patched
        assert _cli("revert").returncode == 0
    return venv0510.SITE


@pytest.fixture(scope="module")
def originals(site):
    before = _hashes(site)
    yield before
    if _cli("check").returncode == 0:
        _cli("revert")


def test_check_reports_not_applied_on_the_release(site, originals):
    done = _cli("check")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "SGLang 0.5.10" in done.stdout and "patch not applied (4 files to change)" in done.stdout


def test_apply_changes_every_file_and_check_reports_applied(site, originals):
    done = _cli("apply")
    assert done.returncode == 0, done.stderr
    after = _hashes(site)
    assert all(after[rel] != originals[rel] for rel in originals)
    manifest = json.loads((site / patching.BACKUP_DIR / patching.MANIFEST).read_text())
    assert {f["path"]: f["original_sha256"] for f in manifest["files"]} == originals
    assert not list(site.rglob("*" + patching._STAGED))
    check = _cli("check")
    assert check.returncode == 0 and "patch applied (recorded in" in check.stdout


def test_patched_modules_compile(site, originals):
    done = subprocess.run([str(venv0510.PYTHON), "-m", "py_compile", *(str(site / rel) for rel in _files())],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sglang_parser_accepts_modelexpress_config_and_rejects_bad_keys(site, originals, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MODEL_CONFIG))
    out = _probe("server-args", str(tmp_path))
    # A target keeps its load format (0.5.10 would fall back to disk without a url) and gets a TransferEngine.
    assert out["target"] == {"load_format": "remote_instance", "url": "127.0.0.1:9", "source": True,
                             "transfer_engine": True}
    # A disk-loading seed with source=true gets a TransferEngine to publish through.
    assert out["seed"] == {"load_format": "auto", "source": True, "transfer_engine": True}
    assert out["bad_key"]["type"] == "ConfigError" and out["bad_key"]["module"] == "sglang_mx.errors"
    assert out["bad_key"]["message"].startswith("unknown --modelexpress-config key(s) 'bogus'; allowed: url, ")
    assert out["bad_value"]["message"] == "fallback 'maybe' is not allowed; allowed: 'fail', 'disk'"


def test_loader_dispatch_reaches_sglang_legacy_stubbed(site, originals):
    # Unit test of the dispatch only: sglang_legacy.load_model is a recording stub in the probe.
    out = _probe("loader")
    assert out["returned"] == "model from sglang_mx"
    assert out["calls"] == [{"loader": "RemoteInstanceModelLoader", "model_config": "the model config",
                             "device_config": "the device config", "backend": "modelexpress"}]


def test_second_apply_is_a_noop(site, originals):
    patched = _hashes(site)
    done = _cli("apply")
    assert done.returncode == 0 and "already applied to SGLang 0.5.10; nothing changed" in done.stdout
    assert _hashes(site) == patched


def test_revert_restores_the_original_bytes(site, originals):
    done = _cli("revert")
    assert done.returncode == 0, done.stderr
    assert "4 files restored byte for byte" in done.stdout
    assert _hashes(site) == originals
    # ... which are the bytes the release shipped: the wheel's RECORD lists their sha256.
    record = next(site.glob("sglang-0.5.10.dist-info")) / "RECORD"
    shipped = {row[0]: row[1] for row in csv.reader(record.read_text().splitlines())}
    for rel, digest in originals.items():
        assert shipped[rel] == "sha256=" + base64.urlsafe_b64encode(bytes.fromhex(digest)).decode().rstrip("=")
    assert not (site / patching.BACKUP_DIR).exists()
    assert _cli("check").returncode == 1


@pytest.fixture(scope="module")
def wheel_cli(tmp_path_factory):
    """`sglang-mx` from a wheel built from this checkout and installed into a fresh venv.

    The venv gets the wheel and the few packages `sglang-mx patch` imports (no torch,
    no checkout on its path): the patch file must come from the wheel's package data.
    """
    root = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"),
                           str(venv0510.ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = (root / "dist").glob("sglang_mx-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "--no-deps", str(wheel), "grpcio", "grpcio-health-checking", "protobuf", "typing_extensions"],
                         capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        pytest.skip(f"cannot install the wheel's runtime packages from PyPI: {pip.stderr[-500:]}")
    return venv / "bin" / "sglang-mx"


def test_patch_from_an_installed_wheel(site, originals, wheel_cli, tmp_path):
    def cli(action):
        return subprocess.run([str(wheel_cli), "patch", action, "--site-packages", str(site)], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)  # not the checkout: nothing found by accident

    check = cli("check")
    assert check.returncode == 1 and "patch not applied (4 files to change)" in check.stdout, check.stderr
    assert cli("apply").returncode == 0
    assert cli("check").returncode == 0 and _hashes(site) != originals
    assert cli("revert").returncode == 0
    assert _hashes(site) == originals
