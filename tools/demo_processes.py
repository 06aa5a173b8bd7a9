"""The demo's child processes: the real ``sketchstream`` commands, run or started and stopped.

- :class:`Processes`: runs ``sketchstream ...`` in the foreground (its output is the demo's) or
  starts it in the background with its output in a log file, and stops them all at the end;
- :func:`wait_healthy`: until a started worker's ``/health`` says ok;
- :func:`tail`: the last lines of a log, for error messages.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sketchstream.tools.demo_console import Console
from sketchstream.tools.demo_plan import DemoError

__all__ = ["Processes", "tail", "wait_healthy"]


def _sketchstream() -> list[str]:
    """How to run this installation's ``sketchstream`` command."""
    script = Path(sys.executable).with_name("sketchstream")
    if script.is_file():
        return [str(script)]
    found = shutil.which("sketchstream")
    if found:
        return [found]
    return [sys.executable, "-c", "from sketchstream.tools.cli import main; main()"]


def _shown(argv: Sequence[str]) -> str:
    words = ["sketchstream", *argv]
    return "$ " + " ".join(w if w and " " not in w else repr(w) for w in words)


class Processes:
    """The demo's child processes: run to completion, or started and stopped at the end."""

    def __init__(self, console: Console, env: Mapping[str, str]) -> None:
        self.console = console
        self.env = dict(env)
        self.children: list[tuple[str, subprocess.Popen, Path | None]] = []

    def run(self, argv: Sequence[str], what: str) -> None:
        """Run ``sketchstream argv`` in the foreground (its output goes to ours)."""
        self.console.say(_shown(argv))
        sys.stdout.flush()
        done = subprocess.run([*_sketchstream(), *argv], env=self.env, check=False)
        if done.returncode != 0:
            raise DemoError(
                f"{what} failed (`sketchstream {' '.join(argv)}` exited {done.returncode})"
            )

    def start(self, argv: Sequence[str], log: Path, name: str) -> subprocess.Popen:
        """Start ``sketchstream argv`` in the background, its output into ``log``."""
        self.console.say(f"{_shown(argv)}   (output: {log})")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*_sketchstream(), *argv],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.children.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.children):
            self.stop(proc, timeout=30.0)


def tail(path: Path | None, lines: int = 25) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns: keep the last state of each line
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def _health(port: int) -> dict | None:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180.0) -> dict:
    """Wait until the worker's /health says ok; :class:`DemoError` if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DemoError(f"the worker exited ({proc.returncode}) while starting:\n{tail(log)}")
        health = _health(port)
        if health and health.get("status") == "ok" and health.get("partitions"):
            return health
        if time.monotonic() > deadline:
            raise DemoError(f"the worker was not healthy within {timeout:.0f}s:\n{tail(log)}")
        time.sleep(0.5)
