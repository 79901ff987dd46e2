"""What a task can learn about the other tasks on its host and about sandgate itself.

Task B runs with a distinctive marker everywhere it can put one: its run id (in its
netns, host veth, cgroup and hostname), a `--rw` directory, a name it resolves, its
process name (comm), an abstract unix socket, files in /dev/shm and /tmp, and 32 MiB
of memory in its cgroup. While B waits, task A looks for B's markers where a task on
a shared host could see them (sysfs's network devices, the cgroup tree, the mount
table, /proc/net, the kernel's timer and scheduler lists, keys, /dev/shm, /run) and
for what Docker masks (its MaskedPaths and ReadonlyPaths), and checks that its own
view still works: its interfaces, its own cgroup and memory limit, the CPU count
and memory that `nproc`, `free` and Python report. After B ends, nothing of B is
left on the host (veth, cgroup) and the next task finds none of its markers either.

What stays visible on purpose (system-wide load, uptime, pressure, memory totals)
is in docs/threat-model.md. DNS bindings and a task's leftovers on a gateway
service are in test_task_reuse.py.
"""

from __future__ import annotations

import json
import secrets

import pytest
from sandgate.enforcer.sandbox import cgroup, init
from support import sandbox
from support.sandbox import dig, eventually, python

pytestmark = pytest.mark.e2e

A_MEMORY = 300 << 20

# B: its marker as process name, abstract socket, /dev/shm and /tmp files; 32 MiB
# held; "up" in its workspace once all is in place, then waits for "done".
HOLD_MARKERS = """
    import ctypes, os, socket, sys, time
    marker = sys.argv[1]
    ctypes.CDLL(None).prctl(15, marker.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("\\0" + marker)
    listener.listen()
    for folder in ("/dev/shm", "/tmp"):
        with open(f"{folder}/{marker}", "w") as f:
            f.write(marker)
    ballast = bytearray(32 << 20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    open("up", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists("done") and time.monotonic() < deadline:
        time.sleep(0.05)
"""

# A: every place named in the module docstring, for any of argv's markers (argv's
# paths: Docker's masked paths). Prints JSON: where a marker was found, what the
# masked paths show, the interfaces in sysfs and in the kernel's view (netlink).
LOOK_FOR_MARKERS = """
    import json, os, socket, sys
    markers = [m.encode() for m in sys.argv[1:] if not m.startswith("/")]
    found = []
    def check(where, data):
        found.extend(f"{where}: {m.decode()}" for m in markers if m in data)
    def names(root):
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                check(f"{folder}/{name}", f"{folder}/{name}".encode())
    def content(path):
        try:
            with open(path, "rb") as f:
                data = f.read(8 << 20)
        except OSError:
            return None
        check(f"content {path}", data)
        return data
    for root in ("/sys/class/net", "/sys/devices/virtual/net", "/sys/fs/cgroup",
                 "/dev/shm", "/tmp", "/var/tmp", "/run", "/var/lib/sandgate"):
        names(root)
    for path in ("/proc/self/mountinfo", "/proc/mounts", "/proc/self/mountstats",
                 "/proc/self/cgroup", "/proc/keys", "/proc/key-users", "/proc/timer_list",
                 "/proc/sched_debug", "/proc/interrupts", "/etc/hosts", "/etc/hostname"):
        content(path)
    for folder in ("/proc/self/net", "/proc/self/net/stat", "/proc/pressure"):
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if os.path.isfile(f"{folder}/{name}"):
                content(f"{folder}/{name}")
    def shown(path):
        # What a masked path shows: absent, empty (masked), denied, or its content.
        if not os.path.lexists(path):
            return "absent"
        try:
            if os.path.isdir(path):
                return "content" if os.listdir(path) else "empty"
            with open(path, "rb") as f:
                return "content" if f.read(1) else "empty"
        except OSError:
            return "denied"
    masked = {p: shown(p) for p in sys.argv[1:] if p.startswith("/")}
    for m in markers:  # B's abstract socket: another network namespace's
        with socket.socket(socket.AF_UNIX) as s:
            if s.connect_ex(b"\\0" + m) == 0:
                found.append(f"abstract socket @{m.decode()} reached")
    def ifindex(name):
        with open(f"/sys/class/net/{name}/ifindex") as f:
            return int(f.read())
    print(json.dumps({
        "found": found, "masked": masked,
        "sysfs": sorted([ifindex(n), n] for n in os.listdir("/sys/class/net")),
        "netlink": sorted([i, n] for i, n in socket.if_nameindex()),
    }))
"""

