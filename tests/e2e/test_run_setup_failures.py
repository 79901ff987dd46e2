"""A run whose setup fails says why in one line and leaves nothing behind; its task
starts only once its whole gateway is up.

A full run directory (/run is a small tmpfs on many hosts): a tmpfs of 8 KiB as
SANDGATE_RUN_DIR, filled but for one page (the run's pid file fits, its upstream CA
bundle, ~200 KB, does not: the network, the cgroup and the init's process forked
ahead exist by then) or whole (the pid file does not fit): each failure names the
file, exit 125, no traceback, and the veth, table, cgroup and processes are gone.
A gateway CA that cannot be made (its directory a file) is said as that, not as a
listener's failure. A state directory with less room than the audit journal (a
file mapped into memory, 16 MiB): the journal was made sparse and written through
the mapping, so the first write to a page the disk had no room for was a SIGBUS
(exit 135, the audit trail with it): at once with a page left, mid-run with 512 KiB
(this test's: the run passed, its journal's later pages unbacked). Its blocks are
now allocated first, and the run says it cannot make the journal.

strace holds or fails one of `sandgate run`'s `listen` calls deterministically (its
main thread alone: the sandbox is not traced). With rules that ask there are three:
the DNS filter's TCP listener, the front door's, then the approvals control socket's.
Held for 1.5 s, the task still reaches an allowed site through the gateway: it ran
after the gateway was up. Refused after 1 s, the task never runs (its step left no
trace, though a task started early had a second to run), the run says which
listener and why in one line, not a traceback, and nothing of it is left behind.
(Both guard the order of enforcer/run.py's setup: a change that starts the task, or
its init without holding the task, before the last listener fails them.) The gateway
service alike: a refused listener of its workers, or its control socket's, is one
line naming it, and the service leaves no guard table and no process (a control
socket bound before its listen was refused stays, unserved: the next start takes it).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from sandgate.enforcer.service_state import guard_table
from support import sandbox
from support.sandbox import NETNS_DIR, curl, leftovers

pytestmark = pytest.mark.e2e

RULES = """version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
      - ask: www.allowed.test
