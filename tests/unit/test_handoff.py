"""The hand-over of `sandgate run --gateway` to a warm runner (enforcer/handoff.py):
which socket the client reads from its arguments, and what it imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sandgate.enforcer import handoff


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["--gateway", "/s.sock", "--", "true"], "/s.sock", id="value"),
        pytest.param(["--gateway=/s.sock", "--", "true"], "/s.sock", id="equals"),
        pytest.param(["--gateway", "--", "true"], handoff.DEFAULT_CONTROL, id="default"),
        pytest.param(["-q", "--gateway", "-q", "--", "x"], handoff.DEFAULT_CONTROL, id="flag-next"),
        pytest.param(
            ["--profile", "p", "--gateway", "rel.sock", "--", "x"], "rel.sock", id="later"
        ),
        pytest.param(["--", "x", "--gateway", "/s.sock"], None, id="in-the-command"),
        pytest.param(["--gateway", "/s.sock", "--help"], "/s.sock", id="help-after"),
        pytest.param(["--help", "--gateway", "/s.sock"], None, id="help-first"),
        pytest.param(["--", "true"], None, id="embedded"),
        pytest.param([], None, id="nothing"),
    ],
)
def test_control_path_reads_gateway_as_argparse_does(args, expected, monkeypatch):
    monkeypatch.delenv("SANDGATE_CONTROL", raising=False)
    assert handoff.control_path(args) == expected


def test_not_root_or_not_a_run_is_never_offered(monkeypatch, tmp_path):
    offered = []
    monkeypatch.setattr(handoff, "_offer", lambda *a: offered.append(a))
    (tmp_path / f"g.sock{handoff.SUFFIX}abcd").touch()
    monkeypatch.setattr(handoff.os, "geteuid", lambda: 1000)
    assert handoff.hand_off(["run", "--gateway", str(tmp_path / "g.sock"), "--", "x"]) is None
    monkeypatch.setattr(handoff.os, "geteuid", lambda: 0)
    assert handoff.hand_off(["status", "--gateway", str(tmp_path / "g.sock")]) is None
    assert offered == []
    assert handoff.hand_off(["run", "--gateway", str(tmp_path / "g.sock"), "--", "x"]) is None
    assert len(offered) == 1  # the one runner socket there, which took nothing


def test_the_client_path_imports_no_argparse_nor_dataclasses():
    probe = (
        "import sys; before = set(sys.modules)\n"
        "import sandgate.enforcer.cli, sandgate.enforcer.handoff\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    new = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "sandgate.enforcer.handoff" in new
    for heavy in ("argparse", "dataclasses", "pathlib", "typing", "sandgate.enforcer.attach"):
        assert heavy not in new, heavy
