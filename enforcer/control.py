"""The gateway service's control protocol: JSON lines over a Unix socket.

One request per line, one reply per line, in order, on a connection that may stay
open (a runner's `attach` holds its connection for the task's lifetime: the service
removes the sandbox when that connection closes). Every reply has `ok`; a refused
request has `ok: false` and `error`, one line for the admin. docs/operations.md
lists the commands:

    {"cmd": "status"}                          policy, rules, sandboxes, connections, uptime
    {"cmd": "sandboxes"}                       one object per attached sandbox
    {"cmd": "reload"}                          the reload's result (errors as FILE:LINE:COL)
    {"cmd": "stop", "grace": 30}               drain, then stop
    {"cmd": "attach", "profile": P, ...}       a new sandbox network for a runner's task
    {"cmd": "resume", "run_id": ID}            a runner back after the service restarted
    {"cmd": "event", ...}                      an event the runner saw (limits, weakened sandbox)
    {"cmd": "detach", "exit_code": N, ...}     the task ended; the reply carries its summary

Stdlib only on the client side: `sandgate run --gateway` imports no mitmproxy.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

DEFAULT_SOCKET = Path(os.environ.get("SANDGATE_CONTROL", "/run/sandgate/gateway.sock"))
MAX_LINE = 1 << 20  # a request or reply longer than this is refused, not buffered


class ControlError(Exception):
    """No service, a broken connection, or a refused request: one line for the admin."""


class ControlClient:
    def __init__(self, sock: socket.socket, path: Path):
        self.sock, self.path = sock, path
        self._buffer = b""
        self.fds: list[int] = []  # descriptors that came with replies (the sandbox's netns)

    @classmethod
    def connect(cls, path: Path = DEFAULT_SOCKET, timeout: float | None = 10.0) -> ControlClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            sock.close()
            raise ControlError(
                f"no gateway service at {path} (start one with: sandgate gateway)"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise ControlError(f"no gateway service answers at {path} (a stale socket?)") from None
        except PermissionError:
            sock.close()
            raise ControlError(f"{path}: permission denied (root or the sandgate group)") from None
        return cls(sock, path)

    def request(self, cmd: str, **args) -> dict:
        """Send one request, return its reply; ControlError when it was refused."""
        self.send(cmd, **args)
        return self.reply()

    def reply(self) -> dict:
        """The reply to the request sent last (`send`); ControlError when it was refused."""
        reply = self.receive()
        if reply is None:
            raise ControlError(f"the gateway service at {self.path} closed the connection")
        if not reply.get("ok"):
            raise ControlError(reply.get("error") or "the gateway service refused the request")
        return reply

    def send(self, cmd: str, **args) -> None:
        try:
            self.sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except OSError as e:
            raise ControlError(
                f"lost the gateway service at {self.path}: {e.strerror or e}"
            ) from None

    def receive(self) -> dict | None:
        """The next reply, or None when the service closed the connection."""
        while b"\n" not in self._buffer:
            try:
                chunk, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
                self.fds += fds
            except TimeoutError:
                raise ControlError(
                    f"the gateway service at {self.path} did not answer in time"
                ) from None
            except OSError as e:
                raise ControlError(
                    f"lost the gateway service at {self.path}: {e.strerror or e}"
                ) from None
            if not chunk:
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise ControlError("the gateway service sent an over-long reply")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: [[[[... too deep
            raise ControlError("the gateway service sent something that is not JSON") from None
        if not isinstance(reply, dict):
            raise ControlError("the gateway service sent something that is not a JSON object")
        return reply

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def fileno(self) -> int:
        return self.sock.fileno()
