"""The `sandgate` command's native front (enforcer/cli/sandgate.c) against a runner
played by this test: what it sends is what the Python client (enforcer/handoff.py)
sends for the same process, byte for byte once decoded; what it does with the
runner's answers, its signals and its end is what that client does; and what it does
not do itself goes to `sandgate-python`, which offers the run to no runner again.

Needs root (only root hands a run over) and the installed native front."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sandgate.enforcer import handoff
from support.sandbox import eventually

SANDGATE = Path(sys.executable).with_name("sandgate")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root hands a run over")


def test_the_installed_sandgate_is_the_native_front():
    """A failed compile installs the Python command as `sandgate` (setup.py): here,
    where the compiler works, that would be a regression, not a fallback."""
    assert SANDGATE.read_bytes()[:4] == b"\x7fELF"
    assert SANDGATE.with_name("sandgate-python").read_text().startswith("#!/")


class FakeRunner:
    """A runner's socket beside a control socket that does not exist; each connection
    is answered by `script(conn, request, lines)`, in a thread."""

    def __init__(self, tmp_path: Path, script, name: str = "a1"):
        self.control = tmp_path / "gw.sock"
        self.path = f"{self.control}{handoff.SUFFIX}{name}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.script = script
        self.requests: list[dict] = []
        self.received: list[dict] = []  # what the client sent after its request
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                with conn:
                    data, fds = b"", []
                    while not data.endswith(b"\n"):
                        chunk, got, _flags, _addr = socket.recv_fds(conn, 1 << 20, 4)
                        fds += got
                        if not chunk:
                            break
                        data += chunk
                    request = json.loads(data)
                    request["_fds"] = fds
                    self.requests.append(request)
                    self.script(self, conn, request)
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)

    def claim(self, conn, request) -> bool:
        taken = os.read(request["_fds"][0], 1) == b"!"
        if taken:
            conn.sendall(b'{"claimed": true}\n')
        return taken

    def take(self, conn, answer: bytes = b'{"taken": true}\n', keep: bool = False) -> list[int]:
        """The caller's stdio line and descriptors, answered with `answer`; the
        descriptors closed here unless `keep`."""
        line, fds, _flags, _addr = socket.recv_fds(conn, handoff.STDIO_LINE_MAX, 3)
        assert json.loads(line) == {"stdio": [0, 1, 2]}
        conn.sendall(answer)
        if keep:
            return fds
        for fd in fds:
            os.close(fd)
        return []

    def follow(self, conn, until=None) -> None:
        """What the client sends (signals), until it hangs up or `until()`."""
        conn.settimeout(0.05)
        buffer = b""
        while until is None or not until():
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.received += [json.loads(line) for line in lines]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@pytest.fixture
def runners(tmp_path):
    made = []

    def make(script, name="a1"):
        made.append(FakeRunner(tmp_path, script, name))
        return made[-1]

    yield make
    for runner in made:
        runner.close()


def _argv(runner: FakeRunner, *command: str) -> list[str]:
    return [str(SANDGATE), "run", "--gateway", str(runner.control), "--", *command]


def _exits_with(code: int):
    def script(runner, conn, request):
        if runner.claim(conn, request):
            runner.take(conn)
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")

    return script


def _refuses(why: str):
    """A runner that claims the run, takes the stdio and then refuses it (as become()
    does for another gateway service)."""

    def script(runner, conn, request):
        if runner.claim(conn, request):
            runner.take(conn, json.dumps({"refused": why}).encode() + b"\n")

    return script


def _spawn_bytes(
    argv: list[bytes], envp: list[bytes], cwd: Path, stdout: Path | None = None
) -> int:
    """argv and an environment of raw entries (duplicates, bytes that are not UTF-8),
    as no Python mapping can hold them: execve in a fork. The child's pid."""
    libc = ctypes.CDLL(None, use_errno=True)
    arr = lambda items: (ctypes.c_char_p * (len(items) + 1))(*items, None)  # noqa: E731
    c_argv, c_envp = arr(argv), arr(envp)
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(cwd)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            if stdout is not None:
                os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT, 0o600), 1)
            libc.execve(argv[0], c_argv, c_envp)
        finally:
            os._exit(127)
    return pid


