"""The fleet view: one row per published worker, for `sglang-mx sources`.

`collect` asks a server (ListSources, then GetMetadata per worker, since the
listing carries no status or tensors); everything else is pure formatting.
A pulling target (pipelined cascade: an INITIALIZING record that reports its
verified bytes) shows as `PULLING 42%`: verified over the bytes of its record.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from typing import Callable, Sequence, TextIO

from sglang_mx.client import MetadataClient
from sglang_mx.manifest import manifest_id
from sglang_mx.records import TOPOLOGY_DEPTH, TOPOLOGY_MODEL_ID, TOPOLOGY_VERIFIED_BYTES, SourceStatus

COLUMNS = ("MODEL", "MX_SOURCE_ID", "WORKER_ID", "RANK", "LAYOUT", "STATUS", "AGE", "TENSORS", "BYTES", "MANIFEST")
MANIFEST_SHOWN = 16  # hex digits of the manifest id in the table (--json has all 64, for `expect`)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FleetRow:
    model_name: str
    mx_source_id: str
    worker_id: str
    worker_rank: int
    status: SourceStatus
    updated_at_ms: int  # last publish or heartbeat
    tensors: int
    total_bytes: int
    tp_size: int = 0
    pp_size: int = 0
    ep_size: int = 0
    any_layout: bool = False  # it advertises a model id: targets of other TP layouts may reshard from it
    # sglang_mx.manifest id recomputed from the record, as a pinned target computes it; "" when the record
    # has no tensors.
    manifest: str = ""
    verified_bytes: int | None = None  # a pulling target's progress (topology mx_verified_bytes)
    depth: int | None = None  # its depth in the cascade tree (topology mx_depth)

    @property
    def pulling(self) -> bool:
        """An INITIALIZING record that reports progress: a target pulling, serving what it verified."""
        return self.status == SourceStatus.INITIALIZING and self.verified_bytes is not None

    @property
    def status_text(self) -> str:
        """The STATUS cell: the status name, or 'PULLING 42%' (rounded down: 100% only when done)."""
        if not self.pulling:
            return self.status.name
        done = 100 if self.verified_bytes >= self.total_bytes else self.verified_bytes * 100 // self.total_bytes
        return f"PULLING {done}%"

    @property
    def layout(self) -> str:
        """'TP2', 'TP2 PP2 EP4' (sizes of 1 after TP left out) without spaces; '/any' when it serves any TP."""
        parts = [f"TP{self.tp_size}" if self.tp_size else "TP?"]
        parts += [f"{k}{v}" for k, v in (("PP", self.pp_size), ("EP", self.ep_size)) if v > 1]
        return ",".join(parts) + ("/any" if self.any_layout else "")


def collect(client: MetadataClient, *, model_name: str | None = None) -> list[FleetRow]:
    """Every worker the server knows (of `model_name`, if given), sorted by model, source, rank, worker.

    A worker that vanishes between the listing and its GetMetadata is left out.
    """
    rows = []
    for ref in client.list_sources(model_name=model_name):
        stored = client.get_metadata(ref.mx_source_id, ref.worker_id)
        if stored is None:
            continue
        worker = stored.worker
        rows.append(FleetRow(
            model_name=stored.identity.model_name or ref.model_name,
            mx_source_id=stored.mx_source_id,
            worker_id=stored.worker_id,
            worker_rank=worker.worker_rank,
            status=worker.status,
            updated_at_ms=worker.updated_at_ms,
            tensors=len(worker.tensors),
            total_bytes=worker.total_bytes,
            tp_size=stored.identity.tensor_parallel_size,
            pp_size=stored.identity.pipeline_parallel_size,
            ep_size=stored.identity.expert_parallel_size,
            any_layout=bool(worker.topology.get(TOPOLOGY_MODEL_ID)),
            manifest=manifest_id(stored.mx_source_id, worker.worker_rank, worker.tensors) if worker.tensors else "",
            verified_bytes=_count(worker.topology.get(TOPOLOGY_VERIFIED_BYTES)),
            depth=_count(worker.topology.get(TOPOLOGY_DEPTH)),
        ))
    rows.sort(key=lambda r: (r.model_name, r.mx_source_id, r.worker_rank, r.worker_id))
    return rows


def _count(text: str | None) -> int | None:
    """A topology value that should be a decimal count; None when absent or not one (shown as unknown)."""
    if text is None or not text.isdigit() or not text.isascii():
        return None
    return int(text)


def format_age(age_ms: int) -> str:
    """Milliseconds as the largest whole unit: '0s', '3s', '2m', '5h', '3d'; '-' when unknown."""
    if age_ms < 0:
        return "0s"  # a clock slightly ahead of ours
    seconds = age_ms // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_bytes(n: int) -> str:
    """Decimal units: '0 B', '512 B', '4.10 KB', '1.03 GB', '681 GB'."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 1000 or unit == "PB":
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


