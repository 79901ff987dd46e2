"""enforcer/sandbox/seccomp.py against the real kernel: each refusal, and what must keep working.

Every probe runs in a forked child that installs the filter first (a filter cannot
be removed). Probes use arguments that would do something visible, or at least
get a different answer, without the filter: `test_table_probe_differs_unfiltered`
runs the same calls unfiltered to prove each probe can fail."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
import tty
from pathlib import Path

import pytest
from forked import ChildRaised, run_forked
from sandgate.enforcer.sandbox import seccomp

pytestmark = pytest.mark.skipif(
    seccomp.available() is not None, reason=f"kernel without seccomp filters: {seccomp.available()}"
)

libc = ctypes.CDLL(None, use_errno=True)
IS_X86_64 = os.uname().machine == "x86_64"


@pytest.fixture(scope="module")
def program() -> bytes:
    return seccomp.build_filter()


def syscall_number(name: str) -> int:
    import pyseccomp

    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    return seccomp.UNIFIED_SYSCALL_NUMBERS.get(name, number) if number == -1 else number


def raw_syscall(name: str, *args: int) -> int:
    """The errno of syscall `name`(args), 0 when it succeeded."""
    result = libc.syscall(ctypes.c_long(syscall_number(name)), *(ctypes.c_long(a) for a in args))
    return ctypes.get_errno() if result == -1 else 0


def filtered(program: bytes, probe, *args):
    seccomp.install(program)
    return probe(*args)


def errno_of(call, *args) -> int:
    try:
        call(*args)
    except OSError as exc:
        return exc.errno
    return 0


# --- every unconditional entry of the table ------------------------------------------

# Arguments that make each call harmless without the filter (bad pointers, bad
# descriptors, bad flags), so the control run below is safe; all ones by default.
HARMLESS_ARGS = {
    "finit_module": (-1, 0, 0),
    "kexec_load": (1, 1, 1, 0xDEAD0000),
    "kexec_file_load": (-1, -1, 0, 0, 0),
    "clock_settime": (1, 1),
    "setns": (-1, 0),
}
UNCONDITIONAL = [
    pytest.param(name, denial.errno, id=name)
    for denial in seccomp.DENIED
    if not denial.when
    for name in denial.syscalls
    if syscall_number(name) >= 0  # i386-only names (none today) have no native number
]


@pytest.mark.parametrize(("name", "expected"), UNCONDITIONAL)
def test_table_syscall_refused(program: bytes, name: str, expected: int) -> None:
    args = HARMLESS_ARGS.get(name, (1, 1, 1, 1, 1, 1))
    assert run_forked(filtered, program, raw_syscall, name, *args).value == expected


@pytest.mark.parametrize(("name", "expected"), UNCONDITIONAL)
def test_table_probe_differs_unfiltered(name: str, expected: int) -> None:
    args = HARMLESS_ARGS.get(name, (1, 1, 1, 1, 1, 1))
    assert run_forked(raw_syscall, name, *args).value != expected


# --- the conditional entries and the brief's list, with their effects -------------------

KEY_SPEC_USER_KEYRING = -4
KEYCTL_GET_KEYRING_ID = 0
KEY_SPEC_SESSION_KEYRING = -3
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2
IO_URING_PARAMS_SIZE = 120
O_CLOEXEC = os.O_CLOEXEC
SIGCHLD = signal.SIGCHLD
AF_PACKET, AF_TIPC, AF_ALG, AF_VSOCK, AF_BLUETOOTH = 17, 30, 38, 40, 31
ETH_P_ALL_BE = 0x0300
NETLINK_SOCK_DIAG, NETLINK_NETFILTER, NETLINK_KOBJECT_UEVENT = 4, 12, 15
HIGH_JUNK = 1 << 32  # the kernel truncates int arguments; the filter must not be fooled
READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE = 0x0400000, 0x0040000


def probe_add_key(description: str) -> int:
    key_type, name, payload = (
        ctypes.create_string_buffer(text) for text in (b"user", description.encode(), b"secret")
    )
    return raw_syscall(
        "add_key",
        ctypes.addressof(key_type),
        ctypes.addressof(name),
        ctypes.addressof(payload),
        len(payload.value),
        KEY_SPEC_USER_KEYRING,
    )


def probe_bpf_map_create() -> int:
    attr = (ctypes.c_uint32 * 30)(
        BPF_MAP_TYPE_ARRAY, 4, 4, 1
    )  # type, key size, value size, entries
    return raw_syscall("bpf", BPF_MAP_CREATE, ctypes.addressof(attr), ctypes.sizeof(attr))


def probe_perf_event_open() -> int:
    attr = (ctypes.c_uint32 * 32)(1, 128)  # PERF_TYPE_SOFTWARE, size; config 0 = cpu-clock
    return raw_syscall("perf_event_open", ctypes.addressof(attr), 0, -1, -1, 0)


def probe_io_uring_setup() -> int:
    params = ctypes.create_string_buffer(IO_URING_PARAMS_SIZE)
    return raw_syscall("io_uring_setup", 8, ctypes.addressof(params))


def forking_syscall(name: str, *args: int) -> int:
    """errno of a raw fork-like syscall; a child it creates exits at once (and is reaped)."""
    result = libc.syscall(ctypes.c_long(syscall_number(name)), *(ctypes.c_long(a) for a in args))
    if result == 0:
        os._exit(0)
    if result > 0:
        os.waitpid(result, 0)
        return 0
    return ctypes.get_errno()


def probe_clone(flags: int) -> int:
    """Raw clone(flags) without CLONE_VM, like fork."""
    return forking_syscall("clone", flags | SIGCHLD, 0, 0, 0, 0)


def probe_clone3() -> int:
    args = (ctypes.c_uint64 * 8)(0, 0, 0, 0, SIGCHLD, 0, 0, 0)  # struct clone_args, version 0
    return forking_syscall("clone3", ctypes.addressof(args), ctypes.sizeof(args))


def probe_unshare(flags: int) -> tuple[int, int, int]:
    """(errno, user namespace inode, network namespace inode) after unshare(flags)."""
    code = raw_syscall("unshare", flags)
    return code, os.stat("/proc/self/ns/user").st_ino, os.stat("/proc/self/ns/net").st_ino


def probe_socket(family: int, kind: int, protocol: int = 0) -> int:
    return raw_syscall("socket", family, kind, protocol)


def probe_socketpair(family: int) -> int:
    fds = (ctypes.c_int * 2)()
    return raw_syscall("socketpair", family, socket.SOCK_STREAM, 0, ctypes.addressof(fds))


def probe_mount(target: str) -> int:
    return errno_of(_mount, target)


def _mount(target: str) -> None:
    if libc.mount(b"none", target.encode(), b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")


def probe_ioctl_tiocsti(fd: int, request: int) -> int:
    typed = ctypes.create_string_buffer(b"X")
    return raw_syscall("ioctl", fd, request, ctypes.addressof(typed))


def probe_personality(persona: int) -> tuple[int, int]:
    """(errno of personality(persona), the persona afterwards)."""
    code = raw_syscall("personality", persona)
    return code, libc.personality(ctypes.c_ulong(0xFFFFFFFF))


def our_namespaces() -> tuple[int, int]:
    return os.stat("/proc/self/ns/user").st_ino, os.stat("/proc/self/ns/net").st_ino


@pytest.mark.parametrize(
    ("probe", "args", "expected"),
    [
        pytest.param(
            raw_syscall,
            ("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1),
            errno.EPERM,
            id="keyctl",
        ),
        pytest.param(probe_bpf_map_create, (), errno.EPERM, id="bpf-map-create"),
        pytest.param(probe_perf_event_open, (), errno.EPERM, id="perf_event_open"),
        pytest.param(raw_syscall, ("userfaultfd", O_CLOEXEC), errno.EPERM, id="userfaultfd"),
        pytest.param(probe_io_uring_setup, (), errno.EPERM, id="io_uring_setup"),
        pytest.param(probe_clone, (seccomp.CLONE_NEWUSER,), errno.EPERM, id="clone-newuser"),
        pytest.param(probe_clone, (seccomp.CLONE_NEWNET,), errno.EPERM, id="clone-newnet"),
        pytest.param(probe_clone3, (), errno.ENOSYS, id="clone3-enosys"),
        pytest.param(
            probe_socket,
            (AF_PACKET, socket.SOCK_RAW, ETH_P_ALL_BE),
            errno.EAFNOSUPPORT,
            id="af-packet-raw",
        ),
        pytest.param(
            probe_socket,
            (AF_PACKET | HIGH_JUNK, socket.SOCK_RAW, ETH_P_ALL_BE),
            errno.EAFNOSUPPORT,
            id="af-packet-high-junk",
        ),
        pytest.param(
            probe_socket,
            (socket.AF_INET, seccomp.SOCK_PACKET, ETH_P_ALL_BE),
            errno.EAFNOSUPPORT,
            id="af-inet-sock-packet",
        ),
        pytest.param(
            probe_socket, (AF_BLUETOOTH, socket.SOCK_STREAM), errno.EAFNOSUPPORT, id="af-bluetooth"
        ),
        pytest.param(
            probe_socket, (AF_VSOCK, socket.SOCK_STREAM), errno.EAFNOSUPPORT, id="af-vsock"
        ),
        pytest.param(
            probe_socket, (AF_ALG, socket.SOCK_SEQPACKET), errno.EAFNOSUPPORT, id="af-alg"
        ),
        pytest.param(probe_socket, (0, socket.SOCK_STREAM), errno.EAFNOSUPPORT, id="af-unspec"),
        pytest.param(probe_socketpair, (AF_TIPC,), errno.EAFNOSUPPORT, id="socketpair-tipc"),
        pytest.param(
            probe_socket,
            (socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER),
            errno.EPROTONOSUPPORT,
            id="netlink-netfilter",
        ),
        pytest.param(
            probe_socket,
            (socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG),
            errno.EPROTONOSUPPORT,
            id="netlink-sock-diag",
        ),
        pytest.param(
            probe_socket,
            (socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT),
            errno.EPROTONOSUPPORT,
            id="netlink-uevent",
        ),
    ],
)
def test_refused(program: bytes, probe, args: tuple, expected: int) -> None:
    assert run_forked(filtered, program, probe, *args).value == expected


def test_add_key_refused_and_no_key_planted(program: bytes) -> None:
    description = f"sandgate-canary-{os.getpid()}"
    assert run_forked(filtered, program, probe_add_key, description).value == errno.EPERM
    assert description not in Path("/proc/keys").read_text()


@pytest.mark.parametrize(
    "flag",
    [
        pytest.param(seccomp.CLONE_NEWUSER, id="user"),
        pytest.param(seccomp.CLONE_NEWNET, id="net"),
        pytest.param(seccomp.CLONE_NEWUSER | seccomp.CLONE_NEWNS, id="user+mount"),
    ],
)
def test_unshare_refused_namespaces_unchanged(program: bytes, flag: int) -> None:
    code, user_ns, net_ns = run_forked(filtered, program, probe_unshare, flag).value
    assert code == errno.EPERM
    assert (user_ns, net_ns) == our_namespaces()


def test_unshare_probe_works_unfiltered() -> None:
    code, user_ns, _ = run_forked(probe_unshare, seccomp.CLONE_NEWUSER).value
    assert code == 0 and user_ns != our_namespaces()[0]


def test_mount_refused_nothing_mounted(program: bytes, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    try:
        assert run_forked(filtered, program, probe_mount, str(target)).value == errno.EPERM
        assert not os.path.ismount(target)
    finally:
        if os.path.ismount(target):
            libc.umount2(str(target).encode(), 0)


SET_ID_MODE = 0o4755
AT_FDCWD = -100


def probe_set_id(call: str, path: str, mode: int) -> tuple[int, int | None]:
    """(errno of giving `path` `mode` through `call`, the file's mode bits afterwards;
    None: no file). `path` exists (mode 0644) for the chmod calls, not for the others."""
    name = ctypes.create_string_buffer(path.encode())
    address = ctypes.addressof(name)
    if call == "chmod":
        code = raw_syscall("chmod", address, mode)
    elif call == "fchmod":
        fd = os.open(path, os.O_RDONLY)
        code = raw_syscall("fchmod", fd, mode)
        os.close(fd)
    elif call in ("fchmodat", "fchmodat2"):
        code = raw_syscall(call, AT_FDCWD, address, mode, 0)
    elif call == "openat":
        code = raw_syscall("openat", AT_FDCWD, address, os.O_WRONLY | os.O_CREAT, mode)
    elif call == "openat-tmpfile":  # an unnamed file, then linked in with its mode
        directory = ctypes.create_string_buffer(os.path.dirname(path).encode())
        code = raw_syscall(
            "openat", AT_FDCWD, ctypes.addressof(directory), os.O_WRONLY | os.O_TMPFILE, mode
        )
    elif call == "creat":
        code = raw_syscall("creat", address, mode)
    else:  # mknodat of a regular file
        code = raw_syscall("mknodat", AT_FDCWD, address, stat.S_IFREG | mode, 0)
    try:
        return code, stat.S_IMODE(os.lstat(path).st_mode)
    except FileNotFoundError:
        return code, None


@pytest.mark.parametrize(
    ("call", "existing"),
    [
        pytest.param("chmod", True, id="chmod"),
        pytest.param("fchmod", True, id="fchmod"),
        pytest.param("fchmodat", True, id="fchmodat"),
        pytest.param("fchmodat2", True, id="fchmodat2"),
        pytest.param("openat", False, id="openat-creat"),
        pytest.param("openat-tmpfile", False, id="openat-tmpfile"),
        pytest.param("creat", False, id="creat"),
        pytest.param("mknodat", False, id="mknodat"),
    ],
)
@pytest.mark.parametrize(
    "mode", [SET_ID_MODE, 0o2755, SET_ID_MODE | HIGH_JUNK], ids=["suid", "sgid", "high-junk"]
)
def test_set_id_modes_refused_no_set_id_file(
    program: bytes, tmp_path: Path, call: str, existing: bool, mode: int
) -> None:
    target = tmp_path / "target"
    if existing:
        target.write_text("x")
        target.chmod(0o644)
    code, after = run_forked(filtered, program, probe_set_id, call, str(target), mode).value
    assert code == errno.EPERM
    assert after == (0o644 if existing else None)


@pytest.mark.parametrize("call", ["chmod", "openat", "mknodat"])
def test_set_id_probe_works_unfiltered(tmp_path: Path, call: str) -> None:
    target = tmp_path / "target"
    if call == "chmod":
        target.write_text("x")
    old = os.umask(0)
    try:
        code, after = run_forked(probe_set_id, call, str(target), SET_ID_MODE).value
    finally:
        os.umask(old)
    assert code == 0 and after == SET_ID_MODE


def test_plain_modes_and_opens_still_work(program: bytes, tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert run_forked(filtered, program, probe_set_id, "openat", str(target), 0o755).value[0] == 0
    assert run_forked(filtered, program, probe_set_id, "chmod", str(target), 0o1777).value == (
        0,
        0o1777,
    )
    # The mode of an open that creates nothing is not looked at.
    opened = run_forked(
        filtered, program, raw_syscall, "openat", AT_FDCWD, 0, os.O_RDONLY, SET_ID_MODE
    )
    assert opened.value == errno.EFAULT


@pytest.mark.parametrize(
    "request_code",
    [
        pytest.param(seccomp.TIOCSTI, id="tiocsti"),
        pytest.param(seccomp.TIOCSTI | HIGH_JUNK, id="tiocsti-high-junk"),
    ],
)
def test_tiocsti_refused_nothing_typed(program: bytes, request_code: int) -> None:
    controller, terminal = os.openpty()
    try:
        tty.setraw(terminal)
        assert (
            run_forked(filtered, program, probe_ioctl_tiocsti, terminal, request_code).value
            == errno.EPERM
        )
        os.set_blocking(terminal, False)
        assert errno_of(os.read, terminal, 16) == errno.EAGAIN  # no "X" waiting to be read
    finally:
        os.close(controller)
        os.close(terminal)


def test_tiocsti_probe_types_unfiltered() -> None:
    controller, terminal = os.openpty()
    try:
        tty.setraw(terminal)
        assert run_forked(probe_ioctl_tiocsti, terminal, seccomp.TIOCSTI).value == 0
        assert os.read(terminal, 16) == b"X"
    finally:
        os.close(controller)
        os.close(terminal)


@pytest.mark.parametrize(
    ("persona", "expected_errno", "expected_after"),
    [
        pytest.param(READ_IMPLIES_EXEC, errno.EPERM, 0, id="read-implies-exec"),
        pytest.param(ADDR_NO_RANDOMIZE, errno.EPERM, 0, id="addr-no-randomize"),
        pytest.param(
            READ_IMPLIES_EXEC | seccomp.PERSONALITY_TOP_BIT, errno.EPERM, 0, id="top-bit-smuggle"
        ),
        pytest.param(HIGH_JUNK | READ_IMPLIES_EXEC, errno.EPERM, 0, id="high-junk"),
        pytest.param(seccomp.PER_LINUX32, 0, seccomp.PER_LINUX32, id="linux32-allowed"),
        pytest.param(seccomp.UNAME26, 0, seccomp.UNAME26, id="uname26-allowed"),
        pytest.param(seccomp.PERSONALITY_QUERY, 0, 0, id="query-allowed"),
    ],
)
def test_personality(
    program: bytes, persona: int, expected_errno: int, expected_after: int
) -> None:
    assert run_forked(filtered, program, probe_personality, persona).value == (
        expected_errno,
        expected_after,
    )


# --- other syscall ABIs: the filter kills, and the call had no effect ------------------

I386_MKDIR = 39
X32_SYSCALL_BIT = 0x40000000
X86_64_MKDIR = 83
MAP_32BIT = 0x40


def probe_i386_mkdir(path: str) -> int:
    """mkdir(path, 0755) through int 0x80, the i386 syscall table of an x86_64 kernel."""
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    page = libc.mmap(
        None, mmap.PAGESIZE, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_32BIT, -1, 0
    )
    path_at = page + 64
    ctypes.memmove(path_at, path.encode() + b"\0", len(path) + 1)
    code = (
        b"\x53"  # push rbx (callee-saved)
        + b"\xb8"
        + I386_MKDIR.to_bytes(4, "little")  # mov eax, mkdir
        + b"\xbb"
        + path_at.to_bytes(4, "little")  # mov ebx, path
        + b"\xb9"
        + (0o755).to_bytes(4, "little")  # mov ecx, mode
        + b"\xcd\x80"  # int 0x80
        + b"\x5b\xc3"
    )  # pop rbx; ret
    ctypes.memmove(page, code, len(code))
    return ctypes.CFUNCTYPE(ctypes.c_int)(page)()


def probe_x32_mkdir(path: str) -> int:
    result = libc.syscall(
        ctypes.c_long(X32_SYSCALL_BIT | X86_64_MKDIR),
        ctypes.c_char_p(path.encode()),
        ctypes.c_long(0o755),
    )
    return ctypes.get_errno() if result == -1 else 0


@pytest.mark.skipif(not IS_X86_64, reason="int 0x80 and x32 are x86_64's other ABIs")
@pytest.mark.parametrize(
    "probe",
    [
        pytest.param(probe_i386_mkdir, id="i386-int80"),
        pytest.param(probe_x32_mkdir, id="x32"),
    ],
)
def test_other_abi_killed_without_effect(program: bytes, tmp_path: Path, probe) -> None:
    canary = tmp_path / "canary"
    assert run_forked(filtered, program, probe, str(canary)).exit_code == -signal.SIGSYS
    assert not canary.exists()


@pytest.mark.skipif(not IS_X86_64, reason="int 0x80 is x86_64's i386 ABI")
def test_i386_probe_works_unfiltered(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    outcome = run_forked(probe_i386_mkdir, str(canary))
    if outcome.value == -errno.ENOSYS or outcome.exit_code == -signal.SIGSEGV:
        pytest.skip("kernel without IA32 emulation")
    assert canary.is_dir()


# --- what must keep working inside the filter ------------------------------------------


def use_fork() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def use_thread() -> str:
    seen = []
    worker = threading.Thread(target=seen.append, args=("ran",))
    worker.start()
    worker.join()
    return seen[0]


def use_posix_spawn() -> int:  # glibc tries clone3 first, then falls back to clone
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def use_sockets() -> list[str]:
    kinds = [
        (socket.AF_INET, socket.SOCK_STREAM, 0),
        (socket.AF_INET6, socket.SOCK_DGRAM, 0),
        (socket.AF_UNIX, socket.SOCK_STREAM, 0),
        (socket.AF_NETLINK, socket.SOCK_RAW, 0),
    ]
    opened = []
    for family, kind, protocol in kinds:
        with socket.socket(family, kind, protocol) as opened_socket:
            opened.append(opened_socket.family.name)
    left, right = socket.socketpair()
    left.close()
    right.close()
    return opened


def use_terminal_ioctl() -> int:
    controller, terminal = os.openpty()
    return os.get_terminal_size(terminal).columns


def run_command(*argv: str) -> tuple[int, str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=100, check=False)
    return done.returncode, done.stderr[-500:]


@pytest.mark.parametrize(
    ("probe", "args", "expected"),
    [
        pytest.param(use_fork, (), 7, id="fork"),
        pytest.param(use_thread, (), "ran", id="thread"),
        pytest.param(run_command, ("/bin/true",), (0, ""), id="execve-true"),
        pytest.param(use_posix_spawn, (), 0, id="posix_spawn"),
        pytest.param(
            use_sockets, (), ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"], id="sockets"
        ),
        pytest.param(use_terminal_ioctl, (), 0, id="terminal-ioctl"),
        pytest.param(probe_personality, (seccomp.PER_LINUX,), (0, 0), id="personality-linux"),
        pytest.param(
            run_command,
            ("/usr/bin/python3", "-c", "import socket; socket.getaddrinfo('localhost', 80)"),
            (0, ""),
            id="getaddrinfo",
        ),
        pytest.param(
            run_command,
            ("git", "--version"),
            (0, ""),
            id="git-version",
            marks=pytest.mark.skipif(not shutil.which("git"), reason="no git"),
        ),
    ],
)
def test_still_works(program: bytes, probe, args: tuple, expected) -> None:
    assert run_forked(filtered, program, probe, *args).value == expected


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no system python3")
def test_venv_still_works(program: bytes, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert run_forked(
        filtered, program, run_command, "/usr/bin/python3", "-m", "venv", str(venv)
    ).value == (0, "")
    assert (venv / "bin" / "pip").exists()


# --- build, cache, install errors --------------------------------------------------------


def test_program_is_stable_and_small(program: bytes) -> None:
    assert seccomp.build_filter() == program
    assert len(program) % seccomp.SOCK_FILTER_SIZE == 0
    assert len(program) // seccomp.SOCK_FILTER_SIZE < seccomp.BPF_MAXINSNS // 4


def test_cache_round_trip(program: bytes, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert seccomp.build_filter(cache) == program
    (cached,) = cache.iterdir()
    assert cached.name.startswith("seccomp-") and cached.read_bytes() == program
    cached.write_bytes(program[:-8])  # a shorter (still well-formed) program: read back as is
    assert seccomp.build_filter(cache) == program[:-8]


def test_cache_ignored_when_others_can_write(program: bytes, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    seccomp.build_filter(cache)
    (cached,) = cache.iterdir()
    cached.write_bytes(b"\0" * 8)  # planted: "return KILL" for every syscall
    cached.chmod(0o666)
    assert seccomp.build_filter(cache) == program


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\0" * 7, id="not-whole-instructions"),
        pytest.param(b"\0" * 8 * (seccomp.BPF_MAXINSNS + 1), id="too-long"),
    ],
)
def test_install_rejects_malformed_program(bad: bytes) -> None:
    with pytest.raises(OSError, match="seccomp: not a BPF program"):
        seccomp.install(bad)


def test_install_kernel_refusal_is_oserror() -> None:
    invalid_opcode = bytes([0xFF, 0xFF, 0, 0, 0, 0, 0, 0])
    with pytest.raises(
        ChildRaised, match="OSError: .*seccomp: loading the filter failed: Invalid argument"
    ):
        run_forked(seccomp.install, invalid_opcode)


def test_available_names_the_missing_action(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    actions = tmp_path / "actions_avail"
    actions.write_text("kill_thread trap errno allow\n")
    monkeypatch.setattr(seccomp, "ACTIONS_AVAIL", str(actions))
    assert "kill_process" in seccomp.available()
    monkeypatch.setattr(seccomp, "ACTIONS_AVAIL", str(tmp_path / "absent"))
    assert "CONFIG_SECCOMP_FILTER" in seccomp.available()


REQUIRED_BY_ISSUE_8 = {
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "clone",
    "unshare",
    "clone3",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "clock_adjtime",
    "syslog",
    "quotactl",
    "lookup_dcookie",
    "iopl",
    "ioperm",
    "personality",
    "ioctl",
    "socket",
    "socketpair",
}


def test_table_documented_and_complete() -> None:
    listed = {name for denial in seccomp.DENIED for name in denial.syscalls}
    assert REQUIRED_BY_ISSUE_8 - listed == set()
    for denial in seccomp.DENIED:
        assert denial.errno > 0 or denial.errno == seccomp.NO_EFFECT and "no-op" in denial.why
        assert denial.why and "\n" not in denial.why and len(denial.why) <= 100


# --- line disciplines, and syscalls newer than the table ---------------------------------

N_NULL = 27  # a line discipline built into most kernels (this one's /proc/tty/ldiscs)
TIOCGETD = 0x5424


def probe_set_line_discipline(terminal: int, discipline: int) -> tuple[int, int]:
    """(errno of TIOCSETD, the terminal's discipline after it: TIOCGETD)."""
    chosen, current = ctypes.c_int(discipline), ctypes.c_int(-1)
    result = libc.ioctl(terminal, ctypes.c_ulong(seccomp.TIOCSETD), ctypes.byref(chosen))
    failure = ctypes.get_errno() if result == -1 else 0
    libc.ioctl(terminal, ctypes.c_ulong(TIOCGETD), ctypes.byref(current))
    return failure, current.value


def test_line_discipline_refused_terminal_unchanged(program: bytes) -> None:
    controller, terminal = os.openpty()
    try:
        refused = run_forked(filtered, program, probe_set_line_discipline, terminal, N_NULL)
        assert refused.value == (errno.EPERM, 0)  # still N_TTY
        unfiltered = run_forked(probe_set_line_discipline, terminal, N_NULL)
        if unfiltered.value[0] == errno.EINVAL:
            pytest.skip("kernel without n_null: the control cannot show the discipline change")
        assert unfiltered.value == (0, N_NULL)
    finally:
        os.close(controller)
        os.close(terminal)


def probe_console_settings(terminal: int) -> list[int]:
    """The errno of each virtual-console setting ioctl on `terminal` (0: it went)."""
    found = []
    for request in seccomp.VT_SETTINGS:
        result = libc.ioctl(terminal, ctypes.c_ulong(request), ctypes.c_ulong(0))
        found.append(ctypes.get_errno() if result == -1 else 0)
    return found


def test_virtual_console_settings_are_refused(program: bytes) -> None:
    """Run from a text console, the task shares it: its keyboard mode, keymaps, fonts
    and switching outlive the task. Each request is refused by the filter (EPERM),
    where a pty unfiltered answers that it is no console (ENOTTY, EINVAL)."""
    controller, terminal = os.openpty()
    try:
        refused = run_forked(filtered, program, probe_console_settings, terminal).value
        assert set(refused) == {errno.EPERM}
        unfiltered = run_forked(probe_console_settings, terminal).value
        assert errno.EPERM not in unfiltered
    finally:
        os.close(controller)
        os.close(terminal)


MSEAL, FILE_GETATTR = 462, 468  # implemented here (Linux >= 6.17) and above the fence below


def raw_numbers(*numbers: int) -> list[int]:
    """The errno of each syscall number called with harmless arguments (0 if it succeeded)."""
    found = []
    for number in numbers:
        result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(0) for _ in range(5)))
        found.append(ctypes.get_errno() if result == -1 else 0)
    return found


