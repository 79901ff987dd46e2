"""What a task's start does not import: a package's __init__ skipped by
`lean_import.skip_init` (run later, when a name of it is asked for), mitmproxy,
which the gateway imports only when its rules inspect or a connection needs it,
dnspython's message machinery, which only the DNS filter's slow path uses, and h11,
which only plain HTTP off the front door's fast path uses.

The gateway cases run in a fresh interpreter: this one has mitmproxy imported by
other tests already."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sandgate.proxy.lean_import import skip_init

PACKAGE_INIT = """\
import sys
sys.lean_import_test_inits = getattr(sys, "lean_import_test_inits", 0) + 1
from leanpkg.sub import VALUE as WHOLE
"""


@pytest.fixture
def leanpkg(tmp_path, monkeypatch):
    package = tmp_path / "leanpkg"
    package.mkdir()
    (package / "__init__.py").write_text(PACKAGE_INIT)
    (package / "sub.py").write_text("VALUE = 42\n")
    (package / "other.py").write_text("OTHER = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "lean_import_test_inits", 0, raising=False)
    yield
    for name in [m for m in sys.modules if m == "leanpkg" or m.startswith("leanpkg.")]:
        del sys.modules[name]


def test_submodules_load_without_the_package_init(leanpkg):
    skip_init("leanpkg")
    import leanpkg.sub
    from leanpkg import other

    assert (leanpkg.sub.VALUE, other.OTHER) == (42, 7)
    assert sys.lean_import_test_inits == 0


def test_a_name_of_the_init_runs_it_once_then(leanpkg):
    skip_init("leanpkg")
    import leanpkg.sub
    from leanpkg import WHOLE

    assert WHOLE == 42 and sys.lean_import_test_inits == 1
    assert sys.modules["leanpkg.sub"] is leanpkg.sub  # not loaded a second time
    assert leanpkg.WHOLE == 42 and sys.lean_import_test_inits == 1
    with pytest.raises(ImportError):
        from leanpkg import NOT_THERE  # noqa: F401


def test_an_imported_package_is_left_as_it_is(leanpkg):
    import leanpkg

    skip_init("leanpkg")
    assert sys.modules["leanpkg"] is leanpkg and sys.lean_import_test_inits == 1


GATEWAY_SCRIPT = """
import asyncio, sys
from pathlib import Path
from sandgate.proxy.gateway import Gateway, GatewayConfig
from sandgate.proxy.policy import load_policy

async def main(rules, confdir):
    config = GatewayConfig("127.0.0.1", ["127.0.0.1"], Path(confdir), dns_upstream_port=9)
    gateway = Gateway(config, load_policy([Path(rules)]))
    await gateway.start()
    print("started", "mitmproxy" in sys.modules, gateway.proxy.ca_cert.exists())
    await gateway.proxy.started()  # what the first hand-off does
    print("handed", "mitmproxy" in sys.modules, gateway.proxy.ca_cert.exists())
    await gateway.stop()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

PASS_THROUGH_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
"""
INSPECTING_RULES = PASS_THROUGH_RULES + "        methods: [GET]\n"


def run_gateway(tmp_path, rules: str) -> list[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(GATEWAY_SCRIPT), str(path), str(tmp_path / "ca")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_a_pass_through_gateway_imports_mitmproxy_only_when_a_connection_needs_it(tmp_path):
    assert run_gateway(tmp_path, PASS_THROUGH_RULES) == [
        "started False False",
        "handed True True",
    ]


def test_a_gateway_whose_rules_inspect_makes_its_ca_up_front_and_mitmproxy_when_handed(tmp_path):
    """Inspected HTTPS/1.1 is the front door's: the CA exists from the start (cryptography
    alone), mitmproxy only once a connection (an h2-only client) is handed to it."""
    assert run_gateway(tmp_path, INSPECTING_RULES) == ["started False True", "handed True True"]


def test_a_gateway_whose_rules_ask_starts_mitmproxy_up_front(tmp_path):
    """A held request must not wait for mitmproxy's import."""
    asking = PASS_THROUGH_RULES + "      - ask: api.allowed.test\n"
    assert run_gateway(tmp_path, asking) == ["started True True", "handed True True"]


DNS_SCRIPT = """
import sys
import sandgate.enforcer.run  # what an embedded `sandgate run` imports, the gateway with it
from sandgate.proxy.dns.query import check_query, quick_check
from sandgate.proxy.policy.builtin import deny

def heavy():
    return sorted(m for m in ("dns.message", "dns.name", "dns.rrset", "importlib.metadata")
                  if m in sys.modules)

print("imported", heavy())
decide = lambda profile, name: deny("unknown-profile", name)  # NXDOMAIN
def query(qtype):
    header = bytes.fromhex("1234 0100 0001 0000 0000 0000")  # id, RD, one question
    return header + b"\\x07allowed\\x04test\\x00" + qtype.to_bytes(2, "big") + b"\\x00\\x01"

assert quick_check(query(1), "default", decide) is not None  # one A question: the fast path
print("fast path", heavy())
txt = query(16)  # TXT: the slow path
assert quick_check(txt, "default", decide) is None
assert check_query(txt, "default", decide).response is not None
print("slow path", heavy()[:3])
"""


