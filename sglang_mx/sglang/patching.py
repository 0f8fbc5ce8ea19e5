"""`sglang-mx patch apply|check|revert`: sglang_mx/sglang/patches/ applied to an installed SGLang.

SGLang 0.5.15 and later load the plugin through their entry points and need no
patch; older releases get the diff in patches/ for their exact version. The
installed SGLang is found through its dist-info (never imported). `apply`
stages every patched file next to its original, then renames them into place
(all or none: a failure restores what was renamed). It records the original
bytes and their sha256 in `<site-packages>/sglang_mx_patch_backup/`, so
`revert` puts back the exact original files.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

from sglang_mx.sglang import unidiff
from sglang_mx.errors import MxError

__all__ = ["PATCHES", "PLUGIN_SINCE", "PatchError", "Report", "State", "apply", "check", "find_sglang", "revert"]

PATCHES = {"0.5.10": "sglang-0.5.10.patch"}  # SGLang version -> file in patches/
PLUGIN_SINCE = (0, 5, 15)  # first release with the sglang.srt.plugins entry point
BACKUP_DIR = "sglang_mx_patch_backup"
MANIFEST = "manifest.json"
_STAGED = ".sglang-mx-staged"
_PATCH_DIR = Path(__file__).resolve().parent / "patches"  # package data: present in a wheel too


class PatchError(MxError):
    """The patch cannot be applied, checked or reverted; nothing was changed."""


class State(enum.Enum):
    NOT_NEEDED = "not needed"
    NOT_APPLIED = "not applied"
    APPLIED = "applied"
    CONFLICTS = "conflicts"


@dataclasses.dataclass(frozen=True)
class Install:
    version: str
    site: Path  # the directory holding the `sglang` package

    def file(self, rel: str) -> Path:
        return self.site / rel


@dataclasses.dataclass(frozen=True)
class Report:
    state: State
    message: str
    details: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "\n".join((self.message, *(f"  {d}" for d in self.details)))


def find_sglang(site_packages: str | os.PathLike | None = None) -> Install:
    """The SGLang installed on sys.path (or in `site_packages`), without importing it."""
    where = {} if site_packages is None else {"path": [str(site_packages)]}
    dist = next(iter(importlib.metadata.distributions(name="sglang", **where)), None)
    if dist is None:
        raise PatchError(f"SGLang is not installed in {site_packages or 'this Python'} (no sglang dist-info found)")
    site = Path(dist.locate_file("")).resolve()
    if not (site / "sglang").is_dir():
        raise PatchError(f"SGLang {dist.version}'s dist-info is in {site} but its package is not "
                         f"(an editable install?); apply patches/ there by hand with `patch -p1`")
    return Install(dist.version, site)


def check(install: Install) -> Report:
    """Where the patch stands on `install`: not needed, not applied, applied, or conflicts."""
    if _plugin_capable(install.version):
        return Report(State.NOT_NEEDED, _not_needed(install))
    files = _load_patch(install)
    clean, patched, conflicts = _classify(install, files)
    record = _read_manifest(install)
    if conflicts or (clean and patched):
        details = [f"{fp.path}: applied" for fp in patched] + [f"{fp.path}: not applied" for fp in clean]
        return Report(State.CONFLICTS, f"SGLang {install.version} at {install.site}: the patch conflicts "
                      f"with the installed files", tuple(conflicts + details))
    if clean:
        return Report(State.NOT_APPLIED, f"SGLang {install.version} at {install.site}: patch not applied "
                      f"({len(clean)} files to change); run `sglang-mx patch apply`")
    how = (f"recorded in {_backup_dir(install)}" if record and record["sglang_version"] == install.version
           else "no record of it (applied by hand?); revert reverses the diff")
    return Report(State.APPLIED, f"SGLang {install.version} at {install.site}: patch applied ({how})",
                  tuple(fp.path for fp in patched))


def apply(install: Install) -> Report:
    """Patch every file or none; a second apply is a no-op."""
    _refuse_not_needed(install, "apply")
    status = check(install)
    if status.state is State.APPLIED:
        return Report(State.APPLIED, f"already applied to SGLang {install.version}; nothing changed")
    if status.state is State.CONFLICTS:
        raise PatchError(f"{status}\nnothing changed")
    files = _load_patch(install)
    originals = {fp.path: install.file(fp.path).read_bytes() for fp in files}
    patched = {fp.path: _encode(unidiff.apply(_decode(originals[fp.path]), fp)) for fp in files}
    _write_backup(install, originals, patched)
    try:
        _replace_all(install, patched, originals)
    except BaseException:
        shutil.rmtree(_backup_dir(install), ignore_errors=True)
        raise
    return Report(State.APPLIED, f"patched SGLang {install.version} at {install.site} "
                  f"({PATCHES[install.version]}); originals kept in {_backup_dir(install)}",
                  tuple(sorted(patched)))


def revert(install: Install) -> Report:
    """Restore the original files byte for byte (from the record, else by reversing the diff)."""
    _refuse_not_needed(install, "revert")
    record = _read_manifest(install)
    if record is not None and record["sglang_version"] != install.version:
        raise PatchError(f"{_backup_dir(install)} records a patch of SGLang {record['sglang_version']}, but "
                         f"{install.version} is installed (reinstalled since?); remove that directory by hand")
    if record is None:
        return _revert_by_diff(install)
    current, originals = {}, {}
    changed = []
    for entry in record["files"]:
        rel = entry["path"]
        data = install.file(rel).read_bytes() if install.file(rel).exists() else b""
        backup = (_backup_dir(install) / "files" / rel).read_bytes()
        if _sha(backup) != entry["original_sha256"]:
            raise PatchError(f"the backup of {rel} in {_backup_dir(install)} is damaged (sha256 differs); "
                             f"nothing changed")
        if _sha(data) not in (entry["patched_sha256"], entry["original_sha256"]):
            changed.append(rel)
        current[rel], originals[rel] = data, backup
    if changed:
        raise PatchError(f"changed since the patch was applied, not touching anything: {', '.join(changed)}")
    todo = {rel: originals[rel] for rel in originals if current[rel] != originals[rel]}
    _replace_all(install, todo, current)
    shutil.rmtree(_backup_dir(install))
    return Report(State.NOT_APPLIED, f"reverted SGLang {install.version} at {install.site}: "
                  f"{len(todo)} files restored byte for byte (sha256 checked)", tuple(sorted(todo)))


# --- helpers ----------------------------------------------------------------------

def _release(version: str) -> tuple[int, ...]:
    m = re.match(r"(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in m[1].split(".")) if m else ()


def _plugin_capable(version: str) -> bool:
    return _release(version) >= PLUGIN_SINCE


def _not_needed(install: Install) -> str:
    return (f"SGLang {install.version} has the plugin system (0.5.15 and later): no patch is needed; "
            f"sglang-mx loads through its sglang.srt.plugins entry point")


def _refuse_not_needed(install: Install, verb: str) -> None:
    if _plugin_capable(install.version):
        raise PatchError(f"{_not_needed(install)}. Nothing to {verb}; nothing changed")


def _load_patch(install: Install) -> list[unidiff.FilePatch]:
    name = PATCHES.get(install.version)
    if name is None:
        raise PatchError(
            f"no patch for SGLang {install.version} (at {install.site}); patches exist for "
            f"{', '.join(sorted(PATCHES))}, and SGLang 0.5.15 and later need none (plugin system). Nothing changed")
    path = _PATCH_DIR / name
    if not path.is_file():
        raise PatchError(f"{path} is missing: `sglang-mx patch` reads patches/ from a source checkout of "
                         f"sglang-mx (pip install -e .)")
    return unidiff.parse(path.read_text(encoding="utf-8"))


def _classify(install: Install, files):
    clean, patched, conflicts = [], [], []
    for fp in files:
        target = install.file(fp.path)
        if not target.is_file():
            conflicts.append(f"{fp.path}: missing from {install.site}")
            continue
        text = _decode(target.read_bytes())
        try:
            unidiff.apply(text, fp)
            clean.append(fp)
            continue
        except unidiff.HunkConflict as forward:
            error = forward
        try:
            unidiff.apply(text, fp.reversed())
            patched.append(fp)
        except unidiff.HunkConflict:
            conflicts.append(str(error))
    return clean, patched, conflicts


def _revert_by_diff(install: Install) -> Report:
    status = check(install)
    if status.state is State.NOT_APPLIED:
        return Report(State.NOT_APPLIED, f"not applied to SGLang {install.version}; nothing to revert")
    if status.state is State.CONFLICTS:
        raise PatchError(f"{status}\nnothing changed")
    current = {fp.path: install.file(fp.path).read_bytes() for fp in _load_patch(install)}
    restored = {fp.path: _encode(unidiff.apply(_decode(current[fp.path]), fp.reversed()))
                for fp in _load_patch(install)}
    _replace_all(install, restored, current)
    return Report(State.NOT_APPLIED, f"reverted SGLang {install.version} at {install.site} by reversing the "
                  f"diff (no record was kept)", tuple(sorted(restored)))


def _replace_all(install: Install, new: dict[str, bytes], old: dict[str, bytes]) -> None:
    """Write `new` over the files, all or none: stage, rename, restore `old` on failure."""
    staged: dict[str, Path] = {}
    done: list[str] = []
    try:
        for rel, data in new.items():
            staged[rel] = _stage(install.file(rel), data)
        for rel in new:
            os.replace(staged[rel], install.file(rel))
            del staged[rel]
            done.append(rel)
    except BaseException as e:
        for path in staged.values():
            path.unlink(missing_ok=True)
        for rel in done:
            os.replace(_stage(install.file(rel), old[rel]), install.file(rel))
        if isinstance(e, OSError):
            raise PatchError(f"could not write {e.filename or 'a file'} ({e.strerror}); "
                             f"every file is as it was") from e
        raise


def _stage(target: Path, data: bytes) -> Path:
    staged = target.with_name(target.name + _STAGED)
    with open(staged, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    shutil.copymode(target, staged)
    return staged


def _backup_dir(install: Install) -> Path:
    return install.site / BACKUP_DIR


def _write_backup(install: Install, originals: dict[str, bytes], patched: dict[str, bytes]) -> None:
    """The record, complete before any SGLang file changes; renamed into place in one step."""
    final = _backup_dir(install)
    shutil.rmtree(final, ignore_errors=True)  # a stale record: every file is unpatched now
    tmp = final.with_name(final.name + _STAGED)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, data in originals.items():
            (tmp / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "files" / rel).write_bytes(data)
        manifest = {
            "tool": "sglang-mx patch",
            "sglang_version": install.version,
            "patch": PATCHES[install.version],
            "patch_sha256": _sha((_PATCH_DIR / PATCHES[install.version]).read_bytes()),
            "applied_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": [{"path": rel, "original_sha256": _sha(originals[rel]), "patched_sha256": _sha(patched[rel]),
                       "backup": f"files/{rel}"} for rel in sorted(originals)],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PatchError(f"could not write the record in {final} ({e.strerror}); nothing changed") from e


def _read_manifest(install: Install) -> dict | None:
    path = _backup_dir(install) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PatchError(f"{path} is unreadable ({e}); remove {_backup_dir(install)} by hand") from e


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")