def test_syscalls_above_the_fence_get_enosys_below_reach_the_kernel(program: bytes) -> None:
    """The mechanism, shown with a fence lowered to 461 on top of the real program:
    mseal and file_getattr exist on this kernel (no ENOSYS unfiltered) and get
    ENOSYS above the fence; 461 and the filter's own refusals still work."""
    machine = os.uname().machine
    if machine not in seccomp.AUDIT_ARCH:
        assert seccomp.newer_syscalls_fence(machine, 461) == b""
        pytest.skip(f"no fence on {machine}")
    unfiltered = run_forked(raw_numbers, MSEAL, FILE_GETATTR).value
    if errno.ENOSYS in unfiltered:
        pytest.skip("kernel older than 6.17: the control calls do not exist")
    lowered = seccomp.newer_syscalls_fence(machine, MSEAL - 1) + program
    assert run_forked(filtered, lowered, raw_numbers, MSEAL, FILE_GETATTR).value == [
        errno.ENOSYS,
        errno.ENOSYS,
    ]
    assert run_forked(filtered, lowered, raw_syscall, "bpf", 1, 1, 1).value == errno.EPERM
    assert run_forked(filtered, lowered, use_fork).value == 7


def test_real_fence_sits_at_the_newest_reviewed_syscall(program: bytes) -> None:
    newest = seccomp.NEWEST_REVIEWED_SYSCALL
    above = (newest + 1, 1000, seccomp.X32_SYSCALL_BIT - 1)
    if os.uname().machine not in seccomp.AUDIT_ARCH:
        pytest.skip("no fence here")
    assert program.startswith(seccomp.newer_syscalls_fence(os.uname().machine, newest))
    # A table entry above the fence would be shadowed by its ENOSYS: raise the fence first.
    named = {name for denial in seccomp.DENIED for name in denial.syscalls}
    assert max(syscall_number(name) for name in named) <= newest
    assert run_forked(filtered, program, raw_numbers, *above).value == [errno.ENOSYS] * 3
    reviewed = run_forked(filtered, program, raw_numbers, newest, FILE_GETATTR).value
    if run_forked(raw_numbers, newest).value != [errno.ENOSYS]:  # the kernel has it
        assert errno.ENOSYS not in reviewed


