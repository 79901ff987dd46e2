"""The floor: the least a Python gateway does to relay plain HTTP/1.1, to measure
sandgate against (bench_http1.py `--with floor`, bench_gateway.py setup F).

    python bench/floor_relay.py HOST PORT [--upstream HOST:PORT]

One epoll loop (select.epoll, no asyncio): accept; read the request head to its
blank line; send it on over a kept upstream connection (without the client's
`Connection: close`, which is hop-by-hop); read the answer to its Content-Length;
send it back; close the client if it said so. The upstream is `--upstream`, else
the connection's original destination (SO_ORIGINAL_DST, as sandgate's front door
reads it behind an nftables redirect); kept upstreams are pooled per destination.
No policy, no checks, no events, no timeouts: a measuring stick, not a proxy. What
sandgate spends above it is its decisions, checks and records; the floor itself is
the interpreter's and the kernel's price of a relay in Python.

Prints the port it listens on (PORT 0: any) as one line, then serves until killed.
"""

from __future__ import annotations

import argparse
import select
import socket
import sys

# The front door's own reading of the redirected destination (one getsockopt).
from sandgate.proxy.frontdoor.door import original_dst


def serve(host: str, port: int, upstream: tuple[str, int] | None) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    socks: dict[int, socket.socket] = {}  # fd -> its socket, clients and upstreams
    upstreams: dict[int, tuple[str, int]] = {}  # upstream fd -> its destination
    pair: dict[int, int] = {}  # client fd <-> upstream fd, while an exchange runs
    pools: dict[tuple[str, int], list[int]] = {}  # idle upstream fds (still registered)
    buffers: dict[int, bytearray] = {}
    closing: set[int] = set()  # clients that said `Connection: close`

    def close(fd: int) -> None:
        closing.discard(fd)
        ep.unregister(fd)
        buffers.pop(fd, None)
        upstreams.pop(fd, None)
        socks.pop(fd).close()

    def from_client(fd: int) -> None:
        try:
            data = socks[fd].recv(65536)
        except OSError:  # reset: as a close
            data = b""
        if not data:
            up = pair.pop(fd, None)
            if up is not None:  # mid-exchange: its upstream is not reusable
                del pair[up]
                close(up)
            close(fd)
            return
        buf = buffers.setdefault(fd, bytearray())
        buf += data
        if b"\r\n\r\n" not in buf:
            return
        dst = upstream or original_dst(socks[fd])
        pool = pools.get(dst)
        if pool:
            up = pool.pop()
        else:
            sock = socket.create_connection(dst)
            sock.setblocking(False)
            up = sock.fileno()
            socks[up], upstreams[up] = sock, dst
            ep.register(up, select.EPOLLIN)
        pair[up], pair[fd] = fd, up
        head = buf.replace(b"Connection: close\r\n", b"")
        if len(head) < len(buf):
            closing.add(fd)
        socks[up].send(head)  # a request head: far below the socket's buffer
        buf.clear()

    def from_upstream(fd: int) -> None:
        try:
            data = socks[fd].recv(65536)
        except OSError:
            data = b""
        client = pair.get(fd)
        if not data or client is None:  # closed, or bytes from an idle one: dropped
            pool = pools.get(upstreams[fd], [])
            if fd in pool:
                pool.remove(fd)
            close(fd)
            if client is not None:
                del pair[client]
                close(client)
            return
        buf = buffers.setdefault(fd, bytearray())
        buf += data
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(buf[:head_end]).lower()
        at = head.find(b"\r\ncontent-length:") + 17
        if at < 17:
            raise SystemExit("floor_relay: an answer without Content-Length")
        end = head.find(b"\r\n", at)
        if len(buf) < head_end + 4 + int(head[at : end if end >= 0 else None]):
            return
        socks[client].sendall(buf)
        buf.clear()
        del pair[fd], pair[client]
        if client in closing:
            close(client)
        pools.setdefault(upstreams[fd], []).append(fd)

    listening = listener.fileno()
    while True:
        for fd, _ in ep.poll():
            if fd == listening:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    socks[sock.fileno()] = sock
                    ep.register(sock.fileno(), select.EPOLLIN)
            elif fd in upstreams:
                from_upstream(fd)
            elif fd in socks:
                from_client(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--upstream", help="HOST:PORT instead of the original destination")
    args = parser.parse_args()
    upstream = None
    if args.upstream:
        host, _, port = args.upstream.rpartition(":")
        upstream = (host, int(port))
    serve(args.host, args.port, upstream)  # until killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
