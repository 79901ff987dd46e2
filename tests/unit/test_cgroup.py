"""Task cgroups on fake cgroup trees: v1, v2 and hybrid layouts in tmp_path.

`FakeKernel` is a directory tree plus the few kernel rules that a plain directory
cannot show: mkdir populates control files (on v2 only for the controllers the
parent enabled), v2's no-internal-processes rule (EBUSY), moving a pid between
cgroup.procs files, killing, and rmdir of a populated cgroup failing.
"""

from __future__ import annotations

import errno
import os

import pytest
from sandgate.enforcer.sandbox import cgroup
from sandgate.enforcer.sandbox.cgroup import (
    CgroupError,
    CgroupFS,
    LimitHit,
    Limits,
    TaskCgroup,
    limit_settings,
    parse_cpus,
    parse_mountinfo,
    parse_proc_cgroup,
    parse_size,
)

SELF_PID = 4242
HYBRID_MOUNTINFO = """\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
"""
V1_MOUNTINFO = """\
25 18 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
28 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
29 25 0:26 / /sys/fs/cgroup/memory rw,nosuid shared:10 - cgroup cgroup rw,memory
"""
V1_CGROUP = "5:memory:/user.slice\n3:cpu,cpuacct:/user.slice\n"
V2_MOUNTINFO = (
    "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev shared:4 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
V2_SERVICE = "/system.slice/agent.service"

V1_FILES = {
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712",
        "memory.memsw.limit_in_bytes": "9223372036854771712",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        "memory.failcnt": "0\n",
    },
    "pids": {"pids.max": "max\n", "pids.events": "max 0\n"},
    "cpu": {
        "cpu.cfs_period_us": "100000\n",
        "cpu.cfs_quota_us": "-1\n",
        "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
    },
}
V2_FILES = {
    "memory": {
        "memory.max": "max\n",
        "memory.swap.max": "max\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    },
    "pids": {"pids.max": "max\n", "pids.events": "max 0\n"},
    "cpu": {
        "cpu.max": "max 100000\n",
        "cpu.stat": "usage_usec 0\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
    },
}


class FakeKernel(CgroupFS):
    def __init__(
        self,
        root,
        mountinfo: str,
        proc_cgroup: str,
        *,
        v2_controllers: str = "cpuset cpu io memory pids",
        swap: bool = False,
    ):
        super().__init__(str(root))
        self.killed: list[int] = []
        self.kill_files: list[str] = []
        self.unkillable: set[int] = set()
        self.absent: set[str] = set()  # control files this kernel lacks
        os.makedirs(self.path("/proc/self"))
        self.set_proc("mountinfo", mountinfo)
        self.set_proc("cgroup", proc_cgroup)
        swaps = "Filename\tType\tSize\tUsed\tPriority\n" + (
            "/swap\tfile\t1024\t0\t-2\n" if swap else ""
        )
        self.set_proc("../swaps", swaps)
        self.mounts = {self.path(m.mountpoint): m for m in parse_mountinfo(mountinfo)}
        for mountpoint, mount in self.mounts.items():
            os.makedirs(mountpoint)
            if mount.fstype == "cgroup2":
                self.put(mountpoint, "cgroup.controllers", v2_controllers + "\n")
                self.put(mountpoint, "cgroup.subtree_control", "")
                self.put(mountpoint, "cgroup.procs", "")
            else:
                self.populate(mountpoint)

    # -- test helpers
    def set_proc(self, name: str, text: str) -> None:
        with open(self.path(f"/proc/self/{name}"), "w") as f:
            f.write(text)

    def put(self, directory: str, name: str, text: str) -> None:
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)

    def get(self, directory: str, name: str) -> str:
        return self.read(os.path.join(directory, name)).strip()

    def makedirs(self, path: str) -> str:
        """A cgroup that already exists, with its ancestors (as the kernel would hold them)."""
        if not os.path.isdir(path):
            self.makedirs(os.path.dirname(path))
            self.mkdir(path)
        return path

    def mount_of(self, path: str) -> str:
        return max((m for m in self.mounts if path == m or path.startswith(m + "/")), key=len)

    def populate(self, path: str, controllers: set[str] | None = None) -> None:
        mount = self.mounts[self.mount_of(path)]
        self.put(path, "cgroup.procs", "")
        if mount.fstype == "cgroup2":
            self.put(path, "cgroup.controllers", " ".join(sorted(controllers)) + "\n")
            for name in ("cgroup.subtree_control", "cgroup.kill"):
                self.put(path, name, "")
            files = V2_FILES
        else:
            controllers, files = set(mount.options), V1_FILES
        for controller in controllers & files.keys():
            for name, text in files[controller].items():
                if name not in self.absent:
                    self.put(path, name, text)

    def procs(self, path: str) -> list[int]:
        return [int(pid) for pid in self.get(path, "cgroup.procs").split()]

    # -- the kernel's rules
    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        parent = os.path.dirname(path)
        enabled = (
            set(self.get(parent, "cgroup.subtree_control").split())
            if os.path.exists(os.path.join(parent, "cgroup.subtree_control"))
            else set()
        )
        self.populate(path, enabled)

    def write(self, path: str, text: str) -> None:
        directory, name = os.path.split(path)
        is_root = directory in self.mounts
        if name == "cgroup.subtree_control":
            if not is_root and self.procs(directory):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
            available = set(self.get(directory, "cgroup.controllers").split())
            enabled = set(self.get(directory, name).split())
            for word in text.split():
                if word[1:] not in available:
                    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
                (enabled.add if word[0] == "+" else enabled.discard)(word[1:])
            text = " ".join(sorted(enabled))
        elif name == "cgroup.procs":
            pid = SELF_PID if text == "0" else int(text)
            mountpoint = self.mount_of(directory)
            if (
                self.mounts[mountpoint].fstype == "cgroup2"
                and not is_root
                and self.get(directory, "cgroup.subtree_control")
            ):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
            for dirpath, _dirs, files in os.walk(mountpoint):
                if "cgroup.procs" in files:
                    self.put(
                        dirpath,
                        "cgroup.procs",
                        "".join(f"{p}\n" for p in self.procs(dirpath) if p != pid),
                    )
            text = "".join(f"{p}\n" for p in [*self.procs(directory), pid])
        elif name == "cgroup.kill":
            self.kill_files.append(path)
            self.signal_members(directory, 9)
            return
        super().write(path, text)

    def signal_members(self, cgroup_dir: str, signum: int) -> None:
        pids = self.procs(cgroup_dir)
        self.killed += pids
        self.put(
            cgroup_dir, "cgroup.procs", "".join(f"{p}\n" for p in pids if p in self.unkillable)
        )

    def rmdir(self, path: str) -> None:
        if self.procs(path) or any(e.is_dir() for e in os.scandir(path)):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        for entry in os.scandir(path):
            os.unlink(entry.path)
        os.rmdir(path)


