"""A minimal TLS 1.3 client, run inside the sandbox (stdlib and `cryptography`). It
sends ClientHello #1 with SNI FIRST_SNI and an empty key_share (which forces a
HelloRetryRequest), then ClientHello #2 with SNI SECOND_SNI, completes the handshake
and sends one HTTP/1.1 request (Host: HOST). From the red-team report rt45/network
(finding 1), with a `pipelined` mode: ClientHello #2 is sent right after #1, before
the HelloRetryRequest arrives.

usage: hrr_client.py IP PORT FIRST_SNI SECOND_SNI HOST [PATH [ech|ech1|pipelined]]
Prints what happened; exit 0 if an HTTP response came back.
"""

import hashlib
import hmac
import os
import socket
import struct
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ip, port, first, second, host = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
path = sys.argv[6] if len(sys.argv) > 6 else "/"
ECH_IN_CH2 = len(sys.argv) > 7 and sys.argv[7] == "ech"
ECH_IN_CH1 = len(sys.argv) > 7 and sys.argv[7] == "ech1"
PIPELINED = len(sys.argv) > 7 and sys.argv[7] == "pipelined"

H = hashlib.sha256
HLEN = 32


def ext(kind, data):
    return struct.pack("!HH", kind, len(data)) + data


def sni_ext(name):
    n = name.encode()
    lst = b"\x00" + struct.pack("!H", len(n)) + n
    return ext(0, struct.pack("!H", len(lst)) + lst)


