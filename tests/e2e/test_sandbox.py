"""The task sandbox end to end (issue 8): a hostile task in a real `sandgate run`.

Each test lets the task try what a hostile task would (write the host, read its
secrets, keep root's powers, inherit the caller's keys, outgrow its limits) and
asserts both sides: what the task saw inside, and that nothing happened on the host
(the canary file does not exist, the owner is right, the limit event is there).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sandgate.enforcer.priority import GATEWAY_NICE
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SITE_PACKAGES = Path(next(p for p in sys.path if p.endswith("site-packages")))
STATE_DIR = Path(os.environ.get("SANDGATE_STATE_DIR", "/var/lib/sandgate"))
TASK_ROOT = 2_000_000_000  # the lowest host id of a task's root (docs/sandbox.md)


@pytest.fixture
def net(fakenet):
    fakenet.clear_logs()
    return fakenet


def _touch(path: str) -> str:
    return f"echo owned > {path}"


def test_host_is_read_only_and_nothing_the_task_writes_outside_the_workspace_survives(
    net, tmp_path
):
    tag = secrets.token_hex(4)
    host_targets = {
        "etc_cron": f"/etc/cron.d/sg-canary-{tag}",
        "usr_local": f"/usr/local/bin/sg-canary-{tag}",
        "site_pth": f"{SITE_PACKAGES}/sg-canary-{tag}.pth",
        "gateway_code": f"{REPO}/proxy/sg_canary_{tag}.py",
        "state": f"{STATE_DIR}/sg-canary-{tag}",
    }
    scratch = {
        "tmp": f"/tmp/sg-canary-{tag}",
        "var_tmp": f"/var/tmp/sg-canary-{tag}",
        "dev_shm": f"/dev/shm/sg-canary-{tag}",
        "home": f"$HOME/.sg-canary-{tag}",
        "root_home": f"/root/.sg-canary-{tag}",
        "run": f"/run/sg-canary-{tag}",
    }
    steps = {label: _touch(path) for label, path in {**host_targets, **scratch}.items()}
    steps["workspace"] = _touch(f"ws-{tag}")
    steps["cat_back"] = f"cat /tmp/sg-canary-{tag} $HOME/.sg-canary-{tag}"
    r = sandbox.run(net, tmp_path, steps)
    for label in host_targets:
        assert r[label].rc != 0, f"{label}: {r.describe()}"
        # Read-only, not ours, or not even there (a checkout under /tmp is behind the fresh /tmp).
        held = ("Read-only file system", "Permission denied", "Directory nonexistent")
        assert any(why in r[label].err for why in held), r[label].err
    for label in (*scratch, "workspace", "cat_back"):
        assert r[label].rc == 0, f"{label}: {r.describe()}"
    # On the host: no canary anywhere, scratch space included (it was the sandbox's own).
    for path in [*host_targets.values(), *scratch.values()]:
        host_path = path.replace("$HOME", "/root")
        assert not os.path.lexists(host_path), f"{host_path} exists on the host"
    assert (r.steps_dir / f"ws-{tag}").read_text() == "owned\n"


def test_the_hosts_secrets_and_sandgates_state_are_not_readable(net, tmp_path):
    r = sandbox.run(
        net,
        tmp_path,
        {
            "shadow": "cat /etc/shadow",
            "root_home": "ls -A /root",
            "state": f"ls -A {STATE_DIR}",
            "ca_key": f"cat {STATE_DIR}/ca/mitmproxy-ca.pem",
            "run_dir": "ls -A /run",
            "netns_files": "ls /run/netns",
        },
    )
    assert r["shadow"].rc != 0 and "Permission denied" in r["shadow"].err
    assert r["root_home"].rc == 0 and r["root_home"].out == ""  # a fresh, empty home
    assert r["state"].rc != 0 or r["state"].out == ""
    assert r["ca_key"].rc != 0 and "PRIVATE KEY" not in r["ca_key"].out
    assert r["run_dir"].out == ""
    assert r["netns_files"].rc != 0


def test_the_task_holds_no_privilege_on_the_host(net, tmp_path):
    r = sandbox.run(
        net,
        tmp_path,
        {
            "uid_map": "cat /proc/self/uid_map",
            "whoami": "id -u",
            "status": "grep -E '^(NoNewPrivs|Seccomp|CapBnd)' /proc/self/status",
            "packet_socket": python(
                "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)"
            ),
            "raw_icmp": python(
                "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)"
            ),
            "nested_userns": "unshare -U true",
            "nested_netns": "unshare -n true",
            "keyctl": python(
                "import ctypes; l = ctypes.CDLL(None, use_errno=True); "
                "r = l.syscall(250, 0, 0, 0, 0, 0); print(r, ctypes.get_errno())"
            ),
            "mount": "mount -t tmpfs none /mnt",
            "ip_link": "ip link set lo mtu 1400",
            "chown_host_file": "chown 0 /etc/hostname",
            "processes": "ps -e -o pid= | wc -l",
            "scheduling": "chrt -p $$",
            "nice": "ps -o ni= -p $$",
            "nice_lower": python("import os; os.setpriority(os.PRIO_PROCESS, 0, -5)"),
        },
    )
    base, count = r["uid_map"].out.split()[1:3]
    # a slot of the pool: its own range, not necessarily the first (enforcer/sandbox/id_slots.py)
    assert int(base) >= TASK_ROOT and (int(base) - TASK_ROOT) % 65536 == 0, r["uid_map"].out
    assert int(count) == 65536, r["uid_map"].out
    assert r["whoami"].out.strip() == "0"  # root inside, owner of nothing outside
    assert "NoNewPrivs:\t1" in r["status"].out and "Seccomp:\t2" in r["status"].out
    for label in (
        "packet_socket",
        "raw_icmp",
        "nested_userns",
        "nested_netns",
        "mount",
        "ip_link",
        "chown_host_file",
    ):
        assert r[label].rc != 0, f"{label}: {r.describe()}"
    assert r["keyctl"].out.split() == ["-1", "1"]  # EPERM from the seccomp filter
    assert int(r["processes"].out) <= 5  # its own PID namespace: init, sh, ps (and wc)
    # batch work: its wake-ups do not preempt the gateway (sandbox/init.py)
    assert "policy: SCHED_BATCH" in r["scheduling"].out, r.describe()
    # below its gateway (enforcer/priority.py), with no way back up
    assert r["nice"].out.strip() == "0", r.describe()
    assert r["nice_lower"].rc != 0 and "PermissionError" in r["nice_lower"].err, r.describe()
    assert not (r.steps_dir / "hostname").exists()


def test_the_environment_is_clean(net, tmp_path):
    env_file = tmp_path / "task.env"
    env_file.write_text("# for the task\nFROM_FILE=file-value\n")
    caller = {
        **os.environ,
        "AWS_SECRET_ACCESS_KEY": "sg-secret",
        "SSH_AUTH_SOCK": "/tmp/agent.sock",
        "GITHUB_TOKEN": "sg-token",
        "PASS_ME": "passed",
        "LANG": "C.UTF-8",
    }
    r = sandbox.run(
        net,
        tmp_path,
        {"env": "env"},
        env=caller,
        extra=("--env", "PASS_ME", "--env", "SET_ME=set", "--env-file", str(env_file)),
    )
    env = dict(line.split("=", 1) for line in r["env"].out.splitlines() if "=" in line)
    for secret in ("AWS_SECRET_ACCESS_KEY", "SSH_AUTH_SOCK", "GITHUB_TOKEN"):
        assert secret not in env, r["env"].out
    assert "sg-secret" not in r["env"].out and "sg-token" not in r["env"].out
    assert (
        env["PASS_ME"] == "passed" and env["SET_ME"] == "set" and env["FROM_FILE"] == "file-value"
    )
    assert env["HOME"] == "/root" and env["USER"] == "root" and env["LANG"] == "C.UTF-8"
    assert env["SANDGATE_TASK_ID"] == r.run_id


def test_workspace_files_land_owned_by_the_directorys_owner(net, tmp_path):
    for user in ("0", "1000"):
        r = sandbox.run(
            net,
            tmp_path,
            {"create": f"echo {user} > by-{user}; mkdir dir-{user}; id -u"},
            extra=("--user", user),
            setup=lambda steps: os.chown(steps, 4321, 4321),
        )
        assert r["create"].rc == 0, r.describe()
        assert r["create"].out.strip() == user
        for name in (f"by-{user}", f"dir-{user}"):
            st = (r.steps_dir / name).stat()
            assert (st.st_uid, st.st_gid) == (4321, 4321), f"{name}: {st.st_uid}"


def test_a_repository_of_another_owner_keeps_its_own_id_mapping(net, tmp_path):
    """The workspace, a repository's pinned git directory and its read-only control
    files are idmapped binds, with one user namespace per owner (init.build_view): a
    git directory another user owns shows inside as the task's, as the workspace
    does, not as nobody's; what the task writes in each lands owned by its owner."""

    def setup(workspace: Path) -> None:
        os.chown(workspace, 4321, 4321)
        git_dir = workspace / "repo" / ".git"
        subprocess.run(["git", "init", "-q", str(git_dir.parent)], check=True)
        for path in [git_dir, *git_dir.rglob("*")]:
            os.lchown(path, 4322, 4322)

    r = sandbox.run(
        net,
        tmp_path,
        {
            "owners": "stat -c %u . repo/.git repo/.git/config repo/.git/hooks",
            "write": "echo ws > by-task && echo git > repo/.git/by-task",
        },
        setup=setup,
    )
    assert r["owners"].rc == 0 and r["write"].rc == 0, r.describe()
    assert r["owners"].out.split() == ["0", "0", "0", "0"], r["owners"].out
    assert (r.steps_dir / "by-task").stat().st_uid == 4321
    assert (r.steps_dir / "repo" / ".git" / "by-task").stat().st_uid == 4322