@pytest.fixture(autouse=True)
def no_parent_from_env(monkeypatch):
    monkeypatch.delenv(cgroup.PARENT_ENV, raising=False)


@pytest.fixture
def hybrid(tmp_path):
    return FakeKernel(tmp_path, HYBRID_MOUNTINFO, HYBRID_CGROUP, v2_controllers="hugetlb")


@pytest.fixture
def v2(tmp_path):
    """systemd-style: the agent's service cgroup holds sandgate and its shell."""
    kernel = FakeKernel(tmp_path, V2_MOUNTINFO, f"0::{V2_SERVICE}\n")
    root = kernel.path("/sys/fs/cgroup")
    kernel.write(os.path.join(root, "cgroup.subtree_control"), "+memory +pids +cpu")
    kernel.makedirs(root + "/system.slice")
    kernel.write(root + "/system.slice/cgroup.subtree_control", "+memory +pids +cpu")
    service = kernel.makedirs(root + V2_SERVICE)
    for pid in (100, SELF_PID):
        kernel.write(service + "/cgroup.procs", str(pid))
    return kernel


LIMITS = Limits(memory_bytes=64 << 20, pids=32, cpus=1.5)


# --- limits and their parsing ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("1073741824", 1 << 30, id="bytes"),
        pytest.param("512M", 512 << 20, id="M"),
        pytest.param("4G", 4 << 30, id="G"),
        pytest.param("4gib", 4 << 30, id="GiB-lower"),
        pytest.param(" 64k ", 64 << 10, id="k-padded"),
        pytest.param("2TB", 2 << 40, id="TB"),
        pytest.param("100b", 100, id="b"),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "4X", "-1G", "1.5G", "G", "4 G B", "0x10"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match=r"invalid size .*e\.g\. 512M"):
        parse_size(text)


