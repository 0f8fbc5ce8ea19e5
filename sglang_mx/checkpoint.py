"""What a checkpoint is, by content: the id seeds and targets put in their identity.

A model name says which model was meant, not which files were loaded: the same
`--model-path` with other files, or a hub id at another commit, would pair. So the
identity carries a content id, the first of:

1. `hub:<commit>`: the model comes from a Hugging Face hub cache (the path is a
   `.../models--org--name/snapshots/<commit>` folder, or a hub id whose cached
   `refs/<revision>` names the commit): the commit names every file's content.
2. `manifest:<hash>`: SGLang's `--model-checksum` points at a checksum manifest file
   (sha256 of each checkpoint file): the hash of that manifest.
3. `files:<hash>`: otherwise, a local folder is hashed (BLAKE3 over every file's name,
   size and content). The per-file digests are cached beside them in
   `.sglang-mx-content.json`, keyed by each file's size and modification time: a file
   that changes is hashed again, the others are not. When the folder cannot be
   written, the hash is recomputed at each start.

An operator whose targets do not hold the files (only the config) names the content
with the `checkpoint` config key on both sides instead. Pure file I/O; no SGLang.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time

log = logging.getLogger(__name__)

CACHE_NAME = ".sglang-mx-content.json"
_CHUNK = 16 << 20


def content_id(model_path: str, *, revision: str = "", checksum_manifest: str | None = None) -> str:
    """The content id of the checkpoint at `model_path` (a folder or a hub id), "" when none can be had."""
    path = pathlib.Path(model_path).expanduser()
    commit = _snapshot_commit(path) if path.is_dir() else _cached_hub_commit(model_path, revision)
    if commit:
        return f"hub:{commit}"
    if checksum_manifest and pathlib.Path(checksum_manifest).is_file():
        data = json.loads(pathlib.Path(checksum_manifest).read_text())
        return f"manifest:{_blake3(json.dumps(data, sort_keys=True, separators=(',', ':')).encode())[:32]}"
    if path.is_dir():
        return f"files:{files_digest(path)[:32]}"
    log.warning("modelexpress: %s is neither a folder nor a cached hub model: the identity names it, not its "
                "content (set the `checkpoint` config key to name the content)", model_path)
    return ""


def files_digest(folder: pathlib.Path) -> str:
    """BLAKE3 over every (name, size, content digest) of the folder's files, names in order; per-file
    digests come from the cache beside them when size and modification time are unchanged."""
    start = time.perf_counter()
    cache_file = folder / CACHE_NAME
    try:
        cached = json.loads(cache_file.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        cached = {}
    entries, hashed = {}, 0
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        stat = file.stat()
        key = [stat.st_size, stat.st_mtime_ns]
        old = cached.get(file.name)
        if isinstance(old, list) and old[:2] == key and len(old) == 3:
            entries[file.name] = old
            continue
        entries[file.name] = [*key, _file_blake3(file)]
        hashed += stat.st_size
    if entries != cached:
        try:
            tmp = folder / f"{CACHE_NAME}.{os.getpid()}"
            tmp.write_text(json.dumps({"files": entries}, sort_keys=True))
            tmp.replace(cache_file)
        except OSError as e:
            log.info("modelexpress: cannot cache the checkpoint's content digests in %s (%s): hashed again next "
                     "time", folder, e)
    lines = "".join(f"{name}\t{size}\t{digest}\n" for name, (size, _, digest) in sorted(entries.items()))
    if hashed:
        log.info("modelexpress: hashed %.3f GB of %s in %.2f s for its content id", hashed / 1e9, folder,
                 time.perf_counter() - start)
    return _blake3(lines.encode())


def _snapshot_commit(path: pathlib.Path) -> str:
    parts = path.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i + 2]
    return ""


def _cached_hub_commit(model_id: str, revision: str) -> str:
    if model_id.count("/") != 1:
        return ""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    ref = pathlib.Path(hub).expanduser() / f"models--{model_id.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        return ref.read_text().strip()
    except OSError:
        return ""


def _file_blake3(file: pathlib.Path) -> str:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _blake3(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()