@pytest.mark.parametrize(
    ("workspace", "message"),
    [
        pytest.param("/", "refusing to give a task / read-write", id="root"),
        pytest.param("/etc", "refusing a system directory (/etc)", id="etc"),
        pytest.param("/usr/lib", "refusing a system directory (/usr)", id="usr-lib"),
        pytest.param("/root", "refusing to give a task /root read-write", id="root-home"),
        pytest.param(str(SITE_PACKAGES), "sandgate's own files", id="site-packages"),
        pytest.param(str(REPO / "proxy"), "sandgate's own files", id="gateway-code"),
        pytest.param("/nonexistent-sg", "No such file or directory", id="missing"),
    ],
)
def test_dangerous_workspaces_are_refused(net, workspace, message):
    proc = net.run_in_host([sandbox.SANDGATE, "run", "--workspace", workspace, "--", "true"])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_fork_bomb_hits_the_pids_limit(net, tmp_path):
    r = sandbox.run(net, tmp_path, {"bomb": sandbox.fork_bomb()}, extra=("--pids", "64"))
    refused, errno_, children = r["bomb"].out.split()
    assert refused == "refused" and errno_ == "11" and int(children) < 64, r.describe()
    hits = r.events(reason="task_limit")
    assert hits and hits[0]["rule_id"] == "builtin:limit-pids", r.describe()


