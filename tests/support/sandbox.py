"""Running `sandgate run` in the fake internet's host netns, for the gateway's e2e tests.

A test hands `run` a few labelled shell steps; they run one after the other in ONE
sandbox (a run costs about a second, a step milliseconds), each step's exit code,
stdout and stderr land in files under the test's tmp_path (the steps directory is the
task's workspace), and `run` returns them with the run's exit code, its summary
JSON and its audit-log lines. Every run is checked for leftovers as it ends.

The step builders (`curl`, `py_get`, `dig`, ...) make commands that trust only the
sandbox's *system* CA bundle (the CA environment variables sandgate sets are
removed), so a passing HTTPS step shows that the bundle bind-mounted over the
system's carries the fake internet's CA and, for inspected rules, the gateway's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_RULES = REPO / "rules" / "examples" / "demo.yaml"
PYTHON = sys.executable  # for helpers outside the sandbox
# Inside the sandbox, the host's /root (where this machine's pyenv lives) is a fresh
# tmpfs: steps use the distribution's Python, as an agent's tools would.
SANDBOX_PYTHON = "/usr/bin/python3"
SANDGATE = str(Path(sys.executable).with_name("sandgate"))
RUN_DIR = Path(os.environ.get("SANDGATE_RUN_DIR", "/run/sandgate"))  # as enforcer/run.py
STATE_DIR = Path(os.environ.get("SANDGATE_STATE_DIR") or "/var/lib/sandgate")  # as enforcer/run.py
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
ID_SLOT_DIR = Path("/run/sandgate-ids")  # as enforcer/sandbox/id_slots.py

# The sandbox's environment points every client at sandgate's bundle; without
# these a client falls back to the system bundle, which is what we want to test.
SYSTEM_BUNDLE_ONLY = "env -u SSL_CERT_FILE -u SSL_CERT_DIR -u CURL_CA_BUNDLE -u REQUESTS_CA_BUNDLE"

_counter = itertools.count()


# --- step builders: shell commands for inside the sandbox ------------------------


def curl(*args: str, timeout: float = 5) -> str:
    """curl, no -k: the body on stdout, then the HTTP status (000: none) on a last line."""
    quoted = " ".join(shlex.quote(a) for a in args)
    return f"{SYSTEM_BUNDLE_ONLY} curl -sS --max-time {timeout} -w '\\n%{{http_code}}' {quoted}"


def python(code: str, *args: str) -> str:
    """The test's Python with `code` (dedented) and args."""
    argv = [SANDBOX_PYTHON, "-c", textwrap.dedent(code), *args]
    return f"{SYSTEM_BUNDLE_ONLY} " + " ".join(shlex.quote(a) for a in argv)


def fork_bomb() -> str:
    """Forks until refused; prints `refused ERRNO CHILDREN` (the pids limit's EAGAIN is 11)."""
    return python("""
        import os, time
        children = 0
        try:
            for _ in range(10_000):
                if os.fork() == 0:
                    time.sleep(3)
                    os._exit(0)
                children += 1
        except OSError as e:
            print("refused", e.errno, children)
    """)


def memory_hog() -> str:
    """Takes 1 GiB in 16 MiB blocks, then prints `survived` (it should not, at a lower limit)."""
    return python("""
        blocks = []
        for _ in range(64):
            blocks.append(bytearray(16 << 20))
        print("survived")
    """)


def py_get(url: str, method: str = "GET") -> str:
    """urllib with ssl's default context: the body, then the status on a last line."""
    return python(
        """
        import sys, urllib.error, urllib.request
        request = urllib.request.Request(sys.argv[1], method=sys.argv[2])
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                body, status = response.read(), response.status
        except urllib.error.HTTPError as e:
            body, status = e.read(), e.code
        sys.stdout.write(body.decode(errors="replace") + "\\n" + str(status))
        """,
        url,
        method,
    )


