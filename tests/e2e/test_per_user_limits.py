"""Tasks against each other through the kernel's per-user limits (docs/threat-model.md,
"Tasks against each other"; enforcer/sandbox/id_slots.py).

The kernel keeps some limits per host user, shared by every process of that uid
whatever its namespaces: pipe buffers by real uid (fs.pipe-user-pages-soft), and,
charged up the user namespaces to the owner of the task's one, inotify instances
and queued signals (RLIMIT_SIGPENDING).
Each case: a hostile task uses one up and holds it, and a second task, running at the
same time, does the ordinary thing that needs it; the victim gets what a task alone
gets. Before each run had its own id range (and owned its user namespace through it),
every victim here failed: one page for a new pipe and EPERM to grow it, EMFILE from
inotify_init, EAGAIN for a queued signal; and, its namespace owned by root, the
hostile task's inotify instances and queued signals were host root's too, so the
host's root is checked here as well (inotify). POSIX message queues (RLIMIT_MSGQUEUE,
charged the same way) and fanotify groups are not here: mq_open (EACCES) and
fanotify_init (EPERM, the seccomp filter, as in Docker's default profile) are refused
in the sandbox, so no task can draw on them.

Then a burst: 24 runs at once, all holding their ids at the same moment, each with a
range of its own, all free again after. And a run whose runner is SIGKILLed while its
task lives: the kernel frees the runner's lock at once, the task's ids are not handed
to the next run until it is gone, and `sandgate gc` frees them."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import secrets
import subprocess
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import cgroup, id_slots
from sandgate.enforcer.sandbox.spec import ID_COUNT, SandboxError
from support import sandbox
from support.sandbox import python

# Run inside the sandbox as `python3 -c LIMITS CASE ROLE`: the hostile role uses the
# limit up in one process, prints what it got, says `ready` and holds it until `done`
# (or 60 s); the victim role does the ordinary thing and prints what it got.
LIMITS = r"""
import ctypes, fcntl, json, os, signal, sys, threading, time

libc = ctypes.CDLL(None, use_errno=True)
F_SETPIPE_SZ, F_GETPIPE_SZ, MiB = 1031, 1032, 1 << 20
held = []


def error():
    return os.strerror(ctypes.get_errno())


def pipe_size():
    r, w = os.pipe()
    held.extend((r, w))
    size = fcntl.fcntl(w, F_GETPIPE_SZ)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, MiB)
        grown = "ok"
    except OSError as e:
        grown = e.strerror
    return {"fresh": size, "grow_1MiB": grown}


def pipes_hostile():
    big = 0
    while big < 1000:
        r, w = os.pipe()
        held.extend((r, w))
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, MiB)
        except OSError:
            break
        big += 1
    return {"big": big, **pipe_size()}


def pipes_victim():
    # a shell pipeline as a build runs it, then the pipe a new one gets
    through = os.popen("head -c 3000000 /dev/zero | wc -c").read().strip()
    return {"pipeline": through, **pipe_size()}


def use_up(make, what):
    # make() (a descriptor, or -1 with errno) until it fails, each one held
    count = 0
    while count < 100000:
        fd = make()
        if fd < 0:
            return {what: count, "error": error()}
        held.append(fd)
        count += 1
    return {what: count, "error": None}


def inotify_hostile():
    return use_up(lambda: libc.inotify_init1(os.O_CLOEXEC), "instances")


def inotify_victim():
    # what `tail -f` or a file watcher does: watch a file, see it change
    fd = libc.inotify_init1(0)
    if fd < 0:
        return {"watch": error()}
    with open("watched", "w"):
        pass
    if libc.inotify_add_watch(fd, b"watched", 0x2) < 0:  # IN_MODIFY
        return {"watch": error()}
    with open("watched", "a") as f:
        f.write("x")
    event = os.read(fd, 4096)
    return {"watch": "event" if len(event) >= 16 else "none"}


def sigpending_hostile():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN})
    count = 0
    while count < 10000000:
        try:
            signal.pthread_kill(threading.get_ident(), signal.SIGRTMIN)
        except OSError as e:
            return {"queued": count, "error": e.strerror}
        count += 1
    return {"queued": count, "error": None}