def test_the_request_is_what_the_python_client_sends_for_the_same_process(runners, tmp_path):
    """Bytes that are not UTF-8 (a lone continuation byte, an overlong, an encoded
    surrogate, a truncated sequence), UTF-8 of every length, JSON's specials, a
    variable twice (the first counts, as in os.environ) and an entry without '='."""
    runner = runners(_exits_with(3))
    odd = [
        b"\xff",
        b"\x80abc",
        b"\xc0\xaf",
        b"\xed\xa0\x80",
        b"\xe2\x82",
        b"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
        b'q"b\\s\t\x01\x7f/',
        b"\xf4\x90\x80\x80",
    ]
    argv = [os.fsencode(a) for a in _argv(runner, "echo")] + odd
    envp = [b"A=" + v for v in odd] + [b"K\xff=1", b"A=second", b"NOEQUALS", b"E=", b"=x=y"]
    envp.append(b"LC_ALL=C.UTF-8")  # else Python sets LC_CTYPE in its own (PEP 538)
    cwd = tmp_path / "d\xe9j\xe0".encode("latin-1").decode("utf-8", "surrogateescape")
    cwd.mkdir()
    pid = _spawn_bytes(argv, envp, cwd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    (request,) = runner.requests
    # What handoff.py sends: Python's own view of the same argv, environment and cwd.
    probe = (
        "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], "
        "'env': dict(os.environ), 'cwd': os.getcwd()}))"
    )
    python_argv = [os.fsencode(sys.executable), b"-I", b"-c", probe.encode(), *argv[1:]]
    out = tmp_path / "expected.json"
    pid = _spawn_bytes(python_argv, envp, cwd, stdout=out)
    os.waitpid(pid, 0)
    expected = json.loads(out.read_text())
    del request["_fds"]
    assert request == expected
    assert request["env"]["A"] == "\udcff"  # the first of two, as os.environ
    assert os.fsencode(request["argv"][-4]) == b"\xe2\x82"  # back to the bytes


def test_the_runners_exit_code_is_the_commands(runners):
    runner = runners(_exits_with(42))
    proc = subprocess.run(_argv(runner, "true"), capture_output=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (42, b"")
    assert len(runner.requests) == 1


def test_the_stdio_the_runner_gets_is_the_callers(runners, tmp_path):
    def script(runner, conn, request):
        if runner.claim(conn, request):
            fds = runner.take(conn, keep=True)
            os.write(fds[1], b"to stdout\n")
            os.write(fds[2], b"to stderr\n")
            data = os.read(fds[0], 100)
            os.write(fds[1], b"read: " + data)
            for fd in fds:
                os.close(fd)
            conn.sendall(b'{"exit": 0}\n')

    runner = runners(script)
    proc = subprocess.run(_argv(runner, "x"), input=b"stdin", capture_output=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        b"to stdout\nread: stdin",
        b"to stderr\n",
    )


def test_a_runner_gone_before_the_exit_code_is_exit_125_with_a_line(runners):
    def script(runner, conn, request):
        if runner.claim(conn, request):
            runner.take(conn)

    runner = runners(script)
    proc = subprocess.run(_argv(runner, "true"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == handoff.EXIT_SETUP
    assert proc.stderr == "sandgate: the gateway service's runner went away\n"


@pytest.mark.parametrize(
    "answer",
    [b'{"exit": "7"}\n', b"not json\n", b'{"exit": 7', b'["exit", 7]\n', b'{"exit": 7.5}\n'],
    ids=["string", "not-json", "cut", "array", "float"],
)
def test_what_no_runner_sends_is_a_runner_gone(runners, answer):
    def script(runner, conn, request):
        if runner.claim(conn, request):
            runner.take(conn)
            conn.sendall(answer)

    runner = runners(script)
    proc = subprocess.run(_argv(runner, "true"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == handoff.EXIT_SETUP, proc.stderr
    assert "runner went away" in proc.stderr


def _no_service(proc: subprocess.CompletedProcess, runner: FakeRunner) -> None:
    """The run went to sandgate-python, which ran it itself: no service at the control
    socket, so it says so (and offered it to no runner again: one request each)."""
    assert proc.returncode == handoff.EXIT_SETUP, proc.stderr
    assert f"no gateway service at {runner.control}" in proc.stderr


def test_a_refusal_after_the_claim_goes_on_without_offering_again(runners):
    runner = runners(_refuses("another gateway service"))
    proc = subprocess.run(_argv(runner, "true"), capture_output=True, text=True, timeout=30)
    _no_service(proc, runner)
    assert len(runner.requests) == 1


def test_a_runner_that_never_answers_costs_the_claim_timeout_once(runners):
    """It never reads its token: the front takes the byte back after CLAIM_TIMEOUT_S and
    goes on; the Python command does not wait on it a second time."""
    runner = runners(lambda runner, conn, request: time.sleep(3))
    started = time.monotonic()
    proc = subprocess.run(_argv(runner, "true"), capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started
    _no_service(proc, runner)
    assert len(runner.requests) == 1
    assert handoff.CLAIM_TIMEOUT_S <= took < 2.5, took


def test_a_runner_that_claims_late_is_waited_for(runners):
    """It read the token in time (the run is its), and answers after the timeout."""

    def script(runner, conn, request):
        os.read(request["_fds"][0], 1)
        time.sleep(handoff.CLAIM_TIMEOUT_S * 2)
        conn.sendall(b'{"claimed": true}\n')
        runner.take(conn)
        conn.sendall(b'{"exit": 5}\n')

    runner = runners(script)
    proc = subprocess.run(_argv(runner, "true"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 5, proc.stderr


def test_the_next_runner_gets_the_run_when_one_refuses(runners):
    first = runners(_refuses("no"), "a1")
    second = runners(_exits_with(9), "b2")
    proc = subprocess.run(_argv(first, "true"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 9, proc.stderr
    assert len(second.requests) == 1  # and the first one's, when the directory lists it first


def _stat_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_signals_go_to_the_runner_and_a_stop_stops_the_front_too(runners):
    done = threading.Event()

    def script(runner, conn, request):
        if runner.claim(conn, request):
            runner.take(conn)
            runner.follow(conn, until=done.is_set)
            conn.sendall(b'{"exit": 0}\n')

    runner = runners(script)
    proc = subprocess.Popen(_argv(runner, "true"), stderr=subprocess.PIPE, process_group=0)
    try:
        assert eventually(lambda: len(runner.requests) == 1, timeout=10)
        time.sleep(0.2)  # taken: the handlers are in
        proc.send_signal(signal.SIGTERM)
        assert eventually(lambda: {"signal": signal.SIGTERM} in runner.received, timeout=10)
        proc.send_signal(signal.SIGTSTP)
        assert eventually(lambda: _stat_state(proc.pid) == "T", timeout=10)
        assert eventually(lambda: {"signal": signal.SIGTSTP} in runner.received, timeout=10)
        proc.send_signal(signal.SIGCONT)
        assert eventually(lambda: _stat_state(proc.pid) != "T", timeout=10)
        assert eventually(lambda: {"signal": signal.SIGCONT} in runner.received, timeout=10)
        assert proc.poll() is None  # none of them ended it: the runner's exit code does
        done.set()
        assert proc.wait(timeout=10) == 0
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    order = [m["signal"] for m in runner.received]
    assert order.index(signal.SIGTERM) < order.index(signal.SIGTSTP) < order.index(signal.SIGCONT)


@pytest.mark.parametrize(
    "argv",
    [
        ["--version"],
        ["run", "--", "true"],  # embedded: no --gateway
        ["run", "--help", "--gateway", "/x.sock"],
        ["run", "--gateway", "/nonexistent/gw.sock", "--", "true"],  # no runner sockets
    ],
)
def test_what_the_front_does_not_do_is_the_python_commands(argv, tmp_path):
    """Byte for byte what `sandgate-python` prints, with no SANDGATE_HANDOFF_TRIED
    left for the task or anything else to see."""
    env = dict(os.environ, SANDGATE_RUN_DIR=str(tmp_path / "run"))
    if argv[:2] == ["run", "--"]:
        argv = ["run", "--rules", "/nonexistent.yaml", "--", "true"]  # fails fast, in Python
    front = subprocess.run([str(SANDGATE), *argv], capture_output=True, timeout=60, env=env)
    python = subprocess.run(
        [str(SANDGATE.with_name("sandgate-python")), *argv],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert (front.returncode, front.stdout, front.stderr) == (
        python.returncode,
        python.stdout,
        python.stderr,
    )


def test_the_marker_is_not_passed_on(runners, tmp_path):
    """A run no runner took goes to sandgate-python with SANDGATE_HANDOFF_TRIED=1, which
    takes it out of its environment before anything else reads it."""
    probe = (
        "import os, sys; from sandgate.enforcer import handoff;"
        "handoff.hand_off(sys.argv[1:]); print(os.environ.get('SANDGATE_HANDOFF_TRIED'))"
    )
    env = dict(os.environ, SANDGATE_HANDOFF_TRIED="1")
    out = subprocess.run(
        [sys.executable, "-c", probe, "run", "--gateway", str(tmp_path / "gw.sock")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.stdout == "None\n", out.stderr


def test_without_proc_the_python_command_is_the_first_on_path(tmp_path):
    """/proc/self/exe says where the front is; without /proc (a bare chroot or
    container), `sandgate-python` is looked up on PATH instead of failing."""
    script = f"umount -l /proc && exec {SANDGATE} --version"

    def without_proc(path: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            env=dict(os.environ, PATH=path),
            timeout=60,
        )

    out = without_proc(f"{SANDGATE.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    assert out.returncode == 0 and out.stdout.startswith("sandgate "), out
    out = without_proc("/usr/bin:/bin")  # and where it is on no PATH: one line, 125
    assert (out.returncode, out.stderr) == (
        125,
        "sandgate: cannot run sandgate-python: No such file or directory\n",
    ), out
