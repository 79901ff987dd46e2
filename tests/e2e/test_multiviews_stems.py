"""A deny of a file written with its extensions takes the stem Apache's MultiViews
serves it by.

With `Options +MultiViews` (the default `MultiviewsMatch NegotiatedOnly`: every
extension mod_mime knows), Apache serves `x.tar.gz` for `/dl/x` and `backup.7z` for
`/dl/backup`. A deny glob's segment written with extensions takes its stem
(load._stem); it took off only the last one, and only one that starts with a letter,
until a red team showed these (session 52). MultiViews negotiates the last segment
only: a deny of `/site/docs.old/secret.pdf` takes `/site/docs.old/secret`, each
segment by its stem or as written (load._stems). A deny of `/files/*.sql` does not take
`/files/dump` (docs/rules.md: deny the directory where MultiViews is on).

Origin: Debian's Apache 2.4 (tests/e2e/web_routers/apache.py), plain HTTP and TLS.
"""

from __future__ import annotations

import shutil

import pytest
from support import sandbox
from web_routers.apache import apache

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test

RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - deny: allowed.test
        id: no-secrets
        ports: [8444, 8088]
        paths: ["/dl/x.tar.gz", "/dl/backup.7z", "/dl/photo.jpg", "/files/*.sql", "/site/docs.old/secret.pdf"]
      - allow: allowed.test
        id: site
        ports: [8444, 8088]
        methods: [GET]
        paths: ["/**"]
"""

FILES = {
    "dl/x.tar.gz": "SECRET-TARBALL",
    "dl/backup.7z": "SECRET-7Z",
    "dl/photo.jpg": "SECRET-JPEG",
    "files/dump.sql": "SECRET-SQL",
    "site/docs.old/secret.pdf": "SECRET-PDF",
}


def h1(port: int, target: str, tls: bool = True) -> str:
    return sandbox.h1(IP, port, target, tls)


STEMS = {
    "tar_gz_plain": (8088, "/dl/x", False),
    "tar_gz_tls": (8444, "/dl/x", True),
    "seven_z_plain": (8088, "/dl/backup", False),
    "jpeg_plain": (8088, "/dl/photo", False),
    "dotted_directory": (8088, "/site/docs.old/secret", False),
}


def test_a_denied_file_is_not_served_by_multiviews_without_all_its_extensions(net, tmp_path):
    (tmp_path / "rules.yaml").write_text(RULES)
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "honest": h1(8088, "/public/ok.txt", False),
        "control_tar_gz": h1(8088, "/dl/x.tar.gz", False),
        "control_tar": h1(8088, "/dl/x.tar", False),
        "control_7z": h1(8088, "/dl/backup.7z", False),
        "control_sql": h1(8444, "/files/dump.sql", True),
    }
    for name, (port, target, tls) in STEMS.items():
        steps[name] = h1(port, target, tls)
    with apache(net, IP, "+MultiViews") as top:
        for name, text in FILES.items():
            (top / "allowed" / name).parent.mkdir(parents=True, exist_ok=True)
            (top / "allowed" / name).write_text(text + "\n")
            (top / "allowed" / name).parent.chmod(0o755)
        result = sandbox.run(
            net, tmp_path, steps, rules=tmp_path / "rules.yaml",
            setup=lambda d: shutil.copy(sandbox.H2CLIENT, d / "h2client.py"),
        )  # fmt: skip
        log = (top / "access.log").read_text()
    why = f"{result.describe()}\napache:\n{log}"
    assert "ALLOWED-TENANT ok" in result["honest"].out, why
    for control in ("control_tar_gz", "control_tar", "control_7z", "control_sql"):
        assert "SECRET" not in result[control].out, (control, why)
    served = [name for name in STEMS if "SECRET-" in result[name].out]
    assert not served, f"served a denied file: {served}\n{why}"
    assert "status=200" not in "".join(
        line for line in log.splitlines() if any(d in line for d in ("/dl/", "/files/", "/site/"))
    ), why
