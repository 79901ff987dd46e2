"""nf_tables netlink messages of our own, sent in one batch: a sandbox's new table,
and the deletion of one.

libnftables 1.0.6 reads what the namespace holds (its cache) before it runs a
command: for a table's deletion every table, and for a table with anything in it
every table's chains, sets and objects. Beside a gateway service's other sandboxes
that grew with their number: creating a sandbox's table took 1.7 ms beside 1 table
and ~52-73 ms beside 256, deleting one 62 (bench/bench_nft.py). The kernel needs
none of it, and a batch of these messages is answered in about the same time
whatever is beside it.

`sandbox_table` is the table of `nft.render_ruleset(cfg, new=True)`, in the messages
`nft -f` sends for that text (its `--debug=mnl`; without the set metadata nft keeps
for its own printing): the text stays the readable definition, and
tests/unit/test_nft_wire.py loads both into a kernel and requires the same rules,
sets and counters back, expression by expression.

The encoding is hand-written: a few attribute types of <linux/netfilter/nf_tables.h>
(pyroute2's nftables classes cost ~84 ms of imports, session 30).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

# netfilter netlink (<linux/netfilter/nfnetlink.h>, <linux/netfilter/nf_tables.h>)
NETLINK_NETFILTER = 12
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP_INTR, _NLM_F_DUMP = 0x1, 0x4, 0x10, 0x300
_NLM_F_EXCL, _NLM_F_CREATE, _NLM_F_APPEND = 0x200, 0x400, 0x800
_NLMSG_ERROR, _NLMSG_DONE = 0x2, 0x3
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 0x10, 0x11
_NFNL_SUBSYS_NFTABLES = 10
_NFPROTO_INET = 1
_NLA_F_NESTED = 0x8000
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
_NLATTR = struct.Struct("=HH")  # length, type
_NLA_TYPE_MASK = 0x3FFF  # the type without its nested and byte order flags
_NFGENMSG_END = _NLMSGHDR.size + 4  # an nf_tables message's attributes start here
DUMP_ATTEMPTS = 5

# message types
_NEWTABLE, _DELTABLE, _NEWCHAIN, _NEWRULE, _NEWSET, _NEWSETELEM = 0, 2, 3, 6, 9, 12
_NEWOBJ, _GETOBJ = 18, 19
# attributes, by the message or expression they belong to
_TABLE_NAME, _TABLE_FLAGS = 1, 2
_CHAIN_TABLE, _CHAIN_NAME, _CHAIN_HOOK, _CHAIN_POLICY, _CHAIN_TYPE = 1, 3, 4, 5, 7
_HOOK_HOOKNUM, _HOOK_PRIORITY = 1, 2
_RULE_TABLE, _RULE_CHAIN, _RULE_EXPRESSIONS = 1, 2, 4
_SET_TABLE, _SET_NAME, _SET_FLAGS, _SET_KEY_TYPE, _SET_KEY_LEN = 1, 2, 3, 4, 5
_SET_DESC, _SET_ID, _SET_DESC_SIZE = 9, 10, 1
_ELEMS_TABLE, _ELEMS_SET, _ELEMS_ELEMENTS, _ELEMS_SET_ID = 1, 2, 3, 4  # NFTA_SET_ELEM_LIST_*
_SET_ELEM_KEY = 1
_OBJ_TABLE, _OBJ_NAME, _OBJ_TYPE, _OBJ_DATA = 1, 2, 3, 4
_COUNTER_BYTES, _COUNTER_PACKETS = 1, 2
_LIST_ELEM, _EXPR_NAME, _EXPR_DATA = 1, 1, 2
_DATA_VALUE, _DATA_VERDICT, _VERDICT_CODE = 1, 2, 1

_REG_VERDICT, _REG_1 = 0, 1
_NF_DROP, _NF_ACCEPT = 0, 1
_CMP_EQ, _CMP_NEQ = 0, 1
_META_IIFNAME, _META_OIFNAME, _META_NFPROTO, _META_L4PROTO = 6, 7, 15, 16
_PAYLOAD_TRANSPORT = 2
_FIB_F_SADDR, _FIB_F_DADDR, _FIB_F_IIF, _FIB_F_PRESENT = 0x1, 0x2, 0x8, 0x20
_FIB_RESULT_OIF, _FIB_RESULT_OIFNAME, _FIB_RESULT_ADDRTYPE = 1, 2, 3
_CT_STATUS, _IPS_DST_NAT = 2, 0x20
_CT_STATE, _CT_STATE_NEW = 0, 0x8  # NFT_CT_STATE; NF_CT_STATE_BIT(IP_CT_NEW)
_NF_NAT_RANGE_PROTO_SPECIFIED = 0x2
_OBJECT_COUNTER = 1
_SET_ANONYMOUS, _SET_CONSTANT = 0x1, 0x2
_NF_INET_PRE_ROUTING, _NF_INET_LOCAL_IN, _NF_INET_FORWARD, _NF_INET_LOCAL_OUT = 0, 1, 2, 3
_IPPROTO_ICMP, _IPPROTO_TCP, _IPPROTO_UDP, _IPPROTO_ICMPV6 = 1, 6, 17, 58
_NFPROTO_IPV4, _NFPROTO_IPV6 = 2, 10
_RTN_LOCAL = 2
_TCP_SYN, _TCP_ACK = 0x02, 0x10
ALL_SANDBOX_IFACES = "sgh-*"  # every sandbox's host end (nft.ALL_SANDBOX_IFACES says why)
# nft's datatypes for a set's key (nftables' datatype.h): how `nft list` shows it
_TYPE_INET_SERVICE, _TYPE_ICMP6_TYPE = 13, 29
# The kernel's own MLD reports (nft.py _KERNEL_MLD): ICMPv6 types 131, 132, 143.
_KERNEL_MLD_TYPES = (131, 132, 143)


Message = tuple[int, int, int, bytes]  # type (subsystem and message), flags, family, attributes


class WireError(OSError):
    """The kernel refused the batch (errno and the step), or did not answer."""


# --- attributes ---------------------------------------------------------------------


def _attr(kind: int, value: bytes) -> bytes:
    return _NLATTR.pack(_NLATTR.size + len(value), kind) + value + b"\0" * (-len(value) % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(attrs))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("!I", value))


def _i32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("!i", value))


def _u64(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("!Q", value))


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _value(kind: int, data: bytes) -> bytes:
    return _nest(kind, _attr(_DATA_VALUE, data))


# --- expressions (nft --debug=netlink shows them as [ meta load iifname => reg 1 ]) ---


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(_LIST_ELEM, _str(_EXPR_NAME, name), _nest(_EXPR_DATA, *attrs))


def _meta(key: int) -> bytes:
    return _expr("meta", _u32(2, key), _u32(1, _REG_1))  # key, dreg


def _cmp(data: bytes, op: int = _CMP_EQ) -> bytes:
    return _expr("cmp", _u32(1, _REG_1), _u32(2, op), _value(3, data))  # sreg, op, data


def _transport(offset: int, length: int) -> bytes:
    return _expr(  # dreg, base, offset, len
        "payload", _u32(1, _REG_1), _u32(2, _PAYLOAD_TRANSPORT), _u32(3, offset), _u32(4, length)
    )


def _bitwise(mask: bytes) -> bytes:
    # sreg, dreg, op (mask and xor), len, mask, xor
    return _expr(
        "bitwise",
        _u32(1, _REG_1),
        _u32(2, _REG_1),
        _u32(6, 0),
        _u32(3, len(mask)),
        _value(4, mask),
        _value(5, bytes(len(mask))),
    )


def _lookup(set_id: int) -> bytes:
    return _expr("lookup", _u32(2, _REG_1), _str(1, "__set%d"), _u32(4, set_id))  # sreg, set, id


def _verdict(code: int) -> bytes:
    data = _nest(2, _nest(_DATA_VERDICT, _u32(_VERDICT_CODE, code)))
    return _expr("immediate", _u32(1, _REG_VERDICT), data)  # dreg, data


def _counter(name: str) -> bytes:
    return _expr("objref", _u32(1, _OBJECT_COUNTER), _str(2, name))  # type, name


def _fib(flags: int, result: int) -> bytes:
    return _expr("fib", _u32(3, flags), _u32(2, result), _u32(1, _REG_1))  # flags, result, dreg


def _limit_over(per_second: int) -> bytes:
    # rate, unit (seconds), burst, type (packets), flags (over: inverted)
    return _expr(
        "limit", _u64(1, per_second), _u64(2, 1), _u32(3, per_second), _u32(4, 0), _u32(5, 1)
    )


def _redirect(port: int) -> bytes:
    return _expr("immediate", _u32(1, _REG_1), _value(2, struct.pack("!H", port))) + _expr(
        "redir", _u32(1, _REG_1), _u32(3, _NF_NAT_RANGE_PROTO_SPECIFIED)
    )


# --- matches, as nft expands them ---------------------------------------------------------


def _ifname(key: int, pattern: str) -> bytes:
    """`iifname "sgh-ab"` (all 16 bytes: the name and its NULs) or `iifname "sgh-*"` (the
    prefix alone)."""
    name = pattern.encode()
    data = name[:-1] if name.endswith(b"*") else name + bytes(16 - len(name))
    return _meta(key) + _cmp(data)


def _l4proto(proto: int, op: int = _CMP_EQ) -> bytes:
    return _meta(_META_L4PROTO) + _cmp(bytes([proto]), op)


def _dport(proto: int, port: int) -> bytes:
    return _l4proto(proto) + _transport(2, 2) + _cmp(struct.pack("!H", port))


# --- messages ----------------------------------------------------------------------------


def _message(kind: int, flags: int, attrs: bytes, family: int = _NFPROTO_INET) -> Message:
    return (_NFNL_SUBSYS_NFTABLES << 8 | kind, flags, family, attrs)


def sandbox_table(cfg, counters: tuple[str, ...]) -> list[Message]:
    """The messages that create table `inet <cfg.table>` as `nft.render_ruleset(cfg,
    new=True)` says it (`cfg`: an nft.RulesetConfig; refused if the table exists),
    with the named `counters` (nft.COUNTERS)."""
    t = cfg.table
    create, add = _NLM_F_CREATE | _NLM_F_EXCL, _NLM_F_CREATE
    messages = [_message(_NEWTABLE, create, _str(_TABLE_NAME, t) + _u32(_TABLE_FLAGS, 0))]
    zero = _u64(_COUNTER_BYTES, 0) + _u64(_COUNTER_PACKETS, 0)
    for name in counters:
        attrs = _str(_OBJ_TABLE, t) + _str(_OBJ_NAME, name) + _u32(_OBJ_TYPE, _OBJECT_COUNTER)
        messages.append(_message(_NEWOBJ, add, attrs + _nest(_OBJ_DATA, zero)))

    def chain(name: str, kind: str, hook: int, priority: int) -> None:
        hooked = _nest(_CHAIN_HOOK, _u32(_HOOK_HOOKNUM, hook), _i32(_HOOK_PRIORITY, priority))
        attrs = _str(_CHAIN_TABLE, t) + _str(_CHAIN_NAME, name) + _str(_CHAIN_TYPE, kind)
        messages.append(_message(_NEWCHAIN, add, attrs + _u32(_CHAIN_POLICY, _NF_ACCEPT) + hooked))

    def anonymous_set(set_id: int, key_type: int, keys: list[bytes]) -> None:
        # "__set%d": the kernel names it; the rules' lookups find it by its id
        attrs = _str(_SET_TABLE, t) + _str(_SET_NAME, "__set%d")
        attrs += _u32(_SET_FLAGS, _SET_ANONYMOUS | _SET_CONSTANT)
        attrs += _u32(_SET_KEY_TYPE, key_type) + _u32(_SET_KEY_LEN, len(keys[0]))
        attrs += _u32(_SET_ID, set_id) + _nest(_SET_DESC, _u32(_SET_DESC_SIZE, len(keys)))
        messages.append(_message(_NEWSET, add, attrs))
        elements = b"".join(_nest(_LIST_ELEM, _value(_SET_ELEM_KEY, key)) for key in keys)
        attrs = _str(_ELEMS_TABLE, t) + _str(_ELEMS_SET, "__set%d") + _u32(_ELEMS_SET_ID, set_id)
        messages.append(_message(_NEWSETELEM, add, attrs + _nest(_ELEMS_ELEMENTS, elements)))

    def rule(chain_name: str, *expressions: bytes) -> None:
        attrs = _str(_RULE_TABLE, t) + _str(_RULE_CHAIN, chain_name)
        body = _attr(_RULE_EXPRESSIONS | _NLA_F_NESTED, b"".join(expressions))
        messages.append(_message(_NEWRULE, _NLM_F_CREATE | _NLM_F_APPEND, attrs + body))

    sbx = _ifname(_META_IIFNAME, cfg.sandbox_ifaces)
    drop, accept = _verdict(_NF_DROP), _verdict(_NF_ACCEPT)

    def dropped(name: str) -> bytes:
        return _counter(name) + drop

    chain("early", "filter", _NF_INET_PRE_ROUTING, -150)
    anonymous_set(1, _TYPE_ICMP6_TYPE, [bytes([kind]) for kind in _KERNEL_MLD_TYPES])
    nfproto_ipv6 = _meta(_META_NFPROTO) + _cmp(bytes([_NFPROTO_IPV6]))
    rule("early", sbx, nfproto_ipv6, _l4proto(_IPPROTO_ICMPV6), _transport(0, 1), _lookup(1), drop)
    rule("early", sbx, nfproto_ipv6, dropped("dropped_ipv6"))
    spoofed = _fib(_FIB_F_SADDR | _FIB_F_IIF | _FIB_F_PRESENT, _FIB_RESULT_OIF) + _cmp(bytes(4))
    rule("early", sbx, spoofed, dropped("dropped_spoofed"))
    rule(
        "early",
        sbx,
        _dport(_IPPROTO_UDP, 53),
        _limit_over(cfg.dns_rate),
        dropped("dropped_dns_flood"),
    )
    rule("early", sbx, _dport(_IPPROTO_UDP, 53), accept)
    syn = _transport(13, 1) + _bitwise(bytes([_TCP_SYN | _TCP_ACK])) + _cmp(bytes([_TCP_SYN]))
    connects = _l4proto(_IPPROTO_TCP) + syn + _limit_over(cfg.connection_rate)
    rule("early", sbx, connects, dropped("dropped_connect_flood"))
    rule("early", sbx, _dport(_IPPROTO_TCP, 53), accept)
    # `fib daddr oifname "sgh-*"`: the name's prefix alone, as `_ifname` compares one
    to_sandbox = _fib(_FIB_F_DADDR, _FIB_RESULT_OIFNAME) + _cmp(ALL_SANDBOX_IFACES[:-1].encode())
    rule("early", sbx, _l4proto(_IPPROTO_TCP), syn, to_sandbox, dropped("dropped_forward"))
    local = _fib(_FIB_F_DADDR, _FIB_RESULT_ADDRTYPE) + _cmp(struct.pack("=I", _RTN_LOCAL))
    rule("early", sbx, local, dropped("dropped_to_gateway"))
    rule("early", sbx, _l4proto(_IPPROTO_UDP), dropped("dropped_udp"))
    rule("early", sbx, _l4proto(_IPPROTO_ICMP), dropped("dropped_icmp"))
    rule("early", sbx, _l4proto(_IPPROTO_TCP, _CMP_NEQ), dropped("dropped_other"))

    chain("nat_prerouting", "nat", _NF_INET_PRE_ROUTING, -100)
    rule("nat_prerouting", sbx, _dport(_IPPROTO_UDP, 53), _redirect(cfg.dns_port))
    rule("nat_prerouting", sbx, _dport(_IPPROTO_TCP, 53), _redirect(cfg.dns_port))
    ipv4 = _meta(_META_NFPROTO) + _cmp(bytes([_NFPROTO_IPV4]))
    rule("nat_prerouting", sbx, ipv4, _l4proto(_IPPROTO_TCP), _redirect(cfg.proxy_port))

    chain("input", "filter", _NF_INET_LOCAL_IN, 0)
    redirected = _expr("ct", _u32(2, _CT_STATUS), _u32(1, _REG_1))  # key, dreg
    redirected += _bitwise(struct.pack("=I", _IPS_DST_NAT)) + _cmp(bytes(4), _CMP_NEQ)
    ports = [struct.pack("!H", cfg.proxy_port), struct.pack("!H", cfg.dns_port)]
    anonymous_set(2, _TYPE_INET_SERVICE, ports)
    tcp_ports = _l4proto(_IPPROTO_TCP) + _transport(2, 2) + _lookup(2)
    rule("input", sbx, redirected, tcp_ports, accept)
    rule("input", sbx, redirected, _dport(_IPPROTO_UDP, cfg.dns_port), accept)
    rule("input", sbx, dropped("dropped_input"))

    chain("forward", "filter", _NF_INET_FORWARD, 0)
    rule("forward", sbx, dropped("dropped_forward"))
    rule("forward", _ifname(_META_OIFNAME, cfg.sandbox_ifaces), dropped("dropped_forward"))

    chain("output", "filter", _NF_INET_LOCAL_OUT, 0)
    new = _expr("ct", _u32(2, _CT_STATE), _u32(1, _REG_1))  # key, dreg
    new += _bitwise(struct.pack("=I", _CT_STATE_NEW)) + _cmp(bytes(4), _CMP_NEQ)
    rule("output", _ifname(_META_OIFNAME, cfg.sandbox_ifaces), new, drop)
    return messages


def table_message(table: str) -> Message:
    """`table inet <table>`: made if missing, left as it is if not."""
    return _message(_NEWTABLE, _NLM_F_CREATE, _str(_TABLE_NAME, table) + _u32(_TABLE_FLAGS, 0))


def delete_table_message(table: str) -> Message:
    return _message(_DELTABLE, 0, _str(_TABLE_NAME, table))


# --- reading ------------------------------------------------------------------------------


def counters(table: str, timeout: float) -> dict[str, int]:
    """Packets per named counter of table `inet <table>`: one dump of its counter
    objects (the kernel filters them by table and type). Empty when there is no such
    table. A dump the kernel marks interrupted (a transaction committed during it)
    is asked for again."""
    attrs = _str(_OBJ_TABLE, table) + _u32(_OBJ_TYPE, _OBJECT_COUNTER)
    kind, flags = _NFNL_SUBSYS_NFTABLES << 8 | _GETOBJ, _NLM_F_REQUEST | _NLM_F_DUMP

    def request(seq: int) -> bytes:
        return _nfnl(kind, flags, seq, _NFPROTO_INET, 0, attrs)

    for _ in range(DUMP_ATTEMPTS):
        found, interrupted = _exchange(1, timeout, request, _read_counters_dump)
        if not interrupted:
            return found
    raise WireError(errno.EAGAIN, f"the dump was interrupted by changes {DUMP_ATTEMPTS} times")


def _read_counters_dump(sock: socket.socket, seq: int) -> tuple[dict[str, int], bool]:
    found, interrupted = {}, False
    for kind, flags, got_seq, data, offset, length in _answers(sock):
        if got_seq != seq:
            continue
        interrupted |= bool(flags & _NLM_F_DUMP_INTR)
        if kind == _NLMSG_DONE:
            return found, interrupted
        if kind == _NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
            raise WireError(-code, os.strerror(-code))
        if kind == _NFNL_SUBSYS_NFTABLES << 8 | _NEWOBJ:
            attrs = _attrs(data, offset + _NFGENMSG_END, offset + length)
            counter = _attrs(attrs[_OBJ_DATA], 0, len(attrs[_OBJ_DATA]))
            name = attrs[_OBJ_NAME].rstrip(b"\0").decode()
            found[name] = struct.unpack("!Q", counter[_COUNTER_PACKETS])[0]
    raise AssertionError("unreachable: _answers never ends")


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """The attributes between `start` and `end`: type -> value."""
    found = {}
    while start + _NLATTR.size <= end:
        length, kind = _NLATTR.unpack_from(data, start)
        if length < _NLATTR.size:
            raise WireError(errno.EPROTO, "a malformed netlink attribute")
        found[kind & _NLA_TYPE_MASK] = bytes(data[start + _NLATTR.size : start + length])
        start += (length + 3) & ~3
    return found


# --- the batch -----------------------------------------------------------------------------


def encode_batch(messages: list[Message], first: int = 1) -> bytes:
    """The messages between a batch's begin (sequence number `first`) and end, each
    asking for its acknowledgement."""
    subsys = _NFNL_SUBSYS_NFTABLES
    parts = [_nfnl(_NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, first, socket.AF_UNSPEC, subsys)]
    for seq, (kind, flags, family, attrs) in enumerate(messages, start=first + 1):
        parts.append(_nfnl(kind, _NLM_F_REQUEST | _NLM_F_ACK | flags, seq, family, 0, attrs))
    end = first + len(messages) + 1
    parts.append(_nfnl(_NFNL_MSG_BATCH_END, _NLM_F_REQUEST, end, socket.AF_UNSPEC, subsys))
    return b"".join(parts)


def commit(
    messages: list[Message],
    timeout: float,
) -> None:
    """Send `messages` as one transaction (all of them or none) and wait for the
    kernel's verdict on it. Raises WireError with the errno of the first message the
    kernel refused.

    On a socket of this thread's that stays open: closing a netfilter netlink socket
    waits until the kernel has freed what its transactions deleted, an RCU grace
    period (~13 ms of a replaced table's 16 here; the commit itself is acknowledged
    in ~0.7 ms). Left open, the kernel frees it in its own time."""
    code = _exchange(
        len(messages) + 2,
        timeout,
        lambda first: encode_batch(messages, first),
        lambda sock, first: _ack(sock, first, first + len(messages)),
    )
    if code < 0:
        raise WireError(-code, os.strerror(-code))


def _exchange(count: int, timeout: float, request, read):
    """`request(first)` sent on this thread's socket (`count` sequence numbers from
    `first` are its), and `read(sock, first)`'s answer. A socket that failed or timed
    out is dropped: its late answers must not be read as the next request's."""
    sock, first = _socket(count)
    try:
        sock.settimeout(timeout)
        sock.send(request(first))
        return read(sock, first)
    except TimeoutError:
        _local.__dict__.clear()
        raise WireError(errno.ETIMEDOUT, f"no answer from the kernel after {timeout} s") from None
    except WireError:
        _local.__dict__.clear()
        raise
    except OSError as e:
        _local.__dict__.clear()
        raise WireError(e.errno or errno.EIO, e.strerror or str(e)) from e