def py_issuer(host: str, port: int = 443) -> str:
    """Prints the common name of the issuer of the certificate `host` presents."""
    return python(
        """
        import socket, ssl, sys
        host, port = sys.argv[1], int(sys.argv[2])
        context = ssl.create_default_context()
        with socket.create_connection((host, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                issuer = dict(pair[0] for pair in tls.getpeercert()["issuer"])
        print(issuer["commonName"])
        """,
        host,
        str(port),
    )


def tcp_hello(host: str, port: int, hello: str = "SSH-2.0-sandgate-test\r\n") -> str:
    """Connect, send `hello` (an ssh client sends its identification at once; "" sends
    nothing, as an SMTP or MySQL client waiting for the banner), print the first
    line the server sends back. Exit 1 if the connection fails or closes."""
    return python(
        """
        import socket, sys
        try:
            with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
                if sys.argv[3]:
                    s.sendall(sys.argv[3].encode())
                data = s.recv(4096)
        except OSError as e:
            sys.exit(f"error: {e}")
        if not data:
            sys.exit("closed without a byte")
        print(data.decode(errors="replace").splitlines()[0])
        """,
        host,
        str(port),
        hello,
    )


def udp_send(host: str, port: int, count: int = 1) -> str:
    return python(
        """
        import socket, sys
        family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
        address = (sys.argv[1], int(sys.argv[2]))
        if family == socket.AF_INET6:
            address = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), family, socket.SOCK_DGRAM)[0][4]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            for _ in range(int(sys.argv[3])):
                s.sendto(b"sandgate-test", address)
        print("sent")
        """,
        host,
        str(port),
        str(count),
    )


def icmp_echo(ip: str, wait: float = 1.0) -> str:
    """`ping -c1 -W1` in Python (iputils-ping is not a suite dependency): prints
    "reply" (exit 0), "no reply" (exit 1) or "refused" (exit 2: no raw socket, as in
    sandgate's sandbox, where the task has no CAP_NET_RAW on the host)."""
    return python(
        """
        import socket, struct, sys
        def checksum(data):
            total = sum(struct.unpack(f"!{len(data) // 2}H", data))
            total = (total >> 16) + (total & 0xFFFF)
            return ~(total + (total >> 16)) & 0xFFFF
        packet = struct.pack("!BBHHH", 8, 0, 0, 0x5347, 1) + b"sandgate"
        packet = packet[:2] + struct.pack("!H", checksum(packet)) + packet[4:]
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except PermissionError:
            print("refused", file=sys.stderr)
            sys.exit(2)
        with s:
            s.settimeout(float(sys.argv[2]))
            s.sendto(packet, (sys.argv[1], 0))
            try:
                while True:
                    data, peer = s.recvfrom(2048)
                    if peer[0] == sys.argv[1] and data[20] == 0:
                        print("reply")
                        break
            except TimeoutError:
                sys.exit("no reply")
        """,
        ip,
        str(wait),
    )


# A raw HTTP/1.1 and HTTP/2 client the tests copy into the sandbox's directory
# (`setup=`), for requests curl would respell.
H2CLIENT = REPO / "tests" / "e2e" / "host_router" / "h2client.py"


def h1(
    ip: str,
    port: int,
    target: str,
    tls: bool = True,
    host: str = "allowed.test",
    fields: tuple[str, ...] = (),
) -> str:
    """One `GET target` over HTTP/1.1 to ip:port, as written (h2client.py, copied in:
    H2CLIENT), over TLS with SNI allowed.test or plain; prints the answers' heads."""
    head = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f + "\r\n" for f in fields)
    request = head + "Connection: close\r\n\r\n"
    sni = "allowed.test" if tls else "-"
    return f"{SANDBOX_PYTHON} h2client.py {ip} {port} {sni} h1 {shlex.quote(json.dumps([request]))}"


def dig(*args: str) -> str:
    """dig, one try: header comments and the answer section (see Step.dns_*)."""
    quoted = " ".join(shlex.quote(a) for a in args)
    return f"dig +time=2 +tries=1 +noall +comments +answer {quoted}"


