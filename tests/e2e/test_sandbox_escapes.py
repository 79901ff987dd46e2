"""A hostile task trying to reach past its sandbox: what tests/e2e/test_sandbox.py does
not already try (docs/sandbox.md). One sandbox per test, several probes per sandbox;
each probe prints what the task saw, and the test checks on the host that the effect
did not happen.

The first test is a leak that was found and closed: through the idmapped workspace, a
file the task makes is owned on the host by the directory's owner (root, here), so a
set-uid bit, a set-gid bit or a file capability the task sets there is root's power
for any host user who runs the file (`getcap` showed `cap_setuid=ep`). The seccomp
filter refuses set-id modes and root of the task no longer holds CAP_SETFCAP or
CAP_FSETID (enforcer/sandbox/seccomp.py, init.py `KEPT_CAPS`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import python
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

SET_ID = stat.S_ISUID | stat.S_ISGID
# A v2 file capability (VFS_CAP_REVISION_2 | effective) holding CAP_SETUID.
CAP_SETUID_XATTR = bytes.fromhex("0000000280000000000000000000000000000000")

# Each probe prints "NAME ok" or "NAME errno E" (the errno's name); the host side
# decides what the effect would have been.
SET_ID_PROBES = r"""
import ctypes, errno, os, stat, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
os.umask(0)
def report(name, call):
    try:
        call()
        print(name, "ok")
    except OSError as e:
        print(name, "errno", errno.errorcode.get(e.errno, e.errno))
def raw(number, *args):
    if libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)) < 0:
        raise OSError(ctypes.get_errno(), "syscall")
def touched(name):
    with open(name, "w") as f:
        f.write("#!/bin/sh\nid -u\n")
    return name
def linked_tmpfile(name, mode):
    fd = os.open(".", os.O_WRONLY | os.O_TMPFILE, mode)
    os.link(f"/proc/self/fd/{fd}", name)
def openat2(name, mode):
    how = (ctypes.c_uint64 * 3)(os.O_WRONLY | os.O_CREAT, mode, 0)
    path = ctypes.create_string_buffer(name.encode())
    raw(437, -100, ctypes.addressof(path), ctypes.addressof(how), ctypes.sizeof(how))
def fchmodat2(name, mode):
    path = ctypes.create_string_buffer(name.encode())
    raw(452, -100, ctypes.addressof(path), mode, 0)
report("chmod_suid", lambda: os.chmod(touched("chmod_suid"), 0o4755))
report("chmod_sgid", lambda: os.chmod(touched("chmod_sgid"), 0o2755))
report("fchmodat2_suid", lambda: fchmodat2(touched("fchmodat2_suid"), 0o4755))
report("open_suid", lambda: os.close(os.open("open_suid", os.O_WRONLY | os.O_CREAT, 0o4755)))
report("tmpfile_suid", lambda: linked_tmpfile("tmpfile_suid", 0o4755))
report("mknod_suid", lambda: os.mknod("mknod_suid", stat.S_IFREG | 0o4755))
report("openat2_suid", lambda: openat2("openat2_suid", 0o4755))
report("file_cap", lambda: os.setxattr(touched("file_cap"), "security.capability", bytes.fromhex(sys.argv[1])))
with open("kept_suid", "a") as f:  # a set-uid file already there, rewritten by the task
    f.write("echo planted\n")
