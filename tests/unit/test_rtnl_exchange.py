"""enforcer/rtnl.py's exchange without a kernel: what it does with answers the kernel
sends rarely (an interrupted dump, a dump's error) or never (a malformed header), and
the link requests it encodes itself, byte for byte as pyroute2's `ifinfmsg` does."""

from __future__ import annotations

import errno
import struct

import pytest
from sandgate.enforcer import rtnl

NLMSG_ERROR, NLMSG_DONE, RTM_NEWADDR = 2, 3, 20
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
NLM_F_MULTI, NLM_F_DUMP_INTR = 0x2, 0x10


class ScriptedKernel:
    """A socket whose answers are scripted per request: each a list of (type, flags,
    payload), sent with the request's sequence number."""

    def __init__(self, *answers: list[tuple[int, int, bytes]]):
        self.answers, self.sent = list(answers), []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        (seq,) = struct.unpack_from("=I", self.sent[-1], 8)
        parts = []
        for kind, flags, payload in self.answers.pop(0):
            parts.append(struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload)
        return b"".join(parts)

    def settimeout(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


def address(text: str) -> bytes:
    """An RTM_NEWADDR payload: ifaddrmsg and its IFA_ADDRESS."""
    ip = bytes(int(part) for part in text.split("."))
    return struct.pack("=BBBBI", 2, 30, 0, 0, 7) + struct.pack("=HH", 8, 1) + ip


def kernel_rtnl(monkeypatch: pytest.MonkeyPatch, kernel: ScriptedKernel) -> rtnl.Rtnl:
    monkeypatch.setattr(rtnl.socket, "socket", lambda *args: kernel)
    return rtnl.Rtnl()


def test_an_interrupted_dump_is_asked_for_again(monkeypatch: pytest.MonkeyPatch) -> None:
    done = (NLMSG_DONE, NLM_F_MULTI, struct.pack("=i", 0))
    kernel = ScriptedKernel(
        # The table changed under the first dump: it may have missed 10.1.0.1.
        [(RTM_NEWADDR, NLM_F_MULTI | NLM_F_DUMP_INTR, address("10.2.0.1")), done],
        [(RTM_NEWADDR, NLM_F_MULTI, address("10.1.0.1")),
         (RTM_NEWADDR, NLM_F_MULTI, address("10.2.0.1")), done],
    )  # fmt: skip
    assert kernel_rtnl(monkeypatch, kernel).ipv4_addresses() == {"10.1.0.1", "10.2.0.1"}
    assert len(kernel.sent) == 2


def test_the_addresses_are_each_messages_local_and_peer_ipv4_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read from the answer's bytes: IFA_LOCAL and IFA_ADDRESS (a point-to-point
    link's peer) both count as taken; another family's message, another attribute
    and a value that is no IPv4 address are passed over."""
    done = (NLMSG_DONE, NLM_F_MULTI, struct.pack("=i", 0))
    ptp = (
        struct.pack("=BBBBI", 2, 32, 0, 0, 8)
        + struct.pack("=HH", 8, 2) + bytes([10, 3, 0, 1])  # IFA_LOCAL
        + struct.pack("=HH", 8, 1) + bytes([10, 3, 0, 2])  # IFA_ADDRESS: the peer
        + struct.pack("=HH", 8, 3) + b"eth\0"  # IFA_LABEL
    )  # fmt: skip
    inet6 = struct.pack("=BBBBI", 10, 64, 0, 0, 9) + struct.pack("=HH", 20, 1) + bytes(16)
    odd = struct.pack("=BBBBI", 2, 24, 0, 0, 9) + struct.pack("=HH", 6, 1) + b"\x0a\x09\0\0"
    kernel = ScriptedKernel(
        [(RTM_NEWADDR, NLM_F_MULTI, address("10.1.0.1")), (RTM_NEWADDR, NLM_F_MULTI, ptp),
         (RTM_NEWADDR, NLM_F_MULTI, inet6), (RTM_NEWADDR, NLM_F_MULTI, odd), done],
    )  # fmt: skip
    assert kernel_rtnl(monkeypatch, kernel).ipv4_addresses() == {
        "10.1.0.1",
        "10.3.0.1",
        "10.3.0.2",
    }


def test_a_dump_interrupted_every_time_is_an_error_not_a_partial_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    interrupted = [
        (RTM_NEWADDR, NLM_F_MULTI | NLM_F_DUMP_INTR, address("10.2.0.1")),
        (NLMSG_DONE, NLM_F_MULTI, struct.pack("=i", 0)),
    ]
    kernel = ScriptedKernel(*[interrupted] * rtnl.DUMP_ATTEMPTS)
    with pytest.raises(OSError, match="interrupted") as failed:
        kernel_rtnl(monkeypatch, kernel).ipv4_addresses()
    assert failed.value.errno == errno.EAGAIN


def test_a_dumps_error_and_a_malformed_answer_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = ScriptedKernel([(NLMSG_DONE, NLM_F_MULTI, struct.pack("=i", -errno.ENOBUFS))])
    with pytest.raises(OSError) as failed:
        kernel_rtnl(monkeypatch, kernel).ipv4_addresses()
    assert failed.value.errno == errno.ENOBUFS

    class Malformed(ScriptedKernel):
        def recv(self, size: int) -> bytes:
            return struct.pack("=IHHII", 8, NLMSG_ERROR, 0, 1, 0)  # shorter than its header

    with pytest.raises(OSError) as failed:
        kernel_rtnl(monkeypatch, Malformed()).set_up(3)
    assert failed.value.errno == errno.EPROTO


def test_a_kernel_that_never_answers_is_a_timeout_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Silent(ScriptedKernel):
        def recv(self, size: int) -> bytes:
            raise TimeoutError("timed out")

    with pytest.raises(TimeoutError, match="no answer from the kernel"):
        kernel_rtnl(monkeypatch, Silent()).set_up(3)


def _pyroute2_link(msg_type: int, msg_flags: int, seq: int, **fields) -> bytes:
    """What pyroute2's ifinfmsg encodes for the same request (`attrs` as it takes them)."""
    import sandgate.enforcer.lean_pyroute2  # noqa: F401
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    msg = ifinfmsg()
    for name, value in fields.items():
        msg[name] = value
    header = msg["header"]
    header["type"], header["flags"], header["sequence_number"] = msg_type, msg_flags, seq
    msg.encode()
    return bytes(msg.data)


def test_the_link_requests_are_the_bytes_pyroute2_encodes(monkeypatch: pytest.MonkeyPatch) -> None:
    ack = [(NLMSG_ERROR, 0, struct.pack("=i", 0))]
    operstate_up = struct.pack("=BxHiII", 0, 1, 7, 0x1, 0) + struct.pack("=HHB3x", 5, 16, 6)
    kernel = ScriptedKernel(ack, ack, ack, [(RTM_NEWLINK, 0, operstate_up)] + ack, ack)
    link = kernel_rtnl(monkeypatch, kernel)
    link.add_veth("sgh-0a1b2c3d", "eth0", 9)
    link.set_up(7)
    link.set_up(7, up=False)
    assert link.link_up(7)
    assert link.delete_link("sgh-0a1b2c3d")

    create, change = 0x1 | 0x4 | 0x400 | 0x200, 0x1 | 0x4  # REQUEST ACK CREATE EXCL; REQUEST ACK
    peer = [("IFLA_IFNAME", "eth0"), ("IFLA_NET_NS_FD", 9)]
    info = [("IFLA_INFO_KIND", "veth"),
            ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", {"attrs": peer})]})]  # fmt: skip
    veth = [("IFLA_IFNAME", "sgh-0a1b2c3d"), ("IFLA_LINKINFO", {"attrs": info})]
    assert kernel.sent == [
        _pyroute2_link(RTM_NEWLINK, create, 1, attrs=veth),
        _pyroute2_link(RTM_NEWLINK, change, 2, index=7, change=1, flags=1),
        _pyroute2_link(RTM_NEWLINK, change, 3, index=7, change=1, flags=0),
        _pyroute2_link(RTM_GETLINK, change, 4, index=7),
        _pyroute2_link(RTM_DELLINK, change, 5, attrs=[("IFLA_IFNAME", "sgh-0a1b2c3d")]),
    ]