def test_parse_cpus():
    assert parse_cpus("1.5") == 1.5
    assert parse_cpus("2") == 2.0
    for text in ("", "abc", "0", "0.001", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="invalid CPU count"):
            parse_cpus(text)


def test_limits_defaults_and_controllers():
    assert Limits() == Limits(memory_bytes=4 << 30, pids=1024, cpus=None)
    assert Limits().controllers() == ("memory", "pids")
    assert LIMITS.controllers() == ("memory", "pids", "cpu")
    assert Limits(memory_bytes=None, pids=None, cpus=None).controllers() == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"memory_bytes": 1000}, "memory limit must be from 1M", id="memory-tiny"),
        pytest.param({"memory_bytes": 1 << 64}, "memory limit", id="memory-past-64-bits"),
        pytest.param({"memory_bytes": 1.5e9}, "memory limit", id="memory-float"),
        pytest.param({"pids": 0}, "pids limit", id="pids-zero"),
        pytest.param({"pids": True}, "pids limit", id="pids-bool"),
        pytest.param({"pids": 10**23}, "pids limit", id="pids-past-pid-max"),
        pytest.param({"cpus": 0}, "cpus limit", id="cpus-zero"),
        pytest.param({"cpus": float("inf")}, "cpus limit", id="cpus-inf"),
        pytest.param({"cpus": "2"}, "cpus limit", id="cpus-str"),
        pytest.param({"cpus": 1e9}, "cpus limit", id="cpus-past-the-quota"),
    ],
)
def test_limits_reject(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)


@pytest.mark.parametrize(
    ("version", "limits", "expected"),
    [
        pytest.param(
            2,
            LIMITS,
            [
                ("memory.max", "67108864"),
                ("memory.swap.max", "0"),
                ("pids.max", "32"),
                ("cpu.max", "150000 100000"),
            ],
            id="v2",
        ),
        pytest.param(
            1,
            LIMITS,
            [
                ("memory.limit_in_bytes", "67108864"),
                ("memory.memsw.limit_in_bytes", "67108864"),
                ("pids.max", "32"),
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "150000"),
            ],
            id="v1",
        ),
        pytest.param(
            2,
            Limits(memory_bytes=None, pids=None, cpus=0.01),
            [("cpu.max", "1000 100000")],
            id="v2-smallest-cpu",
        ),
    ],
)
def test_limit_settings(version, limits, expected):
    assert limit_settings(version, {"memory", "pids", "cpu"}, limits, swap_file=True) == expected


def test_limit_settings_without_swap_accounting():
    writes = limit_settings(1, {"memory"}, LIMITS, swap_file=False)
    assert writes == [("memory.limit_in_bytes", "67108864")]


# --- reading /proc -----------------------------------------------------------------


def test_parse_mountinfo_keeps_cgroup_mounts_and_unescapes():
    text = (
        HYBRID_MOUNTINFO + r"50 31 0:40 /sub /mnt/with\040space rw - cgroup cgroup rw,pids" + "\n"
    )
    mounts = parse_mountinfo(text)
    assert [m.mountpoint for m in mounts][-2:] == ["/sys/fs/cgroup/unified", "/mnt/with space"]
    assert all(m.fstype in ("cgroup", "cgroup2") for m in mounts) and len(mounts) == 7
    assert mounts[-1].root == "/sub" and "pids" in mounts[-1].options


