"""`sandgate rules lint` warns about an allow or ask of a network that is most of the
internet (`0.0.0.0/0`, `::/0`, `/1` ... `/8`; IPv6 to `/16`): valid, and passing its
addresses whatever name a connection presents, but rarely meant. A deny, a narrow
network or a private one (`10.0.0.0/8`: opening it is meant) gets no warning."""

from __future__ import annotations

import json

from sandgate.enforcer.cli import main

RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: 0.0.0.0/0
        ports: [22]
        id: any-ssh
      - ask: "::/0"
      - allow: [203.0.113.0/24, 10.0.0.0/8]
      - deny: 0.0.0.0/0
        ports: [25]
  child:
    extends: default
"""


def test_lint_warns_once_per_wide_allow_or_ask_and_stays_valid(tmp_path, capsys):
    path = tmp_path / "wide.yaml"
    path.write_text(RULES)
    assert main(["rules", "lint", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err  # once each, though two profiles hold them
    assert err[0].startswith(f"{path.name}:5: warning: rule any-ssh allows 0.0.0.0/0 on ports 22")
    assert "wide.yaml:8: warning: rule wide.yaml:8 asks ::/0 on ports 80,443" in err[1]
    assert main(["rules", "lint", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] and len(report["warnings"]) == 2


def test_the_shipped_rules_lint_without_warnings(capsys):
    from sandgate.proxy.policy import DEFAULT_RULES

    assert main(["rules", "lint", str(DEFAULT_RULES)]) == 0
    assert "warning" not in capsys.readouterr().err