@pytest.mark.skipif(not IS_X86_64, reason="x32 is x86_64's")
def test_x32_numbers_above_the_fence_still_kill(program: bytes) -> None:
    """The fence hands x32 numbers (bit 30) to libseccomp's program: killed, not ENOSYS."""
    outcome = run_forked(filtered, program, raw_numbers, seccomp.X32_SYSCALL_BIT | 470)
    assert outcome.exit_code == -signal.SIGSYS


# --- host-wide budgets: native AIO contexts, huge pages ----------------------------------

AIO_NR = Path("/proc/sys/fs/aio-nr")


def probe_io_setup(events: int) -> int:
    """errno of io_setup(events) with a real context pointer (0: made, then destroyed)."""
    context = ctypes.c_ulong(0)
    code = raw_syscall("io_setup", events, ctypes.addressof(context))
    if code == 0:
        raw_syscall("io_destroy", context.value)
    return code


def probe_io_setup_held(events: int) -> tuple[int, int]:
    """(errno of io_setup(events), fs.aio-nr while its context would be held)."""
    context = ctypes.c_ulong(0)
    code = raw_syscall("io_setup", events, ctypes.addressof(context))
    return code, int(AIO_NR.read_text())


def test_native_aio_refused_and_takes_no_context(program: bytes) -> None:
    """io_setup gets ENOSYS (as on a kernel without AIO) and fs.aio-nr, host-wide,
    does not grow by the 4096 events asked; unfiltered, the same call makes one."""
    before = int(AIO_NR.read_text())
    code, during = run_forked(filtered, program, probe_io_setup_held, 4096).value
    assert code == errno.ENOSYS
    assert during < before + 4096
    assert run_forked(probe_io_setup, 4096).value == 0


