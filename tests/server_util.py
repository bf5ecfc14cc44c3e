"""Start `flashport serve` as a real process on a free loopback port, and talk to it without a client library.

    srv = ServerProcess(model_dir, "--api-key", "k")   # spawns `python -m flashport serve --port 0 ...`
    srv.wait_ready()                                  # reads the bound address from its output, polls /health
    status, headers, body = srv.request("POST", "/v1/completions", b"{...}", headers={...})
    srv.metrics()                                     # /metrics parsed: {(name, labels): value}
    srv.terminate()                                   # SIGTERM, returns the exit code

Only 127.0.0.1 is ever contacted. The process output is kept (`srv.output()`) for failure messages.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

_ADDRESS = re.compile(r"serving .* at http://127\.0\.0\.1:(\d+)/v1")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test process dies, so no server outlives a killed test run (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    def __init__(self, model_dir: str | Path, *args: str, api_key: str | None = None) -> None:
        self.api_key = api_key
        cmd = [sys.executable, "-m", "flashport", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
               "--device", "cpu", "--log-level", "warning", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        # conftest sets TRITON_INTERPRET=1 for the kernel tests; the server takes its normal CPU path.
        env.pop("TRITON_INTERPRET", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     errors="replace", preexec_fn=_die_with_parent)
        self._lines: list[str] = []
        self._port: int | None = None
        self._port_seen = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line.rstrip("\n"))
            m = _ADDRESS.search(line)
            if m and self._port is None:
                self._port = int(m.group(1))
                self._port_seen.set()
        self._port_seen.set()  # exited

    def output(self) -> str:
        return "\n".join(self._lines[-80:])

    @property
    def port(self) -> int:
        assert self._port is not None, "server not ready"
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        if not self._port_seen.wait(timeout) or self._port is None:
            raise RuntimeError(f"server did not start (rc {self.proc.poll()}):\n{self.output()}")
        while time.monotonic() < deadline:
            try:
                status, _, _ = self.request("GET", "/health", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"server not healthy (rc {self.proc.poll()}):\n{self.output()}")

    # ---- raw HTTP
    def request(self, method: str, path: str, body: bytes | str | dict | list | None = None,
                headers: dict[str, str] | None = None, auth: bool = True,
                timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection; returns (status, lower-cased headers, body)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        hdrs = {"Content-Type": "application/json"}
        if auth and self.api_key:
            hdrs["Authorization"] = f"Bearer {self.api_key}"
        hdrs.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def raw(self, payload: bytes, timeout: float = 10.0) -> bytes:
        """Send bytes as they are on a new connection; return everything read until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(payload)
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except (ConnectionResetError, socket.timeout):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, _, body = self.request("GET", "/metrics")
        assert status == 200, body
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics()[(name, tuple(sorted(labels.items())))]

    # ---- stopping
    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
