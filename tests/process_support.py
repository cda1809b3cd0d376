"""Running a project command in a child process and stopping it with SIGTERM once it is under way
(the CLI tests of every stage: a stopped command must leave nothing half-written)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sigterm_once(args: list[str], started, what: str, start_timeout: float = 120.0,
                 exit_timeout: float = 60.0) -> tuple[int, bytes]:
    """Run ``python -m <args>`` from the repository, wait until ``started()`` is true (the command
    began writing), send SIGTERM and return ``(exit status, stderr)``; the child is killed if it is
    still there.  Fails the test when it never started (``what``: what was awaited)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + start_timeout
        while time.time() < deadline and proc.poll() is None and not started():
            time.sleep(0.05)
        assert started(), f"{what} never happened"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=exit_timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err