def test_a_memory_hog_is_killed_at_its_limit(net, tmp_path):
    r = sandbox.run(
        net,
        tmp_path,
        {"hog": sandbox.memory_hog(), "after": "echo still-here"},
        extra=("--memory", "128M"),
    )
    assert r["hog"].rc == 137 and "survived" not in r["hog"].out, (
        r.describe()
    )  # SIGKILL by the OOM killer
    assert r["after"].out.strip() == "still-here"
    assert any(e["rule_id"] == "builtin:limit-memory" for e in r.events(reason="task_limit")), (
        r.describe()
    )


def test_agent_jobs_still_work(net, tmp_path):
    r = sandbox.run(
        net,
        tmp_path,
        {
            "venv": "python3 -m venv venv && ./venv/bin/python -c 'print(42)'",
            "git": "git init -q repo && cd repo && git -c user.email=a@b -c user.name=a commit -q --allow-empty -m x "
            "&& git log --oneline | wc -l",
            "compile": "printf 'int main(){return 7;}' > /tmp/m.c && cc -o m /tmp/m.c && ./m; echo $?",
            "pty": python("import os; print(len(os.openpty()))"),
            "as_1000": "true",
        },
    )
    assert r["venv"].out.strip() == "42", r.describe()
    assert r["git"].out.strip() == "1", r.describe()
    assert r["compile"].out.strip() == "7", r.describe()
    assert r["pty"].out.strip() == "2", r.describe()
    r = sandbox.run(
        net,
        tmp_path,
        {"venv": "python3 -m venv v && ./v/bin/python -c 'import os; print(os.getuid())'"},
        extra=("--user", "1000"),
    )
    assert r["venv"].out.strip() == "1000", r.describe()


