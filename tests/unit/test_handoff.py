"""The hand-over of `sandgate run --gateway` to a warm runner (enforcer/handoff.py):
which socket the client reads from its arguments, and what it imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

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
    heavy = ("argparse", "dataclasses", "pathlib", "typing", "sandgate.enforcer.attach")
    # the Python wrappers of _socket, _signal and _json, and what they pull in
    wrappers = ("socket", "signal", "json", "re", "enum", "selectors", "functools", "__future__")
    for name in heavy + wrappers:
        assert name not in new, name


def test_the_sandgate_command_imports_only_the_cli_before_main():
    """The installed `sandgate-python` (which the native front `sandgate` runs) is
    enforcer/cli/sandgate-python (pyproject's script-files), not pip's entry-point
    script, which imports `re` first."""
    script = Path(sys.executable).with_name("sandgate-python").read_text()
    first_line = script.split("\n", 1)[0]
    assert first_line.startswith("#!/") and "python" in first_line  # the installer's
    tree = ast.parse(script)
    imported = [
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert imported == ["sys", "sandgate.enforcer.cli"]


@pytest.mark.parametrize(
    "value",
    [
        {"argv": ["run", "--gateway", "/s", "--", "echo", "\u00e9t\u00e9", 'a"b\\c\n']},
        {"env": {"LANG": "C.UTF-8", "ODD": "\udcff\x00\t", "EMOJI": "\U0001f600"}, "cwd": "/"},
        {"signal": 20},
        {"exit": 0},
        {"refused": "why", "nested": [1, 2.5, True, False, None, {"a": []}]},
    ],
)
def test_encode_and_decode_are_json_dumps_and_loads(value):
    assert handoff.encode(value) == json.dumps(value)
    assert handoff.decode(json.dumps(value)) == json.loads(json.dumps(value)) == value
    assert handoff.decode(f"  {json.dumps(value)}\r\n") == value


@pytest.mark.parametrize(
    "text", ["", "{", '{"exit": }', '{"exit": 1} x', "[1, 2", "nul", '{"a": 1}}', '"\\ud8"']
)
def test_decode_refuses_what_is_not_one_json_value(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        handoff.decode(text)


def test_decode_refuses_nan_which_json_loads_takes():
    assert json.loads('{"exit": NaN}')["exit"] != 0
    with pytest.raises(ValueError, match="NaN"):
        handoff.decode('{"exit": NaN}')
