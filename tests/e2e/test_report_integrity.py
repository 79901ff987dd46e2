"""A hostile task trying to make sandgate report something false about it: another exit
code than its own, a limit it did not hit or none that it did, a weaker sandbox it did
not cause or hiding one, events under another task's name.

What the task could reach was probed (docs/threat-model.md has the table): it inherits
only stdio (the report pipe to the runner is closed before exec, the netns and job
descriptors are the init's); the sandbox's PID 1 runs as a host id the task's user
namespace does not map, so the task can neither signal it (EPERM, even the relayed
signals), ptrace it, read its descriptors or memory, nor change its OOM score; no
cgroup control file is writable (the host tree is read-only, the cgroup mounts under
/run are covered by the sandbox's /run); exit codes past 255 and deaths by signal come
back as a shell reports them, and a self-inflicted SIGKILL is no memory limit.

Found and closed: what sandgate established about the task (its exit code, the limits
it hit, the protections it ran without) was never in the table printed after the task,
and a weaker sandbox not even in `--summary-json`; the one sign of a weaker sandbox on
the terminal was a warning printed before the task ran, on the terminal the task then
owns: it clears the screen and its scrollback, and prints sandgate-like lines of its
own ("sandgate: sandbox setup failed", exit 125). The table now ends with a `task:` line
of those facts, and the summary JSON carries `sandbox_weakened`. An attached run whose
service died for good exited with the task's code and left an earlier run's
`--summary-json` to be read as its own: it now exits 125 and says so.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from support import sandbox
from support.sandbox import python
from support.service import TWO_PROFILES, attach, attach_argv, running

pytestmark = pytest.mark.e2e

# The task's probes of what reports on it; each prints "NAME ok" or "NAME ERRNO".
PROBES = r"""
import ctypes, errno, os, signal
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long] * 4
def report(name, call):
    try:
        call()
        print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
def ptrace_init():
    if libc.ptrace(16, 1, 0, 0) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
def write(path, data=b"0"):
    def call():
        with open(path, "wb", buffering=0) as f:
            f.write(data)
    return call
print("fds", ",".join(sorted(os.listdir("/proc/self/fd"), key=int)[:-1]))  # the last: listdir's
for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGSTOP, signal.SIGKILL, signal.SIGSEGV):
    report(f"kill-init-{signum.name}", lambda s=signum: os.kill(1, s))
report("ptrace-init", ptrace_init)
report("init-fds", lambda: os.listdir("/proc/1/fd"))
report("init-mem", write("/proc/1/mem"))
report("init-oom-score", write("/proc/1/oom_score_adj", b"1000"))
report("own-oom-score-lowered", write("/proc/self/oom_score_adj", b"-1000"))
mounts = [line.split()[4] for line in open("/proc/self/mountinfo") if " - cgroup" in line]
controls = ("cgroup.procs", "cgroup.kill", "memory.events", "memory.oom_control",
            "memory.failcnt", "memory.max", "memory.limit_in_bytes", "pids.events", "pids.max")
found = 0
for top in {*mounts, "/sys/fs/cgroup"}:
    for where, _dirs, files in os.walk(top):
        for name in set(files) & set(controls):
            found += 1
            report("cgroup-write " + os.path.join(where, name), write(os.path.join(where, name)))
