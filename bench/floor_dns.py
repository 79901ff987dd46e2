"""The floor: the least a Python DNS forwarder does, to measure sandgate's DNS filter
against (bench_dns.py's "the floor" rows).

    python bench/floor_dns.py HOST PORT UPSTREAM_PORT

One epoll loop (select.epoll, no asyncio), as sandgate's filter forwards: a query
read from UDP, or from a TCP connection (RFC 7766's 2-byte length), is sent on over
UDP to 127.0.0.1:UPSTREAM_PORT under an id of the floor's own (clients' ids
collide), and the answer goes back to where the query came from, its id restored.
No parsing, no policy, no checks, no bindings, no events, no timeouts: a measuring
stick, not a filter. What sandgate's filter spends above it is its own work; the
floor itself is the interpreter's and the kernel's price of a forwarder in Python.

Prints the port it listens on (PORT 0: any free port for both UDP and TCP) as one
line, then serves until killed.
"""

from __future__ import annotations

import argparse
import select
import socket
import sys


def serve(host: str, port: int, upstream_port: int) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, port))
    port = udp.getsockname()[1]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.connect(("127.0.0.1", upstream_port))
    for sock in (udp, listener, up):
        sock.setblocking(False)
    print(port, flush=True)
    ep = select.epoll()
    for sock in (udp, listener, up):
        ep.register(sock.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}  # TCP clients by fd
    buffers: dict[int, bytes] = {}
    pending: dict[int, tuple[bytes, object]] = {}  # floor id -> (client's id, where to)
    next_id = 0

    def forward(query: bytes, to: object) -> None:
        nonlocal next_id
        next_id = (next_id + 1) & 0xFFFF
        pending[next_id] = (query[:2], to)
        up.send(next_id.to_bytes(2, "big") + query[2:])

    def from_tcp(fd: int) -> None:
        try:
            data = conns[fd].recv(65536)
        except OSError:
            data = b""
        if not data:
            ep.unregister(fd)
            conns.pop(fd).close()
            buffers.pop(fd, None)
            return
        buf = buffers.get(fd, b"") + data
        while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
            end = 2 + int.from_bytes(buf[:2], "big")
            forward(buf[2:end], fd)
            buf = buf[end:]
        buffers[fd] = buf

    fds = {udp.fileno(): "udp", listener.fileno(): "listener", up.fileno(): "up"}
    while True:
        for fd, _ in ep.poll():
            role = fds.get(fd)
            if role == "udp":
                while True:
                    try:
                        query, source = udp.recvfrom(65536)
                    except BlockingIOError:
                        break
                    forward(query, source)
            elif role == "up":
                while True:
                    try:
                        answer = up.recv(65536)
                    except BlockingIOError:
                        break
                    except OSError:  # ICMP unreachable from a restarting upstream
                        continue
                    their_id, to = pending.pop(int.from_bytes(answer[:2], "big"), (None, None))
                    if to is None:
                        continue
                    answer = their_id + answer[2:]
                    if isinstance(to, int):  # a TCP client's fd
                        if to in conns:
                            conns[to].send(len(answer).to_bytes(2, "big") + answer)
                    else:
                        udp.sendto(answer, to)
            elif role == "listener":
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    conns[sock.fileno()] = sock
                    ep.register(sock.fileno(), select.EPOLLIN)
            elif fd in conns:
                from_tcp(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_port", type=int)
    args = parser.parse_args()
    serve(args.host, args.port, args.upstream_port)  # until killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