def test_self_test_flag_and_selftest_command(net, tmp_path):
    r = sandbox.run(net, tmp_path, command=["true"], extra=("--self-test",))
    assert r.returncode == 0, r.describe()
    proc = net.run_in_host(
        [
            sandbox.SANDGATE,
            "selftest",
            "--json",
            "--rules",
            str(sandbox.DEMO_RULES),
            "--dns-upstream",
            net.dns_ip,
        ],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)["probes"]
    assert len(results) >= 15 and all(p["ok"] for p in results), proc.stdout
    names = {p["probe"] for p in results}
    assert {
        "direct TCP to a denied address",
        "UDP/QUIC",
        "IPv6",
        "cloud metadata (169.254.169.254)",
        "outside resolver",
        "no capability on the host",
        "seccomp filter",
    } <= names


def _sandgate_mounts(run_id: str) -> list[str]:
    """Mounts on the host that a run could have left: its own, or sandgate's cgroup mounts.
    (Not every mount: other tests and tools on the machine mount and unmount too.)"""
    targets = subprocess.run(
        ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True
    ).stdout
    return [m for m in targets.splitlines() if run_id in m or "sandgate" in m]


def test_sandbox_leaves_no_process_mount_or_cgroup(net, tmp_path):
    r = sandbox.run(
        net, tmp_path, {"sleep": "sleep 0.1 & echo started; grep -c . /proc/self/mounts"}
    )
    assert (
        r.returncode == 0 and int(r["sleep"].out.split()[-1]) > 5
    )  # the sandbox had its own mounts
    assert _sandgate_mounts(r.run_id) == []
    assert not sandbox.cgroups_of(r.run_id)
    assert not sandbox.processes_of(r.run_id)


@pytest.mark.parametrize(
    ("command", "code"),
    [
        pytest.param(["/nonexistent-sg-command"], 127, id="command-not-found"),
        pytest.param(["sh", "-c", "kill -KILL $$"], 137, id="task-killed"),
    ],
)
def test_a_failed_task_leaves_no_cgroup(net, tmp_path, command, code):
    r = sandbox.run(net, tmp_path, command=command)
    assert r.returncode == code, r.describe()
    assert not sandbox.cgroups_of(r.run_id)