def _cells(row: FleetRow, now_ms: int) -> tuple[str, ...]:
    age = format_age(now_ms - row.updated_at_ms) if row.updated_at_ms > 0 else "-"
    return (row.model_name, row.mx_source_id, row.worker_id, str(row.worker_rank), row.layout, row.status_text, age,
            str(row.tensors), format_bytes(row.total_bytes), row.manifest[:MANIFEST_SHOWN] or "-")


def render_table(rows: Sequence[FleetRow], now_ms: int) -> str:
    """A fixed-width table with a header; numbers right-aligned. 'no workers' when empty."""
    if not rows:
        return "no workers\n"
    table = [COLUMNS, *(_cells(r, now_ms) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    right = {COLUMNS.index(c) for c in ("RANK", "AGE", "TENSORS", "BYTES")}
    lines = [
        "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        .rstrip()
        for line in table
    ]
    return "\n".join(lines) + "\n"


def render_json(rows: Sequence[FleetRow], now_ms: int) -> str:
    """One JSON array on one line; ages in seconds (null when never stamped)."""
    return json.dumps([
        {
            "model_name": r.model_name,
            "mx_source_id": r.mx_source_id,
            "worker_id": r.worker_id,
            "worker_rank": r.worker_rank,
            "tp_size": r.tp_size,
            "pp_size": r.pp_size,
            "ep_size": r.ep_size,
            "any_layout": r.any_layout,
            "status": r.status.name,
            "updated_at_ms": r.updated_at_ms,
            "age_s": round((now_ms - r.updated_at_ms) / 1000, 3) if r.updated_at_ms > 0 else None,
            "tensors": r.tensors,
            "total_bytes": r.total_bytes,
            "manifest": r.manifest or None,
            "pulling": r.pulling,
            "verified_bytes": r.verified_bytes,
            "depth": r.depth,
        }
        for r in rows
    ]) + "\n"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def show(client: MetadataClient, out: TextIO, *, model_name: str | None = None, as_json: bool = False,
         clock_ms: Callable[[], int] = now_ms) -> None:
    """Collect and print one view."""
    rows = collect(client, model_name=model_name)
    now = clock_ms()
    out.write(render_json(rows, now) if as_json else render_table(rows, now))
    out.flush()


def watch(client: MetadataClient, out: TextIO, *, interval_s: float, model_name: str | None = None,
          as_json: bool = False, stop: threading.Event | None = None) -> int:
    """Print a view every `interval_s` until `stop` is set or Ctrl-C; return how many were printed.

    On a terminal the screen is cleared before each table; otherwise each table
    follows a header line with the time (JSON: one array per line).
    """
    stop = stop or threading.Event()
    clear = not as_json and out.isatty()
    renders = 0
    # Ctrl-C sets `stop` instead of raising wherever the main thread is (inside a gRPC call, say): the
    # view in progress is dropped, and the loop ends at once.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        while not stop.is_set():
            rows = collect(client, model_name=model_name)
            if stop.is_set():
                break
            now = now_ms()
            if as_json:
                out.write(render_json(rows, now))
            else:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now / 1000))
                out.write(("\x1b[H\x1b[2J" if clear else "") + f"# {client.url} at {stamp}, every {interval_s:g} s\n")
                out.write(render_table(rows, now))
            out.flush()
            renders += 1
            stop.wait(interval_s)
    except KeyboardInterrupt:  # before the handler was in place, or another thread's
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return renders