# Root in the sandbox asks the kernel, over rtnetlink, for a veth pair whose one end
# is created straight in netns id 0 of the sandbox's view: the netns its own veth
# peer lives in, i.e. the gateway's host. Prints "created" (exit 0) or the errno.
VETH_INTO_HOST_NETNS = """
import socket, struct, sys
RTM_NEWLINK, NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL = 16, 1, 4, 0x400, 0x200
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 3, 18, 1, 2, 1
IFLA_TARGET_NETNSID, IFF_UP = 46, 1
def attr(kind, payload):
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + bytes(-size % 4)
def ifinfo(flags=0):
    return struct.pack("=BxHiII", 0, 0, 0, flags, flags)
peer = ifinfo() + attr(IFLA_IFNAME, sys.argv[2].encode() + b"\\0")
info = attr(IFLA_INFO_KIND, b"veth\\0") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer))
body = (ifinfo(IFF_UP) + attr(IFLA_TARGET_NETNSID, struct.pack("=i", 0))
        + attr(IFLA_IFNAME, sys.argv[1].encode() + b"\\0") + attr(IFLA_LINKINFO, info))
flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:
    s.send(struct.pack("=IHHII", 16 + len(body), RTM_NEWLINK, flags, 1, 0) + body)
    error = -struct.unpack_from("=i", s.recv(65536), 16)[0]
if error:
    sys.exit(f"errno {error}")
print("created")
"""


# --- results --------------------------------------------------------------------


@dataclass
class Step:
    rc: int
    out: str
    err: str
    ms: int  # how long the step took

    @property
    def status(self) -> int:
        """The HTTP status a `curl`/`py_get` step printed last (0: no response)."""
        return int(self.out.rsplit("\n", 1)[-1] or 0)

    @property
    def body(self) -> str:
        return self.out.rsplit("\n", 1)[0] if "\n" in self.out else ""

    @property
    def dns_status(self) -> str | None:
        m = re.search(r"status: (\w+)", self.out)
        return m.group(1) if m else None

    @property
    def dns_answers(self) -> list[str]:
        """The record data of the answer section (`dig` steps)."""
        return [
            line.split()[-1]
            for line in self.out.splitlines()
            if line.strip() and not line.startswith(";")
        ]


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    summary: dict
    audit: list[dict]
    steps: dict[str, Step] = field(default_factory=dict)
    steps_dir: Path | None = None  # the task's workspace

    def __getitem__(self, label: str) -> Step:
        return self.steps[label]

    @property
    def run_id(self) -> str:
        return self.summary["task_id"]

    def events(self, **fields) -> list[dict]:
        """Audit-log lines whose fields have the given values (None: absent)."""
        return [e for e in self.audit if all(e.get(k) == v for k, v in fields.items())]

    def verdicts(self, **fields) -> set[tuple[str, str, str]]:
        """{(verdict, reason, rule_id)} of the matching events: one element when all
        the matching decisions agree, which is what the tests assert."""
        return {(e["verdict"], e["reason"], e.get("rule_id")) for e in self.events(**fields)}

    def describe(self) -> str:
        """For assertion messages: what the sandbox printed and what was decided."""
        lines = [f"exit {self.returncode}; stderr:\n{self.stderr[-3000:]}"]
        for label, step in self.steps.items():
            lines.append(
                f"[{label}] rc={step.rc} {step.ms} ms out={step.out[-300:]!r} err={step.err[-300:]!r}"
            )
        for e in self.audit:
            lines.append(
                " ".join(
                    f"{k}={e.get(k)}"
                    for k in ("kind", "verdict", "reason", "rule_id", "name", "dst_ip", "dst_port")
                )
            )
        return "\n".join(lines)


# --- running --------------------------------------------------------------------


