"""Apache httpd in the fake internet for the tests of web routers (a red team, session 50): a config from
apache.conf.tmpl, two docroots (allowed.test's with a CGI script `admin.cgi` that
prints ADMIN-SECRET), started in the fake internet's namespace, stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from support import sandbox
from support.servers import listening

HERE = Path(__file__).parent
SCRIPT = "#!/bin/sh\nprintf 'Content-Type: text/plain\\n\\nADMIN-SECRET path_info=%s\\n' \"$PATH_INFO\"\n"


@contextlib.contextmanager
def apache(net, ip: str, options: str = "", template: str = "apache.conf.tmpl"):
    """Apache on ip:8088 (plain) and ip:8444 (TLS); yields its directory (access.log)."""
    # Apache's children run as www-data: pytest's tmp_path (0700, root's) is not theirs.
    top = Path(tempfile.mkdtemp(prefix="sgt-apache-"))
    try:
        top.chmod(0o755)
        for tenant in ("allowed", "forbidden"):
            (top / tenant).mkdir()
            (top / tenant / "index.html").write_text(f"{tenant.upper()}-TENANT index\n")
            (top / tenant / "public").mkdir()
            (top / tenant / "public" / "ok.txt").write_text(f"{tenant.upper()}-TENANT ok\n")
        admin = top / "allowed" / "admin.cgi"
        admin.write_text(SCRIPT)
        admin.chmod(0o755)
        shutil.copy(net.workdir / "server.pem", top / "server.pem")
        shutil.copy(net.workdir / "server.key", top / "server.key")
        config = top / "httpd.conf"
        text = (HERE / template).read_text()
        for key, value in {
            "@DIR@": str(top), "@IP@": ip, "@OPTIONS@": options,
            "@PEM@": str(top / "server.pem"), "@KEY@": str(top / "server.key"),
        }.items():  # fmt: skip
            text = text.replace(key, value)
        config.write_text(text)
        (top / "access.log").write_text("")
        process = subprocess.Popen(
            ["ip", "netns", "exec", net.internet_ns, "apache2", "-f", str(config), "-DFOREGROUND"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "APACHE_LOG_DIR": str(top)},
            # Apache's parent signals its whole process group when it stops: its own.
            start_new_session=True,
        )
        try:
            up = sandbox.eventually(
                lambda: listening(net, [f"{ip}:8088", f"{ip}:8444"]), timeout=15
            )
            assert up, (top / "error.log").read_text() if (top / "error.log").exists() else "no log"
            yield top
        finally:
            process.send_signal(signal.SIGTERM)  # the parent stops its children
            process.wait(15)
    finally:
        shutil.rmtree(top, ignore_errors=True)
