"""A plain-HTTP tenant that keeps connections alive (HTTP/1.1), logging each request:
LABEL got conn=N path=P host=H. usage: keepalive_tenant.py IP PORT LABEL LOG"""

import itertools
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ip, port, label, logpath = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
log = open(logpath, "a", buffering=1)  # noqa: SIM115
numbers = itertools.count(1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.number = next(numbers)

    def do_GET(self):
        log.write(
            f"{label} got conn={self.number} path={self.path} host={self.headers.get('Host')}\n"
        )
        body = f"SECRET of {label} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer((ip, port), Handler)
log.write(f"{label} ready\n")
server.serve_forever()
