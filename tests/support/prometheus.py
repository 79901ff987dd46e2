"""A real Prometheus server scraping a sandgate /metrics in the fake internet's host netns.

The Debian `prometheus` binary (scripts/install.sh --test) on a temporary config and
storage, 1 s scrape interval, listening on 127.0.0.1 of that namespace only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from sandgate.enforcer import netns


def free_port(ns: str) -> int:
    with netns.entered_netns(ns), socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """The Debian prometheus binary in the host netns, on a temporary config."""

    def __init__(self, fakenet, workdir: Path, target_port: int):
        self.fakenet, self.ns = fakenet, fakenet.host_ns
        self.port = free_port(self.ns)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: sandgate\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = fakenet.popen_in_host(
                [
                    shutil.which("prometheus") or "/usr/bin/prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def get(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with netns.entered_netns(self.ns), urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response) if path.startswith("/api/") else {"status": response.status}

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}"
                )
            with contextlib.suppress(OSError):
                if self.get("/-/ready")["status"] == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prometheus not ready after {timeout} s:\n{self.log.read_text()[-2000:]}"
                )
            time.sleep(0.2)

    def query(self, promql: str) -> dict[tuple, float]:
        """Instant query -> {tuple of (label, value) pairs: value}."""
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", answer
        return {
            tuple(sorted(r["metric"].items())): float(r["value"][1])
            for r in answer["data"]["result"]
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def require_prometheus() -> None:
    """Fail (never skip: CI installs it) when the Prometheus server is missing."""
    if shutil.which("prometheus") is None and not Path("/usr/bin/prometheus").exists():
        pytest.fail(
            "the Prometheus server is missing (apt-get install prometheus; scripts/install.sh --test)"
        )