def sigpending_victim():
    # a real-time signal queued to itself, as a timer or an AIO completion is
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN})
    try:
        signal.pthread_kill(threading.get_ident(), signal.SIGRTMIN)
    except OSError as e:
        return {"signal": e.strerror}
    return {"signal": "delivered" if signal.sigwait({signal.SIGRTMIN}) else "lost"}


case, role = sys.argv[1], sys.argv[2]
got = globals()[f"{case}_{role}"]()
got["host_ids"] = int(open("/proc/self/uid_map").read().split()[1])  # its root's, on the host
print(json.dumps(got), flush=True)
if role == "hostile":
    open("ready", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists("done") and time.monotonic() < deadline:
        time.sleep(0.02)
"""

PIPE_DEFAULT = 16 * 4096  # a new pipe's buffer
PIPE_SQUEEZED = 2 * 4096  # what a user past fs.pipe-user-pages-soft gets


def host_root_inotify() -> str:
    """Whether this process (host root) can still make an inotify instance."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        return os.strerror(ctypes.get_errno())
    os.close(fd)
    return "ok"


def hostile_exhausted(case: str, got: dict) -> None:
    """The hostile task did use its limit up (else the victim's success proves nothing)."""
    if case == "pipes":
        soft = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
        assert got["big"] >= soft // 256, got  # 1 MiB pipes: 256 pages each
        assert got["fresh"] == PIPE_SQUEEZED and got["grow_1MiB"] == "Operation not permitted"
    elif case == "inotify":
        # all of max_user_instances: before, the bucket was host root's, which root's
        # own daemons already drew from
        limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
        assert (got["instances"], got["error"]) == (limit, "Too many open files"), got
    else:
        assert got["queued"] >= 1000 and got["error"] == "Resource temporarily unavailable", got


@pytest.mark.parametrize("case", ["pipes", "inotify", "sigpending"])
def test_a_task_that_uses_up_a_per_user_limit_leaves_the_others_theirs(net, tmp_path, case):
    hostile = sandbox.start(net, tmp_path, steps={"hostile": python(LIMITS, case, "hostile")})
    try:
        ready = hostile.workdir / "steps" / "ready"
        assert sandbox.eventually(ready.exists, timeout=30), "the hostile task never got ready"
        victim = sandbox.run(net, tmp_path, {"victim": python(LIMITS, case, "victim")})
        root = host_root_inotify()
    finally:
        (hostile.workdir / "steps" / "done").touch()
    held = hostile.finish()
    assert held.returncode == 0 and held["hostile"].rc == 0, held.describe()
    hostile_exhausted(case, json.loads(held["hostile"].out))
    assert victim.returncode == 0 and victim["victim"].rc == 0, victim.describe()
    got = json.loads(victim["victim"].out)
    victim_ids = got.pop("host_ids")
    expected = {
        "pipes": {"pipeline": "3000000", "fresh": PIPE_DEFAULT, "grow_1MiB": "ok"},
        "inotify": {"watch": "event"},
        "sigpending": {"signal": "delivered"},
    }[case]
    assert got == expected, victim.describe()
    # two host users: the victim's ids are not the hostile task's
    assert victim_ids != json.loads(held["hostile"].out)["host_ids"]
    assert root == "ok"  # and the host's root kept its own inotify instances


BURST = 24
# Each task says which host ids its root has, then waits until every task of the burst
# has said so: all of them hold their slot at one moment.
BURST_TASK = """
read -r _ base count < /proc/self/uid_map
echo "$base $count" > "{shared}/$SANDGATE_TASK_ID"
i=0
while [ "$(ls {shared} | wc -l)" -lt {runs} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
ls {shared} | wc -l
"""


def test_a_burst_of_runs_holds_distinct_id_ranges_all_freed_after(net, tmp_path):
    shared, rw = sandbox.shared_dir(tmp_path)
    os.chown(shared, 4321, 4321)  # an owner no task's ids are
    script = BURST_TASK.format(shared=shared, runs=BURST)
    started = []
    try:
        for _ in range(BURST):
            workdir = sandbox._workdir(tmp_path)
            argv = sandbox._argv(net, workdir, ["sh", "-c", script], sandbox.DEMO_RULES, rw)
            pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
            started.append(net.popen_in_host(argv, text=True, stdin=subprocess.DEVNULL, **pipes))
        outputs = [popen.communicate(timeout=180) for popen in started]
    finally:
        for popen in started:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
    for popen, (out, err) in zip(started, outputs, strict=True):
        assert popen.returncode == 0, err[-2000:]
        assert out.strip() == str(BURST), f"the burst did not overlap: {out!r}\n{err[-1000:]}"
    ranges = [tuple(map(int, f.read_text().split())) for f in shared.iterdir()]
    # written with 24 different host ids, all land as the shared directory's owner
    # (idmapped), as when every task had the same ids
    assert {(f.stat().st_uid, f.stat().st_gid) for f in shared.iterdir()} == {(4321, 4321)}
    assert len(ranges) == BURST
    bases = sorted(base for base, _ in ranges)
    assert {count for _, count in ranges} == {ID_COUNT}
    pool = id_slots.host_id_pool()
    assert len(set(bases)) == BURST, bases  # no two tasks the same host user
    assert all((base - pool.base) % ID_COUNT == 0 for base in bases), bases
    assert all(pool.base <= base < pool.base + pool.slots * ID_COUNT for base in bases)
    # every one freed with its run: the next runs get them again
    assert not set(id_slots.in_use(pool)) & set(bases)


def test_a_run_when_every_id_range_is_taken_is_refused_before_its_task(net, tmp_path):
    pool = id_slots.host_id_pool()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, pool.slots + 512)), hard))
    held = []
    try:
        with contextlib.suppress(SandboxError):
            while True:
                held.append(id_slots.claim(pool))
        workdir = sandbox._workdir(tmp_path)
        argv = sandbox._argv(net, workdir, ["sh", "-c", "echo ran > ran"], sandbox.DEMO_RULES, ())
        refused = net.run_in_host(argv, timeout=60)
    finally:
        for slot in held:
            slot.release()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert refused.returncode == 125, refused.stderr
    assert not (workdir / "steps" / "ran").exists()  # the task never started
    refusal = [line for line in refused.stderr.splitlines() if "id ranges" in line]
    assert len(refusal) == 1 and refusal[0].startswith("sandgate: all "), refused.stderr
    assert f"all {pool.slots} sandbox id ranges" in refusal[0]
    audit = [json.loads(line) for line in (workdir / "audit.jsonl").read_text().splitlines()]
    (run_id,) = {record["task_id"] for record in audit if record.get("task_id")}
    assert not (left := sandbox.leftovers(net, run_id)), left  # netns, table, state: gone
    # and the next run, with the slots back, runs
    again = sandbox.run(net, tmp_path, {"ran": "echo ran"})
    assert again.returncode == 0 and again["ran"].out == "ran\n", again.describe()