def run_script(script: str, *args: str) -> list[str]:
    """The lines `script` prints in a fresh interpreter (it must succeed)."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_dnspython_message_machinery_loads_with_the_first_query_off_the_fast_path():
    """dns.message (dns.name, dns.rrset; importlib.metadata through dns._features) is
    the DNS filter's slow path's: not imported by a run's start, nor by a fast-path query."""
    assert run_script(DNS_SCRIPT) == [
        "imported []",
        "fast path []",
        "slow path ['dns.message', 'dns.name', 'dns.rrset']",
    ]


H11_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import sandgate.proxy.gateway  # the front door and its plain-HTTP path with it
from sandgate.proxy.frontdoor.http1 import Http1Session
from support.fakes import make_gate
from pathlib import Path

print("imported", "h11" in sys.modules)
gate = make_gate(Path(sys.argv[2]), sandbox="127.0.0.1")
state = gate.on_connect("c1", "127.0.0.1", 40000, "203.0.113.10", 80)
gate.on_first_bytes(state, b"GET / HTTP/1.1\\r\\n")
session = Http1Session(gate, state)
session.client_data(b"GET / HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n")
session.upstream_connected()
session.upstream_data(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
print("fast exchange", "h11" in sys.modules, bytes(session.to_client).endswith(b"\\r\\n\\r\\nok"))
session.client_data(b"POST / HTTP/1.1\\r\\nHost: allowed.test\\r\\nContent-Length: 1\\r\\n\\r\\nx")
print("a body", "h11" in sys.modules, session.request is not None and not session.closing)
"""


def test_h11_loads_with_the_first_exchange_the_fast_path_does_not_take(tmp_path):
    """The front door's plain-HTTP path imports h11 only when an exchange leaves its
    fast path (http1_fast.py): a gateway whose plain HTTP is all of the common shape,
    or that has none, never imports it (a worker's start and idle memory)."""
    tests = str(Path(__file__).resolve().parents[1])
    assert run_script(H11_SCRIPT, tests, str(tmp_path)) == [
        "imported False",
        "fast exchange False True",
        "a body True True",
    ]


RELOAD_SCRIPT = """
import asyncio, sys
from pathlib import Path
from sandgate.proxy.gateway import Gateway, GatewayConfig
from sandgate.proxy.policy import load_policy

async def main(rules, asking, confdir):
    config = GatewayConfig("127.0.0.1", ["127.0.0.1"], Path(confdir), dns_upstream_port=9)
    gateway = Gateway(config, load_policy([Path(rules)]))
    await gateway.start()
    print("started", "mitmproxy" in sys.modules)
    gateway.swap_policy(load_policy([Path(asking)]))
    for _ in range(2000):
        if gateway.proxy.master is not None:
            break
        await asyncio.sleep(0.01)
    print("reloaded", gateway.proxy.master is not None)
    await gateway.stop()

asyncio.run(main(*sys.argv[1:]))
"""


def test_a_reload_that_adds_an_ask_rule_starts_mitmproxy(tmp_path):
    (tmp_path / "rules.yaml").write_text(PASS_THROUGH_RULES)
    (tmp_path / "asking.yaml").write_text(PASS_THROUGH_RULES + "      - ask: api.allowed.test\n")
    argv = [sys.executable, "-c", textwrap.dedent(RELOAD_SCRIPT)]
    argv += [str(tmp_path / name) for name in ("rules.yaml", "asking.yaml", "ca")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["started False", "reloaded True"], proc.stderr


START_SCRIPT = """
import sys
import sandgate.enforcer.cli.run, sandgate.enforcer.run  # what an embedded `sandgate run` imports
heavy = ("unittest.case", "unittest.loader", "email.utils", "wsgiref.simple_server",
         "http.server", "urllib.request", "prometheus_client.exposition", "h11")
print(sorted(m for m in heavy if m in sys.modules))
from unittest import mock
print(type(mock.Mock()).__name__, "unittest.case" in sys.modules)
"""


def test_a_run_start_imports_no_test_runner_nor_http_server():
    """pyroute2 imports unittest.mock (unittest's __init__, its runner and loader, is
    skipped: enforcer/lean_pyroute2.py); the metrics' WSGI server and its imports
    come with the first scrape (proxy/telemetry/metrics.py), h11 with the admin page's
    first connection or the first webhook (enforcer/admin/)."""
    assert run_script(START_SCRIPT) == ["[]", "Mock False"]