MAP_HUGETLB, MFD_HUGETLB, SHM_HUGETLB = 0x40000, 0x4, 0o4000  # as the kernel's headers
MAP_HUGE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB
HUGE_PAGE = 2 << 20


def probe_mmap(flags: int) -> int:
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_ulong, ctypes.c_int, ctypes.c_long
    )  # fmt: skip
    address = libc.mmap(None, HUGE_PAGE, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return ctypes.get_errno()
    libc.munmap(ctypes.c_void_p(address), HUGE_PAGE)
    return 0


def probe_memfd_hugetlb(flags: int) -> int:
    return errno_of(os.memfd_create, "sg-huge", flags)


IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0


def probe_shmget(flags: int) -> int:
    libc.shmget.restype = ctypes.c_int
    segment = libc.shmget(IPC_PRIVATE, ctypes.c_size_t(HUGE_PAGE), flags | IPC_CREAT | 0o600)
    if segment < 0:
        return ctypes.get_errno()
    libc.shmctl(segment, IPC_RMID, None)
    return 0


HUGETLB_PROBES = [
    pytest.param(probe_mmap, MAP_HUGE, id="mmap-map-hugetlb"),
    pytest.param(probe_mmap, MAP_HUGE | (21 << 26), id="mmap-map-huge-2mb"),  # MAP_HUGE_2MB
    pytest.param(probe_memfd_hugetlb, MFD_HUGETLB, id="memfd-hugetlb"),
    pytest.param(probe_memfd_hugetlb, MFD_HUGETLB | 1, id="memfd-hugetlb-cloexec"),
    pytest.param(probe_shmget, SHM_HUGETLB, id="shmget-shm-hugetlb"),
]


@pytest.mark.parametrize(("probe", "flags"), HUGETLB_PROBES)
def test_huge_pages_refused(program: bytes, probe, flags: int) -> None:
    """EPERM from the filter, whatever the host's pool: the kernel itself answers these
    with success or ENOMEM here (the control below), never EPERM for root."""
    assert run_forked(filtered, program, probe, flags).value == errno.EPERM
    assert run_forked(probe, flags).value != errno.EPERM


@pytest.mark.parametrize(
    ("probe", "flags"),
    [
        pytest.param(probe_mmap, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, id="mmap-plain"),
        pytest.param(probe_memfd_hugetlb, 1, id="memfd-plain"),
        pytest.param(probe_shmget, 0, id="shmget-plain"),
    ],
)
def test_normal_pages_still_work(program: bytes, probe, flags: int) -> None:
    assert run_forked(filtered, program, probe, flags).value == 0


# --- the page cache: no eviction, no probe (red team kernel, finding 2) ---------------

PAGE = 4096
FILE_PAGES = 64


def cached_pages(path: Path) -> int:
    """How many pages of `path` are cached: each preadv2 RWF_NOWAIT that reads (unfiltered)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead of its own
        count, buf = 0, bytearray(1)
        for page in range(FILE_PAGES):
            try:
                os.preadv(fd, [buf], page * PAGE, os.RWF_NOWAIT)
                count += 1
            except BlockingIOError:
                pass
        return count
    finally:
        os.close(fd)


@pytest.fixture
def cached_file(tmp_path: Path) -> Path:
    """A file of FILE_PAGES pages, all cached, on a file system that can evict them."""
    path = tmp_path / "cached.bin"
    path.write_bytes(os.urandom(FILE_PAGES * PAGE))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        f.read()
    if cached_pages(path) != FILE_PAGES:
        pytest.skip("the file's pages are not all cached here")
    return path


def advise(path: str, advice: int) -> int:
    """errno of fadvise64(fd, 0, 0, advice) on a read-only descriptor of `path` (raw: the
    advice may carry junk above 32 bits, which the kernel drops)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return raw_syscall("fadvise64", fd, 0, 0, advice)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "advice",
    [
        pytest.param(os.POSIX_FADV_DONTNEED, id="dontneed"),
        pytest.param(os.POSIX_FADV_NOREUSE, id="noreuse"),
        pytest.param(os.POSIX_FADV_DONTNEED | 1 << 32, id="dontneed-junk-above-32-bits"),
    ],
)
def test_cache_dropping_advice_succeeds_and_drops_nothing(
    program: bytes, cached_file: Path, advice: int
) -> None:
    assert run_forked(filtered, program, advise, str(cached_file), advice).value == 0
    assert cached_pages(cached_file) == FILE_PAGES


