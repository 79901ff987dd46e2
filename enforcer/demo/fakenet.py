"""A throwaway fake internet in two network namespaces.

The end-to-end tests and `sandgate demo` need real upstream servers (HTTP, HTTPS
with its own CA, authoritative DNS, a raw TCP service, a UDP sink) that the
gateway can reach, and they must get them without touching the machine's own
network. So everything lives in namespaces that this module creates and removes:

    <prefix>-host   plays the gateway's host.  <prefix>h0 198.18.0.2/30,
                    2001:db8:ffff::2/64, default routes via the internet side.
    <prefix>-inet   the "internet": <prefix>i0 198.18.0.1/30, 2001:db8:ffff::1/64,
                    every server address on lo, a route back to the sandbox
                    pool 10.213.0.0/16 via 198.18.0.2 (for the direct-forwarding
                    baseline only).

Safety: nothing is added to the root namespace (the veth pair is created inside
host_ns with its peer moved straight into internet_ns), neither namespace has a
route to the root namespace or off the machine, and teardown only signals
processes whose network namespace is one of ours, never the root one.

Servers all run inside internet_ns as children of the calling process:
nginx (one master, plain HTTP on 80 and TLS + HTTP/2 on 443 on every server
address), dnsmasq (authoritative for `.test`, query log) and a tiny Python
TCP-echo/UDP-sink server whose log tells how many connections and datagrams got
through. Each server's log is read back by the `*_seen` methods; `clear_logs`
moves a read mark instead of truncating, so the full logs stay in the workdir for
post-mortems.

Readiness is checked by reading `/proc/<pid>/net/{tcp,udp}` of a server process
from the root namespace, which lists the sockets of that process's namespace:
no probe traffic and no helper process inside the namespace is needed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import resource
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

NETNS_DIR = Path("/run/netns")

HOST_IP = "198.18.0.2"
INTERNET_IP = "198.18.0.1"
HOST_IP6 = "2001:db8:ffff::2"
INTERNET_IP6 = "2001:db8:ffff::1"
SANDBOX_POOL = "10.213.0.0/16"
DNS_IP = "198.51.100.53"

# Every address a server listens on inside internet_ns.
SERVER_IPS_V4 = (
    "203.0.113.10",
    "203.0.113.11",
    "203.0.113.66",
    DNS_IP,
    "10.99.0.10",
    "169.254.169.254",
)
SERVER_IPS_V6 = ("2001:db8::10",)

# name -> IPv4 address, served by dnsmasq (and in the server certificate).
HOSTS: dict[str, str] = {
    "allowed.test": "203.0.113.10",
    "www.allowed.test": "203.0.113.10",
    "api.allowed.test": "203.0.113.11",
    "evil.test": "203.0.113.66",
    "allowed.test.evil.test": "203.0.113.66",
    "evilallowed.test": "203.0.113.66",
    "forbidden.test": "203.0.113.66",
    "internal.test": "10.99.0.10",
    "metadata.test": "169.254.169.254",
    "v6.allowed.test": "203.0.113.10",
    "ssh.allowed.test": "203.0.113.10",
}
# name -> IPv6 address, for the names that also have an AAAA record.
HOSTS_V6: dict[str, str] = {"v6.allowed.test": "2001:db8::10"}

TCP_ECHO = (("203.0.113.10", 22), ("203.0.113.66", 22))
UDP_SINK = (("203.0.113.66", 9999),)
SSH_BANNER = b"SSH-2.0-fake\r\n"

# dnsmasq as a small authoritative server: only our records, NXDOMAIN for any
# other name under .test (REFUSED outside it), nothing read from the machine's
# /etc, bound to the DNS address only, root so it can write the query log.
_DNSMASQ_FLAGS = (
    "--keep-in-foreground",
    "--conf-file=/dev/null",
    "--no-resolv",
    "--no-hosts",
    "--no-poll",
    "--local=/test/",
    f"--listen-address={DNS_IP}",
    "--bind-interfaces",
    "--port=53",
    "--user=root",
    "--group=root",
    "--local-ttl=60",
    "--log-queries",
)

BIG_SIZE = 10 * 1024 * 1024  # bytes served at /big

# Interface names are at most 15 bytes and get a 2-byte suffix.
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,12}$")
_STARTUP_TIMEOUT = 5.0
_TERM_GRACE = 1.0

# The raw TCP echo / UDP sink server. Run with `python -I -S -c`, so stdlib only.
# It binds everything before serving, logs before answering (so a client that got
# the banner can rely on the log line being there) and dies on SIGTERM.
_ECHO_SERVER = r"""
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
lock = threading.Lock()
banner = sys.argv[2].encode("latin-1")