# A's own view: its cgroup, its memory limit where tools look for it, CPU and memory.
OWN_VIEW = """
    import json, os, subprocess, sys
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as e:
            return f"error {e.errno}"
    limit = read("/sys/fs/cgroup/memory.max")
    if limit.startswith("error"):
        limit = read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    # Docker's ReadonlyPaths (argv): on a read-only mount, not only refused by owner.
    read_write = [p for p in sys.argv[1:]
                  if os.path.exists(p) and not os.statvfs(p).f_flag & os.ST_RDONLY]
    print(json.dumps({
        "cgroup": read("/proc/self/cgroup"),
        "memory_limit": limit,
        "cpu_count": os.cpu_count(),
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "free": subprocess.run(["free", "-b"], capture_output=True, text=True).stdout,
        "net_dev": read("/proc/self/net/dev"),
        "read_write": read_write,
    }))
"""

# Docker's MaskedPaths as the sandbox lists them (its ReadonlyPaths: `read_write` above).
DOCKER_MASKED = init.PROC_MASKED + init.SYS_MASKED


def _marker() -> str:
    return "pview" + secrets.token_hex(4)  # 13 characters: fits a process name


# Both run as on a real host (`host_mounts`): `ip netns exec` would give each its own
# sysfs, without the host's cgroup mounts, and hide what a task on a host sees.


def _start_b(net, tmp_path, marker: str) -> tuple[sandbox.Started, str]:
    rw = tmp_path / f"{marker}-rw"
    rw.mkdir()
    b = sandbox.start(
        net,
        tmp_path,
        steps={"resolve": dig(f"{marker}.allowed.test"), "hold": python(HOLD_MARKERS, marker)},
        extra=("--rw", str(rw)),
        host_mounts=True,
    )
    up = b.steps_dir / "up"
    assert eventually(up.exists, timeout=30), "B never came up"
    return b, b.run_id()


def _look(net, tmp_path, markers: list[str]) -> sandbox.RunResult:
    steps = {
        "look": python(LOOK_FOR_MARKERS, *markers, *DOCKER_MASKED),
        "own": python(OWN_VIEW, *init.PROC_READ_ONLY),
    }
    a = sandbox.start(
        net, tmp_path, steps=steps, extra=("--memory", str(A_MEMORY)), host_mounts=True
    )
    result = a.finish()
    assert result.returncode == 0, result.describe()
    assert sandbox.leftovers(net, result.run_id) == []
    assert result["look"].rc == 0 and result["own"].rc == 0, result.describe()
    return result


def test_a_task_sees_nothing_of_another_task_and_its_own_view_works(net, tmp_path):
    marker = _marker()
    b, b_id = _start_b(net, tmp_path, marker)
    try:
        a = _look(net, tmp_path, [marker, b_id])
    finally:
        (b.steps_dir / "done").touch()
        b_result = b.finish()
    assert b_result.returncode == 0, b_result.describe()
    assert b_result["hold"].rc == 0, b_result.describe()
    assert b_result.events(kind="dns", name=f"{marker}.allowed.test"), b_result.describe()

    look = json.loads(a["look"].out)
    assert look["found"] == [], "\n".join(look["found"])
    # sysfs shows its own network devices (as netlink does), no host veth (sgh-...).
    assert look["sysfs"] == look["netlink"]
    assert sorted(name for _, name in look["sysfs"]) == ["eth0", "lo"]
    assert {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"} <= set(DOCKER_MASKED)
    exposed = {path: shown for path, shown in look["masked"].items() if shown == "content"}
    assert exposed == {}

    own = json.loads(a["own"].out)
    # A cgroup namespace rooted at its own cgroup, whose limit it reads where tools look.
    assert all(line.endswith(":/") for line in own["cgroup"].splitlines()), own["cgroup"]
    assert own["memory_limit"] == str(A_MEMORY)
    assert own["cpu_count"] >= 1 and own["nproc"] == str(own["cpu_count"])
    assert own["free"].splitlines()[1].split()[1].isdigit(), own["free"]
    assert "eth0:" in own["net_dev"] and "sgh-" not in own["net_dev"]
    assert own["read_write"] == []


def test_an_ended_task_leaves_nothing_for_the_next(net, tmp_path):
    marker = _marker()
    b, b_id = _start_b(net, tmp_path, marker)
    (b.steps_dir / "done").touch()
    assert b.finish().returncode == 0
    # On the host: its veth, netns, state and processes (`leftovers`), and its cgroups.
    assert sandbox.leftovers(net, b_id) == []
    assert [path for path in cgroup.leftovers() if b_id in path] == []

    look = json.loads(_look(net, tmp_path, [marker, b_id])["look"].out)
    assert look["found"] == [], "\n".join(look["found"])