FREEZER = Path("/sys/fs/cgroup/freezer")  # cgroup v1's: a frozen process dies only once thawed
# The orphan says which host ids its root has, ignores TERM and sleeps.
ORPHAN = "read -r _ base _ < /proc/self/uid_map; echo $base; trap '' TERM; exec sleep 1000"


def alive(pid: int) -> bool:
    """A process with `pid` lives (a zombie is dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@contextlib.contextmanager
def frozen(pids: list[int]):
    """The processes held in a cgroup v1 freezer of their own: a SIGKILL (their
    parent-death signals, their PID namespace's end) takes effect only when they are
    thawed, as for a task in uninterruptible sleep or slow to exit. Thawed after."""
    group = FREEZER / f"sgtest-{secrets.token_hex(4)}"
    group.mkdir()
    try:
        for pid in pids:
            (group / "cgroup.procs").write_text(str(pid))
        (group / "freezer.state").write_text("FROZEN")
        assert sandbox.eventually(lambda: (group / "freezer.state").read_text() == "FROZEN\n")
        yield
    finally:
        (group / "freezer.state").write_text("THAWED")
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # gone, or going
                (FREEZER / "cgroup.procs").write_text(pid)
        assert sandbox.eventually(lambda: not (group / "cgroup.procs").read_text(), timeout=10)
        assert sandbox.eventually(lambda: _removed(group)), f"{group} stays"


def _removed(group: Path) -> bool:
    try:
        group.rmdir()
    except OSError as e:
        return e.errno != errno.EBUSY  # busy: its last members are still exiting
    return True


def hold_slots_below(pool: id_slots.IdPool, base: int) -> list[int]:
    """Lock every free slot below `base` (as a live run does), so that `base` is the
    first free one: the one the next run gets, unless it is not free after all."""
    held = []
    for index in range(pool.slots):
        if pool.slot(index).base == base:
            return held
        fd = os.open(
            id_slots.ID_SLOT_DIR / str(pool.slot(index).base), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(fd)
        except BlockingIOError:
            os.close(fd)
    raise AssertionError(f"{base} is not a slot of {pool}")


@pytest.mark.skipif(not (FREEZER / "cgroup.procs").exists(), reason="needs the v1 freezer")
def test_a_killed_runners_ids_are_not_handed_on_while_its_task_lives(net, tmp_path):
    """SIGKILL frees the runner's lock at once; the task (frozen here, so that its
    kills wait) still has the slot's ids. The next run gets other ids while it lives,
    and `sandgate gc` removes it and frees the slot."""
    pool = id_slots.host_id_pool()
    orphan = sandbox.start(net, tmp_path, steps={"orphan": ORPHAN}, host_mounts=True)
    held = []
    try:
        run_id = orphan.run_id()
        out = orphan.steps_dir / "orphan.out"
        assert sandbox.eventually(lambda: out.exists() and out.read_text().strip(), timeout=30)
        base = int(out.read_text())
        [memory] = [p for p in cgroup.leftovers(f"sandgate-{run_id}") if "/memory/" in p]
        pids = [int(pid) for pid in Path(memory, "cgroup.procs").read_text().split()]
        with frozen(pids):
            orphan.kill()  # the runner, `sandgate run`: SIGKILL
            assert base not in id_slots.in_use(pool)  # the kernel dropped its lock
            assert all(alive(pid) for pid in pids)  # its task did not die with it
            held = hold_slots_below(pool, base)
            next_run = sandbox.run(
                net, tmp_path, {"ids": "read -r _ base _ < /proc/self/uid_map; echo $base"}
            )
            assert all(alive(pid) for pid in pids)  # the two ran at once
        assert next_run.returncode == 0, next_run.describe()
        assert int(next_run["ids"].out) != base  # not the living orphan's ids
    finally:
        for fd in held:
            os.close(fd)
        orphan.kill()
    cleaned = sandbox.gc(net)
    assert cleaned.returncode == 0, cleaned.stderr
    assert not [pid for pid in pids if alive(pid)]
    assert not (left := sandbox.leftovers(net, run_id)), left
    assert cgroup.leftovers(f"sandgate-{run_id}") == []
    # Free: emptied by gc (or, its task gone, taken since by a run of the host's, whose
    # record it now holds), nothing of the orphan's left to look at.
    assert f"sandgate-{run_id}" not in (id_slots.ID_SLOT_DIR / str(base)).read_text()


def test_gc_kills_the_task_a_killed_runners_slot_names_then_frees_the_slot(net, tmp_path):
    """A record a SIGKILLed runner left names a cgroup with a live process in it that
    no run's state names (gc's other steps leave such a cgroup alone: it is not
    empty): gc kills it and empties the record."""
    name = f"sandgate-sgt{secrets.token_hex(4)}"
    task = cgroup.TaskCgroup.create(name, cgroup.Limits(memory_bytes=64 << 20, pids=16))
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        task.attach(sleeper.pid)
        pool = id_slots.host_id_pool()
        last = pool.slot(pool.slots - 1)  # runs take the lowest free slot: not this one
        lock = id_slots.ID_SLOT_DIR / str(last.base)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        slot = id_slots.IdSlot(last, fd, lock.stat().st_size)
        slot.record(task.named)
        slot.release(task_gone=False)  # as the kernel drops a killed runner's lock
        cleaned = sandbox.gc(net)
        assert cleaned.returncode == 0, cleaned.stderr
        assert f"removed id slot {slot.ids.base}" in cleaned.stdout, cleaned.stdout
        assert sleeper.wait(timeout=10) == -9  # SIGKILL
        assert cgroup.leftovers(name) == []
        assert lock.stat().st_size == 0
    finally:
        sleeper.kill()
        sleeper.wait()
        task.remove()
