"""An application server behind the Apache proxy (test_apache_paths.py): serves
files under ROOT by the path as most servers resolve it (percent-decoded, then dot
segments removed: Python's http.server, Tomcat, Express's static), logging the
target it got and the file it served.
usage: files_backend.py IP PORT ROOT LOG"""

import os
import posixpath
import socket
import sys
import threading
from urllib.parse import unquote

ip, port, root, logpath = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
log = open(logpath, "a", buffering=1)  # noqa: SIM115


def serve(conn):
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = conn.recv(4096)
            if not piece:
                return
            data += piece
        target = data.split(b"\r\n")[0].split(b" ")[1].decode("latin-1")
        path = posixpath.normpath(unquote(target.split("?")[0]))
        file = os.path.join(root, path.lstrip("/"))
        if os.path.isfile(file):
            body, status = open(file, "rb").read(), b"200 OK"  # noqa: SIM115
            log.write(f"BACKEND target={target} served={path}\n")
        else:
            body, status = b"not found\n", b"404 Not Found"
            log.write(f"BACKEND target={target} missing={path}\n")
        conn.sendall(
            b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body))
            + body
        )


ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ip, port))
ls.listen(16)
log.write("BACKEND ready\n")
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
