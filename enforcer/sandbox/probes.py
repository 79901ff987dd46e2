"""Probes that a task would use to get out, run from inside a real sandbox.

Stdlib only (loaded by the sandbox init by path). Each probe tries one thing a
hostile task would try and says what it saw; `ok` is True when the sandbox held.
`run_cheap` (the file, identity and syscall probes: well under a millisecond each)
runs before the task with `sandgate run --self-test`; `run_network` adds the
egress probes for `sandgate selftest`. A probe that raises something unexpected
reports it as not ok: a self-test must never pass by accident.
"""

from __future__ import annotations

import contextlib
import ctypes
import encodings.idna  # noqa: F401 - ssl needs it for server_hostname; after the switch to the
import errno  # task's ids the interpreter's own stdlib may be out of reach (/root)
import os
import socket
import ssl
import struct
import time

CLONE_NEWUSER = 0x10000000
HELD = {errno.EROFS, errno.EACCES, errno.EPERM}
# Addresses from the documentation ranges (RFC 5737, RFC 3849): never anybody's host.
PROBE_V4 = "203.0.113.7"
PROBE_RESOLVER = "203.0.113.53"
PROBE_V6 = "2001:db8::7"
METADATA = "169.254.169.254"

_libc = ctypes.CDLL(None, use_errno=True)


def _result(probe: str, expected: str, seen: str, ok: bool) -> dict:
    return {"probe": probe, "expected": expected, "seen": seen, "ok": ok}


def _errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else str(e)


def probe_write(probe: str, directory: str) -> dict:
    """Creating a file in `directory` must fail; if it worked, the file goes again."""
    path = os.path.join(directory, f".sandgate-probe-{os.getpid()}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as e:
        return _result(
            probe, "EROFS/EACCES", _errno_name(e), e.errno in HELD or e.errno == errno.ENOENT
        )
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)
    return _result(probe, "EROFS/EACCES", f"created {path}", False)


def probe_hidden(probe: str, directory: str) -> dict:
    try:
        entries = os.listdir(directory)
    except OSError as e:
        return _result(probe, "empty or absent", _errno_name(e), True)
    return _result(
        probe, "empty or absent", f"{len(entries)} entries" if entries else "empty", not entries
    )


def probe_identity() -> dict:
    """Inside a user namespace of its own, the task holds no capability on the host."""
    with open("/proc/self/uid_map") as f:
        fields = f.read().split()
    initial = fields[:3] == ["0", "0", "4294967295"]
    seen = (
        "the host's ids (initial user namespace)"
        if initial
        else f"ids mapped to host {fields[1]}.."
    )
    return _result("no capability on the host", "own user namespace", seen, not initial)


def probe_status(field: str, want: str, probe: str) -> dict:
    with open("/proc/self/status") as f:
        values = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    seen = values.get(field, "absent").strip()
    return _result(probe, f"{field} {want}", f"{field} {seen}", seen == want)


def probe_socket(probe: str, family: int, kind: int, proto: int = 0) -> dict:
    try:
        socket.socket(family, kind, proto).close()
    except OSError as e:
        return _result(probe, "refused", _errno_name(e), True)
    return _result(probe, "refused", "socket created", False)


