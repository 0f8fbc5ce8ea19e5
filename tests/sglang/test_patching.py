"""`sglang-mx patch` on fake site-packages (a dist-info and a few files) and on .venv's SGLang.

The real SGLang 0.5.10 release is patched in tests/legacy/test_sglang_0510.py.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import sys

import pytest

from sglang_mx.sglang import patching

A = "import os\n\n\ndef f():\n    return 1\n"
B = "class C:\n    def g(self):\n        return 2\n"
DIFF = """--- a/sglang/a.py
+++ b/sglang/a.py
@@ -3,3 +3,4 @@
 
 def f():
+    import sglang_mx
     return 1
--- a/sglang/sub/b.py
+++ b/sglang/sub/b.py
@@ -1,3 +1,3 @@
 class C:
     def g(self):
-        return 2
+        return 3
"""


def make_site(root, version: str, files: dict[str, str] | None = None):
    dist = root / f"sglang-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sglang\nVersion: {version}\n")
    for rel, text in (files or {"sglang/a.py": A, "sglang/sub/b.py": B}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def tree(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def fake_patch(tmp_path, monkeypatch):
    """Version 0.5.10 patched by DIFF instead of the real patches/ file."""
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "fake.patch").write_text(DIFF)
    monkeypatch.setattr(patching, "_PATCH_DIR", patches)
    monkeypatch.setattr(patching, "PATCHES", {"0.5.10": "fake.patch"})


@pytest.fixture
def site(tmp_path, fake_patch):
    return make_site(tmp_path / "site", "0.5.10")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sglang_mx.cli", "patch", *args], capture_output=True,
                          text=True, timeout=60)


def test_unsupported_version_fails_naming_the_supported_ones_and_changes_nothing(tmp_path):
    site = make_site(tmp_path / "site", "0.5.9")
    before = tree(site)
    for action in ("apply", "check", "revert"):
        done = run_cli(action, "--site-packages", str(site))
        assert done.returncode == 2
        assert done.stderr == (
            f"sglang-mx: error: no patch for SGLang 0.5.9 (at {site.resolve()}); patches exist for 0.5.10, and "
            "SGLang 0.5.15 and later need none (plugin system). Nothing changed\n")
    assert tree(site) == before


def test_plugin_release_needs_no_patch_and_apply_changes_nothing():
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("SGLang is not installed in this venv (bash scripts/setup.sh installs 0.5.23)")
    install = patching.find_sglang()
    before = tree(install.site / "sglang")
    check = run_cli("check")
    assert check.returncode == 0
    assert check.stdout.startswith(f"SGLang {version} has the plugin system (0.5.15 and later): no patch is needed")
    done = run_cli("apply")
    assert done.returncode == 2
    assert "no patch is needed" in done.stderr and done.stderr.rstrip().endswith("Nothing to apply; nothing changed")
    assert tree(install.site / "sglang") == before
    assert not (install.site / patching.BACKUP_DIR).exists()


def test_missing_sglang_is_named(tmp_path):
    done = run_cli("check", "--site-packages", str(tmp_path))
    assert done.returncode == 2 and "SGLang is not installed in" in done.stderr


def test_apply_check_revert_round_trip(site):
    install = patching.find_sglang(site)
    before = tree(site)
    assert patching.check(install).state is patching.State.NOT_APPLIED
    assert patching.apply(install).state is patching.State.APPLIED
    assert (site / "sglang/a.py").read_text() == "import os\n\n\ndef f():\n    import sglang_mx\n    return 1\n"
    assert patching.check(install).state is patching.State.APPLIED
    again = patching.apply(install)
    assert again.message == "already applied to SGLang 0.5.10; nothing changed"
    patching.revert(install)
    assert tree(site) == before


def test_changed_context_is_reported_as_conflicts_and_blocks_apply(site):
    (site / "sglang/sub/b.py").write_text(B.replace("def g", "def h"))
    install = patching.find_sglang(site)
    before = tree(site)
    report = patching.check(install)
    assert report.state is patching.State.CONFLICTS
    assert "sglang/sub/b.py: hunk 1 does not match at line 2" in str(report)
    with pytest.raises(patching.PatchError, match="nothing changed"):
        patching.apply(install)
    assert tree(site) == before


def test_half_patched_files_are_conflicts(site):
    install = patching.find_sglang(site)
    patching.apply(install)
    (site / "sglang/sub/b.py").write_text(B)
    report = patching.check(install)
    assert report.state is patching.State.CONFLICTS
    assert "sglang/a.py: applied" in str(report) and "sglang/sub/b.py: not applied" in str(report)


def test_a_failed_rename_restores_every_file(site, monkeypatch):
    install = patching.find_sglang(site)
    before = tree(site)
    real_replace = patching.os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the record went in, then one SGLang file; the second file fails
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(patching.os, "replace", failing_replace)
    with pytest.raises(patching.PatchError, match="No space left on device.*every file is as it was"):
        patching.apply(install)
    assert tree(site) == before  # no patched file, no record, no staged copy


def test_revert_refuses_files_changed_after_apply(site):
    install = patching.find_sglang(site)
    patching.apply(install)
    (site / "sglang/a.py").write_text("edited by hand\n")
    before = tree(site)
    with pytest.raises(patching.PatchError, match="changed since the patch was applied.*sglang/a.py"):
        patching.revert(install)
    assert tree(site) == before


def test_revert_without_a_record_reverses_the_diff(site):
    install = patching.find_sglang(site)
    before = tree(site)
    patching.apply(install)
    import shutil

    shutil.rmtree(site / patching.BACKUP_DIR)  # as if applied with `patch -p1`
    assert "no record" in patching.check(install).message
    assert "by reversing the diff" in patching.revert(install).message
    assert tree(site) == before


def test_the_shipped_patch_parses_and_only_adds_calls_into_sglang_legacy():
    from sglang_mx.sglang import unidiff

    text = (patching._PATCH_DIR / patching.PATCHES["0.5.10"]).read_text()
    files = unidiff.parse(text)
    assert sorted(fp.path for fp in files) == [
        "sglang/srt/managers/scheduler.py", "sglang/srt/model_executor/model_runner.py",
        "sglang/srt/model_loader/loader.py", "sglang/srt/server_args.py"]
    added = [line[1:].strip() for line in text.splitlines() if line.startswith("+") and not line.startswith("+++")]
    calls = sorted({line for line in added if line.startswith(("mx.", "return mx."))})
    assert calls == ["mx.check_server_args(self)", "mx.mark_ready()", "mx.publish_after_load(self)",
                     "return mx.load_model(", "return mx.modelexpress_keys(self)"]