def write(line):
    with lock:
        log.write(line + "\n")
        log.flush()

def family(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET

def echo(conn):
    with conn:
        try:
            conn.sendall(banner)
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass

def serve_tcp(ls):
    ip, port = ls.getsockname()[:2]
    while True:
        conn, peer = ls.accept()
        write(f"tcp {ip} {port} {peer[0]} {peer[1]}")
        threading.Thread(target=echo, args=(conn,), daemon=True).start()

def serve_udp(s):
    ip, port = s.getsockname()[:2]
    while True:
        data, peer = s.recvfrom(65536)
        write(f"udp {ip} {port} {peer[0]} {peer[1]} {len(data)}")

jobs = []
for spec in sys.argv[3:]:
    proto, rest = spec.split(":", 1)
    ip, port = rest.rsplit(":", 1)
    if proto == "tcp":
        s = socket.socket(family(ip), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, int(port)))
        s.listen(512)
        jobs.append((serve_tcp, s))
    else:
        s = socket.socket(family(ip), socket.SOCK_DGRAM)
        s.bind((ip, int(port)))
        jobs.append((serve_udp, s))
threads = [threading.Thread(target=f, args=(s,), daemon=True) for f, s in jobs]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


class FakeNetError(RuntimeError):
    """Building the fake internet failed; the message carries the tool's output."""


def _which(tool: str) -> str:
    """Find a tool also when /usr/sbin is not on PATH (sudo, non-login shells)."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    found = shutil.which(tool, path=path)
    if found is None:
        raise FakeNetError(f"{tool} not found (install the Debian package that ships it)")
    return found


def _run(argv: list[str], input: str | None = None) -> None:
    """Run a setup command; a failure names the command and its stderr."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise FakeNetError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
            + (f"\ninput:\n{input}" if input else "")
        )


# --- namespaces and their processes -------------------------------------------