print("kept_suid ok")
"""


def _probe_lines(out: str) -> dict[str, str]:
    return {
        line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines() if " " in line
    }


def _plant_set_uid_file(workspace: Path) -> None:
    kept = workspace / "kept_suid"
    kept.write_text("#!/bin/sh\n")
    kept.chmod(0o4755)  # root's, as a build run by root on the host could leave it


def test_no_set_id_bit_or_file_capability_reaches_the_host_through_the_workspace(net, tmp_path):
    r = sandbox.run(
        net,
        tmp_path,
        {"set_id": python(SET_ID_PROBES, CAP_SETUID_XATTR.hex()), "whoami": "id -u"},
        setup=_plant_set_uid_file,
    )
    assert r["set_id"].rc == 0 and r["whoami"].out.strip() == "0", r.describe()
    seen = _probe_lines(r["set_id"].out)
    assert set(seen) == {
        "chmod_suid",
        "chmod_sgid",
        "fchmodat2_suid",
        "open_suid",
        "tmpfile_suid",
        "mknod_suid",
        "openat2_suid",
        "file_cap",
        "kept_suid",
    }, r.describe()
    assert seen["openat2_suid"] == "errno ENOSYS"  # callers fall back to openat
    assert seen["kept_suid"] == "ok"  # writing a file is not refused: its bit goes
    for name in seen.keys() - {"openat2_suid", "kept_suid"}:
        assert seen[name] == "errno EPERM", r.describe()
    # On the host: the workspace is root's, so any set-id bit would be root's power.
    assert r.steps_dir.stat().st_uid == 0
    for path in r.steps_dir.iterdir():
        info = path.lstat()
        assert not info.st_mode & SET_ID, f"{path.name}: {oct(info.st_mode)} on the host"
        with pytest.raises(OSError) as no_capability:
            os.getxattr(path, "security.capability", follow_symlinks=False)
        assert no_capability.value.errno == errno.ENODATA, path.name
    assert (r.steps_dir / "kept_suid").read_text().endswith("echo planted\n")


def _json(step) -> dict:
    return json.loads(step.out)


def _run_refusable(net, workspace: Path, options: tuple[str, ...], script: str):
    """`sandgate run` with `options` that it may refuse (so not `sandbox.run`, which
    expects a run to have happened and its summary written)."""
    return net.run_in_host(
        [
            sandbox.SANDGATE,
            "run",
            "--rules",
            str(sandbox.DEMO_RULES),
            "--dns-upstream",
            net.dns_ip,
            "--workspace",
            str(workspace),
            *options,
            "--",
            "sh",
            "-c",
            script,
        ]  # fmt: skip
    )


@pytest.mark.parametrize(
    ("option", "where"),
    [
        pytest.param("--summary-json", "workspace", id="summary-in-workspace"),
        pytest.param("--summary-json", "link-to-workspace", id="summary-via-link"),
        pytest.param("--audit-log", "rw", id="audit-log-in-rw"),
    ],
)
def test_sandgate_writes_no_file_the_task_can_turn_into_a_link(net, tmp_path, option, where):
    """Found and closed: with --summary-json in the workspace the task replaced the file
    with a link to a host file it cannot write, and sandgate, as root, wrote the summary
    there at the end. Now a file sandgate writes is refused where the task can write."""
    canary = tmp_path / "host-file"
    canary.write_text("the host's\n")
    canary.chmod(0o600)
    workspace, rw = tmp_path / "ws", tmp_path / "rw"
    workspace.mkdir()
    rw.mkdir()
    (tmp_path / "ws-link").symlink_to(workspace)
    target = {
        "workspace": workspace / "out.json",
        "link-to-workspace": tmp_path / "ws-link" / "out.json",
        "rw": rw / "audit.jsonl",
    }[where]
    plant = f"touch ran; ln -sf {canary} {target.parent.resolve() / target.name}"
    proc = _run_refusable(net, workspace, ("--rw", str(rw), option, str(target)), plant)
    assert proc.returncode == 2, proc.stderr
    assert f"{option} {target}: inside" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (workspace / "ran").exists()  # refused before anything ran
    assert canary.read_text() == "the host's\n"


def test_a_task_cannot_author_its_own_rules(net, tmp_path):
    """Found and closed: a --rules file in the workspace was the task's to edit, and an
    `always` approval reloads it (and approved.yaml next to it) mid-run: a task that
    rewrote it to allow everything got that policy the moment a human approved any of
    its requests for good, and the next run started with it. Refused where the task can
    write; the same file elsewhere runs."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    inside, outside = workspace / "rules.yaml", tmp_path / "rules.yaml"
    for path in (inside, outside):
        path.write_text(sandbox.DEMO_RULES.read_text())
    proc = _run_refusable(net, workspace, ("--rules", str(inside)), "touch ran")
    assert proc.returncode == 2, proc.stderr
    assert f"--rules {inside}: inside {workspace}" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (workspace / "ran").exists()  # refused before anything ran
    proc = _run_refusable(net, workspace, ("--rules", str(outside)), "touch ran")
    assert proc.returncode == 0, proc.stderr
    assert (workspace / "ran").exists()