"""
DNS_LISTEN, CONTROL_LISTEN = 1, 3


def _traced_run(net, tmp_path, inject: str, steps: dict[str, str]) -> sandbox.RunResult:
    """`sandgate run` of `steps` with strace injecting `inject` (`...:when=N`) into its
    `listen` calls."""
    rules = tmp_path / "ask.yaml"
    rules.write_text(RULES)
    workdir = sandbox._workdir(tmp_path)
    steps_dir = workdir / "steps"
    command = ["sh", "-c", sandbox._script(steps, steps_dir)]
    argv = sandbox._argv(net, workdir, command, rules, ("--admin-listen", "off"))
    proc = net.run_in_host([*_strace(inject, follow=False), *argv], timeout=90)
    return sandbox._result(proc.returncode, proc.stdout, proc.stderr, workdir, steps_dir)


def test_a_task_waits_for_its_gateway_to_be_up(net, tmp_path):
    r = _traced_run(
        net,
        tmp_path,
        f"delay_enter=1500000:when={CONTROL_LISTEN}",
        {"fetch": curl("http://allowed.test/")},
    )
    assert r.returncode == 0, r.describe()
    assert r["fetch"].status == 200, r.describe()
    assert [q["host"] for q in net.requests_seen()] == ["allowed.test"]
    assert not (left := leftovers(net, r.run_id)), left


@pytest.mark.parametrize(
    ("listen", "said"),
    [
        (DNS_LISTEN, "sandgate: the gateway did not start: the DNS filter cannot listen on "),
        (CONTROL_LISTEN, "sandgate: cannot serve this run's approvals on "),
    ],
    ids=["dns", "control"],
)
def test_a_task_whose_gateway_cannot_come_up_never_runs(net, tmp_path, listen, said):
    r = _traced_run(
        net, tmp_path, f"error=EPERM:delay_enter=1000000:when={listen}", {"ran": "echo ran"}
    )
    assert r.returncode == 125, r.describe()
    assert said in r.stderr, r.stderr
    assert "Operation not permitted" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (r.steps_dir / "ran.rc").exists() and not r.steps, r.describe()
    assert [e["detail"] for e in r.events(kind="task")] == ["task ended: was not started"]
    assert not (left := leftovers(net, r.audit[-1]["task_id"])), left
    assert net.requests_seen() == []


def _strace(inject: str, *, follow: bool = True) -> list[str]:
    """strace injecting `inject` into `listen` calls: of every process and thread
    (`follow`), or of the command's main thread alone (a run's listeners are made
    there; its sandbox then is not traced)."""
    if shutil.which("strace") is None:
        pytest.fail("strace is missing (scripts/install.sh --test installs it)")
    return ["strace", *(["-f"] if follow else []), "-qq", "-o", "/dev/null",
            "-e", "trace=listen", "-e", f"inject=listen:{inject}"]  # fmt: skip


def _service(net, tmp_path, workers: str) -> tuple:
    """A `sandgate gateway` command line of its own control socket: (socket, argv)."""
    control = tmp_path / "control" / "gateway.sock"
    control.parent.mkdir()
    argv = [sandbox.SANDGATE, "gateway", "--rules", str(sandbox.DEMO_RULES),
            "--dns-upstream", net.dns_ip, "--control", str(control),
            "--audit-log", str(tmp_path / "audit.jsonl"), "--metrics-listen", "off",
            "--admin-listen", "off", "--warm", "0", "--workers", workers]  # fmt: skip
    return control, argv


def _service_gone(net, proc, control) -> None:
    """A service that did not start: no traceback, its guard table and processes gone."""
    assert "Traceback" not in proc.stderr, proc.stderr
    tables = net.run_in_host(["nft", "list", "tables"], check=True).stdout
    assert guard_table(control) not in tables, tables
    alive = subprocess.run(["pgrep", "-f", str(control)], capture_output=True, text=True)
    assert alive.stdout == "", alive.stdout


# The service's listens: each worker's front door and DNS filter (two workers on this
# machine kind, more with more cores: the first is a worker's), then the control socket.
@pytest.mark.parametrize(
    ("workers", "listen", "said"),
    [
        (
            "2",
            1,
            "sandgate: the gateway did not start: gateway worker 0 cannot listen on 0.0.0.0: ",
        ),
        ("1", 3, "sandgate: --control "),
    ],
    ids=["worker", "control"],
)
def test_a_service_whose_listener_is_refused_says_which(net, tmp_path, workers, listen, said):
    control, argv = _service(net, tmp_path, workers)
    enter = ["nsenter", f"--net={NETNS_DIR / net.host_ns}", "--"]
    proc = subprocess.run(
        [*enter, *_strace(f"error=EPERM:when={listen}"), *argv],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 125, proc.stderr
    assert said in proc.stderr and "Operation not permitted" in proc.stderr, proc.stderr
    _service_gone(net, proc, control)


def _on_full_tmpfs(net, tmp_path, variable: str, kib: int, free: int, argv: list[str]):
    """`argv` in the fake internet's host netns with `variable` (SANDGATE_RUN_DIR or
    SANDGATE_STATE_DIR) a tmpfs of `kib` KiB with `free` KiB left, in a mount
    namespace of its own (gone with it; as `ip netns exec`, the netns's name too)."""
    where = tmp_path / variable.lower()
    where.mkdir()
    script = (
        f"mount -t tmpfs -o size={kib}k tmpfs {where} && "
        f"head -c {kib - free}k /dev/zero > {where}/fill && "
        f'{variable}={where} exec "$@"'
    )
    unshare = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
    return where, net.run_in_host([*unshare, *argv], timeout=90)


@pytest.mark.parametrize(("free", "file"), [(4, "upstream-ca.pem"), (0, "pid")])
def test_a_full_run_dir_is_said_and_leaves_nothing(net, tmp_path, free, file):
    workdir = sandbox._workdir(tmp_path)
    argv = sandbox._argv(net, workdir, ["true"], sandbox.DEMO_RULES, ())
    run_dir, proc = _on_full_tmpfs(net, tmp_path, "SANDGATE_RUN_DIR", 8, free, argv)
    assert proc.returncode == 125, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "No space left on device" in line]
    assert len(said) == 1 and said[0].startswith(f"sandgate: cannot write {run_dir}/"), proc.stderr
    assert said[0].split(": ")[1].endswith(f"/{file}"), said
    assert "Traceback" not in proc.stderr, proc.stderr
    r = sandbox._result(proc.returncode, proc.stdout, proc.stderr, workdir, None)
    assert [e["detail"] for e in r.events(kind="task")] == ["task ended: was not started"]
    assert not (left := leftovers(net, r.audit[-1]["task_id"])), left