def _ns_id(path: str | Path) -> tuple[int, int] | None:
    """The (device, inode) identity of a network namespace file, or None if gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _pids_in_netns(ns: str) -> list[int]:
    """Pids of live processes in the named namespace (what `ip netns pids` does).

    Returns [] rather than everything if the name points at our own or the
    initial namespace (e.g. `ip netns attach x 1`): killing by namespace must never
    reach the root namespace's processes.
    """
    target = _ns_id(NETNS_DIR / ns)
    if target is None or target in (_ns_id("/proc/1/ns/net"), _ns_id("/proc/self/ns/net")):
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_id(f"/proc/{entry}/ns/net") == target:
            pids.append(int(entry))
    return pids


def _kill_netns_processes(ns: str, timeout: float = 2.0) -> None:
    """SIGKILL everything left in a namespace and wait until it is gone.

    Zombies have no namespace link any more, so they do not keep this waiting.
    """
    deadline = time.monotonic() + timeout
    while pids := _pids_in_netns(ns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise FakeNetError(f"processes {pids} in netns {ns} survive SIGKILL")
        time.sleep(0.01)


def _delete_netns(ns: str) -> None:
    """Kill what runs in a namespace and delete it; a missing namespace is fine."""
    if not (NETNS_DIR / ns).exists():
        return
    _kill_netns_processes(ns)
    proc = subprocess.run(
        [_which("ip"), "netns", "del", ns], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0 and (NETNS_DIR / ns).exists():
        raise FakeNetError(f"ip netns del {ns} failed: {proc.stderr.strip()}")


def cleanup_prefix(prefix_start: str) -> None:
    """Remove the namespaces (and every process in them) of crashed runs.

    A run killed with SIGKILL leaves its namespaces and servers behind; this is
    what `sandgate gc` and test setup call. It matches every namespace whose name
    starts with `prefix_start`, so sandbox namespaces named with the same prefix
    go too. Workdirs are not touched: they belong to whoever made them. At least
    3 characters, so a typo cannot sweep away every namespace on the machine.
    """
    if len(prefix_start) < 3 or not _PREFIX_RE.match(prefix_start):
        raise ValueError(f"refusing to clean up namespaces by prefix {prefix_start!r}")
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return
    errors = []
    for ns in names:
        if ns.startswith(prefix_start):
            try:
                _delete_netns(ns)
            except FakeNetError as e:
                errors.append(str(e))
    if errors:
        raise FakeNetError("; ".join(errors))


def fresh_prefix(stem: str = "sgt") -> str:
    """`stem` plus 4 random hex digits that no namespace uses yet.

    Parallel runs (two test sessions, a demo next to a test run) each get their
    own prefix, so each can clean up exactly its own namespaces and never
    another run's.
    """
    while True:
        prefix = stem + secrets.token_hex(2)
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"stem {stem!r} does not make a valid prefix")
        if not any(NETNS_DIR.glob(prefix + "*")):
            return prefix


def _proc_sockets(pid: int, kind: str) -> set[tuple[str, int]]:
    """Local (ip, port) of listening TCP or bound UDP sockets in pid's namespace.

    /proc/<pid>/net/* shows the sockets of the namespace that pid is in, which
    lets the root-namespace caller see when a server inside is ready.
    """
    found = set()
    for suffix, family in (("", 4), ("6", 6)):
        try:
            lines = Path(f"/proc/{pid}/net/{kind}{suffix}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if kind == "tcp" and state != "0A":  # TCP_LISTEN
                continue
            hexip, hexport = local.split(":")
            words = [int(hexip[i : i + 8], 16) for i in range(0, len(hexip), 8)]
            raw = struct.pack(f"={len(words)}I", *words)
            ip = ipaddress.ip_address(raw) if family == 4 else ipaddress.IPv6Address(raw)
            found.add((str(ip), int(hexport, 16)))
    return found


# --- certificates ---------------------------------------------------------------


def _key_usage(ca: bool):
    """Signing only (EC keys); a CA also signs certificates and CRLs."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_certs(workdir: Path) -> tuple[Path, Path, Path]:
    """A test CA and one server certificate for every name and server address.

    EC P-256 keeps generation around a millisecond (RSA would cost most of the
    startup budget). SKI/AKI and key usages are set because OpenSSL 3's strict
    verification (used by Python 3.13+ and thus by some mitmproxy setups) rejects
    certificates without them.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandgate fake internet CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in HOSTS]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS_V4 + SERVER_IPS_V6]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "allowed.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = (
        workdir / "ca.pem",
        workdir / "server.pem",
        workdir / "server.key",
    )
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


# --- the fake internet ----------------------------------------------------------


def _nginx_conf(workdir: Path, cert: Path, key: Path) -> str:
    """nginx config with every path inside workdir, so runs never share state."""
    listens = []
    for ip in SERVER_IPS_V4:
        listens += [f"listen {ip}:80;", f"listen {ip}:443 ssl http2;"]
    for ip in SERVER_IPS_V6:
        listens += [f"listen [{ip}]:80;", f"listen [{ip}]:443 ssl http2;"]
    listen_block = "\n        ".join(listens)
    fields = {
        "server_addr": "$server_addr",
        "server_port": "$server_port",
        "host": "$host",
        "method": "$request_method",
        "uri": "$request_uri",
        "resolved": "$uri",  # the path nginx resolved (decoded, dot segments merged)
        "variant": "$http_x_variant",  # a differential test's label for the request
        "status": "$status",
        "sni": "$ssl_server_name",
        "remote_addr": "$remote_addr",
        "protocol": "$server_protocol",
        "scheme": "$scheme",
        "body_bytes_sent": "$body_bytes_sent",
        "upgrade": "$http_upgrade",  # what reached the server of a protocol switch
    }
    log_format = "{" + ",".join(f'"{k}":"{v}"' for k, v in fields.items()) + "}"
    # Ask for no more descriptors than the hard limit allows, or every worker logs
    # an alert at startup; this nginx only serves, so one descriptor per connection.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    w = workdir
    return f"""\
daemon off;
master_process on;
worker_processes auto;
user root;
pid {w}/nginx.pid;
lock_file {w}/nginx.lock;
error_log {w}/nginx-error.log warn;
worker_rlimit_nofile {nofile};

events {{
    worker_connections {max(512, nofile - 64)};
}}

http {{
    log_format sandgate escape=json '{log_format}';
    access_log {w}/access.log sandgate;
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    default_type text/plain;
    sendfile on;
    keepalive_requests 1000000;
    client_max_body_size 0;
    server_tokens off;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:sandgate:1m;

    server {{
        {listen_block}
        server_name _;

        location = /big {{
            alias {w}/www/big;
        }}
        location / {{
            return 200 "hello from $server_addr host=$host $request_method $request_uri\\n";
        }}
    }}
}}
"""


class FakeInternet:
    """Two namespaces with real servers in them; a context manager.

    `__enter__` builds everything and returns once every server accepts
    connections; `__exit__` (or `close()`) tears it all down, also after an
    exception, and is safe to call repeatedly. If building fails halfway, what
    was built is removed before the error propagates.

    The gateway under test runs in `host_ns` (see `run_in_host`/`popen_in_host`)
    with `host_if` as its upstream interface; sandbox namespaces hang off host_ns.
    """

    def __init__(self, prefix: str, workdir: Path):
        if not _PREFIX_RE.match(prefix):
            raise ValueError(
                f"prefix {prefix!r} must be 1-13 chars of [a-z0-9-] starting with a letter "
                "(interface names are limited to 15 bytes)"
            )
        self.prefix = prefix
        self.workdir = Path(workdir).resolve()
        self.host_ns = f"{prefix}-host"
        self.internet_ns = f"{prefix}-inet"
        self.host_if = f"{prefix}h0"
        self.internet_if = f"{prefix}i0"
        self.host_ip = HOST_IP
        self.host_ip6 = HOST_IP6
        self.dns_ip = DNS_IP
        self.hosts = dict(HOSTS)
        self.ca_cert = self.workdir / "ca.pem"
        self.big_size = BIG_SIZE
        self.access_log = self.workdir / "access.log"
        self.dns_log = self.workdir / "dnsmasq.log"
        self.echo_log = self.workdir / "echo.log"
        self._procs: dict[str, subprocess.Popen] = {}
        self._offsets: dict[Path, int] = {}
        # Set once start() may have created namespaces: close() must never delete
        # namespaces of another run that happens to use the same prefix.
        self._owns_namespaces = False

    def __repr__(self) -> str:
        return f"FakeInternet(prefix={self.prefix!r}, workdir={str(self.workdir)!r})"

    # -- lifecycle

    def __enter__(self) -> FakeInternet:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> None:
        """Build namespaces, start servers, wait until all of them listen."""
        for ns in (self.host_ns, self.internet_ns):
            if (NETNS_DIR / ns).exists():
                raise FakeNetError(
                    f"netns {ns} already exists: another run uses prefix {self.prefix!r}, "
                    f"or a crashed one left it (sandgate gc / cleanup_prefix)"
                )
        if self._owns_namespaces:
            raise FakeNetError(f"{self!r} is already started")
        self._owns_namespaces = True
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "tmp").mkdir(exist_ok=True)
            (self.workdir / "www").mkdir(exist_ok=True)
            with open(self.workdir / "www" / "big", "wb") as f:
                f.truncate(BIG_SIZE)  # sparse: instant, and reads back as zeros
            for log in (self.access_log, self.dns_log, self.echo_log):
                log.touch()
            _ca, cert, key = _make_certs(self.workdir)
            (self.workdir / "nginx.conf").write_text(_nginx_conf(self.workdir, cert, key))
            self._build_namespaces()
            self._start_servers()
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop our servers, kill anything else left in our namespaces, delete them.

        SIGTERM first so nginx and dnsmasq exit cleanly; whatever is still there
        after a grace period (including processes others started in host_ns,
        such as the gateway under test) gets SIGKILL.
        """
        for proc in self._procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _TERM_GRACE
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        errors = []
        for ns in (self.host_ns, self.internet_ns) if self._owns_namespaces else ():
            try:
                _delete_netns(ns)
            except FakeNetError as e:
                errors.append(str(e))
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)  # reap; the kill above already ended it
        self._procs.clear()
        if errors:
            raise FakeNetError("; ".join(errors))
        self._owns_namespaces = False

    def _build_namespaces(self) -> None:
        ip = _which("ip")
        _run([ip, "netns", "add", self.host_ns])
        _run([ip, "netns", "add", self.internet_ns])
        # Created inside host_ns with the peer moved straight to internet_ns, so the
        # pair never exists in the root namespace.
        veth = f"link add {self.host_if} type veth peer name {self.internet_if}"
        _run([ip, "-n", self.host_ns, *veth.split(), "netns", self.internet_ns])
        # accept_dad=0 before the links go up: otherwise IPv6 addresses (including
        # the link-local ones neighbour discovery needs) stay tentative ~2 s.
        nodad = "for c in all default $0; do echo 0 > /proc/sys/net/ipv6/conf/$c/accept_dad; done"
        for ns, dev in ((self.host_ns, self.host_if), (self.internet_ns, self.internet_if)):
            _run([ip, "netns", "exec", ns, "sh", "-ec", nodad, dev])
        inet = [
            "link set lo up",
            f"link set {self.internet_if} up",
            f"addr add {INTERNET_IP}/30 dev {self.internet_if}",
            f"addr add {INTERNET_IP6}/64 dev {self.internet_if} nodad",
            *(f"addr add {a}/32 dev lo" for a in SERVER_IPS_V4),
            *(f"addr add {a}/128 dev lo nodad" for a in SERVER_IPS_V6),
            f"route add {SANDBOX_POOL} via {HOST_IP}",
        ]
        host = [
            "link set lo up",
            f"link set {self.host_if} up",
            f"addr add {HOST_IP}/30 dev {self.host_if}",
            f"addr add {HOST_IP6}/64 dev {self.host_if} nodad",
            f"route add default via {INTERNET_IP}",
            f"route add ::/0 via {INTERNET_IP6} dev {self.host_if}",
        ]
        _run([ip, "-n", self.internet_ns, "-batch", "-"], input="\n".join(inet) + "\n")
        _run([ip, "-n", self.host_ns, "-batch", "-"], input="\n".join(host) + "\n")

    def _spawn(self, name: str, argv: list) -> None:
        """Start a server in internet_ns; `ip netns exec` execs it, keeping the pid."""
        out = open(self.workdir / f"{name}.out", "wb")  # noqa: SIM115 - owned by the child
        with out:
            self._procs[name] = subprocess.Popen(
                self._netns_argv(self.internet_ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's ^C goes to the test, not to these
            )

    def _start_servers(self) -> None:
        w = self.workdir
        nginx = [_which("nginx"), "-p", w, "-c", w / "nginx.conf", "-e", w / "nginx-error.log"]
        self._spawn("nginx", nginx)
        dnsmasq = [_which("dnsmasq"), *_DNSMASQ_FLAGS, f"--log-facility={self.dns_log}"]
        for name, addr in HOSTS.items():
            v6 = f",{HOSTS_V6[name]}" if name in HOSTS_V6 else ""
            dnsmasq.append(f"--host-record={name},{addr}{v6}")
        self._spawn("dnsmasq", dnsmasq)
        echo = [sys.executable, "-I", "-S", "-c", _ECHO_SERVER, self.echo_log]
        echo.append(SSH_BANNER.decode("latin-1"))
        echo += [f"tcp:{ip}:{port}" for ip, port in TCP_ECHO]
        echo += [f"udp:{ip}:{port}" for ip, port in UDP_SINK]
        self._spawn("echo", echo)

    def _wait_ready(self) -> None:
        want_tcp = {
            "nginx": {(ip, port) for ip in SERVER_IPS_V4 + SERVER_IPS_V6 for port in (80, 443)},
            "dnsmasq": {(DNS_IP, 53)},
            "echo": set(TCP_ECHO),
        }
        want_udp = {"nginx": set(), "dnsmasq": {(DNS_IP, 53)}, "echo": set(UDP_SINK)}
        inet_id = _ns_id(NETNS_DIR / self.internet_ns)
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        pending = set(self._procs)
        while pending:
            for name in sorted(pending):
                proc = self._procs[name]
                if proc.poll() is not None:
                    raise FakeNetError(
                        f"{name} exited with {proc.returncode} during startup:\n"
                        + self._output_tail(name)
                    )
                # Until `ip netns exec` has switched namespace, /proc/<pid>/net
                # would show the root namespace's sockets.
                if _ns_id(f"/proc/{proc.pid}/ns/net") != inet_id:
                    continue
                tcp, udp = _proc_sockets(proc.pid, "tcp"), _proc_sockets(proc.pid, "udp")
                if want_tcp[name] <= tcp and want_udp[name] <= udp:
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise FakeNetError(
                    f"{', '.join(sorted(pending))} not listening after {_STARTUP_TIMEOUT}s:\n"
                    + "\n".join(self._output_tail(n) for n in sorted(pending))
                )
            if pending:
                time.sleep(0.005)

    def _output_tail(self, name: str) -> str:
        text = ""
        for path in (self.workdir / f"{name}.out", self.workdir / f"{name}-error.log"):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")[-2000:]
        return text

    # -- running things in host_ns

    def _netns_argv(self, ns: str, argv) -> list[str]:
        if isinstance(argv, str | bytes):
            raise TypeError("argv must be a list of arguments, not a shell string")
        return [_which("ip"), "netns", "exec", ns, *map(str, argv)]

    def run_in_host(self, argv, **kw) -> subprocess.CompletedProcess:
        """Run a command in host_ns; output is captured as text unless kw says otherwise."""
        return self._run_in(self.host_ns, argv, **kw)

    def run_in_internet(self, argv, **kw) -> subprocess.CompletedProcess:
        """Run a command in internet_ns (debugging, the direct-forwarding baseline)."""
        return self._run_in(self.internet_ns, argv, **kw)

    def _run_in(self, ns: str, argv, **kw) -> subprocess.CompletedProcess:
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        if "text" not in kw and "encoding" not in kw and "universal_newlines" not in kw:
            kw["text"] = True
        kw.setdefault("timeout", 60)
        return subprocess.run(self._netns_argv(ns, argv), **kw)

    def popen_in_host(self, argv, **kw) -> subprocess.Popen:
        """Start a long-running process (the gateway) in host_ns.

        The caller owns it; `close()` still kills it with everything else in
        host_ns if it is left running.
        """
        return subprocess.Popen(self._netns_argv(self.host_ns, argv), **kw)

    # -- what the servers saw

    def _read_log(self, path: Path) -> list[str]:
        with open(path, "rb") as f:
            f.seek(self._offsets.get(path, 0))
            data = f.read()
        # A line still being written has no newline yet: leave it for next time.
        complete = data[: data.rfind(b"\n") + 1]
        return complete.decode("utf-8", errors="replace").split("\n")[:-1]

    def clear_logs(self) -> None:
        """Forget what was seen so far (the files keep it, for post-mortems)."""
        for path in (self.access_log, self.dns_log, self.echo_log):
            self._offsets[path] = path.stat().st_size

    def requests_seen(self, ip: str | None = None) -> list[dict]:
        """HTTP(S) requests nginx answered, oldest first, optionally only on `ip`.

        Fields: server_addr, server_port (int), host, method, uri, status (int),
        sni ("" for plain HTTP or no SNI), remote_addr, protocol, scheme,
        body_bytes_sent (int), upgrade (the Upgrade header, "" if none), resolved (the
        path nginx served: decoded, dot segments merged), variant (the X-Variant
        header, "" if none). nginx logs after the response is sent, so a client
        that just finished may, rarely, be a few microseconds ahead of the log.
        """
        want = ipaddress.ip_address(ip) if ip is not None else None
        seen = []
        for line in self._read_log(self.access_log):
            entry = json.loads(line)
            for key in ("server_port", "status", "body_bytes_sent"):
                with contextlib.suppress(ValueError):
                    entry[key] = int(entry[key])
            if want is None or ipaddress.ip_address(entry["server_addr"]) == want:
                seen.append(entry)
        return seen

    def dns_queries_seen(self) -> list[str]:
        """Names dnsmasq was asked for (any type), lower-case, no trailing dot."""
        names = []
        for line in self._read_log(self.dns_log):
            m = re.search(r"\bquery\[[^\]]*\] (\S+) from ", line)
            if m:
                names.append(m.group(1).lower().rstrip("."))
        return names

    def _echo_entries(self, proto: str) -> list[list[str]]:
        return [
            fields
            for fields in (line.split() for line in self._read_log(self.echo_log))
            if fields and fields[0] == proto
        ]

    def tcp_connections_seen(self, ip: str, port: int) -> int:
        """TCP connections accepted on ip:port by the raw TCP (fake SSH) server."""
        want = ipaddress.ip_address(ip)
        return sum(
            1
            for f in self._echo_entries("tcp")
            if ipaddress.ip_address(f[1]) == want and int(f[2]) == port
        )

    def udp_datagrams_seen(self, ip: str | None = None, port: int | None = None) -> int:
        """Datagrams that reached the UDP sink (UDP egress must be dropped)."""
        want = ipaddress.ip_address(ip) if ip is not None else None
        return sum(
            1
            for f in self._echo_entries("udp")
            if (want is None or ipaddress.ip_address(f[1]) == want)
            and (port is None or int(f[2]) == port)
        )
