"""`sandgate run --gateway` handed to a warm runner of the service (enforcer/handoff.py,
enforcer/zygote.py), in the fake internet.

Each test starts its own service; the runs are handed over (the service's record of
the run names a runner pid that is not the `sandgate` process the test started).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from sandgate.enforcer import handoff
from sandgate.enforcer.sandbox import cgroup
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, attach, attach_argv

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"


@pytest.fixture
def service(fakenet, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    gateway = GatewayProcess(fakenet, tmp_path, rules).start()
    try:
        assert eventually(lambda: gateway.status()["warm_runners"] == 2, timeout=20)
        yield gateway
    finally:
        gateway.stop()


def _runner_sockets(service) -> list[str]:
    folder = service.control.parent
    return sorted(str(folder / n) for n in os.listdir(folder) if handoff.SUFFIX in n)


def _start(
    service, tmp_path, script: str, extra: tuple[str, ...] = (), **popen
) -> tuple[subprocess.Popen, Path]:
    """`sandgate run --gateway [EXTRA] -- sh -c SCRIPT`, started (stdin and stdout
    /dev/null, stderr a pipe, unless `popen` says otherwise); and the workspace."""
    workdir = tmp_path / f"handoff{time.monotonic_ns()}"
    (workdir / "steps").mkdir(parents=True)
    argv = attach_argv(service, workdir, ["sh", "-c", script], extra=extra)
    streams = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    return subprocess.Popen(argv, **{**streams, **popen}), workdir / "steps"


def _zygotes(service_pid: int) -> list[int]:
    """The service's zygote: its one child that is not a gateway worker."""
    found = []
    for pid in _children(service_pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            if b"sandgate.enforcer.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def _children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry))
    return found


def _pids_cgroup(pid: int) -> str:
    """The process's cgroup in the pids hierarchy (v1), or in the v2 one."""
    paths = cgroup.parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    return paths.get("pids", paths[""])


def _waiting(service) -> dict[int, tuple[int, str]]:
    """{runner pid: (its seed's pid, the seed's pids cgroup)} of the runners waiting,
    once each has its seed in a cgroup made ahead (attach.InitSeed)."""

    def seeds() -> dict[int, tuple[int, str]]:
        found = {}
        for zygote in _zygotes(service.popen.pid):
            for runner in _children(zygote):
                for seed in _children(runner):
                    with contextlib.suppress(OSError, KeyError):
                        path = _pids_cgroup(seed)
                        if path.rpartition("/")[2].startswith(cgroup.AHEAD_PREFIX):
                            found[runner] = (seed, path)
        return found

    assert eventually(lambda: len(seeds()) == 2, timeout=20), seeds()
    return seeds()


def _the_sandbox(service) -> dict:
    assert eventually(lambda: json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"])
    (box,) = json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]
    return box


def test_a_handed_over_task_has_only_stdio_and_gets_the_callers_signals(service, tmp_path):
    read_end, write_end = os.pipe()
    proc, _ = _start(
        service,
        tmp_path,
        "ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; trap 'echo TERM; exit 7' TERM; "
        "sleep 30 & wait",
        stdout=write_end,
    )
    os.close(write_end)
    try:
        box = _the_sandbox(service)
        assert box["runner_pid"] != proc.pid  # a warm runner runs it, not the process we started
        with os.fdopen(read_end, "r") as out:
            fds = out.readline().split()
            proc.send_signal(signal.SIGTERM)  # forwarded to the task, whose trap answers
            assert proc.wait(30) == 7, proc.stderr.read()
            assert out.read() == "TERM\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fds == ["0", "1", "2", "3"]  # stdio, and `ls`'s own descriptor on /proc/self/fd


def test_the_task_writes_to_the_callers_own_pipe(service, tmp_path):
    proc, _ = _start(service, tmp_path, "readlink /proc/self/fd/1", stdout=subprocess.PIPE)
    inode = os.fstat(proc.stdout.fileno()).st_ino
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.decode().strip() == f"pipe:[{inode}]"


def test_the_callers_death_kills_the_task_and_removes_its_cgroup(service, fakenet, tmp_path):
    waiting = _waiting(service)
    proc, steps = _start(service, tmp_path, "while :; do date +%s%N >> beat; sleep 0.05; done")
    beat = steps / "beat"
    try:
        box = _the_sandbox(service)
        run_id, (_seed, task_cgroup) = box["task_id"], waiting[box["runner_pid"]]
        assert eventually(lambda: beat.exists() and len(beat.read_text().split()) > 3, timeout=20)
        assert sandbox.processes_of(run_id)  # the task runs
    finally:
        proc.kill()
        proc.wait()
    assert eventually(lambda: not sandbox.processes_of(run_id), timeout=15), sandbox.processes_of(
        run_id
    )
    assert eventually(lambda: not sandbox.leftovers(fakenet, run_id), timeout=15)
    assert not [p for p in cgroup.leftovers() if p.endswith(task_cgroup)]
    beats = len(beat.read_text().split())
    time.sleep(0.5)
    assert len(beat.read_text().split()) == beats  # nothing of the task runs any more
    ended = service.events(task_id=run_id, kind="task")
    assert any((e.get("detail") or "").startswith("task ended") for e in ended), ended


def test_a_non_root_caller_is_refused_and_the_runner_waits_on(service, tmp_path):
    sockets = _runner_sockets(service)
    assert len(sockets) == 2
    target = sockets[0]
    assert os.stat(target).st_mode & 0o777 == 0o600  # root only, first of all
    os.chmod(target, 0o666)  # as if it were not: SO_PEERCRED still refuses
    # /tmp/pytest-of-root is 0700: the same socket at a path uid 65534 can walk to
    reachable = Path(tempfile.gettempdir()) / f"sgtest-handoff-{os.getpid()}.sock"
    os.link(target, reachable)
    marker = tmp_path / "ran"
    request = {"argv": ["run", "--gateway", str(service.control), "--", "touch", str(marker)]}
    request.update(env={"PATH": "/usr/bin:/bin"}, cwd=str(tmp_path))
    reply_r, reply_w = os.pipe()
    child = os.fork()
    if child == 0:  # the caller: uid 65534
        try:
            os.close(reply_r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(10)
            conn.connect(str(reachable))
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
            os.write(reply_w, b"reply:" + conn.recv(4096))
        except (ConnectionResetError, BrokenPipeError):  # closed before or with the request unread
            os.write(reply_w, b"reply:")
        except OSError as e:
            os.write(reply_w, f"error: {e}".encode())
        finally:
            os._exit(0)
    os.close(reply_w)
    os.waitpid(child, 0)
    reachable.unlink()
    with os.fdopen(reply_r, "rb") as r:
        assert r.read() == b"reply:"  # closed without a word: not taken
    assert not marker.exists()
    assert json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"] == []
    assert os.path.exists(target)  # that runner still waits
    assert service.status()["warm_runners"] == 2
    assert eventually(lambda: "refused a caller: uid 65534" in service.log.read_text(), timeout=10)


def test_without_warm_runners_the_run_goes_on_in_process(fakenet, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    gateway = GatewayProcess(fakenet, tmp_path, rules, "--warm", "0").start()
    try:
        proc, _ = _start(gateway, tmp_path, "echo ran", stdout=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.decode().strip() == "ran"
        assert not _runner_sockets(gateway)
        mark = f"runner pid {proc.pid})"  # the run's own process was its runner
        assert eventually(
            lambda: any(mark in (e.get("detail") or "") for e in gateway.events(kind="task")),
            timeout=10,
        ), gateway.events(kind="task")
    finally:
        gateway.stop()


def test_the_init_is_forked_ahead_in_a_task_cgroup_under_the_pools_not_the_callers(
    service, tmp_path
):
    """Nothing migrates at run time: the runner forked the init's process and moved it
    into a cgroup of its own before any run came (attach.InitSeed); the run's limits
    are written there and the task is forked from it. That cgroup is under the runner
    pool's (here the service's), not the caller's: as a container's under its daemon's."""
    mount = Path("/sys/fs/cgroup/pids")
    if not (mount / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy at /sys/fs/cgroup/pids")
    waiting = _waiting(service)
    caller_cgroup = mount / f"sgtest-caller-{os.getpid()}"
    caller_cgroup.mkdir()
    try:
        proc, _ = _start(
            service,
            tmp_path,
            "exec sleep 30",
            ("--pids", "77"),
            # the caller joins its own cgroup before it execs sandgate
            preexec_fn=lambda: (caller_cgroup / "cgroup.procs").write_text("0"),
        )
        try:
            box = _the_sandbox(service)
            seed, path = waiting[box["runner_pid"]]  # the run went to a runner that waited
            task_cgroup = mount / path.lstrip("/")
            assert eventually(lambda: len(sandbox.processes_of(box["task_id"])) > 0, timeout=20)
            [(task, _)] = sandbox.processes_of(box["task_id"])
            assert _pids_cgroup(task) == path
            assert _pids_cgroup(seed) == path  # the seed is the task's outer init
            ancestors, pid = [], task
            while pid > 1:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
                ancestors.append(pid)
            assert seed in ancestors
            assert (task_cgroup / "pids.max").read_text().strip() == "77"
            under = _pids_cgroup(service.popen.pid).rstrip("/")
            assert path.startswith(f"{under}/{cgroup.AHEAD_PREFIX}")
            assert not list(caller_cgroup.glob(f"{cgroup.PREFIX}*"))
        finally:
            proc.kill()
            proc.wait()
        assert eventually(lambda: not task_cgroup.exists(), timeout=15)
    finally:
        assert eventually(lambda: not (caller_cgroup / "cgroup.procs").read_text(), timeout=10)
        caller_cgroup.rmdir()


def test_limits_bite_on_the_warm_path(service, tmp_path):
    """The limits written into a cgroup made ahead hold the task as those of one made
    for the run: a fork bomb gets EAGAIN, a memory hog the OOM killer, both reported."""
    waiting = _waiting(service)
    r = attach(
        service,
        tmp_path,
        {"bomb": sandbox.fork_bomb(), "hog": sandbox.memory_hog(), "after": "echo still-here"},
        extra=("--pids", "48", "--memory", "128M"),
    )
    refused, errno_, children = r["bomb"].out.split()
    assert refused == "refused" and errno_ == "11" and int(children) < 48, r.describe()
    assert r["hog"].rc == 137 and "survived" not in r["hog"].out, r.describe()
    assert r["after"].out.strip() == "still-here"
    assert {e["rule_id"] for e in r.events(reason="task_limit")} == {
        "builtin:limit-pids",
        "builtin:limit-memory",
    }, r.describe()
    started = [e.get("detail") or "" for e in r.audit if e.get("kind") == "task"]
    assert any(f"runner pid {runner})" in d for d in started for runner in waiting), started


def test_a_stopped_pool_removes_its_cgroups_and_a_killed_ones_go_at_the_next_start(
    fakenet, tmp_path
):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    first = GatewayProcess(fakenet, tmp_path, rules).start()
    try:
        made = [path for _seed, path in _waiting(first).values()]
    finally:
        first.stop()
    leftovers = cgroup.leftovers(cgroup.AHEAD_PREFIX)
    assert not [p for p in leftovers for m in made if p.endswith(m)], leftovers

    second = GatewayProcess(fakenet, tmp_path, rules).start()
    try:
        [zygote] = _zygotes(second.popen.pid)
        made = [path for _seed, path in _waiting(second).values()]
        os.kill(zygote, signal.SIGKILL)  # its runners die, their seeds with them: nobody rmdirs
        assert eventually(lambda: not _children(zygote) and not _zygotes(second.popen.pid))
        left = [p for p in cgroup.leftovers(cgroup.AHEAD_PREFIX) for m in made if p.endswith(m)]
        assert left, "the killed pool's cgroups stay until somebody removes them"
        gc = subprocess.run([sandbox.SANDGATE, "gc", "--dry-run"], capture_output=True, text=True)
        assert all(f"would remove cgroup {p}" in gc.stdout for p in left), gc.stdout
    finally:
        second.stop()
    third = GatewayProcess(fakenet, tmp_path, rules).start()  # its pool removes them at start
    try:
        _waiting(third)
        assert not [p for p in left if os.path.exists(p)]
    finally:
        third.stop()


def _spare_files(service) -> dict[str, float]:
    """{run id: mtime of its state file} of the networks this service keeps warm; a
    spare's state file is written once, as its network is made."""
    found = {}
    for state_file in sandbox.RUN_DIR.glob("*/service.json"):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(state_file.read_text())
            if state["service_pid"] == service.popen.pid and state["runner_pid"] == 0:
                found[state["run_id"]] = state_file.stat().st_mtime
    return found


def _made(paths) -> dict[str, float]:
    """{path: its ctime}, for runner sockets (bound once, never changed)."""
    found = {}
    for path in paths:
        with contextlib.suppress(OSError):
            found[path] = os.stat(path).st_ctime
    return found


def test_a_taken_runner_and_spare_are_replaced_after_the_start_not_during_it(service, tmp_path):
    """While another runner and another spare network wait, the replacements of those
    a run took are made once its start is over (the run ends, or 1 s after the take:
    service.REFILL_AFTER_S, zygote.REFILL_AFTER_S), not during it (bench_attach
    --breakdown: they slowed the start). The pool is full again while the task runs
    on, and again after a second run takes one of each."""
    assert eventually(lambda: service.status()["spares"] == 2, timeout=15)
    first_spares, first_runners = _spare_files(service), _made(_runner_sockets(service))
    assert len(first_spares) == len(first_runners) == 2
    long_task, _ = _start(service, tmp_path, "sleep 60")
    second = None
    try:
        box = _the_sandbox(service)
        assert box["task_id"] in first_spares
        assert eventually(lambda: service.status()["spares"] == 2, timeout=15)
        assert eventually(lambda: len(_runner_sockets(service)) == 2, timeout=15)
        assert long_task.poll() is None  # refilled while the task runs on
        new_spare = {k: v for k, v in _spare_files(service).items() if k not in first_spares}
        new_runner = {
            k: v for k, v in _made(_runner_sockets(service)).items() if k not in first_runners
        }
        assert len(new_spare) == len(new_runner) == 1
        # Not during the start: ~1 s after the attach (the take was before it), however
        # loaded the machine; an early refill would be made within ms of it.
        assert min(new_spare.values()) - box["started"] > 0.5, (new_spare, box)
        assert min(new_runner.values()) - box["started"] > 0.5, (new_runner, box)
        # A second run: one of each taken, and made again.
        second, _ = _start(service, tmp_path, "sleep 60")
        assert eventually(
            lambda: len(json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]) == 2
        )
        assert eventually(lambda: service.status()["spares"] == 2, timeout=15)
        assert eventually(lambda: len(_runner_sockets(service)) == 2, timeout=15)
        assert long_task.poll() is None and second.poll() is None
    finally:
        for proc in (long_task, second):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_the_workspaces_user_namespace_is_made_ahead_and_mapped_by_the_run(service, tmp_path):
    """A waiting runner's seed keeps a child in a user namespace of its own, made before
    any run and outside the task's cgroup (init.UnmappedUserns); the run's idmapped
    workspace takes it, mapped for that run's ids: the task's files land owned by the
    workspace's owner, whatever the task's uid. The child is gone once it is used."""
    waiting = _waiting(service)
    helpers = {}
    for seed, path in waiting.values():
        (helper,) = _children(seed)
        own = os.stat("/proc/self/ns/user").st_ino
        assert os.stat(f"/proc/{helper}/ns/user").st_ino != own
        assert not Path(f"/proc/{helper}/uid_map").read_text().strip()  # no maps yet
        assert _pids_cgroup(helper) != path  # the pool's cgroup, not the task's
        helpers[helper] = seed
    for user in ("0", "1000"):
        workdir = tmp_path / f"ahead-{user}"
        steps = workdir / "steps"
        steps.mkdir(parents=True)
        os.chown(steps, 4321, 4321)
        script = f"echo {user} > by-{user}; mkdir dir-{user}; id -u"
        argv = attach_argv(service, workdir, ["sh", "-c", script], extra=("--user", user))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == user
        for name in (f"by-{user}", f"dir-{user}"):
            st = (steps / name).stat()
            assert (st.st_uid, st.st_gid) == (4321, 4321), f"{name}: {st.st_uid}"
        if user == "0":  # the first run took a runner that waited, and its helper
            assert eventually(lambda: sum(Path(f"/proc/{h}").exists() for h in helpers) == 1)
