"""sglang_mx.checkpoint: what a checkpoint is by content (file I/O in temporary folders)."""

import json
import os

from sglang_mx.checkpoint import CACHE_NAME, content_id


def _model(folder, weights=b"\x01" * 1000):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"hidden_size": 64}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_same_files_same_id_other_bytes_other_id(tmp_path):
    a, b = _model(tmp_path / "a"), _model(tmp_path / "b")
    assert content_id(str(a)) == content_id(str(b)) and content_id(str(a)).startswith("files:")
    c = _model(tmp_path / "c", weights=b"\x01" * 999 + b"\x02")  # one byte differs, same name and size
    assert content_id(str(c)) != content_id(str(a))


def test_the_cache_is_used_and_invalidated_by_size_or_mtime(tmp_path):
    a = _model(tmp_path / "a")
    first = content_id(str(a))
    cache = json.loads((a / CACHE_NAME).read_text())
    assert set(cache["files"]) == {"config.json", "model.safetensors"}
    # A cached entry is trusted while size and mtime stand: poison it, the id follows the cache.
    size, mtime, _ = cache["files"]["model.safetensors"]
    cache["files"]["model.safetensors"] = [size, mtime, "0" * 64]
    (a / CACHE_NAME).write_text(json.dumps(cache))
    assert content_id(str(a)) != first
    # A changed file (new mtime) is hashed again.
    os.utime(a / "model.safetensors", ns=(mtime + 10**9, mtime + 10**9))
    assert content_id(str(a)) == first


def test_a_hub_snapshot_is_named_by_its_commit(tmp_path):
    snap = _model(tmp_path / "hub" / "models--org--m" / "snapshots" / "c0ffee")
    assert content_id(str(snap)) == "hub:c0ffee"
    refs = tmp_path / "hub" / "models--org--m" / "refs"
    refs.mkdir()
    (refs / "main").write_text("c0ffee\n")
    os.environ["HF_HUB_CACHE"] = str(tmp_path / "hub")
    try:
        assert content_id("org/m") == "hub:c0ffee" and content_id("org/absent") == ""
    finally:
        del os.environ["HF_HUB_CACHE"]


def test_a_checksum_manifest_names_the_content(tmp_path):
    a = _model(tmp_path / "a")
    manifest = tmp_path / "sums.json"
    manifest.write_text(json.dumps({"files": {"model.safetensors": {"sha256": "ab", "size": 1000}}}))
    got = content_id(str(a), checksum_manifest=str(manifest))
    assert got.startswith("manifest:") and got != content_id(str(a))