print("cgroup-files", found)
"""


# Processes that try to outlive the task's end (PID 1's), one of them in a session of
# its own, to write after the run has reported.
OUTLIVER = "(sleep 0.4; echo late > late) & setsid sh -c 'sleep 0.4; echo late > late2' &"


def probe_results(out: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in out.splitlines() if " " in line)


def last_line(stderr: str) -> str:
    return stderr.rstrip("\n").rsplit("\n", 1)[-1]


def test_a_task_reaches_nothing_that_reports_on_it(net, tmp_path):
    result = sandbox.run(
        net,
        tmp_path,
        command=["sh", "-c", f"{python(PROBES)} > probes.out 2>&1; {OUTLIVER} exit 7"],
        extra=("--memory", "256M", "--pids", "64"),
    )
    out = (result.steps_dir / "probes.out").read_text()
    seen = probe_results(out)
    assert seen.pop("fds") == "0,1,2", out  # stdio only: no report pipe, netns, job socket
    for signum in ("SIGTERM", "SIGUSR1", "SIGSTOP", "SIGKILL", "SIGSEGV"):
        assert seen.pop(f"kill-init-{signum}") == "EPERM", out
    assert seen.pop("ptrace-init") == "EPERM", out
    assert seen.pop("init-fds") == "EACCES", out
    assert seen.pop("init-mem") == "EACCES", out
    assert seen.pop("init-oom-score") == "EACCES", out
    assert seen.pop("own-oom-score-lowered") == "EACCES", out
    seen.pop("cgroup-files")
    assert all(v in ("EROFS", "EACCES", "EPERM") for v in seen.values()), out
    # The effect: PID 1 was neither stopped nor killed, and reported the task's own exit
    # code; no limit was hit, no protection went missing, everything is this task's.
    assert result.returncode == 7, result.describe()
    assert result.summary["exit_code"] == 7
    assert "limits_hit" not in result.summary and "sandbox_weakened" not in result.summary
    assert [e["detail"] for e in result.events(kind="task", reason="rule_allow")][-1] == (
        "task ended: exit code 7"
    )
    assert {e.get("task_id") for e in result.audit if e["kind"] != "policy"} == {result.run_id}
    assert last_line(result.stderr) == "  task: exit code 7", result.stderr
    time.sleep(0.5)  # past the outlivers' sleep: they died with PID 1
    assert not list(result.steps_dir.glob("late*"))


@pytest.mark.parametrize(
    "script, code",
    [
        pytest.param("exit 300", 300 % 256, id="exit-past-255"),
        pytest.param("kill -SEGV $$", 128 + 11, id="killed-by-a-signal"),
        pytest.param("kill -KILL $$", 128 + 9, id="sigkill-is-no-memory-limit"),
    ],
)
def test_the_exit_code_is_the_tasks_own_as_a_shell_reports_it(net, tmp_path, script, code):
    result = sandbox.run(net, tmp_path, command=["sh", "-c", script], extra=("--memory", "256M"))
    assert result.returncode == code, result.describe()
    assert result.summary["exit_code"] == code
    assert "limits_hit" not in result.summary  # a 137 of its own is not an OOM kill
    assert not result.events(reason="task_limit")
    assert last_line(result.stderr) == f"  task: exit code {code}", result.stderr


def test_the_oom_killer_picking_the_init_is_reported_as_the_memory_limit(net, tmp_path):
    """A task that fills a tmpfs (charged to its cgroup, to no process of its own) and
    may not lower its own OOM score makes the OOM killer pick the sandbox's init, the
    largest process: the run says 137 and names the memory limit, on the table's last
    line too. Two tmpfs mounts: each holds up to the limit (spec.tmpfs_bounds), so one
    alone could end in ENOSPC first when the kernel reclaimed the processes' file pages
    (CI saw "survived" once); the two together are over it whatever is reclaimed."""
    fill = "head -c 200M /dev/zero > /dev/shm/fill; head -c 200M /dev/zero > /tmp/fill"
    result = sandbox.run(
        net,
        tmp_path,
        command=["sh", "-c", f"{fill}; echo survived"],
        extra=("--memory", "64M"),
    )
    assert "survived" not in result.stdout
    assert result.returncode == 137, result.describe()
    assert result.summary["limits_hit"] == ["memory"]
    assert len(result.events(reason="task_limit", task_id=result.run_id)) == 1
    assert last_line(result.stderr) == "  task: exit code 137; limits hit: memory", result.stderr


# Erases the screen and its scrollback (where sandgate's warning of a weaker sandbox
# was), then imitates sandgate: a full sandbox's self-test, a setup failure, exit 125.
IMPOSTOR = (
    r"printf '\033[3J\033[H\033[2J' >&2; "
    "echo 'sandgate: self-test: 9/9 probes held (1 ms, before the task)' >&2; "
    "echo 'sandgate: sandbox setup failed: the runner could not move the sandbox "
    "into its cgroup' >&2; exit 125"
)


def test_a_weaker_sandbox_is_in_the_summary_after_what_the_task_printed(net, tmp_path):
    """Found and fixed: the table after the task said nothing of a weaker sandbox,
    `--summary-json` had no trace of it, and the warning before the task was the
    task's to erase and imitate."""
    env = {**os.environ, "SANDGATE_CGROUP_PARENT": "not-absolute"}  # no cgroup: a real gap
    result = sandbox.run(
        net, tmp_path, command=["sh", "-c", IMPOSTOR], env=env, extra=("--allow-weaker-sandbox",)
    )
    assert result.returncode == 125, result.describe()
    [weakened] = result.events(reason="sandbox_weakened")
    assert weakened["task_id"] == result.run_id and weakened["rule_id"] == "builtin:weakened-cgroup"
    assert result.summary["sandbox_weakened"] == ["cgroup"]
    # 125 was the task's: the summary has its exit code (sandgate's own 125 has none).
    assert result.summary["exit_code"] == 125
    after_task = result.stderr.rsplit("\033[2J", 1)[1]
    assert last_line(after_task) == (
        "  task: exit code 125; WEAKER SANDBOX (--allow-weaker-sandbox): no cgroup"
    ), result.stderr