@dataclass
class Started:
    """A `sandgate run` in the background (signals, SIGKILL): see `start`."""

    popen: subprocess.Popen
    fakenet: object
    workdir: Path
    steps_dir: Path | None = None

    @property
    def pid(self) -> int:
        # `ip netns exec` execs sandgate: the Popen's pid is sandgate's.
        return self.popen.pid

    def run_id(self, timeout: float = 10.0) -> str:
        """The run's id, from the state dir whose pid file names our process."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid_file in RUN_DIR.glob("*/pid"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if int(pid_file.read_text().split()[0]) == self.pid:  # `PID START`
                        return pid_file.parent.name
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"sandgate exited with {self.popen.returncode} before it started"
                )
            time.sleep(0.01)
        raise AssertionError(f"no {RUN_DIR}/*/pid names sandgate's pid {self.pid}")

    def finish(self, timeout: float = 60.0) -> RunResult:
        try:
            stdout, stderr = self.popen.communicate(timeout=timeout)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
        return _result(self.popen.returncode, stdout, stderr, self.workdir, self.steps_dir)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def _argv(
    fakenet,
    workdir: Path,
    command: list[str],
    rules: Path,
    extra: tuple[str, ...],
    fakenet_ca: bool = True,
    dns_upstream: str | None = None,
) -> list[str]:
    trust = ["--extra-ca", str(fakenet.ca_cert)] if fakenet_ca else []
    return [
        SANDGATE, "run",
        "--rules", str(rules),
        "--dns-upstream", dns_upstream or fakenet.dns_ip,
        *trust,
        "--audit-log", str(workdir / "audit.jsonl"),
        "--summary-json", str(workdir / "summary.json"),
        "--workspace", str(workdir / "steps"),  # the audit log and summary stay out of the task's reach
        *extra,
        "--", *command,
    ]  # fmt: skip


def _script(steps: dict[str, str], steps_dir: Path) -> str:
    """One shell script running each step with its output and exit code in files."""
    lines = [f"cd {shlex.quote(str(steps_dir))}"]
    for label, command in steps.items():
        if not re.fullmatch(r"[a-z0-9_]+", label):
            raise ValueError(f"step label {label!r}: use [a-z0-9_]")
        lines.append(
            f"t=$(date +%s%N); ( {command} ) >{label}.out 2>{label}.err </dev/null; "
            f"echo $? $((($(date +%s%N) - t) / 1000000)) >{label}.rc"
        )
    return "\n".join(lines) + "\n"


def _workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / f"run{next(_counter)}"
    (workdir / "steps").mkdir(parents=True)
    return workdir


def run(
    fakenet,
    tmp_path: Path,
    steps: dict[str, str] | None = None,
    *,
    command: list[str] | None = None,
    rules: Path = DEMO_RULES,
    extra: tuple[str, ...] = (),
    timeout: float = 90.0,
    env: dict[str, str] | None = None,
    setup: Callable[[Path], None] | None = None,
    fakenet_ca: bool = True,
    dns_upstream: str | None = None,
    workdir: Path | None = None,
) -> RunResult:
    """`sandgate run` of `steps` (labelled shell commands) or of `command`, in the
    fake internet's host netns (with sandgate's environment `env`, if given); asserts
    that the run left nothing behind. `setup` gets the workspace before the run.
    `fakenet_ca=False` leaves out `--extra-ca` with the fake internet's CA, so that a
    pass-through run gets no CA bundle or variables from sandgate. `dns_upstream`
    replaces the fake internet's DNS server (a test's own, for names outside .test).
    `workdir`: an earlier run's (`result.steps_dir.parent`), to run in its workspace
    again (its audit log then holds both runs' events)."""
    workdir = workdir or _workdir(tmp_path)
    if setup is not None:
        setup(workdir / "steps")
    steps_dir = None
    if steps is not None:
        steps_dir = workdir / "steps"
        command = ["sh", "-c", _script(steps, steps_dir)]
    assert command, "give steps or a command"
    argv = _argv(fakenet, workdir, command, rules, extra, fakenet_ca, dns_upstream)
    proc = fakenet.run_in_host(argv, timeout=timeout, env=env)
    result = _result(proc.returncode, proc.stdout, proc.stderr, workdir, steps_dir)
    assert not (left := leftovers(fakenet, result.run_id)), f"{left}\n{result.describe()}"
    return result


def start(
    fakenet,
    tmp_path: Path,
    script: str | None = None,
    *,
    steps: dict[str, str] | None = None,
    rules: Path = DEMO_RULES,
    host_mounts: bool = False,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    setup: Callable[[Path], None] | None = None,
    stderr: int = subprocess.PIPE,
) -> Started:
    """`sandgate run -- sh -c script` in the background; the caller finishes or kills it.

    `ip netns exec` gives sandgate a mount namespace of its own, so the bind mount
    that keeps /run/netns/sg-<id> alive lives and dies with it. `host_mounts` starts
    it with `nsenter --net` instead, in the test's mount namespace, as on a real
    host: then a SIGKILLed run leaves its netns behind, which is what gc is for.
    `steps`, `env` and `setup` as for `run` (`finish` reads the steps' results).
    `stderr`: sandgate's (a descriptor), instead of a pipe `finish` reads.
    """
    workdir = _workdir(tmp_path)
    if setup is not None:
        setup(workdir / "steps")
    steps_dir = None
    if steps is not None:
        steps_dir = workdir / "steps"
        script = _script(steps, steps_dir)
    assert script, "give a script or steps"
    argv = _argv(fakenet, workdir, ["sh", "-c", script], rules, extra)
    pipes = {"stdout": subprocess.PIPE, "stderr": stderr, "stdin": subprocess.DEVNULL}
    if host_mounts:
        enter = ["nsenter", f"--net={NETNS_DIR / fakenet.host_ns}", "--"]
        popen = subprocess.Popen(enter + argv, text=True, env=env, **pipes)
    else:
        popen = fakenet.popen_in_host(argv, text=True, env=env, **pipes)
    return Started(popen, fakenet, workdir, steps_dir)


def shared_dir(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    """A directory the task and the test both see (`--rw`), apart from the run's audit log."""
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    return shared, ("--rw", str(shared))


def gc(fakenet, *args: str) -> subprocess.CompletedProcess:
    """`sandgate gc` in the host netns and the test's mount namespace (see `start`)."""
    argv = ["nsenter", f"--net={NETNS_DIR / fakenet.host_ns}", "--", SANDGATE, "gc", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _result(
    returncode: int, stdout: str, stderr: str, workdir: Path, steps_dir: Path | None
) -> RunResult:
    summary_path, audit_path = workdir / "summary.json", workdir / "audit.jsonl"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    audit = []
    if audit_path.exists():
        audit = [json.loads(line) for line in audit_path.read_text().splitlines() if line]
    result = RunResult(returncode, stdout, stderr, summary, audit, steps_dir=workdir / "steps")
    if steps_dir is not None:
        for rc_file in sorted(steps_dir.glob("*.rc"), key=lambda f: f.stat().st_mtime_ns):
            label = rc_file.stem
            rc, ms = map(int, rc_file.read_text().split())
            result.steps[label] = Step(
                rc,
                (steps_dir / f"{label}.out").read_text(errors="replace"),
                (steps_dir / f"{label}.err").read_text(errors="replace"),
                ms,
            )
    return result


# --- what a run may leave behind ---------------------------------------------------


def leftovers(fakenet, run_id: str) -> list[str]:
    """What of run `run_id` still exists: its netns, veth, nft table, task cgroup,
    state dir, or a process (the sandbox init has the id in its argv, the task in its
    env)."""
    found = []
    released = not (NETNS_DIR / f"sg-{run_id}").exists()
    if not released:
        found.append(f"netns sg-{run_id}")

    def veth_gone() -> bool:
        return fakenet.run_in_host(["ip", "link", "show", f"sgh-{run_id}"]).returncode != 0

    # A released netns (its name removed: netns.release_sandbox_net) and its veth are
    # the kernel's to delete, in its cleanup worker moments after the run: waited for.
    if not (eventually(veth_gone, timeout=20) if released else veth_gone()):
        found.append(f"veth sgh-{run_id}")
    tables = fakenet.run_in_host(["nft", "list", "tables"], check=True).stdout
    if f"sandgate_{run_id}" in tables.split():
        found.append(f"nft table sandgate_{run_id}")
    found += [f"cgroup {path}" for path in cgroups_of(run_id)]
    if (RUN_DIR / run_id).exists():
        found.append(f"state {RUN_DIR / run_id}")
    found += [f"process {pid}: {what}" for pid, what in processes_of(run_id)]
    return found


def cgroups_of(run_id: str) -> list[Path]:
    """The task cgroups of run `run_id` (`sandgate-<id>`), in every hierarchy (a v1
    one may hold them a few levels down, under the host's own cgroup)."""
    return list(CGROUP_ROOT.glob(f"*/**/sandgate-{run_id}"))


def id_slots_held(pid: int) -> dict[str, dict]:
    """The id slots whose record names `pid` (enforcer/sandbox/id_slots.py: a lock
    file per slot, `{"pid", "cgroups"}` while its holder runs or after it died with
    its task's processes maybe left; empty once freed): file name -> record."""
    held = {}
    for lock in ID_SLOT_DIR.glob("*"):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(lock.read_text() or "{}")
            if record.get("pid") == pid:
                held[lock.name] = record
    return held


def run_dirs_held(pid: int) -> list[Path]:
    """The run dirs whose pid file names `pid` as the run's runner (a test that
    attaches by itself names its own process)."""
    held = []
    for pid_file in RUN_DIR.glob("*/pid"):
        with contextlib.suppress(OSError, ValueError):
            if pid_file.read_text().split()[0] == str(pid):
                held.append(pid_file.parent)
    return held


def processes_of(run_id: str) -> list[tuple[int, str]]:
    """Live processes that belong to run `run_id` (zombies have no cmdline: skipped)."""
    marks = (f"sg-{run_id}".encode(), f"SANDGATE_TASK_ID={run_id}".encode())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if cmdline and any(m in cmdline or m in environ for m in marks):
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]))
    return found


