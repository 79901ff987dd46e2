"""`sandgate rules lint` warns about a deny that an allow (or ask) of the same host
outruns in ports: a deny's ports default to 80 and 443 as an allow's do, so a deny of
a path beside an allow on 8443 does not hold on 8443 (a red team's first deny of a
script, session 50, missed so). A deny covering every port the allows open, or one of
another host, gets no warning."""

from __future__ import annotations

import json

from sandgate.enforcer.cli import main

RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: example.com
        ports: [443, 8443]
        methods: [GET]
        paths: ["/**"]
        id: site
      - deny: example.com
        paths: ["/admin/**"]
        id: no-admin
      - deny: "*.example.org"
        paths: ["/x"]
        id: no-x
      - ask: api.example.org
        ports: [8080]
      - deny: example.net
        ports: [443, 8443]
        paths: ["/y"]
        id: covered
      - allow: example.net
        ports: [8443]
      - deny: other.test
        paths: ["/z"]
        id: unrelated
  child:
    extends: default
"""


def test_lint_warns_once_per_deny_an_allow_outruns_in_ports(tmp_path, capsys):
    path = tmp_path / "denies.yaml"
    path.write_text(RULES)
    assert main(["rules", "lint", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err  # once each, though two profiles hold them
    assert err[0].startswith("denies.yaml:10: warning: rule no-admin denies on ports 80,443 only;")
    assert "rule site (denies.yaml:5) allows the same host on 8443 too" in err[0]
    assert "rule no-x denies on ports 80,443 only;" in err[1]
    assert "asks the same host on 8080 too" in err[1]
    assert main(["rules", "lint", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] and len(report["warnings"]) == 2
