"""fscrypt keys a task could add would outlive its run (a red team found it, session 51).

On a file system with the ext4 `encrypt` feature (what `fscrypt setup` or `tune2fs -O
encrypt` enable, e.g. for encrypted home directories), FS_IOC_ADD_ENCRYPTION_KEY is an
ioctl any user may issue on any file of it, a read-only one included. It is not
keyctl, and v2 keys need no privilege. Each key goes into the file system's keyring,
with a claim charged to the caller's host uid (the sandbox slot's), and stays until the
file system is unmounted (for / or /home, until reboot), in host kernel memory that no
cgroup counts (struct fscrypt_master_key and its HMAC transform): 178 per slot here
(kernel.keys.maxbytes 20000), a quota then used up for the slot's later tasks, and a
channel to them (FS_IOC_GET_ENCRYPTION_KEY_STATUS). The filter refuses fscrypt's key
and policy ioctls (enforcer/sandbox/seccomp.py `LASTING_FSCRYPT_IOCTLS`): EOPNOTSUPP, as
on a file system without the feature.

Also held before the filter: the same ioctls could not lock a repository away from the
after-run check, since FS_IOC_SET_ENCRYPTION_POLICY checks ownership without the
mount's idmap (EACCES on a directory made through the idmapped workspace).

Control: an honest run leaves no key. The test makes its own file system (mkfs.ext4
-O encrypt, `mount -o loop` under /srv); it skips only on a kernel without ext4
encryption.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

# Adds up to N fresh v2 keys on a file of the file system (argv[2], or the workspace),
# printing why it stopped and how many it added.
ADD_KEYS = r"""
import fcntl, os, struct, sys
FS_IOC_ADD_ENCRYPTION_KEY = 0xC0506617
def add_key(path, raw):
    fd = os.open(path, os.O_RDONLY)
    arg = bytearray(struct.pack("II32sII32s", 2, 0, b"\0" * 32, len(raw), 0, b"\0" * 32) + raw)
    fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg, True)
    os.close(fd)
done = 0
for i in range(int(sys.argv[1])):
    try:
        add_key(sys.argv[2] if len(sys.argv) > 2 else ".", os.urandom(64))
        done += 1
    except OSError as e:
        print("stopped:", e)
        break
print("keys added", done)
"""


@pytest.fixture
def encrypting_fs(tmp_path):
    """An ext4 with the encrypt feature, loop-mounted under /srv (its image in tmp_path)."""
    if not Path("/sys/fs/ext4/features/encryption").exists():
        pytest.skip("kernel without ext4 encryption")
    # Outside /tmp (the sandbox's /tmp is a tmpfs of its own), so that a task whose
    # workspace is elsewhere sees it in the host's read-only view.
    base = Path("/srv") if Path("/srv").is_dir() else Path("/opt")
    image, mnt = tmp_path / "fs.img", base / f"sg-fscrypt-{os.getpid()}-{tmp_path.name}"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "encrypt", str(image)], check=True)
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        mnt.rmdir()


def _workdir(root: Path, name: str) -> Path:
    workdir = root / name
    (workdir / "steps").mkdir(parents=True)
    return workdir


POOL = range(2_000_000_000, 2_067_108_864)


def _pool_key_users() -> dict[int, str]:
    users = {}
    for line in Path("/proc/key-users").read_text().splitlines():
        uid = int(line.split(":")[0])
        if uid in POOL:
            users[uid] = line.strip()
    return users


@pytest.mark.parametrize("task", ["keys", "keys_through_read_only_view", "honest"])
def test_a_task_leaves_no_kernel_keys_behind(net, tmp_path, encrypting_fs, task):
    """fscrypt keys a task adds are the file system's: they outlive the run (charged to
    its slot's host uid, in host kernel memory no cgroup counts) until the file system
    is unmounted. Control: an honest run leaves none."""
    before = _pool_key_users()
    if task == "keys":  # through the workspace, on that file system
        step, workdir = python(ADD_KEYS, "500"), _workdir(encrypting_fs, "w")
    elif task == "keys_through_read_only_view":  # the workspace elsewhere: the host's
        # read-only view of a file system with the encrypt feature is enough
        step = python(ADD_KEYS, "500", str(encrypting_fs))
        workdir = _workdir(tmp_path, "elsewhere")
    else:
        step, workdir = "echo keys added 0", _workdir(encrypting_fs, "w")
    result = sandbox.run(net, tmp_path, {"add": step}, workdir=workdir)
    assert "keys added" in result["add"].out, result.describe()
    after = _pool_key_users()
    left = {uid: line for uid, line in after.items() if before.get(uid) != line}
    assert not left, (
        f"after the run, the sandbox's host ids hold kernel keys: {left}; "
        f"task: {result['add'].out.strip()}"
    )
    assert "keys added 0" in result["add"].out, result.describe()  # not even for the run