def test_dontneed_drops_the_cache_unfiltered(cached_file: Path) -> None:
    # The control: unfiltered, the advice drops the pages (a few tries: pages still in
    # another CPU's LRU batch, or under writeback on a busy host, stay the first time).
    for _ in range(5):
        assert run_forked(advise, str(cached_file), os.POSIX_FADV_DONTNEED).value == 0
        if cached_pages(cached_file) < FILE_PAGES // 2:
            return
        time.sleep(0.2)
    raise AssertionError(f"{cached_pages(cached_file)} of {FILE_PAGES} pages still cached")


def read_nowait(path: str, flags: int, write: bool = False) -> int:
    """errno of preadv2 (pwritev2) of one byte at offset 0 with `flags` (raw syscall)."""
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    buf = ctypes.create_string_buffer(1)
    iov = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 1)
    try:
        name = "pwritev2" if write else "preadv2"
        return raw_syscall(name, fd, ctypes.addressof(iov), 1, 0, 0, flags)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("flags", "write", "expected"),
    [
        pytest.param(os.RWF_NOWAIT, False, errno.EOPNOTSUPP, id="preadv2-nowait"),
        pytest.param(os.RWF_NOWAIT | os.RWF_HIPRI, False, errno.EOPNOTSUPP, id="preadv2-more"),
        pytest.param(os.RWF_NOWAIT | 1 << 32, False, errno.EOPNOTSUPP, id="preadv2-junk"),
        pytest.param(os.RWF_NOWAIT, True, errno.EOPNOTSUPP, id="pwritev2-nowait"),
        pytest.param(0, False, 0, id="preadv2-plain"),
        pytest.param(os.RWF_HIPRI, False, 0, id="preadv2-hipri"),
        pytest.param(os.RWF_DSYNC, True, 0, id="pwritev2-dsync"),
    ],
)
def test_nowait_reads_and_writes_are_refused(
    program: bytes, cached_file: Path, flags: int, write: bool, expected: int
) -> None:
    assert run_forked(filtered, program, read_nowait, str(cached_file), flags, write).value == (
        expected
    )
    if not write:  # ext4 answers a buffered RWF_NOWAIT write EOPNOTSUPP itself
        assert run_forked(read_nowait, str(cached_file), flags & 0xFFFFFFFF, write).value == 0


