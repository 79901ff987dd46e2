"""Python's own static file server (http.server.SimpleHTTPRequestHandler, as
`python3 -m http.server` runs it) behind the Apache proxy, logging each request
line it got and the file it served. usage: static_backend.py IP PORT ROOT LOG"""

import functools
import http.server
import os
import sys

ip, port, root, logpath = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
log = open(logpath, "a", buffering=1)  # noqa: SIM115


class Handler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):
        file = self.translate_path(self.path)
        found = os.path.isfile(file)
        log.write(f"STATIC target={self.path} file={file if found else '-'}\n")
        return super().send_head()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer((ip, port), functools.partial(Handler, directory=root))
log.write("STATIC ready\n")
server.serve_forever()