def test_parse_proc_cgroup():
    assert parse_proc_cgroup(V1_CGROUP + "0::/x\n") == {
        "memory": "/user.slice",
        "cpu": "/user.slice",
        "cpuacct": "/user.slice",
        "": "/x",
    }
    assert parse_proc_cgroup(HYBRID_CGROUP)["name=systemd"] == "/"


# --- where cgroups go --------------------------------------------------------------


def test_hybrid_uses_v1_under_own_cgroups(hybrid):
    assert cgroup.check(LIMITS, fs=hybrid) == []
    task = TaskCgroup.create("sandgate-r1", Limits(memory_bytes=64 << 20, pids=32), fs=hybrid)

    memory = hybrid.path("/sys/fs/cgroup/memory/process_api/abc/sandgate-r1")
    pids = hybrid.path("/sys/fs/cgroup/pids/sandgate-r1")
    assert task.paths == [memory, pids]
    assert task.procs_files == [memory + "/cgroup.procs", pids + "/cgroup.procs"]
    assert hybrid.get(memory, "memory.limit_in_bytes") == str(64 << 20)
    assert hybrid.get(memory, "memory.memsw.limit_in_bytes") == str(64 << 20)
    assert hybrid.get(pids, "pids.max") == "32"
    assert os.listdir(hybrid.path("/sys/fs/cgroup/unified")).count("sandgate-r1") == 0
    assert not os.path.exists(hybrid.path("/sys/fs/cgroup/cpu/sandgate-r1"))  # no cpus limit


