"""Stand-ins shared by unit tests."""

from sandgate.proxy.policy.request_head import RequestHead
from sandgate.proxy.telemetry.metrics import Metrics


def wired_metrics(firewall: dict[str, int] | None = None) -> Metrics:
    """A Metrics object with every watcher attached to fakes, so that it exports
    every series it can (for checking names against docs, dashboard and alerts)."""
    from sandgate.proxy.approvals.holder import Approvals
    from sandgate.proxy.limits import ConnectionCounts

    class Policy:
        hash, rule_count = "h", 1

    class Audit:
        written = lost = write_errors = queued = 0

    class Gateway:
        policy, registry = Policy(), []
        addon = type("Addon", (), {"connections": {}})()
        gate = type("Gate", (), {"counts": ConnectionCounts()})()
        approvals = Approvals(lambda event: None)

    metrics = Metrics()
    metrics.watch_gateway(Gateway())
    metrics.watch_audit(Audit())
    metrics.watch_firewall(lambda: dict(firewall or {}))
    return metrics


SANDBOX = "10.213.0.2"
GATE_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        id: allowed
      - allow: api.allowed.test
        methods: [GET]
        id: api-get
      - allow: ssh.allowed.test
        ports: [22]
        id: ssh
      - allow: db.allowed.test
        ports: [5432]
        paths: [/health]
        id: db-http-only
      - deny: 203.0.113.99
        id: deny-ip
"""
# What the sandbox resolved through the gateway's DNS filter.
GATE_BINDINGS = {
    "allowed.test": "203.0.113.10",
    "api.allowed.test": "203.0.113.11",
    "ssh.allowed.test": "203.0.113.10",
    "db.allowed.test": "203.0.113.12",
}


def make_gate(tmp_path, sandbox: str = SANDBOX, rules: str = GATE_RULES):
    """A ConnectionGate over `rules` (GATE_RULES) for one sandbox; its events collect in `.events`."""
    from sandgate.proxy.dns.bindings import DnsBindings
    from sandgate.proxy.gate import ConnectionGate
    from sandgate.proxy.policy import load_policy
    from sandgate.proxy.registry import Sandbox, SandboxRegistry

    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    registry = SandboxRegistry()
    registry.add(Sandbox(sandbox, "task1", "default"))
    bindings = DnsBindings()
    for name, ip in GATE_BINDINGS.items():
        bindings.record(sandbox, name, ip, 60)
    events: list = []
    gate = ConnectionGate(load_policy(path), registry, bindings, events.append)
    gate.events = events
    return gate


def client_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    """A real ClientHello, from Python's own TLS stack (no SNI when `sni` is None),
    offering the ALPN protocols `alpn` (None: no ALPN extension)."""
    import ssl

    import pytest

    context = ssl.create_default_context()
    context.check_hostname = sni is not None
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def request_head(host: str, method: str = "GET", path: str = "/") -> RequestHead:
    """An HTTP/1 request head with one Host header ("" for none)."""
    fields = ((b"host", host.encode()),) if host else ()
    return RequestHead(method.encode(), path.encode(), fields)


# Hand-made TLS records, for what no TLS stack sends (malformed, or extensions such as
# encrypted_client_hello that Python's ssl cannot add).


def record(body: bytes, kind: int = 0x16, version: bytes = b"\x03\x01") -> bytes:
    return bytes([kind]) + version + len(body).to_bytes(2, "big") + body


def hello_with_extensions(extensions: bytes, trailing: bytes = b"") -> bytes:
    """A minimal ClientHello record with the given raw extensions block content."""
    body = (
        b"\x03\x03"
        + b"\x00" * 32
        + b"\x00"
        + b"\x00\x02\x13\x01"
        + b"\x01\x00"
        + len(extensions).to_bytes(2, "big")
        + extensions
        + trailing
    )
    return record(b"\x01" + len(body).to_bytes(3, "big") + body)


def extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def server_name(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(bytes([kind]) + len(name).to_bytes(2, "big") + name for kind, name in names)
    return extension(0, len(entries).to_bytes(2, "big") + entries)
