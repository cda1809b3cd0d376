"""Run one benchmark case in a fresh Python process (its own memory peak, its own thread count).

The benchmark scripts call themselves with ``--case JSON``; the child prints the result as JSON on its
last stdout line. Used by bench_cpu.py and bench_precision.py.  ``cpu_name`` names the machine in
every benchmark's JSON.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def run_in_subprocess(script: str, case: dict) -> dict:
    """``python script --case JSON`` with ``OMP_NUM_THREADS = case["threads"]``; the child's JSON result,
    or the case with an ``error`` (the child's last stderr line) when it failed."""
    out = subprocess.run([sys.executable, script, "--case", json.dumps(case)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(case["threads"])})
    if out.returncode != 0:
        return {**case, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
