"""The few rtnetlink requests sandgate makes: the address and route requests encoded by
pyroute2's message classes, the link requests by this module.

pyroute2's `IPRoute` loads, with itself, its request filters, its mock and every
queueing discipline's message class: ~37 ms of the ~260 ms an embedded `sandgate run`
takes to start and end (docs/performance.md, "Session 19"), for the six requests
below. pyroute2's `ifaddrmsg` and `rtmsg` encode the address and route requests;
this module sends a request on a netlink socket and reads the kernel's answer to it.

The link requests (a veth pair, a link up, a link's state, its deletion) are
sandgate's own bytes (`_link`, `_attribute`): pyroute2's `ifinfmsg` module loads its
fifteen link-kind plugins, `multiprocessing` and `pkgutil` with it, for four fixed
layouts (the embedded start 0.95x-0.97x without it: docs/performance.md, "Session 41").
tests/unit/test_rtnl_exchange.py checks them byte for byte against `ifinfmsg`'s.

A link's index is asked with an interface ioctl instead (`SIOCGIFINDEX`, as
`if_nametoindex` does), on the same socket: the kernel answers it in that socket's
network namespace. Whether a link is up is read from an `RTM_GETLINK` answer's one
attribute, not decoded by pyroute2: the answer is the whole link (statistics and
all), which pyroute2 took ~0.3 ms to decode, ~1.7 ms of the ~6 ms a sandbox network
takes to make (session 28).

Synchronous: every answer is in the socket when `send` returns (the kernel handles
an rtnetlink request in the sender's system call). Errors are `OSError`s with the
kernel's errno (`FileExistsError` for a name taken, ...); a kernel that does not
answer within `TIMEOUT_S` is a `TimeoutError`, never a hang.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

import sandgate.enforcer.lean_pyroute2  # noqa: F401 - must come before any pyroute2 import
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

TIMEOUT_S = 5.0
DUMP_ATTEMPTS = 5
_HEADER = struct.Struct("=IHHI")  # nlmsghdr: length, type, flags, seq (then the port id)
_REQUEST_HEADER = struct.Struct("=IHHII")  # nlmsghdr, the port id 0: the kernel's to fill
_ERROR = struct.Struct("=i")  # nlmsgerr's error, after its header
_CHANGE = NLM_F_REQUEST | NLM_F_ACK
_CREATE = _CHANGE | NLM_F_CREATE | NLM_F_EXCL
_IFF_UP = 0x1
_SIOCGIFINDEX = 0x8933
_RTATTR = struct.Struct("=HH")  # rtattr: length, type (then the value)
_HEADER_END = 16  # nlmsghdr: the message's own struct (ifaddrmsg, ifinfomsg) starts here
_IFINFOMSG_END = 32  # nlmsghdr and ifinfomsg: the attributes start here
_IFADDRMSG_END = 24  # nlmsghdr and ifaddrmsg
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_IFLA_OPERSTATE, _IF_OPER_UP = 16, 6
_U32 = struct.Struct("=I")
_IFINFOMSG = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFLA_IFNAME, _IFLA_LINKINFO, _IFLA_NET_NS_FD = 3, 18, 28
_IFLA_INFO_KIND, _IFLA_INFO_DATA, _VETH_INFO_PEER = 1, 2, 1
_IFREQ = struct.Struct("16si20x")  # struct ifreq: the name, then the union (its int first)
_IFNAMSIZ = 16  # with the name's NUL
_RT_TABLE_MAIN, _RTPROT_STATIC, _RT_SCOPE_UNIVERSE, _RTN_UNICAST = 254, 4, 0, 1


class Rtnl:
    """One rtnetlink socket: of this thread's network namespace, or `fileno`'s (a
    socket made in another one stays in it)."""

    def __init__(self, fileno: int | None = None):
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE, fileno
        )
        self.sock.settimeout(TIMEOUT_S)
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- links ---------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        """The index of link `name`; None when there is none."""
        try:
            return self._ifreq(_SIOCGIFINDEX, name)
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise

    def link_up(self, index: int) -> bool:
        """Whether link `index` is operationally up: what `ip link` shows as `state UP`
        (the kernel's link watcher has seen its carrier). OSError (ENODEV) when there
        is no such link.

        Not IFF_RUNNING (SIOCGIFFLAGS), which an operstate UNKNOWN counts as running:
        a new veth's operstate is UNKNOWN until the link watcher has handled its
        creation, in its own time. A veth end set up before that was "running" at
        once, its peer down and its queue not active: it dropped the gateway's first
        ARP reply in 1 of 150-450 sandbox networks on a busy host (the task's first
        packet waited a second, for the next ARP probe)."""
        (answer,) = self._request(_link(index), RTM_GETLINK, _CHANGE, collect=True)
        for kind, value in _attributes(answer, _IFINFOMSG_END):
            if kind == _IFLA_OPERSTATE:
                return value[:1] == bytes([_IF_OPER_UP])
        raise OSError(errno.EPROTO, f"the kernel's answer for link {index} has no operstate")

    def _ifreq(self, request: int, name: str) -> int:
        """The int the interface ioctl `request` answers for link `name`, in this
        socket's network namespace."""
        encoded = name.encode()
        if not 0 < len(encoded) < _IFNAMSIZ or b"\0" in encoded:
            # Not a link's name (cut short to fit, it could be another link's).
            raise OSError(errno.ENODEV, f"no link {name!r}: not a link name")
        answer = fcntl.ioctl(self.sock.fileno(), request, _IFREQ.pack(encoded, 0))
        return _IFREQ.unpack(answer)[1]

    def wait_for_linkwatch(self, index: int) -> None:
        """Return once the kernel's link watcher has finished changing link `index`.

        It marks a link up (what `link_up` reads) just before it activates the link's
        transmit queue, and until then the link drops what it is given. It holds the
        RTNL lock throughout (net/core/link_watch.c: linkwatch_event, then
        rfc2863_policy, dev_activate). Setting a link up takes that lock, so the
        kernel answers it only after; on a link that is up it changes nothing."""
        self.set_up(index)

    def add_veth(self, name: str, peer: str, peer_netns_fd: int) -> None:
        """A veth pair: `name` here, `peer` in the network namespace `peer_netns_fd`."""
        peer_link = _link(attrs=_name(peer) + _attribute(_IFLA_NET_NS_FD, _U32.pack(peer_netns_fd)))
        info = _attribute(_IFLA_INFO_KIND, b"veth\0") + _attribute(
            _IFLA_INFO_DATA, _attribute(_VETH_INFO_PEER, peer_link)
        )
        msg = _link(attrs=_name(name) + _attribute(_IFLA_LINKINFO, info))
        self._request(msg, RTM_NEWLINK, _CREATE)

    def set_up(self, index: int, up: bool = True) -> None:
        self._request(_link(index, _IFF_UP if up else 0, _IFF_UP), RTM_NEWLINK, _CHANGE)

    def delete_link(self, name: str) -> bool:
        """Delete link `name` (a veth end: both); False when there is none."""
        try:
            self._request(_link(attrs=_name(name)), RTM_DELLINK, _CHANGE)
        except OSError as e:
            if e.errno == errno.ENODEV:
                return False
            raise
        return True

    # --- addresses and routes ------------------------------------------------------

    def add_address(self, index: int, address: str, prefixlen: int) -> None:
        msg = ifaddrmsg()
        msg["family"], msg["prefixlen"], msg["index"] = socket.AF_INET, prefixlen, index
        msg["attrs"] = [("IFA_LOCAL", address), ("IFA_ADDRESS", address)]
        self._request(_body(msg), RTM_NEWADDR, _CREATE)

    def ipv4_addresses(self) -> set[str]:
        """The IPv4 addresses of this network namespace's links. Read from the dump's
        bytes: decoded by pyroute2, 256 sandbox networks' addresses took ~18 ms of each
        new one (bench_attach `--beside 256 --breakdown`)."""
        msg = ifaddrmsg()
        msg["family"] = socket.AF_INET
        found = self._request(_body(msg), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, collect=True)
        return {
            socket.inet_ntoa(value)
            for answer in found
            if answer[_HEADER_END] == socket.AF_INET
            for kind, value in _attributes(answer, _IFADDRMSG_END)
            if kind in (_IFA_ADDRESS, _IFA_LOCAL) and len(value) == 4
        }

    def add_default_route(self, gateway: str) -> None:
        """`default via gateway` in the main table (as `ip route add` makes it)."""
        msg = rtmsg()
        msg["family"], msg["table"], msg["proto"] = socket.AF_INET, _RT_TABLE_MAIN, _RTPROT_STATIC
        msg["scope"], msg["type"] = _RT_SCOPE_UNIVERSE, _RTN_UNICAST
        msg["attrs"] = [("RTA_GATEWAY", gateway)]
        self._request(_body(msg), RTM_NEWROUTE, _CREATE)

    # --- the exchange ----------------------------------------------------------------

    def _request(
        self, body: bytes, msg_type: int, flags: int, collect: bool = False
    ) -> list[bytes]:
        """Send the request `body` (its bytes after the nlmsghdr); the messages that
        answer it, as bytes, if `collect`, until its acknowledgement or a dump's end.
        Raises OSError for the kernel's error. A dump the kernel marks interrupted (the
        table changed under it: it may miss entries) is asked for again."""
        for _ in range(DUMP_ATTEMPTS):
            found, interrupted = self._exchange(body, msg_type, flags, collect)
            if not interrupted:
                return found
        raise OSError(errno.EAGAIN, f"rtnetlink dump {msg_type} was interrupted by changes "
                                    f"{DUMP_ATTEMPTS} times in a row")  # fmt: skip

    def _exchange(self, body: bytes, msg_type: int, flags: int, collect: bool) -> tuple[list, bool]:
        self._seq = seq = self._seq % 0xFFFFFFFF + 1
        self.sock.send(
            _REQUEST_HEADER.pack(_HEADER_END + len(body), msg_type, flags, seq, 0) + body
        )
        found, interrupted = [], False
        while True:
            try:
                # The kernel sends a dump in parts of at most 32 KiB (netlink_recvmsg's
                # cap); 64 KiB stays below malloc's mmap threshold.
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise TimeoutError(f"no answer from the kernel to rtnetlink request {msg_type} "
                                   f"in {TIMEOUT_S:.0f} s") from None  # fmt: skip
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, got_flags, got_seq = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise OSError(errno.EPROTO, "a malformed rtnetlink answer")
                if got_seq == seq:
                    interrupted |= bool(got_flags & NLM_F_DUMP_INTR)
                    if kind in (NLMSG_ERROR, NLMSG_DONE):
                        # The acknowledgement, or a dump's end: each carries the error.
                        (code,) = _ERROR.unpack_from(data, offset + 16) if length >= 20 else (0,)
                        if code < 0:
                            raise OSError(-code, os.strerror(-code))
                        return found, interrupted
                    if collect:
                        found.append(data[offset : offset + length])
                offset += (length + 3) & ~3


def _attributes(message: bytes, offset: int):
    """(type, value) of each rtattr of `message` from `offset`: the one or two
    attributes sandgate reads, without pyroute2's decode of all of them."""
    while offset + _RTATTR.size <= len(message):
        length, kind = _RTATTR.unpack_from(message, offset)
        if length < _RTATTR.size:
            return
        yield kind, message[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3


def _body(msg) -> bytes:
    """A pyroute2 message's bytes after its nlmsghdr (`_exchange` writes the header)."""
    msg.encode()
    return bytes(msg.data[_HEADER_END:])


def _link(index: int = 0, flags: int = 0, change: int = 0, attrs: bytes = b"") -> bytes:
    """An ifinfomsg (family AF_UNSPEC, as `ip link` sends) and its attributes."""
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change) + attrs


def _name(name: str) -> bytes:
    """IFLA_IFNAME: the name with its NUL (the kernel refuses one of IFNAMSIZ or more)."""
    return _attribute(_IFLA_IFNAME, name.encode() + b"\0")


def _attribute(kind: int, value: bytes) -> bytes:
    """One rtattr (a nested one's value is its attributes), padded to 4 bytes."""
    length = _RTATTR.size + len(value)
    return _RTATTR.pack(length, kind) + value + bytes(-length % 4)