def test_v1_comounted_cpu_and_swap_unaccounted(tmp_path):
    kernel = FakeKernel(tmp_path, V1_MOUNTINFO, V1_CGROUP, swap=True)
    os.unlink(kernel.path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"))
    assert cgroup.check(Limits(memory_bytes=None, pids=None, cpus=1.5), fs=kernel) == []
    [memory, pids] = cgroup.check(LIMITS, fs=kernel)
    assert memory.startswith("memory: swap is on") and "swapaccount=1" in memory
    assert pids.startswith("pids: this host has no cgroup controller 'pids'")

    task = TaskCgroup.create(
        "sandgate-r1", Limits(memory_bytes=None, pids=None, cpus=0.5), fs=kernel
    )
    [cpu] = task.paths
    assert cpu == kernel.path("/sys/fs/cgroup/cpu,cpuacct/user.slice/sandgate-r1")
    assert kernel.get(cpu, "cpu.cfs_quota_us") == "50000"
    assert kernel.get(cpu, "cpu.cfs_period_us") == "100000"


def test_v2_moves_processes_into_a_leaf_then_enables_controllers(v2):
    service = v2.path("/sys/fs/cgroup" + V2_SERVICE)
    assert cgroup.check(LIMITS, fs=v2) == []

    task = TaskCgroup.create("sandgate-r1", LIMITS, fs=v2)

    assert v2.procs(service) == []
    assert v2.procs(service + "/sandgate.self") == [100, SELF_PID]
    assert v2.get(service, "cgroup.subtree_control") == "cpu memory pids"
    [path] = task.paths
    assert path == service + "/sandgate-r1"
    assert task.procs_files == [path + "/cgroup.procs"]
    assert {
        name: v2.get(path, name)
        for name in ("memory.max", "memory.swap.max", "pids.max", "cpu.max")
    } == {
        "memory.max": str(64 << 20),
        "memory.swap.max": "0",
        "pids.max": "32",
        "cpu.max": "150000 100000",
    }

    # sandgate now lives in sandgate.self: the next run is a sibling, not nested.
    v2.set_proc("cgroup", f"0::{V2_SERVICE}/sandgate.self\n")
    task2 = TaskCgroup.create("sandgate-r2", LIMITS, fs=v2)
    assert task2.paths == [service + "/sandgate-r2"]
    assert cgroup.leftovers(fs=v2) == [service + "/sandgate-r1", service + "/sandgate-r2"]


def test_v2_gives_up_when_processes_keep_joining(v2, monkeypatch):
    service = v2.path("/sys/fs/cgroup" + V2_SERVICE)
    write = v2.write

    def respawning_write(path: str, text: str) -> None:
        write(path, text)
        if path.endswith("sandgate.self/cgroup.procs"):
            write(service + "/cgroup.procs", "300")  # something forks into the service again

    monkeypatch.setattr(v2, "write", respawning_write)
    with pytest.raises(CgroupError, match="processes keep joining .*agent.service"):
        TaskCgroup.create("sandgate-r1", LIMITS, fs=v2)
    assert not os.path.exists(service + "/sandgate-r1")


def test_v2_root_cgroup_needs_no_leaf(tmp_path):
    """A container with its own cgroup namespace: we are in "/", exempt from the rule."""
    kernel = FakeKernel(tmp_path, V2_MOUNTINFO, "0::/\n")
    root = kernel.path("/sys/fs/cgroup")
    kernel.write(root + "/cgroup.procs", str(SELF_PID))

    task = TaskCgroup.create("sandgate-r1", Limits(), fs=kernel)

    assert task.paths == [root + "/sandgate-r1"]
    assert not os.path.exists(root + "/sandgate.self")
    assert kernel.get(root, "cgroup.subtree_control") == "memory pids"
    assert kernel.get(root + "/sandgate-r1", "memory.max") == str(4 << 30)


def test_v2_controller_not_delegated(v2):
    service = v2.path("/sys/fs/cgroup" + V2_SERVICE)
    v2.put(service, "cgroup.controllers", "pids\n")

    [memory, cpu] = cgroup.check(LIMITS, fs=v2)
    assert memory.startswith("memory: the cgroup v2 controller is not delegated to " + service)
    assert cpu.startswith("cpu: the cgroup v2 controller is not delegated")
    assert "system.slice/cgroup.subtree_control" in memory
    with pytest.raises(CgroupError, match="cannot set the task's limits: memory: .*cpu: "):
        TaskCgroup.create("sandgate-r1", LIMITS, fs=v2)
    assert not os.path.exists(service + "/sandgate-r1")
    assert cgroup.check(Limits(memory_bytes=None, cpus=None), fs=v2) == []


def test_v2_swap_on_without_swap_file(v2):
    v2.set_proc("../swaps", "Filename\n/swap file 1 0 -2\n")
    v2.absent.add("memory.swap.max")  # CONFIG_MEMCG_SWAP off
    with pytest.raises(CgroupError, match="swap is on but .* has no memory.swap.max"):
        TaskCgroup.create("sandgate-r1", LIMITS, fs=v2)
    assert cgroup.leftovers(fs=v2) == []


@pytest.mark.parametrize(
    ("mountinfo", "proc_cgroup", "expected"),
    [
        pytest.param(
            V2_MOUNTINFO, "0::/elsewhere\n", ["/sys/fs/cgroup/sandgate/runs/sandgate-r1"], id="v2"
        ),
        pytest.param(
            HYBRID_MOUNTINFO,
            HYBRID_CGROUP,
            [
                "/sys/fs/cgroup/memory/sandgate/runs/sandgate-r1",
                "/sys/fs/cgroup/pids/sandgate/runs/sandgate-r1",
            ],
            id="hybrid",
        ),
    ],
)
def test_parent_from_env_is_created(tmp_path, monkeypatch, mountinfo, proc_cgroup, expected):
    """On v2 every new level enables the controllers for the next (the fake's mkdir
    gives memory.max only to a child whose parent enabled memory)."""
    kernel = FakeKernel(tmp_path, mountinfo, proc_cgroup)
    monkeypatch.setenv(cgroup.PARENT_ENV, "/sandgate//runs/")

    task = TaskCgroup.create("sandgate-r1", Limits(), fs=kernel)

    assert task.paths == [kernel.path(p) for p in expected]
    assert kernel.get(
        task.paths[0], "memory.max" if len(expected) == 1 else "memory.limit_in_bytes"
    ) == str(4 << 30)


@pytest.mark.parametrize("parent", ["sandgate", "/a/../b", "/./a"])
def test_bad_parent(hybrid, parent):
    [problem] = cgroup.check(LIMITS, parent=parent, fs=hybrid)
    assert cgroup.PARENT_ENV in problem and "absolute cgroup path" in problem
    with pytest.raises(CgroupError, match="absolute cgroup path"):
        TaskCgroup.create("sandgate-r1", LIMITS, parent=parent, fs=hybrid)


@pytest.mark.parametrize(
    "name", ["r1", "sandgate-", "sandgate-../x", "sandgate-a/b", "sandgate.self"]
)
def test_bad_name(hybrid, name):
    with pytest.raises(CgroupError, match="invalid cgroup name"):
        TaskCgroup.create(name, LIMITS, fs=hybrid)


def test_existing_name_fails_and_rolls_back(hybrid):
    hybrid.mkdir(hybrid.path("/sys/fs/cgroup/pids/sandgate-r1"))

    with pytest.raises(CgroupError, match="pids/sandgate-r1 already exists: .*sandgate gc"):
        TaskCgroup.create("sandgate-r1", Limits(), fs=hybrid)

    assert not os.path.exists(hybrid.path("/sys/fs/cgroup/memory/process_api/abc/sandgate-r1"))


# --- what the task hit -------------------------------------------------------------


def test_limits_hit_v1(hybrid):
    task = TaskCgroup.create("sandgate-r1", LIMITS, fs=hybrid)
    memory, pids, cpu = task.paths
    assert task.limits_hit() == []
    hybrid.put(memory, "memory.failcnt", "57\n")
    assert task.limits_hit() == []  # reclaim at the limit is no hit
    hybrid.put(memory, "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    hybrid.put(pids, "pids.events", "max 7\n")
    hybrid.put(cpu, "cpu.stat", "nr_periods 20\nnr_throttled 9\nthrottled_time 2500000000\n")

    assert task.limits_hit() == [
        LimitHit(
            "memory",
            2,
            "2 process(es) killed by the OOM killer at the memory limit of "
            "67108864 bytes (usage reached the limit 57 times)",
        ),
        LimitHit("pids", 7, "7 fork/clone call(s) failed with EAGAIN at the limit of 32 processes"),
        LimitHit("cpus", 9, "throttled in 9 period(s), 2.5 s in all, at the limit of 1.5 CPUs"),
    ]


def test_limits_hit_v2(v2):
    task = TaskCgroup.create("sandgate-r1", LIMITS, fs=v2)
    [path] = task.paths
    v2.put(path, "memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
    v2.put(path, "cpu.stat", "usage_usec 9\nnr_periods 3\nnr_throttled 3\nthrottled_usec 400000\n")

    assert [(h.limit, h.count) for h in task.limits_hit()] == [("memory", 1), ("cpus", 3)]
    assert "reached the limit 12 times" in task.limits_hit()[0].detail
    assert "0.4 s in all" in task.limits_hit()[1].detail

    task.remove()
    with pytest.raises(CgroupError, match="cannot read the counters"):
        task._dirs = [cgroup._Dir(cgroup.Hierarchy(2, "/", frozenset({"pids"}), "/"), path)]
        task.limits_hit()


# --- joining and removing ------------------------------------------------------------


def test_attach_and_remove_v1_kills_members(hybrid):
    task = TaskCgroup.create("sandgate-r1", Limits(), fs=hybrid)
    task.attach(501)
    for procs in task.procs_files:
        hybrid.write(procs, "0")  # what the sandbox's init does
    assert [hybrid.procs(p) for p in task.paths] == [[501, SELF_PID]] * 2
    paths = task.paths

    task.remove()

    assert sorted(set(hybrid.killed)) == [501, SELF_PID]
    assert hybrid.kill_files == []  # v1 has no cgroup.kill
    assert not any(os.path.exists(p) for p in paths)
    assert cgroup.leftovers(fs=hybrid) == []
    task.remove()  # idempotent


def test_remove_v2_uses_cgroup_kill(v2):
    task = TaskCgroup.create("sandgate-r1", LIMITS, fs=v2)
    task.attach(777)
    [path] = task.paths

    task.remove()

    assert v2.kill_files == [path + "/cgroup.kill"] and v2.killed == [777]
    assert not os.path.exists(path)


def test_remove_gives_up_in_bounded_time(hybrid):
    task = TaskCgroup.create("sandgate-r1", Limits(memory_bytes=None), fs=hybrid)
    task.attach(666)
    hybrid.unkillable.add(666)

    with pytest.raises(CgroupError, match=r"pids/sandgate-r1 survived SIGKILL for 0.05 s"):
        task.remove(timeout=0.05)
    assert os.path.isdir(task.paths[0])


def test_leftovers_and_remove_path(hybrid):
    TaskCgroup.create("sandgate-crashed", Limits(), fs=hybrid).attach(900)
    TaskCgroup.create("sandgate-other", Limits(pids=None), fs=hybrid)
    hybrid.makedirs(hybrid.path("/sys/fs/cgroup/pids/not-ours"))
    memory = hybrid.path("/sys/fs/cgroup/memory/process_api/abc/")
    pids = hybrid.path("/sys/fs/cgroup/pids/")

    found = cgroup.leftovers(fs=hybrid)
    assert found == [
        memory + "sandgate-crashed",
        memory + "sandgate-other",
        pids + "sandgate-crashed",
    ]
    assert cgroup.leftovers("sandgate-cr", fs=hybrid) == [
        memory + "sandgate-crashed",
        pids + "sandgate-crashed",
    ]
    crashed = cgroup.leftovers("sandgate-cr", fs=hybrid)
    assert [cgroup.remove_path(path, fs=hybrid) for path in crashed] == [True, True]
    assert cgroup.leftovers(fs=hybrid) == [memory + "sandgate-other"]
    # gone since it was listed (its run removed it): said, for gc not to report it
    assert cgroup.remove_path(crashed[0], fs=hybrid) is False
    assert 900 in hybrid.killed


@pytest.mark.parametrize(
    "path",
    ["/sys/fs/cgroup/pids/not-ours", "/tmp/sandgate-r1", "/sys/fs/cgroup/pids/sandgate.self"],
)
def test_remove_path_refuses_what_is_not_ours(hybrid, path):
    target = hybrid.makedirs(hybrid.path(path)) if path.startswith("/sys") else path
    with pytest.raises(CgroupError, match="is not a sandgate cgroup"):
        cgroup.remove_path(target, fs=hybrid)
    assert os.path.exists(target) or not path.startswith("/sys")


def test_leftovers_prefix_must_be_ours(hybrid):
    with pytest.raises(CgroupError, match="must start with 'sandgate-'"):
        cgroup.leftovers("", fs=hybrid)


# --- cgroups made ahead (a warm runner's) --------------------------------------------


def test_ahead_hybrid_makes_every_hierarchy_then_the_run_writes_only_its_limits(hybrid):
    task = TaskCgroup.ahead("sandgate-warm-ab12", fs=hybrid)

    cpu = hybrid.path("/sys/fs/cgroup/cpu/sandgate-warm-ab12")
    memory = hybrid.path("/sys/fs/cgroup/memory/process_api/abc/sandgate-warm-ab12")
    pids = hybrid.path("/sys/fs/cgroup/pids/sandgate-warm-ab12")
    assert task.paths == [cpu, memory, pids]  # no limit needed yet: every hierarchy
    assert hybrid.get(pids, "pids.max") == "max" and hybrid.get(cpu, "cpu.cfs_quota_us") == "-1"
    task.attach(501)  # the seed, while the runner waits

    task.set_limits(Limits(memory_bytes=64 << 20, pids=32))

    assert hybrid.get(memory, "memory.limit_in_bytes") == str(64 << 20)
    assert hybrid.get(pids, "pids.max") == "32"
    assert hybrid.get(cpu, "cpu.cfs_quota_us") == "-1"  # no cpus limit: none written
    assert [p for p in task.paths] == [cpu, memory, pids]  # the task is in all three
    assert [hybrid.procs(p) for p in task.paths] == [[501]] * 3
    hybrid.put(pids, "pids.events", "max 3\n")
    assert [hit.limit for hit in task.limits_hit()] == ["pids"]
    # Named for the id slot's record (id_slots.py) in every hierarchy, the cpu one
    # too, which no limit of this run needs (a run of the service's warm runners).
    assert [h for h, _ in task.named] == ["cpu", "memory", "pids"]
    assert [cgroup.members(h, p, fs=hybrid) for h, p in task.named] == [{501}] * 3
    task.remove()
    assert cgroup.leftovers(fs=hybrid) == []


def test_ahead_v2_is_one_directory_under_the_processes_own(v2):
    service = v2.path("/sys/fs/cgroup" + V2_SERVICE)
    task = TaskCgroup.ahead("sandgate-warm-ab12", fs=v2)
    assert task.paths == [service + "/sandgate-warm-ab12"]
    assert v2.procs(service + "/sandgate.self") == [100, SELF_PID]

    task.set_limits(LIMITS)

    assert v2.get(task.paths[0], "cpu.max") == "150000 100000"
    assert v2.get(task.paths[0], "memory.swap.max") == "0"


def test_set_limits_needs_the_controllers(tmp_path):
    kernel = FakeKernel(tmp_path, V1_MOUNTINFO, V1_CGROUP)  # memory and cpu, no pids
    task = TaskCgroup.ahead("sandgate-warm-ab12", fs=kernel)
    with pytest.raises(CgroupError, match="sandgate-warm-ab12 has no pids controller"):
        task.set_limits(Limits(pids=32))
    assert kernel.get(task.paths[1], "memory.limit_in_bytes") != str(4 << 30)  # nothing written


def test_ahead_rejects_a_bad_name_and_rolls_back(hybrid):
    with pytest.raises(CgroupError, match="invalid cgroup name"):
        TaskCgroup.ahead("warm-ab12", fs=hybrid)
    hybrid.makedirs(hybrid.path("/sys/fs/cgroup/pids/sandgate-warm-ab12"))
    with pytest.raises(CgroupError, match="already exists"):
        TaskCgroup.ahead("sandgate-warm-ab12", fs=hybrid)
    assert cgroup.leftovers(fs=hybrid) == [hybrid.path("/sys/fs/cgroup/pids/sandgate-warm-ab12")]


def test_made_under_compares_the_parent_of_the_moment(hybrid, monkeypatch):
    task = TaskCgroup.ahead("sandgate-warm-ab12", fs=hybrid)
    assert task.made_under()
    monkeypatch.setenv(cgroup.PARENT_ENV, "/sandgate")  # the caller's environment asks elsewhere
    assert not task.made_under()
    monkeypatch.setenv(cgroup.PARENT_ENV, "../bad")
    assert not task.made_under()


def test_remove_ahead_and_remove_empty_ahead(hybrid):
    live = TaskCgroup.ahead("sandgate-warm-aaaa", fs=hybrid)
    live.attach(501)  # a waiting runner's seed
    dead = TaskCgroup.ahead("sandgate-warm-bbbb", fs=hybrid)  # its seed died with its pool
    run = TaskCgroup.create("sandgate-r1", Limits(), fs=hybrid)  # a run's: not ours to remove

    assert cgroup.remove_empty_ahead(fs=hybrid) == sorted(dead.paths)
    assert all(os.path.isdir(p) for p in live.paths + run.paths)

    cgroup.remove_ahead("sandgate-warm-aaaa", fs=hybrid)
    assert 501 in hybrid.killed and not any(os.path.exists(p) for p in live.paths)
    assert cgroup.leftovers(fs=hybrid) == sorted(run.paths)
    with pytest.raises(CgroupError, match="not the name of a cgroup made ahead"):
        cgroup.remove_ahead("sandgate-r1", fs=hybrid)
