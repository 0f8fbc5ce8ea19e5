"""Helpers that run real processes for the tests."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


class SeedProcess:
    """A tests/procs/seed_proc.py process; `info` holds its published ids."""

    def __init__(self, url: str, *, timeout_s: float = 120, **options) -> None:
        argv = [sys.executable, "-m", "tests.procs.seed_proc", "--url", url]
        for key, value in options.items():
            flag = f"--{key.replace('_', '-')}"
            argv += [flag] if value is True else [flag, str(value)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        # Its log goes to a file: a pipe nobody reads would fill and block it.
        self.log = tempfile.NamedTemporaryFile(prefix="seed-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        line = _readline(self.proc, timeout_s)
        if not line:
            self.kill()
            raise RuntimeError(f"seed process did not publish: {self.log_text()[-3000:]}")
        self.info = json.loads(line)
        self.worker_id = self.info["worker_id"]

    def log_text(self) -> str:
        return pathlib.Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        """Clean exit (stdin closed): the seed marks itself STALE."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        return ""
    return proc.stdout.readline()