def test_a_gateway_ca_that_cannot_be_made_is_said_and_leaves_nothing(net, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "ca").write_text("not a directory\n")
    workdir = sandbox._workdir(tmp_path)
    argv = sandbox._argv(net, workdir, ["true"], sandbox.DEMO_RULES, ())  # its rules inspect
    env = {**os.environ, "SANDGATE_STATE_DIR": str(state)}
    proc = net.run_in_host(argv, timeout=90, env=env)
    assert proc.returncode == 125, proc.stderr
    said = f"sandgate: the gateway did not start: cannot make the gateway CA in {state / 'ca'}: "
    assert said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    r = sandbox._result(proc.returncode, proc.stdout, proc.stderr, workdir, None)
    assert [e["detail"] for e in r.events(kind="task")] == ["task ended: was not started"]
    assert not (left := leftovers(net, r.audit[-1]["task_id"])), left


def _sandbox_networks(net) -> set[str]:
    """Every sandbox netns, host veth end and nftables table there is now."""
    links = net.run_in_host(["ip", "-o", "link", "show"], check=True).stdout
    tables = net.run_in_host(["nft", "list", "tables"], check=True).stdout.split()
    return (
        {f"netns {n}" for n in os.listdir(NETNS_DIR) if n.startswith("sg-")}
        | {f"veth {w.split('@')[0]}" for w in links.split() if w.startswith("sgh-")}
        | {f"table {t}" for t in tables if t.startswith("sandgate_")}
    )


def test_a_full_state_dir_is_said_not_a_bus_error(net, tmp_path):
    """The audit log cannot be opened (its journal has no room): said, and the sandbox
    network made meanwhile (the log opens while it is made) is gone again."""
    workdir = sandbox._workdir(tmp_path)
    argv = sandbox._argv(net, workdir, ["true"], sandbox.DEMO_RULES, ())
    before = _sandbox_networks(net)
    state, proc = _on_full_tmpfs(net, tmp_path, "SANDGATE_STATE_DIR", 1024, 512, argv)
    assert proc.returncode == 125, (proc.returncode, proc.stderr)
    said = f"sandgate: cannot make the audit journal {state}/audit-journal/"
    assert said in proc.stderr and "No space left on device" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # (a released netns's veth is the kernel's to delete, moments after the run)
    assert sandbox.eventually(lambda: _sandbox_networks(net) <= before, timeout=5), (
        _sandbox_networks(net) - before
    )


def test_a_service_without_room_for_a_workers_black_box_says_which(net, tmp_path):
    """The state dir has room for the audit journal (16 MiB) and one worker's black box
    (4 MiB), not the second's: the first start of worker 1 fails, and the service with
    it (it was a traceback), naming the file; no guard table, no process left."""
    control, argv = _service(net, tmp_path, "2")
    state, proc = _on_full_tmpfs(net, tmp_path, "SANDGATE_STATE_DIR", 24 << 10, 22 << 10, argv)
    assert proc.returncode == 125, proc.stderr
    said = f"sandgate: the gateway did not start: gateway worker 1: its black box {state}/"
    assert said in proc.stderr and "No space left on device" in proc.stderr, proc.stderr
    _service_gone(net, proc, control)