@pytest.mark.parametrize(
    "advice",
    [os.POSIX_FADV_NORMAL, os.POSIX_FADV_RANDOM, os.POSIX_FADV_SEQUENTIAL, os.POSIX_FADV_WILLNEED],
)
def test_other_advice_still_reaches_the_kernel(program: bytes, advice: int) -> None:
    assert run_forked(filtered, program, advise, "/etc/passwd", advice).value == 0
    bad = run_forked(filtered, program, raw_syscall, "fadvise64", -1, 0, 0, advice).value
    assert bad == errno.EBADF  # the kernel answered, not the filter


# --- RLIMIT_CORE stays as the sandbox set it (inherit.core_limited) --------------------


def set_core_limit(soft: int, hard: int, old: bool = False) -> tuple[int, tuple[int, int]]:
    """(errno of prlimit64(0, RLIMIT_CORE, new, old?), the limit afterwards)."""
    new = (ctypes.c_uint64 * 2)(soft, hard)
    before = (ctypes.c_uint64 * 2)()
    failure = raw_syscall(
        "prlimit64", 0, seccomp.RLIMIT_CORE, ctypes.addressof(new),
        ctypes.addressof(before) if old else 0,
    )  # fmt: skip
    return failure, resource.getrlimit(resource.RLIMIT_CORE)


