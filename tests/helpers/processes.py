"""``stella-search serve`` in a process of its own on 127.0.0.1 (a free port), which a test can kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll ``url``/ready until it answers 200; RuntimeError naming the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"the server did not come up; its log is {log}:\n{tail}")
        time.sleep(0.1)


class ServerProcess:
    """``stella-search serve`` in its own process group, started until /ready answers 200; ``env`` replaces the
    environment (e.g. one that preloads a fault shim)."""

    def __init__(self, data_dir: Path, log_path: Path, *args: str, env: dict | None = None):
        self.data_dir = data_dir
        self.log_path = log_path
        self.args = args
        self.env = env
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> ServerProcess:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        stella = os.path.join(os.path.dirname(sys.executable), "stella-search")
        command = [stella, "serve", "--data-dir", str(self.data_dir), "--port", str(port), *self.args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--device", "cpu"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        wait_until_ready(self.url, self.process, self.log_path)
        return self

    def kill(self, term_first: float | None = None) -> None:
        """SIGKILL the server; with ``term_first``, SIGTERM it and SIGKILL it that many seconds later."""
        if term_first is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=term_first)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM the process group (a graceful shutdown) and wait for it."""
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)