def test_a_setup_that_fails_after_the_init_is_forked_leaves_no_cgroup(net, tmp_path):
    """An embedded run forks its init ahead into the task's cgroup once its netns is
    made (enforcer/run.py, `_init_seed`). A setup that fails after that (here: a
    repository whose config names the workspace itself as its hooks, refused as the
    sandbox is prepared) ends that init and removes its cgroup."""

    def hooks_at_the_root(workspace: Path) -> None:
        subprocess.run(["git", "init", "-q", str(workspace / "repo")], check=True)
        subprocess.run(
            ["git", "-C", str(workspace / "repo"), "config", "core.hooksPath", str(workspace)],
            check=True,
        )

    workdir = sandbox._workdir(tmp_path)
    hooks_at_the_root(workdir / "steps")
    # Compared with what was there before: another test's run may still be ending.
    before = (
        set(sandbox.cgroups_of("*")),
        set(sandbox.NETNS_DIR.glob("sg-*")),
        set(sandbox.RUN_DIR.glob("*/sandbox.json")),
    )
    argv = sandbox._argv(net, workdir, ["true"], sandbox.DEMO_RULES, ())
    proc = net.run_in_host(argv)
    assert proc.returncode == 125, proc.stderr
    assert "a writable root" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert set(sandbox.cgroups_of("*")) <= before[0], "the task's cgroup was left"
    assert set(sandbox.NETNS_DIR.glob("sg-*")) <= before[1], "its netns was left"
    assert set(sandbox.RUN_DIR.glob("*/sandbox.json")) <= before[2], "a state dir was left"


def test_an_embedded_task_inherits_nothing_of_its_init(net, tmp_path):
    """The embedded run's init is started ahead, as an interpreter of its own, holding
    the stop signals while it waits (attach.InitSeed.spawn): the sandbox's PID 1 blocks
    none of them once it runs the task (its stop signals reach the task), and the task
    gets only stdio, no blocked or ignored signal (glibc's posix_spawn would leave it
    two ignored: 32 and 33), and its own cgroup as its root."""
    steps = {
        "fds": "ls /proc/self/fd | sort -n | tr '\\n' ' '",
        "signals": "grep -E 'SigBlk|SigIgn' /proc/self/status",
        "init_blocks": "grep SigBlk /proc/1/status",
        "cgroup": "cat /proc/self/cgroup",
    }
    r = sandbox.run(net, tmp_path, steps)
    assert r.returncode == 0, r.describe()
    # 0-2, and the descriptor `ls` opens on /proc/self/fd itself
    assert r["fds"].out.split() == ["0", "1", "2", "3"], r["fds"].out
    assert r["signals"].out.split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]
    assert r["init_blocks"].out.split() == ["SigBlk:", "0" * 16]
    assert all(line.endswith(":/") for line in r["cgroup"].out.split()), r["cgroup"].out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_run_killed_while_its_init_waits_leaves_no_init(net, tmp_path):
    """The init starts as the run begins and waits through the run's imports and
    setup for its cgroup and its spec; a run SIGKILLed meanwhile takes it along
    (PR_SET_PDEATHSIG, or the end of file on its socket), and gc leaves nothing."""
    started = sandbox.start(net, tmp_path, "exit 0")
    seed, deadline = None, time.monotonic() + 20
    while seed is None and time.monotonic() < deadline and started.popen.poll() is None:
        for child in _children(started.pid):
            with contextlib.suppress(OSError):
                if b"--seed" in Path(f"/proc/{child}/cmdline").read_bytes():
                    seed = child
        time.sleep(0.002)
    assert seed is not None, "no init was started ahead"
    started.kill()  # SIGKILL, while the run imports and sets up
    deadline = time.monotonic() + 5
    while _running(seed) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _running(seed), Path(f"/proc/{seed}/cmdline").read_bytes()
    assert sandbox.gc(net).returncode == 0


def test_gc_removes_an_empty_task_cgroup_that_no_run_owns(net):
    from sandgate.enforcer.sandbox.cgroup import Limits, TaskCgroup

    orphan_id = secrets.token_hex(4)
    TaskCgroup.create(f"sandgate-{orphan_id}", Limits(memory_bytes=64 << 20, pids=16))
    assert sandbox.cgroups_of(orphan_id)
    removed = sandbox.gc(net)
    assert removed.returncode == 0, removed.stderr
    assert f"sandgate-{orphan_id}" in removed.stdout
    assert not sandbox.cgroups_of(orphan_id)


