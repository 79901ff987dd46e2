"""The front door's TLS I/O core (proxy/frontdoor/tls_io.py): a TlsSocket pair over a
socketpair, with real TLS (a leaf of a test CA): one recv per read, one send per
flight, what the socket did not take goes first next time, the end after data."""

from __future__ import annotations

import socket
import ssl

import pytest
from sandgate.proxy.frontdoor.relay import RELAY_CHUNK
from sandgate.proxy.frontdoor.tls_contexts import _leaf_certificate
from sandgate.proxy.frontdoor.tls_io import ENDED, TlsSocket
from test_tls_relay import NAME, _ca, _pem


class Counting(TlsSocket):
    """A TlsSocket that counts its socket calls."""

    __slots__ = ("recvs", "sends")

    def recv_into(self, *args):
        self.recvs = getattr(self, "recvs", 0) + 1
        return super().recv_into(*args)

    def send(self, *args):
        self.sends = getattr(self, "sends", 0) + 1
        return super().send(*args)


def unshaken_pair(tmp_path, trusted: bool = True, cls=TlsSocket):
    """(server, client) over a socketpair, before their handshake: the server has a
    leaf for NAME of a test CA, the client trusts that CA (else another)."""
    key, ca = _ca("test CA")
    key_pem, leaf_pem = _pem(key, _leaf_certificate(key, ca, (NAME,)))
    (tmp_path / "server.pem").write_bytes(key_pem + leaf_pem)
    trusted_key, trusted_ca = (key, ca) if trusted else _ca("another CA")
    (tmp_path / "ca.pem").write_bytes(_pem(trusted_key, trusted_ca)[1])
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "server.pem")
    client_context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    server = cls.wrap(a, server_context, server_side=True)
    client = cls.wrap(b, client_context, server_side=False, server_hostname=NAME)
    return server, client


@pytest.fixture
def pair(tmp_path):
    """A handshaken (server, client) pair of Counting sockets, counts reset."""
    server, client = unshaken_pair(tmp_path, cls=Counting)
    for _ in range(10):
        if server.handshaken and client.handshaken:
            break
        client.handshaken or client.handshake()
        server.handshaken or server.handshake()
    assert server.handshaken and client.handshaken
    read_all(client, bytearray(RELAY_CHUNK))  # the server's session ticket
    server.recvs = server.sends = client.recvs = client.sends = 0
    yield server, client
    server.close()
    client.close()


def read_all(sock: TlsSocket, buffer: bytearray) -> bytes:
    got = bytearray()
    view = memoryview(buffer)
    while (n := sock.read_into(view)) > 0:
        got += buffer[:n]
    view.release()
    return bytes(got)


def test_a_response_is_one_send_and_reading_it_one_recv_without_a_want_read(pair):
    server, client = pair
    response = bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 30000\r\n\r\n" + b"x" * 30000)
    assert server.write_from(response) == len(response)
    assert server.sends == 1  # two 16 KiB records, one flight
    buffer = bytearray(RELAY_CHUNK)
    view = memoryview(buffer)
    assert client.read_into(view) == len(response)  # under the buffer's size: drained
    assert client.recvs == 1  # not OpenSSL's header-then-body reads, nor an EAGAIN one
    assert client.read_into(view) == -1  # nothing yet (one EAGAIN)
    view.release()
    assert bytes(buffer[: len(response)]) == response


def test_a_read_fills_the_buffer_and_gives_the_rest_to_the_next_read(pair):
    server, client = pair
    data = bytes(range(256)) * 200
    server.write_from(bytearray(data))
    buffer = bytearray(1000)
    view = memoryview(buffer)
    pieces = []
    while (n := client.read_into(view)) > 0:
        pieces.append(n)
        buffer_copy = bytes(buffer[:n])
        data, head = data[n:], data[:n]
        assert buffer_copy == head
    view.release()
    assert data == b""
    assert pieces[:-1] == [1000] * (len(pieces) - 1) and pieces[-1] <= 1000


def test_what_the_socket_did_not_take_goes_first_and_its_plaintext_is_not_encrypted_twice(pair):
    server, client = pair
    owed = bytearray(b"".join(b"%07d\n" % i for i in range(300000)))  # 2.4 MB
    expected = bytes(owed) + b"the end"
    received = bytearray()
    buffer = bytearray(RELAY_CHUNK)
    appended = False
    for _ in range(10000):
        sent = server.write_from(owed)
        if sent < len(owed):
            assert server.unsent  # the socket was full: ciphertext kept
        del owed[:sent]  # as the relay does
        if not appended:
            owed += b"the end"  # the relay appends while a write waits
            appended = True
        received += read_all(client, buffer)
        if not owed and not server.unsent:
            break
    received += read_all(client, buffer)
    assert bytes(received) == expected


def test_the_peers_end_after_data_is_read_with_the_data_then_is_the_next_answer(pair):
    """Data and FIN in one event: the FIN raises no edge of its own."""
    server, client = pair
    client.write_from(bytearray(b"last words"))
    client.shutdown(socket.SHUT_WR)  # a FIN without close_notify, as many clients end
    server.peer_closing = True  # the relay's part: its event said RDHUP
    buffer = bytearray(64)
    view = memoryview(buffer)
    assert server.read_into(view) == len(b"last words")
    assert server.eof  # the relay is told: no socket edge will come for it
    assert server.read_into(view) == ENDED
    view.release()


def test_a_failed_verification_is_an_ssl_error_from_the_handshake(tmp_path):
    server, client = unshaken_pair(tmp_path, trusted=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        for _ in range(10):
            client.handshake()
            server.handshaken or server.handshake()
    assert not client.handshaken
    server.close()
    client.close()


def test_notify_close_sends_close_notify_once_without_waiting_and_the_peer_reads_an_end(pair):
    server, client = pair
    server.write_from(bytearray(b"the body"))
    server.notify_close()  # the peer's close_notify has not come: no wait for it
    server.notify_close()
    assert server.sends == 2 and not server.unsent  # the data, then the alert once
    client.truncation_is_reset = True  # a strict reader: a bare FIN would be a cut
    server.shutdown(socket.SHUT_WR)
    buffer = bytearray(64)
    view = memoryview(buffer)
    assert client.read_into(view) == len(b"the body")
    assert client.read_into(view) == ENDED and client.notified and not client.truncated
    view.release()


def test_notify_close_before_the_handshake_sends_nothing(tmp_path):
    server, client = unshaken_pair(tmp_path, cls=Counting)
    client.notify_close()
    assert getattr(client, "sends", 0) == 0 and not client.outgoing.pending
    server.close()
    client.close()
