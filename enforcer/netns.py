"""A sandbox's network: its own network namespace, wired to the calling netns by a
veth pair, with a /30 of its own.

The calling process's network namespace plays the gateway's host: the host end of
the veth, the gateway address and the nftables ruleset live there. The sandbox
gets one IPv4 address (its identity at the gateway), a default route via the
gateway, and IPv6 link-local addresses only.

Everything here is synchronous (enforcer/rtnl.py's requests, on pyroute2's message
classes): asyncio callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from sandgate.enforcer.rtnl import Rtnl

NETNS_PREFIX = "sg-"
HOST_IF_PREFIX = "sgh-"
SANDBOX_IF = "eth0"
DEFAULT_POOL = IPv4Network("10.213.0.0/16")

# IFNAMSIZ is 16 including the NUL: "sgh-" leaves 11 characters for the id.
_SANDBOX_ID = re.compile(r"[a-z0-9]{1,11}")
_CLONE_NEWNET = 0x40000000
_MS_BIND, _MS_REC, _MS_SHARED = 0x1000, 0x4000, 0x100000
_MNT_DETACH = 2
# Where `ip netns` keeps a namespace's name: a bind mount of it on /run/netns/<name>.
# Bound and removed here as iproute2 does, not by pyroute2.netns, whose import
# (multiprocessing, platform, its process helpers: ~10 ms of every embedded start)
# brought nothing else sandgate uses.
NETNS_RUN_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)  # dlopen(NULL): libc's symbols, no lookup

# Sysctls written in the new netns before its eth0 exists, so eth0 inherits them
# from `default`: no DAD (addresses would stay tentative for seconds) and no
# router advertisements or autoconf, so eth0 never has more than link-local IPv6.
_SANDBOX_IPV6_SYSCTLS = {
    "default/accept_dad": "0",
    "all/accept_dad": "0",
    "default/accept_ra": "0",
    "default/autoconf": "0",
}
# TCP timestamps in the sandbox's netns from one clock, without a random offset per
# connection (2; the default, 1, draws one per 4-tuple). Every connection the task
# opens ends at the gateway's one listening port, where two from the same task port
# to two destinations clash in conntrack and NAT moves the second to another source
# port, often one whose earlier connection the gateway still holds in TIME_WAIT. A
# SYN on it is taken only if its timestamp is newer (PAWS): with offsets of their
# own, half are not, and that connect waits for a reset and a second SYN (1-2 % of
# bench_gateway's plain-HTTP connections after its HTTPS row; docs/performance.md,
# "Session 21"). The timestamps reach only the gateway, which ends every connection.
SANDBOX_TCP_TIMESTAMPS = "2"
# The host end must never take addresses or routes from router advertisements that
# a root user in the sandbox forges.
_HOST_IF_IPV6_SYSCTLS = ("accept_dad", "accept_ra", "autoconf")


class SandboxNetError(RuntimeError):
    """Creating a sandbox network failed at `step`; what was done was undone."""

    def __init__(self, sandbox_id: str, step: str, cause: BaseException | str):
        self.sandbox_id = sandbox_id
        self.step = step
        super().__init__(f"sandbox {sandbox_id}: {step} failed: {cause}")


@dataclass(frozen=True)
class SandboxNet:
    netns: str
    host_if: str
    sandbox_if: str
    gateway_ip: IPv4Address
    sandbox_ip: IPv4Address
    prefixlen: int


def netns_name(sandbox_id: str) -> str:
    return NETNS_PREFIX + sandbox_id


def host_if_name(sandbox_id: str) -> str:
    return HOST_IF_PREFIX + sandbox_id


def allocate_addresses(pool: IPv4Network, index: int) -> tuple[IPv4Address, IPv4Address]:
    """(gateway, sandbox) addresses of the `index`-th /30 of `pool`: its .1 and .2.

    Raises ValueError when `pool` has no `index`-th /30.
    """
    if pool.prefixlen > 30:
        raise ValueError(f"pool {pool} is smaller than a /30")
    count = pool.num_addresses // 4
    if not 0 <= index < count:
        raise ValueError(f"index {index} is outside pool {pool} ({count} sandboxes)")
    base = pool.network_address + 4 * index
    return base + 1, base + 2


def create_sandbox_net(
    sandbox_id: str,
    gateway_ip: IPv4Address | str,
    sandbox_ip: IPv4Address | str,
    prefixlen: int = 30,
) -> SandboxNet:
    """Create netns `sg-<id>` wired to the calling netns by veth `sgh-<id>`.

    Raises ValueError for bad arguments, SandboxNetError naming the failed step
    (after undoing the steps before it).
    """
    net = _validate(sandbox_id, gateway_ip, sandbox_ip, prefixlen)
    _refuse_running_loop("create_sandbox_net")
    # Undo only what this call did: a name already in use belongs to someone else.
    undo: list[Callable[[], None]] = []
    step = "create netns"
    try:
        sandbox_fd = _create_netns(net.netns)
        undo.append(lambda: _remove_netns(net.netns))
        step = "open netlink sockets"
        # The sandbox's socket first: it owns sandbox_fd from here, whatever fails next.
        with Rtnl(fileno=sandbox_fd) as sandbox, Rtnl() as host:
            step = "create veth"
            netns_fd = os.open(os.path.join(NETNS_RUN_DIR, net.netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                host.add_veth(net.host_if, net.sandbox_if, netns_fd)
            finally:
                os.close(netns_fd)
            undo.append(lambda: _delete_host_link(net.host_if))

            step = "set host ipv6 sysctls"
            for key in _HOST_IF_IPV6_SYSCTLS:
                _write_ipv6_conf(f"{net.host_if}/{key}", "0")
            # The host never routes what comes from a sandbox, even where it forwards
            # (a Docker or Kubernetes node): until the table is loaded, and after a
            # run SIGKILLed before it (a netns and veth left, no table), nothing else
            # stops a packet from the netns from being forwarded out. (Switching the
            # host's net.ipv4.ip_forward on later sets it again on every interface.)
            step = "stop forwarding from the host end"
            with open(f"/proc/sys/net/ipv4/conf/{net.host_if}/forwarding", "w") as f:
                f.write("0")

            step = "configure host end"
            host_idx = _link_index(host, net.host_if)
            host.add_address(host_idx, str(net.gateway_ip), prefixlen)
            host.set_up(host_idx)

            step = "configure sandbox end"
            sandbox.set_up(_link_index(sandbox, "lo"))
            sbx_idx = _link_index(sandbox, net.sandbox_if)
            sandbox.add_address(sbx_idx, str(net.sandbox_ip), prefixlen)
            sandbox.set_up(sbx_idx)

            step = "add sandbox default route"
            sandbox.add_default_route(str(net.gateway_ip))

            # Until the kernel's linkwatch worker has made a veth end up, it drops
            # what it is given: the task's first SYN, or the ARP reply to it, would
            # be lost and retried only a second later.
            step = "wait for links up"
            _wait_until_up(host, host_idx)
            _wait_until_up(sandbox, sbx_idx)
    except Exception as e:
        for action in reversed(undo):
            with contextlib.suppress(Exception):
                action()
        raise SandboxNetError(sandbox_id, step, e) from e
    return net


def destroy_sandbox_net(sandbox_id: str) -> None:
    """Remove netns `sg-<id>` and veth `sgh-<id>`; absent parts are fine."""
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise ValueError(f"bad sandbox id {sandbox_id!r}")
    _refuse_running_loop("destroy_sandbox_net")
    # Deleting one veth end deletes both at once. Removing the netns alone would
    # take the host end down only later, in the kernel's netns cleanup worker (what
    # `release_sandbox_net` leaves to it, for a sandbox already cut off).
    _delete_host_link(host_if_name(sandbox_id))
    _remove_netns(netns_name(sandbox_id))


def release_sandbox_net(sandbox_id: str) -> None:
    """Remove the name of netns `sg-<id>`, whose veth's host end is down (`cut_off`),
    and leave the rest to the kernel: once nothing holds the namespace (the sandbox's
    processes are gone), its cleanup worker deletes it and both veth ends, batched
    with other namespaces' and waiting for the RCU grace period there, not here
    (deleting the link took 17-33 ms of every run's teardown). Until then the host
    end lingers, down: nothing crosses it, and its address stays taken
    (`run._pick_addresses` skips it)."""
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise ValueError(f"bad sandbox id {sandbox_id!r}")
    _remove_netns(netns_name(sandbox_id))


# What the kernel retries for an orphan (a socket no process holds) in a sandbox whose
# task has ended, before it gives up on it (`give_up_orphans`; the default, 0, means 8).
ORPHAN_RETRIES_AT_END = "1"
_ORPHAN_RETRIES = "/proc/sys/net/ipv4/tcp_orphan_retries"


def give_up_orphans(sandbox_id: str) -> None:
    """Before sandbox `sandbox_id`'s network goes, with every process of its task gone:
    its sockets still open are orphans, and one whose FIN the gateway had not yet
    acknowledged (it delays that ACK, expecting to answer with its own FIN; a
    connection still waiting on its upstream does not) was retransmitted into the
    link taken down, with backoff, for ~100 s, holding the netns and its veth (and
    the veth's address) as long. With one retry the kernel gives up within a second.
    Not set while the task runs: there an orphan may still be delivering the last
    bytes a process wrote before it exited."""
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise ValueError(f"bad sandbox id {sandbox_id!r}")
    _refuse_running_loop("give_up_orphans")  # the netns is entered by the calling thread
    # (/proc/sys/net is the netns of the thread that opens the file)
    with entered_netns(netns_name(sandbox_id)), open(_ORPHAN_RETRIES, "w") as f:
        f.write(ORPHAN_RETRIES_AT_END)


def cut_off(sandbox_id: str) -> bool:
    """Take the host end of sandbox `sandbox_id`'s veth down: from then on nothing
    crosses the pair (a veth drops what it would hand to a peer that is down), so the
    sandbox has no path to the host, whatever the host's tables say. Unlike deleting
    the link (~20 ms: an RCU barrier), this waits for no grace period. False when
    there is no such link."""
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise ValueError(f"bad sandbox id {sandbox_id!r}")
    _refuse_running_loop("cut_off")
    with Rtnl() as host:
        index = host.link_index(host_if_name(sandbox_id))
        if index is None:
            return False
        host.set_up(index, False)
    return True


def list_sandbox_nets() -> list[str]:
    """Ids of the `sg-*` netns in /run/netns, for garbage collection."""
    return sorted(
        name[len(NETNS_PREFIX) :]
        for name in _listnetns()
        if name.startswith(NETNS_PREFIX) and _SANDBOX_ID.fullmatch(name[len(NETNS_PREFIX) :])
    )


def _validate(
    sandbox_id: str,
    gateway_ip: IPv4Address | str,
    sandbox_ip: IPv4Address | str,
    prefixlen: int,
) -> SandboxNet:
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise ValueError(f"bad sandbox id {sandbox_id!r}: 1 to 11 lower-case letters or digits")
    gateway = IPv4Interface(f"{gateway_ip}/{prefixlen}")
    sandbox = IPv4Interface(f"{sandbox_ip}/{prefixlen}")
    if gateway.network != sandbox.network or gateway.ip == sandbox.ip:
        raise ValueError(f"{gateway} and {sandbox} must be two addresses of one network")
    if prefixlen < 31:
        edges = {gateway.network.network_address, gateway.network.broadcast_address}
        if gateway.ip in edges or sandbox.ip in edges:
            raise ValueError(f"{gateway} or {sandbox} is a network or broadcast address")
    return SandboxNet(
        netns=netns_name(sandbox_id),
        host_if=host_if_name(sandbox_id),
        sandbox_if=SANDBOX_IF,
        gateway_ip=gateway.ip,
        sandbox_ip=sandbox.ip,
        prefixlen=prefixlen,
    )


def _refuse_running_loop(name: str) -> None:
    # Each call blocks its thread for a kernel's netlink work (an RCU grace period
    # when a link is deleted, ~20 ms): never the event loop's.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{name} blocks: call it with asyncio.to_thread")


def _delete_host_link(ifname: str) -> None:
    with Rtnl() as host:
        host.delete_link(ifname)


def _listnetns() -> list[str]:
    try:
        return os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []


def _bind_thread_netns(name: str) -> None:
    """This thread's netns bound on /run/netns/<name>, as `ip netns add` binds it:
    the directory made a shared mount first (a bind made here then shows in every
    mount namespace that has it), the mount point created with O_EXCL (a
    FileExistsError when another creator won the name)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(NETNS_RUN_DIR, 0o755)
    run_dir = NETNS_RUN_DIR.encode()
    shared = False
    while _libc.mount(b"", run_dir, b"none", _MS_SHARED | _MS_REC, None) != 0:
        if shared or _libc.mount(run_dir, run_dir, b"none", _MS_BIND | _MS_REC, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot make {NETNS_RUN_DIR} a shared mount: {os.strerror(err)}")
        shared = True  # bound on itself: now it is a mount point that can be shared
    path = os.path.join(NETNS_RUN_DIR, name)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot bind the new netns on {path}: {os.strerror(err)}")


def _remove_netns(name: str) -> None:
    """Its bind undone (lazily: a process still in it keeps it) and its name gone."""
    path = os.path.join(NETNS_RUN_DIR, name)
    _libc.umount2(path.encode(), _MNT_DETACH)  # not bound (a failed create): nothing to undo
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _link_index(rtnl: Rtnl, ifname: str) -> int:
    index = rtnl.link_index(ifname)
    if index is None:
        raise LookupError(f"no link {ifname}")
    return index


def _wait_until_up(rtnl: Rtnl, index: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not rtnl.link_up(index):
        if time.monotonic() > deadline:
            raise TimeoutError(f"link {index} is not up after {timeout} s")
        time.sleep(0.0005)
    rtnl.wait_for_linkwatch(index)


def _write_ipv6_conf(key: str, value: str) -> None:
    # /proc/sys/net resolves to the netns of the thread that opens the file.
    try:
        with open(f"/proc/sys/net/ipv6/conf/{key}", "w") as f:
            f.write(value)
    except FileNotFoundError:
        if os.path.exists("/proc/sys/net/ipv6"):
            raise
        # IPv6 is disabled in this kernel: nothing to configure.


def _create_netns(name: str) -> int:
    """Create netns `name` (bound at /run/netns/<name>) and return the fd of an
    rtnetlink socket inside it. Raises FileExistsError if the name is taken.

    The netns is made by a short-lived thread that unshares its own network
    namespace. A thread rather than the fork that pyroute2's `netns.create` does:
    it is cheaper, and forking a process that runs other threads (the gateway's
    event loop) is unsafe. The thread ends afterwards, so no caller's thread is
    ever left in the wrong namespace.
    """
    result: dict[str, object] = {}

    def run() -> None:
        made = False
        try:
            if _libc.unshare(_CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            path = os.path.join(NETNS_RUN_DIR, name)
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "netns exists", path)
            try:
                _bind_thread_netns(name)
            except FileExistsError:
                raise
            except BaseException:
                made = True  # the mount point may exist, unbound
                raise
            made = True
            for key, value in _SANDBOX_IPV6_SYSCTLS.items():
                _write_ipv6_conf(key, value)
            with open("/proc/sys/net/ipv4/tcp_timestamps", "w") as f:
                f.write(SANDBOX_TCP_TIMESTAMPS)
            # A socket stays in the netns it was created in.
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
            result["fd"] = sock.detach()
        except BaseException as e:
            if made:
                _remove_netns(name)
            result["error"] = e

    thread = threading.Thread(target=run, name=f"create-netns-{name}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["fd"]  # type: ignore[return-value]


@contextlib.contextmanager
def entered_netns(name: str) -> Iterator[None]:
    """Run the calling thread inside netns `name` for the block.

    Network namespaces are per thread: other threads are not affected, and
    threads and processes started inside the block start inside `name`.
    """
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(saved)
    finally:
        os.close(saved)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")