_local = threading.local()  # this thread's socket, and the sequence number it is at


def _socket(count: int) -> tuple[socket.socket, int]:
    """This thread's netfilter netlink socket, and the first of `count` sequence
    numbers for a batch on it (numbers never reused, so that a late answer to an
    earlier batch is never taken for this one's)."""
    sock = getattr(_local, "sock", None)
    if sock is None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as e:
            raise WireError(e.errno, f"no netfilter netlink socket: {e.strerror}") from e
        _local.sock, _local.seq = sock, 0
    first = _local.seq % 0x7FFF0000 + 1
    _local.seq = first + count
    return sock, first


def _forget_in_child() -> None:
    # A forked child shares its parent's socket: the parent's answers are not its own.
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_forget_in_child)


def _nfnl(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes = b"") -> bytes:
    """One netlink message with its nfgenmsg (family, version 0, res_id big-endian)."""
    body = struct.pack("!BBH", family, 0, res_id) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def _ack(sock: socket.socket, first: int, last: int) -> int:
    """The kernel's verdict on the batch sent (its begin `first`, its last message
    `last`): 0 once `last` is acknowledged, or minus the errno of the first message it
    refused (or of the batch's begin: nf_tables missing, the commit failed).
    nfnetlink answers a batch's messages once it is through with the batch: after the
    commit, or the abort."""
    for kind, _flags, seq, data, offset, length in _answers(sock):
        if kind == _NLMSG_ERROR and length >= _NLMSGHDR.size + 4 and first <= seq <= last:
            (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
            if seq == last or code < 0:
                return code
    raise AssertionError("unreachable: _answers never ends")


def _answers(sock: socket.socket):
    """The messages the kernel sends on `sock`, as they come: (type, flags, sequence
    number, the datagram, the message's offset in it, its length)."""
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, flags, seq, _port = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                raise WireError(errno.EPROTO, "a malformed netlink answer")
            yield kind, flags, seq, data, offset, length
            offset += (length + 3) & ~3
