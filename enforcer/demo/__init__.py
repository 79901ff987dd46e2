"""`sandgate demo`: the whole product on a machine without internet.

Scaffolding, not product: the gateway never imports this package. It builds a
throwaway fake internet in network namespaces (`fakenet`: nginx with a test CA,
dnsmasq, a "host" namespace in front; the end-to-end tests use it too), runs
`sandgate run` in the host namespace with rules/examples/demo.yaml, and inside
the sandbox the scripted `agent`. Everything is removed afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sandgate.enforcer.demo.fakenet import FakeInternet, FakeNetError, fresh_prefix
from sandgate.proxy.policy.load import RULES_DIR

DEMO_RULES = RULES_DIR / "examples" / "demo.yaml"
AGENT = Path(__file__).resolve().with_name("agent.py")
# The agent is a task like any other: it runs with the host's Python, stdlib only, as
# a file, not with sandgate's own interpreter (whose home may be hidden from tasks).
TASK_PATH = "/usr/local/bin:/usr/bin:/bin"


def demo() -> int:
    """0 when every allowed step passed and every forbidden one was blocked (and the
    fake internet saw none of them); RunError when the machine cannot host it."""
    # Here, not at the top: it loads the gateway, and the agent imports this package.
    from sandgate.enforcer.run import RunError

    for tool in ("nft", "nginx", "dnsmasq"):
        if subprocess.run(
            ["sh", "-c", f"command -v {tool} || test -x /usr/sbin/{tool}"], capture_output=True
        ).returncode:
            raise RunError(
                f"demo: '{tool}' is missing; install nftables, nginx-light and dnsmasq-base"
            )
    try:
        return _run_demo()
    except FakeNetError as e:
        raise RunError(f"demo: the fake internet could not be built: {e}") from None


def _run_demo() -> int:
    print("sandgate demo: building a fake internet in network namespaces ...", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="sandgate-demo-") as work,
        FakeInternet(fresh_prefix("sgdemo"), Path(work)) as net,
    ):
        python = shutil.which("python3", path=TASK_PATH)
        if python is None:
            from sandgate.enforcer.run import RunError

            raise RunError(
                "demo: the agent needs python3 in /usr/bin or /usr/local/bin (apt-get install python3)"
            )
        workspace = Path(work) / "workspace"
        workspace.mkdir()
        # The task sees the host read-only but not all of it (a fresh /tmp and /root,
        # sandgate's own files hidden): where sandgate is installed may be out of its
        # view, so the agent runs from a copy in its workspace.
        agent = workspace / AGENT.name
        shutil.copyfile(AGENT, agent)
        print(
            f"  host namespace {net.host_ns}; servers: allowed.test, api.allowed.test, evil.test (203.0.113.66)\n"
            f"  rules: {DEMO_RULES}\n\nsandgate run -- python3 {AGENT.name}\n",
            flush=True,
        )
        run = net.run_in_host(
            [
                sys.executable,
                "-m",
                "sandgate.enforcer.cli",
                "run",
                "--rules",
                str(DEMO_RULES),
                "--dns-upstream",
                net.dns_ip,
                "--extra-ca",
                str(net.ca_cert),
                "--workspace",
                str(workspace),
                "--",
                python,
                "-I",
                str(agent),
            ],
            capture_output=False,
            text=True,
            timeout=120,
        )
        leaked = [r for r in net.requests_seen("203.0.113.66")] + [
            q for q in net.dns_queries_seen() if q.endswith("evil.test")
        ]
        udp = net.udp_datagrams_seen()
        print(
            f"\nForbidden servers received: {len(leaked)} HTTP requests / DNS queries, {udp} UDP datagrams."
        )
    if run.returncode == 0 and not leaked and not udp:
        print(
            "sandgate demo: every allowed step passed, every forbidden step was blocked. Cleaned up."
        )
        return 0
    print(
        f"sandgate demo: FAILED (agent exit {run.returncode}, leaks {len(leaked) + udp})",
        file=sys.stderr,
    )
    return 1
