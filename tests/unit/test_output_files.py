"""The files sandgate writes where an admin points it must hold what is written: a
file on one of the kernel's interface file systems (proc, sysfs...) is refused before
anything is written (proxy/file_systems.py; the audit log's case is in
test_disk_faults.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sandgate.enforcer.summary_file import SummaryFile, SummaryFileError
from sandgate.proxy.file_systems import kernel_interface


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/proc/self/status", "proc"), ("/sys/kernel", "sysfs"), ("/", None), ("/dev/null", None)],
)
def test_the_kernels_interfaces_are_told_from_storage(path, kind):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert kernel_interface(fd) == kind
    finally:
        os.close(fd)


def test_a_summary_on_a_kernel_setting_is_refused_and_left_as_it_was():
    comm = Path(f"/proc/{os.getpid()}/comm")  # stands for /proc/sys/kernel/hostname
    before = comm.read_text()
    with pytest.raises(SummaryFileError, match=r"is on proc, the kernel's settings, not a file"):
        SummaryFile(comm)
    assert comm.read_text() == before


def test_a_summary_to_a_pipe_or_a_file_is_written(tmp_path):
    read, write = os.pipe()
    try:
        summary = SummaryFile(Path(f"/proc/self/fd/{write}"))  # `--summary-json /dev/stdout`
        assert summary.write({"exit_code": 0}, 0)
        assert b'"exit_code": 0' in os.read(read, 4096)
    finally:
        os.close(read)
        os.close(write)
    path = tmp_path / "summary.json"
    assert SummaryFile(path).write({"exit_code": 3}, 3)
    assert '"exit_code": 3' in path.read_text()


@pytest.mark.parametrize("exists", [False, True], ids=["made", "given-world-writable"])
def test_a_summary_is_not_writable_by_other_users_whatever_the_umask(tmp_path, exists):
    """Found by a red team: made 0666 minus the umask, a summary was world-writable
    under a CI's umask 0, and a local user could change the exit code or the planted
    paths its caller reads."""
    path = tmp_path / "summary.json"
    if exists:
        path.write_text("")
        path.chmod(0o666)
    old = os.umask(0)
    try:
        summary = SummaryFile(path)
    finally:
        os.umask(old)
    assert summary.write({"task_id": "x"}, 0)
    assert path.stat().st_mode & 0o777 == 0o644