def netns_inode(path: str | Path) -> int | None:
    """The inode that identifies the network namespace at `path` (a /run/netns
    file or /proc/<pid>/ns/net), or None if there is none."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_netns(inode: int) -> list[int]:
    """Pids of the live processes whose network namespace has this inode."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and netns_inode(f"/proc/{entry}/ns/net") == inode
    ]


def eventually(probe, timeout: float = 3.0, interval: float = 0.02):
    """Poll until probe() is truthy (or time is up); returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


# --- a listener that only counts, in the fake internet -----------------------------

_SINK = r"""
import socket, sys, threading
ip, port, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind((ip, port))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); tcp.bind((ip, port)); tcp.listen(16)
def serve_udp():
    while True:
        data, peer = udp.recvfrom(65536); log.write(f"udp {peer[0]}\n")
def serve_tcp():
    while True:
        conn, peer = tcp.accept(); log.write(f"tcp {peer[0]}\n"); conn.close()
threading.Thread(target=serve_udp, daemon=True).start()
threading.Thread(target=serve_tcp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


@contextlib.contextmanager
def sink(fakenet, ip: str, port: int, log: Path) -> Iterator[Callable[[], list[str]]]:
    """UDP and TCP listener on ip:port in the fake internet that answers nothing
    and logs every datagram and connection; yields a function returning the log lines."""
    log.touch()
    argv = ["ip", "netns", "exec", fakenet.internet_ns, PYTHON, "-I", "-S", "-c", _SINK]
    argv += [ip, str(port), str(log)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", f"sink on {ip}:{port} did not start"
        yield lambda: log.read_text().splitlines()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