def core_limited_then(program: bytes, probe, *args):
    resource.setrlimit(resource.RLIMIT_CORE, (1, 1))  # as inherit.core_limited leaves it
    return filtered(program, probe, *args)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param((0, 0), (0, (1, 1)), id="lower-to-0"),
        pytest.param((0, 1), (0, (1, 1)), id="soft-0"),
        pytest.param((0, 0, True), (errno.EPERM, (1, 1)), id="with-old-value"),
    ],
)
def test_the_core_limit_cannot_be_changed(program: bytes, args, expected) -> None:
    assert run_forked(core_limited_then, program, set_core_limit, *args).value == expected


def use_setrlimit_core() -> tuple[int, int]:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # what a program turning cores off does
    return resource.getrlimit(resource.RLIMIT_CORE)


def test_turning_cores_off_still_succeeds_and_other_limits_still_change(program: bytes) -> None:
    assert run_forked(core_limited_then, program, use_setrlimit_core).value == (1, 1)
    assert run_forked(filtered, program, use_other_limit).value == 64
    assert run_forked(set_core_limit, 0, 0).value == (0, (0, 0))  # unfiltered: it changes


def use_other_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- state that outlives the task: fscrypt keys, inode flags, leases -------------------
# (red team hosteffects, session 51, findings 1, 3 and 5)