def client_hello(name, random, session_id, key_share_entries, ech=False):
    exts = b"".join(
        [
            # an encrypted_client_hello extension (outer, junk payload), if asked
            ext(0xFE0D, b"\x00" + os.urandom(40)) if ech else b"",
            sni_ext(name),
            ext(10, struct.pack("!HH", 2, 0x001D)),  # supported_groups: x25519
            ext(
                13, struct.pack("!HHHHHHH", 12, 0x0804, 0x0403, 0x0805, 0x0401, 0x0807, 0x0503)
            ),  # sig algs
            ext(43, b"\x02\x03\x04"),  # supported_versions: TLS 1.3
            ext(51, struct.pack("!H", len(key_share_entries)) + key_share_entries),
        ]
    )
    body = (
        b"\x03\x03"
        + random
        + bytes([len(session_id)])
        + session_id
        + struct.pack("!H", 2)
        + b"\x13\x01"  # TLS_AES_128_GCM_SHA256
        + b"\x01\x00"
        + struct.pack("!H", len(exts))
        + exts
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def record(ctype, payload):
    return bytes([ctype]) + b"\x03\x03" + struct.pack("!H", len(payload)) + payload


class Reader:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; have {self.buf!r}")
            self.buf += chunk

    def record(self):
        self.need(5)
        size = struct.unpack("!H", self.buf[3:5])[0]
        self.need(5 + size)
        rec, self.buf = self.buf[: 5 + size], self.buf[5 + size :]
        return rec[0], rec[5:], rec[:5]


def hkdf_extract(salt, ikm):
    return hmac.new(salt, ikm, H).digest()


def hkdf_expand_label(secret, label, context, length):
    full = b"tls13 " + label.encode()
    info = struct.pack("!H", length) + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(secret, t + info + bytes([i]), H).digest()
        out += t
        i += 1
    return out[:length]


def derive(secret, label, transcript):
    return hkdf_expand_label(secret, label, H(transcript).digest(), HLEN)


class Cipher:
    def __init__(self, secret):
        self.key = hkdf_expand_label(secret, "key", b"", 16)
        self.iv = hkdf_expand_label(secret, "iv", b"", 12)
        self.seq = 0

    def nonce(self):
        n = bytes(4) + self.seq.to_bytes(8, "big")
        self.seq += 1
        return bytes(a ^ b for a, b in zip(self.iv, n, strict=True))

    def seal(self, ctype, data):
        inner = data + bytes([ctype])
        header = b"\x17\x03\x03" + struct.pack("!H", len(inner) + 16)
        return header + AESGCM(self.key).encrypt(self.nonce(), inner, header)

    def open(self, header, payload):
        inner = AESGCM(self.key).decrypt(self.nonce(), payload, header).rstrip(b"\x00")
        return inner[-1], inner[:-1]


def main():
    sock = socket.create_connection((ip, port), timeout=5)
    rd = Reader(sock)
    random = os.urandom(32)
    session_id = os.urandom(32)
    ch1 = client_hello(first, random, session_id, b"", ech=ECH_IN_CH1)
    priv = X25519PrivateKey.generate()
    pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ch2 = client_hello(
        second, random, session_id, struct.pack("!HH", 0x001D, 32) + pub, ech=ECH_IN_CH2
    )
    if PIPELINED:  # both hellos before the server answers
        sock.sendall(record(22, ch1) + record(20, b"\x01") + record(22, ch2))
    else:
        sock.sendall(record(22, ch1))
    ctype, payload, _ = rd.record()
    if ctype != 22 or payload[0] != 2:
        print("expected HRR, got", ctype, payload[:60].hex())
        return 2
    hrr = payload[: 4 + int.from_bytes(payload[1:4], "big")]
    if hrr[6:38] != hashlib.sha256(b"HelloRetryRequest").digest():
        print("got a ServerHello, not a HelloRetryRequest")
        return 2
    print("HRR received")
    if not PIPELINED:
        sock.sendall(record(20, b"\x01") + record(22, ch2))  # middlebox-compat CCS, then CH2
    transcript = b"\xfe\x00\x00\x20" + H(ch1).digest() + hrr + ch2
    # ServerHello (skip CCS records)
    while True:
        ctype, payload, _ = rd.record()
        if ctype != 20:
            break
    if ctype != 22 or payload[0] != 2:
        print("expected ServerHello, got", ctype, payload[:40].hex())
        return 3
    sh = payload[: 4 + int.from_bytes(payload[1:4], "big")]
    transcript += sh
    # find key_share in ServerHello
    at = 4 + 2 + 32
    at += 1 + sh[at]
    at += 2 + 1
    ext_end = at + 2 + struct.unpack("!H", sh[at : at + 2])[0]
    at += 2
    server_pub = None
    while at < ext_end:
        kind, size = struct.unpack("!HH", sh[at : at + 4])
        data = sh[at + 4 : at + 4 + size]
        if kind == 51:
            server_pub = data[4:]
        at += 4 + size
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    shared = priv.exchange(X25519PublicKey.from_public_bytes(server_pub))
    early = hkdf_extract(bytes(HLEN), bytes(HLEN))
    hs = hkdf_extract(derive(early, "derived", b""), shared)
    c_hs, s_hs = derive(hs, "c hs traffic", transcript), derive(hs, "s hs traffic", transcript)
    master = hkdf_extract(derive(hs, "derived", b""), bytes(HLEN))
    server_hs, client_hs = Cipher(s_hs), Cipher(c_hs)
    hs_buf = b""
    cert_request = None
    server_finished_seen = False
    while not server_finished_seen:
        ctype, payload, header = rd.record()
        if ctype == 20:
            continue
        inner_type, data = server_hs.open(header, payload)
        hs_buf += data
        while len(hs_buf) >= 4:
            size = int.from_bytes(hs_buf[1:4], "big")
            if len(hs_buf) < 4 + size:
                break
            msg, hs_buf = hs_buf[: 4 + size], hs_buf[4 + size :]
            if msg[0] == 20:
                server_finished_seen = True
            transcript += msg
            if msg[0] == 11:
                print("server sent its certificate")
            if msg[0] == 13:
                cert_request = msg[5 : 5 + msg[4]]  # certificate_request_context
    c_ap, s_ap = (
        derive(master, "c ap traffic", transcript),
        derive(master, "s ap traffic", transcript),
    )
    out = b""
    if cert_request is not None:  # an empty Certificate: no client certificate
        body = bytes([len(cert_request)]) + cert_request + b"\x00\x00\x00"
        cert_msg = b"\x0b" + len(body).to_bytes(3, "big") + body
        transcript += cert_msg
        out += client_hs.seal(22, cert_msg)
    fkey = hkdf_expand_label(c_hs, "finished", b"", HLEN)
    verify = hmac.new(fkey, H(transcript).digest(), H).digest()
    fin = b"\x14" + len(verify).to_bytes(3, "big") + verify
    sock.sendall(out + client_hs.seal(22, fin))
    app_out, app_in = Cipher(c_ap), Cipher(s_ap)
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    sock.sendall(app_out.seal(23, req))
    response = b""
    try:
        while True:
            ctype, payload, header = rd.record()
            inner_type, data = app_in.open(header, payload)
            if inner_type == 23:
                response += data
            elif inner_type == 21:
                break
    except EOFError:
        pass
    print("RESPONSE:", response[:200].decode(errors="replace").splitlines()[:1])
    return 0 if response.startswith(b"HTTP/") else 4


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001
        print("error:", type(e).__name__, e)
        sys.exit(9)