def _nice(pid: int) -> int | None:
    """A process's (or thread's) nice value; None if it went meanwhile."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    except OSError:
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # it went meanwhile
        return ""


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    children = _children(pid)  # one that went meanwhile (the init's helpers) has none
    return children + [d for c in children for d in _descendants(c)]


def test_the_gateway_outranks_its_task_for_the_cpu(net, tmp_path):
    """The gateway's threads at nice GATEWAY_NICE, the task at 0 (enforcer/priority.py):
    busy tasks cannot starve the gateway every sandbox's connections go through."""
    started = sandbox.start(net, tmp_path, "exec sleep 5")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sleeps = [p for p in _descendants(started.pid) if _comm(p) == "sleep"]
            if sleeps:
                break
            time.sleep(0.05)
        assert sleeps, "the task never started"
        gateway_threads = [int(t) for t in os.listdir(f"/proc/{started.pid}/task")]
        assert {_nice(t) for t in gateway_threads} - {None} == {GATEWAY_NICE}
        assert _nice(sleeps[0]) == 0
    finally:
        result = started.finish()
    assert result.returncode == 0, result.describe()


# Each name's errno on open (or "opened"), and the mount options of each directory
# given (mountinfo's per-mount options, of the mount at that very path).
DEVICE_PROBE = r"""
import errno, json, os, sys
seen = {}
for path in [os.getcwd(), *sys.argv[1:]]:
    for name in ("any_null", "owners_zero"):
        try:
            os.close(os.open(os.path.join(path, name), os.O_RDWR))
            seen[f"{path}/{name}"] = "opened"
        except OSError as e:
            seen[f"{path}/{name}"] = errno.errorcode[e.errno]
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4] == path:
            seen[path] = sorted(fields[5].split(","))
print(json.dumps(seen))
"""


def test_device_nodes_in_the_workspace_and_rw_paths_are_inert(net, tmp_path):
    """A device node the host left in a writable root (a rootfs unpacked as root):
    /dev/null's numbers with mode 0666, /dev/zero's with 0600 of the workspace's owner
    (through the idmap, the task's root's). Both opened before (the host's devices):
    the binds kept the host mount's flags. Now every bind is nosuid,nodev: EACCES."""
    shared, rw = sandbox.shared_dir(tmp_path)

    def plant(workspace: Path) -> None:
        for where in (workspace, shared):
            os.mknod(where / "any_null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            os.chmod(where / "any_null", 0o666)
            os.mknod(where / "owners_zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))

    try:
        r = sandbox.run(
            net,
            tmp_path,
            command=["/usr/bin/python3", "-c", DEVICE_PROBE, str(shared)],
            extra=rw,
            setup=plant,
        )
    finally:
        for node in shared.glob("*_*"):
            node.unlink()
    assert r.returncode == 0, r.describe()
    seen = json.loads(r.stdout)
    workspace = str(r.steps_dir)
    assert {k: v for k, v in seen.items() if "_" in k.rsplit("/", 1)[-1]} == {
        f"{where}/{name}": "EACCES"
        for where in (workspace, str(shared))
        for name in ("any_null", "owners_zero")
    }, seen
    for where in (workspace, str(shared)):
        assert {"nosuid", "nodev", "rw"} <= set(seen[where]), seen


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param(("--memory", "none", "--pids", "none"), id="forked-init"),
        pytest.param((), id="spawned-init"),
    ],
)
def test_pid_1_does_not_show_the_runners_command_line(net, tmp_path, limits):
    """Without cgroup limits the init is a fork of the runner, and /proc/1/cmdline
    (not ptrace-protected) showed the runner's whole command line: an approval
    webhook's URL, --env values, file paths. Now a forked init shows `sandgate-init`."""
    token = secrets.token_hex(8)
    r = sandbox.run(
        net,
        tmp_path,
        command=["/usr/bin/python3", "-c", "print(open('/proc/1/cmdline', 'rb').read().hex())"],
        extra=(*limits, "--env", f"SECRETX={token}"),
    )
    assert r.returncode == 0, r.describe()
    shown = bytes.fromhex(r.stdout.strip()).replace(b"\0", b" ").decode().strip()
    assert shown, r.describe()  # PID 1's command line was read: sandgate-init, or init.py's
    assert token not in shown, shown
    assert "SECRETX" not in shown and "--env" not in shown, shown