def probe_ioctls(requests: tuple[int, ...]) -> list[int]:
    """errno of ioctl(memfd, request, NULL) for each request (raw: junk above 32 bits
    stays). Unfiltered, a memfd (shmem) answers ENOTTY or EFAULT, never the filter's."""
    fd = os.memfd_create("sg-ioctl")
    try:
        return [raw_syscall("ioctl", fd, request, 0) for request in requests]
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        pytest.param(seccomp.LASTING_FSCRYPT_IOCTLS, errno.EOPNOTSUPP, id="fscrypt-verity"),
        pytest.param(seccomp.INODE_ATTRIBUTE_IOCTLS, errno.EPERM, id="inode-attributes"),
        pytest.param(seccomp.FILE_SYSTEM_IDENTITY_IOCTLS, errno.EPERM, id="fs-label-uuid"),
    ],
)
def test_ioctls_with_lasting_effects_are_refused(
    program: bytes, requests: tuple[int, ...], expected: int
) -> None:
    with_junk = requests + tuple(request | HIGH_JUNK for request in requests)
    assert run_forked(filtered, program, probe_ioctls, with_junk).value == [expected] * len(
        with_junk
    )
    assert expected not in run_forked(probe_ioctls, requests).value


FS_IOC_GETFLAGS, FS_IOC_FSGETXATTR = 0x80086601, 0x801C581F


def read_flags_lock_and_make_fifo(directory: str) -> tuple[int, int, str]:
    """What builds keep: (errno of FS_IOC_GETFLAGS, of FS_IOC_FSGETXATTR, a FIFO's type)
    on `directory`, after taking a record lock and an OFD lock on files in it."""
    with open(os.path.join(directory, "locked"), "w") as locked:
        fcntl.lockf(locked, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(os.path.join(directory, "ofd-locked"), "w") as locked:
        fcntl.fcntl(locked, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = errno_of(fcntl.ioctl, fd, FS_IOC_GETFLAGS, bytes(8))
        xattr = errno_of(fcntl.ioctl, fd, FS_IOC_FSGETXATTR, bytes(28))
    finally:
        os.close(fd)
    os.mkfifo(os.path.join(directory, "fifo"))
    return flags, xattr, stat.filemode(os.stat(os.path.join(directory, "fifo")).st_mode)[0]


def test_flag_reads_locks_and_fifos_still_work(program: bytes, tmp_path: Path) -> None:
    assert run_forked(filtered, program, read_flags_lock_and_make_fifo, str(tmp_path)).value == (
        0,
        0,
        "p",
    )


def probe_lease(path: str, command: int, argument: int) -> tuple[int, int]:
    """(errno of raw fcntl(fd, command, argument) on a read-only descriptor of `path`,
    the descriptor's lease afterwards: F_GETLEASE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return raw_syscall("fcntl", fd, command, argument), fcntl.fcntl(fd, fcntl.F_GETLEASE)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("command", "argument", "expected"),
    [
        pytest.param(seccomp.F_SETLEASE, fcntl.F_RDLCK, errno.EACCES, id="read-lease"),
        pytest.param(seccomp.F_SETLEASE, fcntl.F_WRLCK, errno.EACCES, id="write-lease"),
        pytest.param(seccomp.F_SETLEASE | HIGH_JUNK, fcntl.F_RDLCK, errno.EACCES, id="cmd-junk"),
        pytest.param(seccomp.F_SETLEASE, fcntl.F_RDLCK | HIGH_JUNK, errno.EACCES, id="arg-junk"),
        # Letting go reaches the kernel: with no lease held, it answers EAGAIN.
        pytest.param(seccomp.F_SETLEASE, fcntl.F_UNLCK, errno.EAGAIN, id="unlock"),
        # A delegation's type sits in memory: refused whole, as a kernel without it does.
        pytest.param(seccomp.F_SETDELEG, 0, errno.EINVAL, id="delegation"),
    ],
)
def test_leases_are_refused(
    program: bytes, tmp_path: Path, command: int, argument: int, expected: int
) -> None:
    leased = tmp_path / "leased"
    leased.write_text("x\n")
    assert run_forked(filtered, program, probe_lease, str(leased), command, argument).value == (
        expected,
        fcntl.F_UNLCK,
    )


def test_lease_probe_takes_a_lease_unfiltered(tmp_path: Path) -> None:
    leased = tmp_path / "leased"
    leased.write_text("x\n")
    taken = run_forked(probe_lease, str(leased), seccomp.F_SETLEASE, fcntl.F_RDLCK).value
    assert taken == (0, fcntl.F_RDLCK)
