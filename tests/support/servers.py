"""A logging HTTPS server for the fake internet, for tests that need a server of their
own (another CA, another address): static files, and git's smart HTTP under /octo/."""

from __future__ import annotations

import contextlib
import re
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

from support import sandbox

# Static files, and git's smart HTTP through `git http-backend` (CGI) for /octo/.
# Logs "METHOD PATH STATUS" for every request it gets, whatever it answers.
HTTPS_SERVER = r"""
import functools, http.server, os, ssl, subprocess, sys
root, ip, port, cert, key, log_path = sys.argv[1:7]
log = open(log_path, "a", buffering=1)

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_request(self, code="-", size="-"):
        log.write(f"{self.command} {self.path} {int(code)}\n")

    def do_GET(self):
        return self.git() if self.path.startswith("/octo/") else super().do_GET()

    def do_POST(self):
        return self.git() if self.path.startswith("/octo/") else self.send_error(405)

    def do_PUT(self):
        self.send_error(405)

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def git(self):
        path, _, query = self.path.partition("?")
        body = self.body()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": root, "GIT_HTTP_EXPORT_ALL": "1", "REMOTE_USER": "tester",
            "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": self.client_address[0],
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

server = http.server.ThreadingHTTPServer((ip, int(port)), functools.partial(Handler, directory=root))
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"""


def start_https_server(
    net, root: Path, ip: str, port: int, cert: Path, key: Path, log: Path
) -> subprocess.Popen:
    """HTTPS_SERVER in the fake internet's namespace on ip:port, serving `root` and
    logging to `log`; returns once it listens (the caller kills it)."""
    argv = ["ip", "netns", "exec", net.internet_ns, sandbox.PYTHON, "-I", "-S", "-c", HTTPS_SERVER]
    argv += [str(root), ip, str(port), str(cert), str(key), str(log)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise AssertionError(f"no HTTPS server on {ip}:{port}")
    return proc


@contextlib.contextmanager
def script_server(net, script: str, *args: str) -> Iterator[subprocess.Popen]:
    """`script` (Python source that prints "ready" once it listens) run with `args` in
    the fake internet's namespace, for a server that misbehaves on purpose; killed
    when the block ends."""
    argv = ["ip", "netns", "exec", net.internet_ns, sandbox.PYTHON, "-I", "-S", "-c", script]
    proc = subprocess.Popen(
        [*argv, *args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready", "the test's server did not start"
        yield proc
    finally:
        proc.kill()
        proc.wait()


# What every test's own nginx has around its `http` block: one process in the
# foreground, its pid, error log and temporary files under its prefix.
NGINX_FRAME = """\
daemon off;
master_process off;
worker_processes 1;
user root;
pid {w}/nginx.pid;
error_log {w}/err.log warn;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {w}/t1; proxy_temp_path {w}/t2; fastcgi_temp_path {w}/t3;
    uwsgi_temp_path {w}/t4; scgi_temp_path {w}/t5;
{http}
}}
"""


def listening(net, addresses) -> bool:
    """Whether something listens on every `ip:port` of `addresses` (TCP) in the fake
    internet's namespace."""
    listed = net.run_in_internet(["ss", "-ltnH"]).stdout
    return all(address in listed for address in addresses)


@contextlib.contextmanager
def internet_servers(net, commands: list[list[str]], listens: list[str]) -> Iterator[None]:
    """Each of `commands` (a router and its tenants, say) run in the fake internet's
    namespace, up once something listens on every `ip:port` of `listens`; stopped
    when the block ends."""
    inside = ["ip", "netns", "exec", net.internet_ns]
    processes = []
    try:
        for argv in commands:
            processes.append(
                subprocess.Popen(
                    [*inside, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            )
        if not sandbox.eventually(lambda: listening(net, listens), timeout=10):
            started = ", ".join(Path(argv[0]).name + " " + Path(argv[1]).name for argv in commands)
            raise AssertionError(f"not all of {listens} listen ({started})")
        yield
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def door_and_engine(rules: str) -> str:
    """The rule file with `rules` (rule list items, YAML as under `rules:`) in two
    profiles, so that a test runs through both gateway paths: `door`, decided by the
    front door's own HTTP relay, and `engine`, the same rules with `websocket: true`
    on each allow, which sends the profile's connections to mitmproxy. Each id is
    prefixed `door-` or `engine-`."""
    items = re.split(r"(?m)^(?=- )", textwrap.dedent(rules))

    def profile(name: str) -> str:
        text = ""
        for item in filter(None, items):
            item = re.sub(r"(?m)^  id: ", f"  id: {name}-", item)
            if name == "engine" and item.startswith("- allow:"):
                item += "  websocket: true\n"
            text += textwrap.indent(item, "      ")
        return f"  {name}:\n    rules:\n{text}"

    return "version: 1\nprofiles:\n" + profile("door") + profile("engine")


def run_beside(net, tmp_path: Path, commands, listens, steps, rules: Path, profile: str):
    """`steps` run in a sandbox of `profile` under the rule file `rules` (after a
    lookup of allowed.test), with `commands` up in the fake internet (internet_servers):
    the result (sandbox.run)."""
    with internet_servers(net, commands, listens):
        return sandbox.run(
            net, tmp_path, {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules, extra=("--profile", profile),
        )  # fmt: skip


@contextlib.contextmanager
def nginx_server(net, workdir: Path, http: str, listens: list[str]) -> Iterator[None]:
    """An nginx of the test's own in the fake internet's namespace, `http` what its
    nginx.conf has in its `http` block (NGINX_FRAME: `workdir` its prefix, the logs
    and temporary files there), up once it listens on every `ip:port` of `listens`;
    killed when the block ends."""
    conf, errors = workdir / "nginx.conf", workdir / "err.log"
    conf.write_text(NGINX_FRAME.format(w=workdir, http=http))
    argv = ["ip", "netns", "exec", net.internet_ns, "nginx", "-p", str(workdir), "-c", str(conf)]
    proc = subprocess.Popen(
        [*argv, "-e", str(errors)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        if not sandbox.eventually(lambda: listening(net, listens), timeout=5):
            raise AssertionError(f"the test's nginx did not start: {errors.read_text()}")
        yield
    finally:
        proc.kill()
        proc.wait()


# The start of a resolver script for the fake internet (resolver_server): its address
# and log from argv, and the question's name and where the question ends in a query.
RESOLVER_PRELUDE = r"""
import socket, struct, sys, threading
ip, log = sys.argv[1], open(sys.argv[2], "a", buffering=1)

def name_of(q):
    labels, o = [], 12
    while q[o]:
        labels.append(q[o + 1 : o + 1 + q[o]].decode().lower()); o += 1 + q[o]
    return ".".join(labels), o + 5
"""


@contextlib.contextmanager
def resolver_server(net, script: str, ip: str, log: Path) -> Iterator[Callable[[], list[str]]]:
    """RESOLVER_PRELUDE + `script` (it prints "ready" once it listens) on `ip`, an
    address of its own in the fake internet, logging to `log`; yields a reader of the
    log's lines. The address is removed when the block ends."""
    log.touch()
    net.run_in_internet(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
    try:
        with script_server(net, RESOLVER_PRELUDE + script, ip, str(log)):
            yield lambda: log.read_text().splitlines()
    finally:
        net.run_in_internet(["ip", "addr", "del", f"{ip}/32", "dev", "lo"])