def test_an_attached_task_cannot_reach_the_control_socket(fakenet, tmp_path):
    """What a runner tells the service about its task (limits, weaker sandbox, exit code)
    comes from the runner alone: the task finds no control socket at its path (its
    directory is under the sandbox's fresh /run), and its pids limit comes back once,
    from the runner's own reading."""
    with running(fakenet, tmp_path, TWO_PROFILES) as service:
        reach = python(
            """
            import socket, sys
            for where in sys.argv[1:]:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(where)
                    print(where, "connected")
                except OSError as e:
                    print(where, type(e).__name__)
            """,
            str(service.control),
        )
        result = attach(
            service,
            tmp_path,
            {"reach": reach, "bomb": sandbox.fork_bomb()},
            extra=("--pids", "16"),
        )
        assert "connected" not in result["reach"].out, result["reach"].out
        assert result["reach"].out.count("Error") == 1, result.describe()
        assert result["bomb"].out.startswith("refused 11"), result.describe()
        assert result.returncode == 0, result.describe()
        assert result.summary["limits_hit"] == ["pids"]
        assert len([e for e in result.audit if e["reason"] == "task_limit"]) == 1
        assert last_line(result.stderr) == "  task: exit code 0; limits hit: pids"


def test_an_attached_run_without_its_summary_does_not_pass_for_a_finished_one(fakenet, tmp_path):
    """Found and fixed: when the gateway service died during the task and did not come
    back, the runner exited with the task's code and left `--summary-json` as it was: a
    summary of an earlier run at that path (here: no limit, nothing blocked) was read as
    this run's. Now it says so and exits 125, as an embedded run does when it cannot
    write the summary."""
    with running(fakenet, tmp_path, TWO_PROFILES) as service:
        workdir = sandbox._workdir(tmp_path)
        earlier = '{"task_id": "00000000", "exit_code": 0, "destinations": []}'
        (workdir / "summary.json").write_text(earlier)
        steps = workdir / "steps"
        script = "touch ready; while [ ! -e stop ]; do sleep 0.05; done; exit 4"
        runner = subprocess.Popen(
            attach_argv(service, workdir, ["sh", "-c", script]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert sandbox.eventually((steps / "ready").exists, timeout=20)
            service.kill()  # SIGKILL, and no restart
            (steps / "stop").touch()
            _, stderr = runner.communicate(timeout=30)
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
            sandbox.gc(fakenet)  # what the killed service left of the sandbox
    assert runner.returncode == 125, stderr
    assert "sandgate: no summary for" in stderr and "(the task exited 4)" in stderr, stderr
    assert (workdir / "summary.json").read_text() == earlier  # untouched, and said so


def _refused_for_its_summary(run, workdir) -> None:
    """`run(argv_maker)` with --summary-json under a missing directory: refused before
    the task ran (it would have made `ran`), in one line, exit 125. It used to run the
    task and only then find it could not write the summary."""
    missing = workdir / "no-such-dir" / "summary.json"
    proc = run(["sh", "-c", "touch ran"], missing)
    assert proc.returncode == 125, proc.stderr
    assert f"sandgate: cannot write the summary to {missing}: No such file or directory (nothing ran)" in proc.stderr, proc.stderr  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (workdir / "steps" / "ran").exists()


def _with_summary_at(argv: list[str], path) -> list[str]:
    argv[argv.index("--summary-json") + 1] = str(path)
    return argv


def test_a_summary_path_that_cannot_be_written_refuses_the_run_before_the_task(net, tmp_path):
    workdir = sandbox._workdir(tmp_path)

    def run(command, path):
        argv = sandbox._argv(net, workdir, command, sandbox.DEMO_RULES, ())
        return net.run_in_host(_with_summary_at(argv, path), timeout=60)

    _refused_for_its_summary(run, workdir)


def test_a_summary_path_that_cannot_be_written_refuses_the_attached_run_too(fakenet, tmp_path):
    with running(fakenet, tmp_path, TWO_PROFILES) as service:
        workdir = sandbox._workdir(tmp_path)

        def run(command, path):
            argv = _with_summary_at(attach_argv(service, workdir, command), path)
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)  # fmt: skip

        _refused_for_its_summary(run, workdir)
        assert service.status()["sandboxes"] == 0  # nothing attached, nothing left


# The task shares the caller's stdout and stderr (the same open file descriptions):
# it writes a forged summary, clears O_APPEND and moves the log's offset to its start,
# so that sandgate's lines would overwrite the top and the log end with the forgery.
FORGE = """
import fcntl, os
os.write(2, b"task output\\n" * 2000)
os.write(2, b"sandgate: task 3f610f99 (profile default): 0 allowed, 0 blocked\\n  task: exit code 0\\n")
for fd in (1, 2):
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND | os.O_NONBLOCK)
os.lseek(2, 0, os.SEEK_SET)
os._exit(3)
"""


@pytest.mark.parametrize("way", ["embedded", "in-process", "warm"])
def test_sandgate_writes_its_summary_after_the_task_whatever_the_task_did_to_the_log(
    fakenet, tmp_path, way
):
    """`sandgate run ... >> agent.log 2>&1`: sandgate's summary went where the task
    left the shared offset (over the log's first lines, an earlier run's record) and
    the log ended with the task's forged `task: exit code 0`. Now the flags are set
    again and the offset put at the end once the task is gone (enforcer/shared_stdio.py)."""
    log = tmp_path / "agent.log"
    earlier = "EARLIER RUN: sandgate: task 11111111 (profile default)\n  task: exit code 137\n"
    log.write_text(earlier)
    command = [sandbox.SANDBOX_PYTHON, "-c", FORGE]
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        if way == "embedded":
            workdir = sandbox._workdir(tmp_path)
            argv = sandbox._argv(fakenet, workdir, command, sandbox.DEMO_RULES, ())
            code = subprocess.run(
                ["ip", "netns", "exec", fakenet.host_ns, *argv], stdout=fd, stderr=fd, timeout=90
            ).returncode
        else:
            warm = "1" if way == "warm" else "0"
            with running(fakenet, tmp_path, TWO_PROFILES, "--warm", warm) as service:
                if way == "warm":
                    assert sandbox.eventually(lambda: service.status()["warm_runners"] == 1)
                workdir = sandbox._workdir(tmp_path)
                argv = attach_argv(service, workdir, command)
                code = subprocess.run(argv, stdout=fd, stderr=fd, timeout=90).returncode
    finally:
        os.close(fd)
    text = log.read_text(errors="replace")
    assert code == 3, text[-2000:]
    assert text.startswith(earlier), text[:300]  # sandgate wrote nothing over it
    assert last_line(text) == "  task: exit code 3", text[-500:]
