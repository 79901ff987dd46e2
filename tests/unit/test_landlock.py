"""enforcer/sandbox/landlock.py against the real kernel, in forked children.

Each refusal is checked twice: the call fails in the restricted child, and the
parent finds the filesystem (or the process) unchanged afterwards."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from forked import run_forked
from sandgate.enforcer.sandbox import landlock

ABI = landlock.abi_version()
pytestmark = pytest.mark.skipif(ABI == 0, reason="kernel without Landlock")
ORIGINAL = b"original\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/a (to be writable), tmp/b (not) with b/existing and a/movable in them."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "existing").write_bytes(ORIGINAL)
    (tmp_path / "a" / "movable").write_bytes(ORIGINAL)
    return tmp_path


def restricted(writable: list[str], action, *args):
    """restrict_writes(writable), then action(*args): (ABI applied, errno of action or 0)."""
    applied = landlock.restrict_writes(writable)
    try:
        action(*args)
    except OSError as exc:
        return applied, exc.errno
    return applied, 0


def write_file(path: str, data: bytes = b"written\n", mode: str = "wb") -> None:
    with open(path, mode) as handle:
        handle.write(data)


def truncate(path: str) -> None:
    os.truncate(path, 0)


def work_in(directory: str) -> None:
    """What a build does in its workspace: create, write, rename, mkdir, remove."""
    write_file(f"{directory}/new")
    os.rename(f"{directory}/new", f"{directory}/renamed")
    os.mkdir(f"{directory}/sub")
    os.symlink("renamed", f"{directory}/link")
    truncate(f"{directory}/renamed")
    os.unlink(f"{directory}/link")
    os.rmdir(f"{directory}/sub")


def test_abi_of_this_kernel() -> None:
    assert ABI >= 1
    assert landlock.handled_write_access(ABI) & landlock.ACCESS_FS_READ_FILE == 0


def test_writes_beneath_writable_path(tree: Path) -> None:
    assert run_forked(restricted, [str(tree / "a")], work_in, str(tree / "a")).value == (
        min(ABI, 7),
        0,
    )
    assert (tree / "a" / "renamed").read_bytes() == b""
    assert not (tree / "a" / "sub").exists()


@pytest.mark.parametrize(
    ("action", "relative_args"),
    [
        pytest.param(write_file, ("b/new",), id="create-file"),
        pytest.param(write_file, ("b/existing",), id="overwrite-file"),
        pytest.param(write_file, ("b/existing", b"more", "ab"), id="append-file"),
        pytest.param(truncate, ("b/existing",), id="truncate"),
        pytest.param(os.mkdir, ("b/new",), id="mkdir"),
        pytest.param(os.mkfifo, ("b/new",), id="mkfifo"),
        pytest.param(os.symlink, ("existing", "b/new"), id="symlink"),
        pytest.param(os.unlink, ("b/existing",), id="remove-file"),
        pytest.param(os.rename, ("b/existing", "b/new"), id="rename-in-b"),
        pytest.param(os.rename, ("a/movable", "b/new"), id="move-a-to-b"),
        pytest.param(os.rename, ("b/existing", "a/new"), id="move-b-to-a"),
        pytest.param(os.link, ("b/existing", "b/new"), id="hardlink-in-b"),
    ],
)
def test_writes_elsewhere_refused_without_effect(tree: Path, action, relative_args: tuple) -> None:
    args = [
        str(tree / arg) if isinstance(arg, str) and "/" in arg else arg for arg in relative_args
    ]
    applied, code = run_forked(restricted, [str(tree / "a")], action, *args).value
    assert applied >= 1
    assert code == errno.EACCES, os.strerror(code)
    assert sorted(p.name for p in (tree / "b").iterdir()) == ["existing"]
    assert (tree / "b" / "existing").read_bytes() == ORIGINAL
    assert (tree / "a" / "movable").read_bytes() == ORIGINAL
    assert not (tree / "a" / "new").exists()


@pytest.mark.parametrize(
    ("writable", "expected"),
    [
        pytest.param(["/dev/null"], 0, id="listed"),
        pytest.param([], errno.EACCES, id="not-listed"),
    ],
)
def test_dev_null(tree: Path, writable: list[str], expected: int) -> None:
    assert run_forked(restricted, writable, write_file, "/dev/null").value[1] == expected


def test_regular_file_path_gets_file_rights_only(tree: Path) -> None:
    target = tree / "b" / "existing"
    assert run_forked(restricted, [str(target)], write_file, str(target)).value[1] == 0
    assert target.read_bytes() == b"written\n"
    assert run_forked(restricted, [str(target)], os.unlink, str(target)).value[1] == errno.EACCES
    assert target.exists()


def test_missing_paths_are_skipped(tree: Path) -> None:
    writable = [str(tree / "absent"), str(tree / "a")]
    assert run_forked(restricted, writable, write_file, str(tree / "a" / "new")).value == (
        min(ABI, 7),
        0,
    )
    assert not (tree / "absent").exists()


def no_new_privs() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("NoNewPrivs:"))


def test_sets_no_new_privs(tree: Path) -> None:
    assert run_forked(no_new_privs).value == 0
    assert run_forked(restricted, [], no_new_privs).value == (min(ABI, 7), 0)
    assert run_forked(lambda: (landlock.restrict_writes([]), no_new_privs())[1]).value == 1


def connect_abstract(name: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(name)


@pytest.mark.skipif(ABI < landlock.SCOPES_ABI, reason="Landlock scopes need ABI 6")
def test_abstract_socket_of_outside_not_connectable() -> None:
    name = f"\0sandgate-landlock-test-{os.getpid()}".encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(name)
        server.listen(4)
        server.settimeout(0)
        assert run_forked(restricted, [], connect_abstract, name).value[1] == errno.EPERM
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing got through
        assert run_forked(connect_abstract, name).value is None  # the probe connects unrestricted


@pytest.mark.skipif(ABI < landlock.SCOPES_ABI, reason="Landlock scopes need ABI 6")
def test_process_outside_not_signalled() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert (
            run_forked(restricted, [], os.kill, sleeper.pid, signal.SIGTERM).value[1] == errno.EPERM
        )
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