def probe_userns() -> dict:
    pid = os.fork()
    if pid == 0:  # unshare changes the caller: try it in a throwaway child
        os._exit(0 if _libc.unshare(CLONE_NEWUSER) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    refused = os.waitstatus_to_exitcode(status) == 1
    return _result("no new user namespace", "EPERM", "refused" if refused else "created", refused)


def run_cheap(spec: dict) -> list[dict]:
    paths = spec.get("probe_paths", {})
    results = [
        probe_write("host root read-only", "/"),
        probe_write("host /etc read-only", "/etc"),
        probe_write("host /usr read-only", "/usr"),
    ]
    results += [probe_write(f"gateway code read-only ({p})", p) for p in paths.get("code", [])]
    results += [probe_hidden(f"sandgate state hidden ({p})", p) for p in paths.get("state", [])]
    results += [
        probe_identity(),
        probe_status("NoNewPrivs", "1", "no new privileges"),
        probe_status("Seccomp", "2", "seccomp filter"),
        probe_socket("no packet sockets", socket.AF_PACKET, socket.SOCK_RAW),
        probe_socket("no raw IP sockets", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        probe_userns(),
    ]
    return results


# --- egress ---------------------------------------------------------------------------


def _client_hello(name: str) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _exchange(address: tuple, payload: bytes, timeout: float) -> bytes | OSError:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(address)
            s.sendall(payload)
            data = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (chunk := s.recv(4096)):
                data += chunk
            return data
    except TimeoutError:
        return b""
    except OSError as e:
        return e


def probe_tcp_denied() -> dict:
    seen = _exchange((PROBE_V4, 443), _client_hello("selftest.sandgate.invalid"), 2.0)
    if isinstance(seen, OSError):
        return _result("direct TCP to a denied address", "blocked", _errno_name(seen), True)
    held = not seen.startswith(b"\x16")  # a ServerHello would be a way out
    return _result(
        "direct TCP to a denied address",
        "blocked",
        "closed" if not seen else f"{len(seen)} bytes",
        held,
    )


def probe_metadata() -> dict:
    request = (
        f"GET /latest/meta-data/ HTTP/1.1\r\nHost: {METADATA}\r\nConnection: close\r\n\r\n".encode()
    )
    seen = _exchange((METADATA, 80), request, 2.0)
    if isinstance(seen, OSError):
        return _result("cloud metadata (169.254.169.254)", "blocked", _errno_name(seen), True)
    status = seen.split(b"\r\n", 1)[0].decode("latin-1")
    return _result(
        "cloud metadata (169.254.169.254)", "blocked", status or "closed", b" 200 " not in seen[:20]
    )


def probe_ipv6() -> dict:
    seen = _exchange((PROBE_V6, 443), b"x", 1.0)
    if isinstance(seen, OSError):
        return _result("IPv6", "no route", _errno_name(seen), True)
    return _result("IPv6", "no route", "connected", False)


def probe_udp() -> dict:
    """UDP/QUIC: a datagram out must get nothing back (the firewall drops it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        try:
            s.sendto(b"\xc0" + b"\x00" * 1199, (PROBE_V4, 443))  # the shape of a QUIC Initial
            data = s.recv(2048)
        except TimeoutError:
            return _result("UDP/QUIC", "dropped", "no answer", True)
        except OSError as e:
            return _result("UDP/QUIC", "dropped", _errno_name(e), True)
    return _result("UDP/QUIC", "dropped", f"answer of {len(data)} bytes", False)


def probe_outside_resolver() -> dict:
    """A query to another resolver is answered by the gateway's filter (or not at all)."""
    query = struct.pack("!HHHHHH", 0x5347, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p for p in b"selftest.sandgate.invalid".split(b".")) + b"\0"
    query += struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        try:
            s.sendto(query, (PROBE_RESOLVER, 53))
            data = s.recv(2048)
        except TimeoutError:
            return _result("outside resolver", "filtered", "no answer", True)
        except OSError as e:
            return _result("outside resolver", "filtered", _errno_name(e), True)
    rcode = data[3] & 0x0F if len(data) >= 12 else -1
    answers = struct.unpack("!H", data[6:8])[0] if len(data) >= 12 else 0
    names = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}
    return _result(
        "outside resolver",
        "filtered",
        f"{names.get(rcode, rcode)}, {answers} answers",
        answers == 0,
    )


def run_network() -> list[dict]:
    return [
        probe_tcp_denied(),
        probe_udp(),
        probe_ipv6(),
        probe_metadata(),
        probe_outside_resolver(),
    ]


def run_all(spec: dict) -> list[dict]:
    results = []
    for batch in (lambda: run_cheap(spec), run_network):
        try:
            results += batch()
        except Exception as e:  # noqa: BLE001 - a broken probe is a failed self-test
            results.append(_result("probe error", "none", f"{type(e).__name__}: {e}", False))
    return results
