"""The README's main job, small: server + seed + target processes, bytes checked."""

import re
import subprocess
import sys

import pytest

from tests.procs import ROOT

pytestmark = pytest.mark.slow  # the demo: seed and target processes


def test_demo_moves_identical_bytes_and_reports_speed():
    out = subprocess.run(
        [sys.executable, "-m", "sglang_mx.cli", "demo", "--size-gb", "0.05"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bytes identical to the checkpoint: yes" in out.stdout
    moved = re.search(r"target  pulled (\d+) tensors, ([\d.]+) GB .* ([\d.]+) GB/s", out.stdout)
    assert moved, out.stdout
    assert int(moved.group(1)) >= 10
    assert float(moved.group(2)) > 0.04
