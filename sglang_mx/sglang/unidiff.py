"""A small, strict unified-diff applier (pure: text in, text out).

Strict on purpose: a hunk applies only at the line its header names and only
when every context and removed line matches exactly (no offset, no fuzz, no
whitespace leniency). Anything else is a `HunkConflict` naming the file, the
hunk and the first line that differs. Paths are taken from the `+++` header
with one leading component stripped (`patch -p1`). Only edits of existing files
are supported; text before the first file header is ignored.
"""

from __future__ import annotations

import dataclasses
import re

from sglang_mx.errors import MxError

__all__ = ["FilePatch", "Hunk", "HunkConflict", "PatchFormatError", "apply", "parse"]

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_NO_NEWLINE = "\\ No newline at end of file"


class PatchFormatError(MxError):
    """The diff itself is malformed."""


class HunkConflict(MxError):
    """A hunk's context or removed lines do not match the file."""

    def __init__(self, path: str, hunk: int, line: int, expected: str, found: str | None) -> None:
        found_text = "end of file" if found is None else repr(found)
        super().__init__(f"{path}: hunk {hunk} does not match at line {line}: "
                         f"expected {expected!r}, found {found_text}")
        self.path = path
        self.hunk = hunk
        self.line = line


@dataclasses.dataclass(frozen=True)
class Hunk:
    old_start: int
    new_start: int
    old: tuple[str, ...]  # the lines it expects (context and removed), each with its "\n" if any
    new: tuple[str, ...]  # the lines it leaves (context and added)


@dataclasses.dataclass(frozen=True)
class FilePatch:
    path: str  # relative, first component stripped
    hunks: tuple[Hunk, ...]

    def reversed(self) -> "FilePatch":
        return FilePatch(self.path, tuple(Hunk(h.new_start, h.old_start, h.new, h.old) for h in self.hunks))


def parse(text: str) -> list[FilePatch]:
    """The files and hunks of a unified diff."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the text's last newline ends the last line; no empty line follows it
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        if not (lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")):
            i += 1
            continue
        path = _strip_path(lines[i + 1][4:], i + 2)
        i += 2
        hunks: list[Hunk] = []
        while i < len(lines) and lines[i].startswith("@@"):
            hunk, i = _parse_hunk(lines, i, path)
            hunks.append(hunk)
        if not hunks:
            raise PatchFormatError(f"line {i}: no hunks for {path}")
        files.append(FilePatch(path, tuple(hunks)))
    if not files:
        raise PatchFormatError("no file headers ('--- a/...' then '+++ b/...') found")
    return files


def apply(text: str, patch: FilePatch) -> str:
    """`text` with every hunk applied; raises HunkConflict (nothing partial is returned)."""
    lines = _split_lf(text)
    out: list[str] = []
    pos = 0
    for number, hunk in enumerate(patch.hunks, 1):
        start = hunk.old_start - 1 if hunk.old else hunk.old_start
        if start < pos:
            raise PatchFormatError(f"{patch.path}: hunk {number} overlaps the one before it")
        for k, want in enumerate(hunk.old):
            have = lines[start + k] if start + k < len(lines) else None
            if have != want:
                raise HunkConflict(patch.path, number, start + k + 1, want, have)
        out.extend(lines[pos:start])
        out.extend(hunk.new)
        pos = start + len(hunk.old)
    out.extend(lines[pos:])
    return "".join(out)


def _split_lf(text: str) -> list[str]:
    # Split on "\n" only: "\r" (and form feeds, ...) stay inside their line.
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _strip_path(header: str, line: int) -> str:
    name = header.split("\t", 1)[0].strip()
    if name == "/dev/null":
        raise PatchFormatError(f"line {line}: creating or deleting files is not supported")
    parts = name.split("/", 1)
    if len(parts) != 2 or not parts[1] or ".." in parts[1].split("/") or parts[1].startswith("/"):
        raise PatchFormatError(f"line {line}: bad path {name!r}; expected b/<relative path>")
    return parts[1]


def _parse_hunk(lines: list[str], i: int, path: str) -> tuple[Hunk, int]:
    m = _HUNK.match(lines[i])
    if m is None:
        raise PatchFormatError(f"line {i + 1}: bad hunk header {lines[i]!r}")
    old_start, new_start = int(m[1]), int(m[3])
    old_len = 1 if m[2] is None else int(m[2])
    new_len = 1 if m[4] is None else int(m[4])
    old: list[str] = []
    new: list[str] = []
    i += 1
    last: list[list[str]] = []  # the lists the previous line went into
    while len(old) < old_len or len(new) < new_len or (i < len(lines) and lines[i] == _NO_NEWLINE):
        if i >= len(lines):
            raise PatchFormatError(f"{path}: hunk at {old_start} ends early (expected -{old_len} +{new_len} lines)")
        line = lines[i]
        i += 1
        if line == _NO_NEWLINE:
            for target in last:
                target[-1] = target[-1].removesuffix("\n")
            continue
        kind, body = (line[:1], line[1:] + "\n") if line else (" ", "\n")  # a bare empty line is context
        if kind == " ":
            old.append(body), new.append(body)
            last = [old, new]
        elif kind == "-":
            old.append(body)
            last = [old]
        elif kind == "+":
            new.append(body)
            last = [new]
        else:
            raise PatchFormatError(f"line {i}: unexpected {line!r} inside a hunk of {path}")
        if len(old) > old_len or len(new) > new_len:
            raise PatchFormatError(f"{path}: hunk at {old_start} is longer than its header says")
    return Hunk(old_start, new_start, tuple(old), tuple(new)), i
