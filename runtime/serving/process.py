"""``runtime serve`` as a child process: start it on free loopback ports, wait until it is ready,
stop it by its PID.  ``infer`` is one tritonclient request.  Used by the tests and ``benchmarks/bench_serve.py``; a supervisor of the
user's own can do the same with the command line it shows.

The server runs in its own process group, so ``kill()`` also ends the ``tritonserver`` and
Python-backend stub processes it started (they would otherwise keep the ports).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from export.contract.errors import NFormerError


def infer(client, model: str, inputs: dict, outputs: list[str]) -> list:
    """One tritonclient request: ``inputs`` maps names to ``(array, Triton dtype)``; returns the
    ``outputs`` as numpy arrays.  Works with an HTTP or a gRPC client."""
    if type(client).__module__.startswith("tritonclient.grpc"):
        import tritonclient.grpc as protocol
    else:
        import tritonclient.http as protocol
    tensors = []
    for name, (arr, dtype) in inputs.items():
        tensor = protocol.InferInput(name, list(arr.shape), dtype)
        tensor.set_data_from_numpy(arr)
        tensors.append(tensor)
    result = client.infer(model, tensors)
    return [result.as_numpy(o) for o in outputs]


class ServeFailed(NFormerError):
    """``runtime serve`` exited or did not become ready in time."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServeProcess:
    """``python -m runtime serve MODEL_DIR --gallery GALLERY ...`` with its output in ``log_path``."""

    def __init__(self, model_dir, gallery, log_path, *extra: str, start_timeout_s: float = 240.0,
                 env: dict | None = None):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log_path = Path(log_path)
        self.command = [sys.executable, "-m", "runtime", "serve", str(model_dir), "--gallery", str(gallery),
                        "--http-port", str(self.http), "--grpc-port", str(self.grpc),
                        "--metrics-port", str(self.metrics), *extra]
        self._log = open(self.log_path, "ab")
        self._start = self._log.tell()          # a reused log: only this run's lines count
        self.proc = subprocess.Popen(self.command, cwd=Path(__file__).resolve().parents[2], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if "\nready\n" in "\n" + self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.kill()
        raise ServeFailed(f"runtime serve did not become ready within {start_timeout_s:.0f} s "
                          f"(exit code {self.proc.returncode}):\n{self.output()[-4000:]}")

    def output(self) -> str:
        """What this run printed so far."""
        with open(self.log_path, "rb") as f:
            f.seek(self._start)
            return f.read().decode(errors="replace")

    def client(self, kind: str = "http"):
        if kind == "http":
            import tritonclient.http as httpclient

            return httpclient.InferenceServerClient(f"127.0.0.1:{self.http}", network_timeout=600.0,
                                                    connection_timeout=120.0)
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server saves its gallery and exits); the exit code.  The group is killed after."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole process group (``kill -9``: nothing is flushed)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        if not self._log.closed:
            self._log.close()
        # a killed server cannot unlink PyTriton's shared-memory blocks (named after its pid)
        for block in Path("/dev/shm").glob(f"pytrtion{self.proc.pid}-*"):
            block.unlink(missing_ok=True)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.terminate()
        else:
            self.kill()
