"""A refused client's socket closed the way the client still reads its answer
(proxy/frontdoor/relay.py Lingering): the gateway answers while the client is still
sending (a 431 for a 1 MB head, a 403 for a denied upload); closed with bytes unread
the socket would send a reset and the client's send would fail before it read the
answer. Real TCP sockets on loopback, a real Poller on an asyncio loop."""

from __future__ import annotations

import asyncio
import socket
import threading

from sandgate.proxy.frontdoor.poller import Poller, new_event_loop
from sandgate.proxy.frontdoor.relay import Lingering, close_read

ANSWER = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n"
SENT = 3 << 20  # more than close_read reads, less than Lingering drops


def client_sends_then_reads(port: int, result: dict) -> None:
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(10)
        try:
            client.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * SENT)
            client.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := client.recv(65536):
                data += chunk
            result["answer"] = data
        except OSError as e:
            result["error"] = e


def serve_one(closer: str) -> dict:
    """Accept one client, answer it at once, close the way `closer` says; what the
    client got."""
    loop = new_event_loop()
    result: dict = {}
    listener = socket.create_server(("127.0.0.1", 0))
    try:

        async def main() -> None:
            poller = Poller(loop)
            lingering = Lingering(poller, loop)
            thread = threading.Thread(
                target=client_sends_then_reads, args=(listener.getsockname()[1], result)
            )
            thread.start()
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            await loop.sock_recv(sock, 4096)  # the start of the head, then the refusal
            await loop.sock_sendall(sock, ANSWER)
            poller.watch(sock.fileno(), lambda _events: None)  # as the door's connection
            poller.forget(sock.fileno())  # ... which ends: Connection.finish
            if closer == "linger":
                lingering.close(sock)
            else:
                close_read(sock)
            while thread.is_alive():
                await asyncio.sleep(0.05)
            assert not lingering.socks, "the lingering socket was closed at the client's end"
            poller.close()

        loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        listener.close()
        loop.close()
    return result


def test_a_client_still_sending_reads_the_refusal():
    result = serve_one("linger")
    assert result.get("answer") == ANSWER, result


def test_without_lingering_the_client_got_a_reset():
    """The control: what the door did before (close_read, then close)."""
    result = serve_one("close_read")
    assert "answer" not in result and isinstance(result.get("error"), OSError), (
        result
    )  # a reset (ECONNRESET, EPIPE or ENOTCONN)