@pytest.mark.parametrize("kind", ["file", "link-to-a-shipped-preset"])
def test_a_task_cannot_author_a_file_its_rules_include(net, tmp_path, kind):
    """Found and closed: only the --rules file itself was checked, and a team preset it
    includes from the project was the task's to rewrite: the next run with the same
    rules (and an `always` approval's reload, which reads every file again) loaded the
    policy the task wrote. Every file the rules read must be out of its reach too, by
    the name they give as well: a link in the workspace to a shipped preset (read-only)
    was taken for the preset, and the task pointed it at a file of its own."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    preset = workspace / "team-preset.yaml"
    if kind == "file":
        preset.write_text("version: 1\nrules:\n  - allow: www.allowed.test\n")
    else:
        preset.symlink_to(sandbox.REPO / "rules" / "presets" / "package-registries.yaml")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    include: [./ws/team-preset.yaml]\n"
        "    rules:\n      - allow: allowed.test\n"
    )
    proc = _run_refusable(net, workspace, ("--rules", str(rules)), "touch ran")
    assert proc.returncode == 2, proc.stderr
    assert f"--rules {rules} reads {preset}: inside {workspace}" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (workspace / "ran").exists()  # refused before anything ran


def test_a_task_cannot_author_the_services_rules(net, tmp_path):
    """Found and closed: `sandgate run --gateway` took a --rw (or workspace) holding
    the service's rule files, which the service reloads when they change: the task
    could rewrite every task's policy, its own included, mid-run."""
    team = tmp_path / "team"
    team.mkdir()
    rules = team / "rules.yaml"
    rules.write_text(sandbox.DEMO_RULES.read_text())
    service = GatewayProcess(net, tmp_path, rules).start()
    try:
        command = ["sh", "-c", f"touch {team}/ran; echo 'version: 1' > {rules}"]
        argv = attach_argv(service, sandbox._workdir(tmp_path), command, extra=("--rw", str(team)))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        service.stop()
    assert proc.returncode != 0, proc.stderr
    assert (
        f"the service's rule file {rules}: inside {team}, which the task can write" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (team / "ran").exists() and rules.read_text() == sandbox.DEMO_RULES.read_text()


def test_a_local_user_reads_no_task_secret_from_its_run_directory(net, tmp_path):
    """Found and closed: an embedded run's directory was 0755 and its spec 0644, and
    the spec holds the task's environment: a local user (nobody here) read the
    values of a root-only --env-file while the run lived."""
    secrets = tmp_path / "secrets.env"
    secrets.write_text("API_TOKEN=sg-secret-value\n")
    secrets.chmod(0o600)
    started = sandbox.start(net, tmp_path, "sleep 3", extra=("--env-file", str(secrets)))
    try:
        spec = sandbox.RUN_DIR / started.run_id() / "sandbox.json"
        assert sandbox.eventually(spec.exists, timeout=10)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat"]
        read = subprocess.run([*as_nobody, str(spec)], capture_output=True, text=True)
        assert read.returncode != 0 and "sg-secret-value" not in read.stdout
        assert "sg-secret-value" in spec.read_text()  # it is the file that holds it
    finally:
        started.finish()


@pytest.mark.parametrize("option", ["--env-file", "--extra-ca"])
def test_a_link_planted_by_an_earlier_task_reads_no_host_file_for_the_next(net, tmp_path, option):
    """Found and closed: a task replaced the workspace's `.env` (or a CA file given with
    --extra-ca) with a link to a host file only root may read; the next run, reading it
    as root, put that file's lines in the task's environment (or its CA bundle)."""
    secret = tmp_path / "host-secret"
    secret.write_text("STOLEN=sg-host-secret\n")
    secret.chmod(0o600)
    first = sandbox.run(net, tmp_path, {"plant": f"ln -s {secret} planted && cat {secret}"})
    assert first["plant"].rc != 0 and "sg-host-secret" not in first["plant"].out  # not readable
    planted = first.steps_dir / "planted"
    assert planted.is_symlink()
    script = "env; cat /etc/ssl/certs/ca-certificates.crt"
    proc = _run_refusable(net, first.steps_dir, (option, str(planted)), script)
    assert "sg-host-secret" not in proc.stdout
    assert proc.returncode == 2, proc.stdout[-500:] + proc.stderr
    assert f"{option} {planted}: a link from" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# Blocked today; kept as a regression net. The task prints {probe: "ok" | errno name}.
HOST_REACH_PROBES = r"""
import ctypes, errno, json, os, signal, socket, stat, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
seen = {}
def report(name, call):
    try:
        call()
        seen[name] = "ok"
    except OSError as e:
        seen[name] = errno.errorcode.get(e.errno, str(e.errno))
def raw(number, *args):
    if libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)) < 0:
        raise OSError(ctypes.get_errno(), "syscall")
host_pid, abstract, tag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
report("ptrace_init", lambda: raw(101, 16, 1, 0, 0))  # PTRACE_ATTACH to PID 1 (sandgate's init)
buffer = ctypes.create_string_buffer(64)
local, remote = (ctypes.c_uint64 * 2)(ctypes.addressof(buffer), 64), (ctypes.c_uint64 * 2)(0x400000, 64)
report("vm_readv_init", lambda: raw(310, 1, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0))
report("init_root", lambda: os.listdir("/proc/1/root/"))
report("init_fds", lambda: os.listdir("/proc/1/fd"))
report("init_environ", lambda: open("/proc/1/environ", "rb").read())
report("bpf", lambda: raw(321, 0, 0, 0))
report("perf_event_open", lambda: raw(298, 0, 0, -1, -1, 0))
report("userfaultfd", lambda: raw(323, 0))
report("io_uring_setup", lambda: raw(425, 1, 0))
report("open_by_handle_at", lambda: raw(304, 0, 0, 0))
report("mknod_mem", lambda: os.mknod("mem", stat.S_IFCHR | 0o666, os.makedev(1, 1)))
report("sys_write", lambda: open("/sys/kernel/mm/transparent_hugepage/enabled", "w").write("never"))
report("proc_sys_write", lambda: open("/proc/sys/kernel/hostname", "w").write("sg-pwned"))
report("sysrq", lambda: open("/proc/sysrq-trigger", "w").write("h"))
report("sethostname", lambda: socket.sethostname("sg-pwned"))
report("settime", lambda: raw(227, 0, 0))  # clock_settime
report("kill_host_pid", lambda: os.kill(host_pid, signal.SIGKILL))
def connect_abstract():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect("\0" + abstract)
report("host_abstract_socket", connect_abstract)
libc.shmget.restype = ctypes.c_int
seen["sysv_shm"] = "ok" if libc.shmget(0x5347E5C, 4096, 0o1666) >= 0 else "failed"
seen["pids"] = len([p for p in os.listdir("/proc") if p.isdigit()])
# A survivor: double fork, new session, SIGHUP/SIGTERM ignored, the tag in its argv.
subprocess.Popen(["setsid", "sh", "-c", f"trap '' HUP TERM; sleep 30 & exec sleep 31 {tag}"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
print(json.dumps(seen))
"""


def _host_processes_with(tag: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if tag.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_host_processes_ipc_and_kernel_stay_out_of_reach(net, tmp_path):
    tag = f"sg-escape-{os.getpid()}-{tmp_path.name[-6:]}"
    hostname, thp = os.uname().nodename, Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp_before = thp.read_text() if thp.exists() else None
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("\0" + tag)
    listener.listen()
    listener.setblocking(False)
    victim = subprocess.Popen(["sleep", "60"])
    try:
        r = sandbox.run(
            net, tmp_path, {"reach": python(HOST_REACH_PROBES, str(victim.pid), tag, tag)}
        )
        assert r["reach"].rc == 0, r.describe()
        seen = json.loads(r["reach"].out)
        refused = seen.keys() - {"sysv_shm", "pids"}
        assert not [name for name in refused if seen[name] == "ok"], seen
        assert seen["kill_host_pid"] == "ESRCH"  # not even a number it can name
        assert seen["pids"] <= 6, seen  # its own PID namespace only
        # On the host: nothing happened.
        assert victim.poll() is None
        with pytest.raises(BlockingIOError):
            listener.accept()
        assert os.uname().nodename == hostname
        assert thp_before is None or thp.read_text() == thp_before
        assert not (r.steps_dir / "mem").exists()
        assert f"{0x5347E5C:d}" not in Path("/proc/sysvipc/shm").read_text()  # its own IPC ns
        assert _host_processes_with(tag) == []  # the survivor died with the sandbox
    finally:
        victim.kill()
        victim.wait()
        listener.close()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_a_sandbox_init_killed_by_a_signal_exits_as_a_shell_would(net, tmp_path):
    """Found and fixed: when the sandbox's init was killed (the OOM killer picks it when
    a task fills a tmpfs up to its memory limit), an embedded run exited with 247 (the
    low byte of -9), not 137 as an attached run and a shell report."""
    started = sandbox.start(net, tmp_path, "echo up > up; exec sleep 30")
    run_id = started.run_id()
    up = started.workdir / "steps" / "up"
    deadline = time.monotonic() + 20
    while not up.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (init,) = _children(started.pid)
    os.kill(init, signal.SIGKILL)
    result = started.finish()
    assert result.returncode == 137, result.describe()
    assert result.summary["exit_code"] == 137, result.summary
    assert not sandbox.processes_of(run_id)
