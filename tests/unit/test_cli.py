"""`sandgate check`, `sandgate rules lint|show`: what an admin types, what they see,
and the exit codes scripts rely on (0 allowed/valid, 1 denied/ask, 2 bad input)."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sandgate.enforcer.cli import main

ROOT = Path(__file__).resolve().parents[2]
TEAM = "rules/examples/team.yaml"
BROKEN = "tests/fixtures/rules/broken/bare_star.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    # Paths on the command line are relative to the checkout. Default rule ids are
    # FILE:LINE with FILE relative to the first rule file's directory (team.yaml:12).
    monkeypatch.chdir(ROOT)


def check_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["check", "--json", *argv])
    out = capsys.readouterr().out
    return code, json.loads(out)


PRIVATE = ("deny", "private_address", "builtin:private-address")


@pytest.mark.parametrize(
    ("argv", "code", "expected"),
    [
        pytest.param(
            ["https://pypi.org/simple/requests/"],
            0,
            ("allow", "rule_allow", "preset:pypi"),
            id="url",
        ),
        pytest.param(
            ["https://files.pythonhosted.org/packages/x.whl"],
            0,
            ("allow", "rule_allow", "preset:pypi"),
            id="url-second-name-of-a-rule",
        ),
        pytest.param(["pypi.org"], 0, ("allow", "rule_allow", "preset:pypi"), id="bare-host"),
        pytest.param(
            ["PyPI.ORG."],
            0,
            ("allow", "rule_allow", "preset:pypi"),
            id="bare-host-case-trailing-dot",
        ),
        pytest.param(["pypi.org:80"], 0, ("allow", "rule_allow", "preset:pypi"), id="host-port-80"),
        pytest.param(
            ["pypi.org:8443"],
            1,
            ("deny", "port_not_allowed", "default:fallback"),
            id="host-other-port",
        ),
        pytest.param(
            ["http://deb.debian.org/debian/dists/"],
            0,
            ("allow", "rule_allow", "preset:apt"),
            id="http-url",
        ),
        pytest.param(
            ["github.com"], 1, ("deny", "no_rule", "default:fallback"), id="not-in-default"
        ),
        pytest.param(
            ["--profile", "github", "github.com:22"],
            1,
            ("deny", "port_not_allowed", "default:fallback"),
            id="github-profile-no-ssh",
        ),
        pytest.param(
            [
                "--profile",
                "github",
                "--method",
                "POST",
                "https://github.com/o/r.git/git-upload-pack",
            ],
            0,
            ("allow", "rule_allow", "preset:github-upload-pack"),
            id="github-profile-fetch",
        ),
        pytest.param(
            [
                "--profile",
                "github",
                "--method",
                "POST",
                "https://github.com/o/r.git/git-receive-pack",
            ],
            1,
            ("deny", "rule_deny", "preset:github-no-push"),
            id="github-profile-push",
        ),
        pytest.param(
            ["--method", "POST", "https://pypi.org/legacy/"],
            1,
            ("deny", "method_not_allowed", "default:fallback"),
            id="pypi-upload",
        ),
        pytest.param(
            ["evilpypi.org"], 1, ("deny", "no_rule", "default:fallback"), id="suffix-confusion"
        ),
        pytest.param(
            ["pypi.org.evil.test"],
            1,
            ("deny", "no_rule", "default:fallback"),
            id="suffix-elsewhere",
        ),
        pytest.param(
            ["p\u0443pi.org"], 1, ("deny", "no_rule", "default:fallback"), id="cyrillic-lookalike"
        ),
        pytest.param(["169.254.169.254"], 1, PRIVATE, id="metadata"),
        pytest.param(["0xa9fea9fe"], 1, PRIVATE, id="metadata-hex"),
        pytest.param(["2852039166"], 1, PRIVATE, id="metadata-decimal"),
        pytest.param(["0251.0376.0251.0376:80"], 1, PRIVATE, id="metadata-octal-with-port"),
        pytest.param(
            ["http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/"],
            1,
            PRIVATE,
            id="metadata-url-hex-parts",
        ),
        pytest.param(["[::ffff:169.254.169.254]:80"], 1, PRIVATE, id="metadata-v4-mapped"),
        pytest.param(["https://[::ffff:a9fe:a9fe]/"], 1, PRIVATE, id="metadata-v4-mapped-hex-url"),
        pytest.param(["127.1"], 1, PRIVATE, id="loopback-short"),
        pytest.param(["::1"], 1, PRIVATE, id="v6-loopback-bare"),
        pytest.param(["[::1]:8080"], 1, PRIVATE, id="v6-loopback-port"),
        pytest.param(["8.8.8.8"], 1, ("deny", "no_rule", "default:fallback"), id="public-ip"),
    ],
)
def test_check_default_rules(capsys, argv, code, expected):
    got_code, result = check_json(capsys, *argv)
    assert (got_code, (result["verdict"], result["reason"], result["rule"])) == (code, expected), (
        result
    )


@pytest.mark.parametrize(
    ("argv", "code", "expected", "inspect"),
    [
        pytest.param(
            ["https://api.github.com/repos/octo/hello"],
            0,
            ("allow", "rule_allow", "team.yaml:12"),
            False,
            id="request-allowed-by-path",
        ),
        pytest.param(
            ["--method", "HEAD", "https://api.github.com/repos/octo/hello"],
            0,
            ("allow", "rule_allow", "team.yaml:12"),
            False,
            id="request-second-method",
        ),
        pytest.param(
            ["api.github.com"],
            0,
            ("allow", "rule_allow", "team.yaml:12"),
            True,
            id="connection-inspected",
        ),
        pytest.param(
            ["https://api.github.com/"],
            0,
            ("allow", "rule_allow", "team.yaml:12"),
            True,
            id="url-without-path-is-a-connection",
        ),
        pytest.param(
            ["--method", "POST", "https://api.github.com/repos/octo/hello"],
            1,
            ("deny", "method_not_allowed", "default:fallback"),
            False,
            id="method-not-allowed",
        ),
        pytest.param(
            ["https://api.github.com/user/keys"],
            1,
            ("deny", "path_not_allowed", "default:fallback"),
            False,
            id="path-not-allowed",
        ),
        pytest.param(
            ["https://api.github.com/repos/../user/keys"],
            1,
            ("deny", "ambiguous_path", "builtin:ambiguous-path"),  # as the gateway answers it
            False,
            id="dot-dot-path",
        ),
        pytest.param(
            ["github.com:22"], 0, ("allow", "rule_allow", "team.yaml:10"), False, id="explicit-port"
        ),
        pytest.param(
            ["download.pythonhosted.org"],
            0,
            ("allow", "rule_allow", "team.yaml:9"),
            False,
            id="wildcard",
        ),
        pytest.param(
            ["pythonhosted.org"],
            1,
            ("deny", "no_rule", "default:fallback"),
            False,
            id="wildcard-apex",
        ),
        pytest.param(["203.0.113.7"], 0, ("allow", "rule_allow", "team.yaml:15"), False, id="cidr"),
        pytest.param(
            ["3405803783"], 0, ("allow", "rule_allow", "team.yaml:15"), False, id="cidr-decimal"
        ),
        pytest.param(
            ["http://203.0.113.7/"],
            1,
            ("deny", "port_not_allowed", "default:fallback"),
            False,
            id="cidr-other-port",
        ),
        pytest.param(
            ["[2001:db8::1]:443"],
            1,
            ("deny", "no_rule", "default:fallback"),
            False,
            id="v6-no-rule",
        ),
        pytest.param(
            ["--profile", "ci", "registry.npmjs.org"],
            0,
            ("allow", "rule_allow", "ci-npm"),  # the rule that allows any method
            True,  # the preset's download-only rule is inspected, so requests are too
            id="extends-include",
        ),
        pytest.param(
            ["--profile", "ci", "api.github.com"],
            0,
            ("allow", "rule_allow", "team.yaml:12"),
            True,
            id="extends-inherits-rules",
        ),
    ],
)
def test_check_team_rules(capsys, argv, code, expected, inspect):
    got_code, result = check_json(capsys, "--rules", TEAM, *argv)
    assert (got_code, (result["verdict"], result["reason"], result["rule"]), result["inspect"]) == (
        code,
        expected,
        inspect,
    ), result


def test_check_json_shape(capsys):
    code, result = check_json(capsys, "--rules", TEAM, "api.github.com")
    assert code == 0
    assert {"verdict", "reason", "rule", "inspect"} <= set(result)
    assert isinstance(result["inspect"], bool)
    assert result["rule_origin"] == "team.yaml:12"
    assert re.fullmatch(r"[0-9a-f]{16}", result["policy"])


def test_check_human_output(capsys):
    assert main(["check", "--rules", TEAM, "api.github.com"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "ALLOW  api.github.com"
    assert "reason:  rule_allow" in out and "rule:    team.yaml:12" in out and "inspect: yes" in out

    assert main(["check", "--rules", TEAM, "crates.io"]) == 0
    out = capsys.readouterr().out
    assert "rule:    preset:crates  (presets/package-registries.yaml:" in out

    assert main(["check", "169.254.169.254"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DENY  169.254.169.254") and "rule:    builtin:private-address\n" in out


def test_check_ask_is_exit_1_and_audit_exit_0(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nprofiles:\n  asking:\n    fallback: ask\n  learning:\n    fallback: audit\n"
    )
    assert main(["check", "--rules", str(path), "--profile", "asking", "example.com"]) == 1
    assert main(["check", "--rules", str(path), "--profile", "learning", "example.com"]) == 0
    out = capsys.readouterr().out
    assert "ASK  example.com" in out and "AUDIT  example.com" in out


@pytest.mark.parametrize(
    "target",
    ["/pub//x", "/pub/x;y", "/pub/x%00", "/pub/x\\y", "/pub/a%2Fb", "/pub/./x", "/pub/x?a b",
     "/pub/x", "/pub/x?a=1", "/pub/%7Ex"],
)  # fmt: skip
def test_check_refuses_the_paths_the_gateway_refuses(tmp_path, capsys, target):
    """The block page names `sandgate check`: it must not say ALLOW where the gateway
    answers 400 ambiguous_path (check_head, the gateway's own check of a request)."""
    from sandgate.proxy.policy.request_head import RequestHead, check_head

    rules = tmp_path / "r.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: allowed.test\n        paths: ['/pub/**']\n"
    )
    gateway = check_head(RequestHead(b"GET", target.encode(), ((b"host", b"allowed.test"),)), 80)
    refused = getattr(gateway, "reason", None) == "ambiguous_path"
    code, result = check_json(capsys, "--rules", str(rules), f"http://allowed.test{target}")
    assert (code, result["reason"] == "ambiguous_path") == ((1, True) if refused else (0, False))


def test_check_shows_a_typed_escape_sequence_escaped(capsys):
    assert main(["check", "http://allowed.test/\x1b[31mx"]) == 1
    assert "\x1b" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["ftp://example.com/"], "unsupported URL scheme", id="scheme"),
        pytest.param(["http://[::1/"], "not a URL", id="broken-url"),
        pytest.param(["https:///path"], "not a host name", id="url-without-host"),
        pytest.param(["exa mple.com"], "not a host name", id="space"),
        pytest.param(["example..com"], "not a host name", id="empty-label"),
        pytest.param(["example.com:99999"], "bad port", id="port-range"),
        pytest.param(["example.com:https"], "bad port", id="port-word"),
        pytest.param(["https://example.com:99999/"], "bad port", id="url-port-range"),
        pytest.param(["--method", "FETCH", "example.com"], "unknown HTTP method", id="method"),
        pytest.param(["--profile", "nope", "pypi.org"], "no profile 'nope'", id="unknown-profile"),
        pytest.param(
            ["--rules", BROKEN, "pypi.org"], "invalid rules, nothing checked", id="broken-rules"
        ),
        pytest.param(
            ["--rules", "does/not/exist.yaml", "pypi.org"],
            "cannot read rule file",
            id="missing-rules",
        ),
    ],
)
def test_check_bad_input_exits_2(capsys, argv, message):
    assert main(["check", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


def test_check_broken_rules_names_file_line_col(capsys):
    assert main(["check", "--rules", BROKEN, "pypi.org"]) == 2
    assert f"{BROKEN}:6:16: '*' would allow everything" in capsys.readouterr().err


# --- rules show ---------------------------------------------------------------------------


def test_rules_show_each_rule_with_its_origin(capsys):
    assert main(["rules", "show", TEAM]) == 0
    out = capsys.readouterr().out
    profiles = [line for line in out.splitlines() if not line.startswith("  ")]
    assert profiles == [
        "profile default  (fallback: deny, team.yaml:5)",
        "profile ci  (fallback: deny, team.yaml:5)",
    ]
    limits = [line for line in out.splitlines() if line.startswith("  limits per sandbox: ")]
    # team.yaml sets no limits: each profile shows the defaults.
    assert (
        limits
        == [
            "  limits per sandbox: connections 512, pending 64, dns_qps 50, connection_rate 200, leaf_rate 10"
        ]
        * 2
    )
    presets = [line for line in out.splitlines() if line.startswith("  preset ")]
    assert (
        presets
        == [
            "  preset package-registries: download-only (GET, HEAD): PyPI, npm, crates.io, the Go "
            "module proxy, Maven Central, RubyGems, Debian and Ubuntu archives; TLS to them is "
            "inspected with the gateway's CA (installed in the sandbox), so publish requests "
            "(POST, PUT ...) are refused"
        ]
        * 2
    )
    inspection = [line for line in out.splitlines() if line.startswith("  inspection: ")]
    assert len(inspection) == 2 and all("gateway's CA" in line for line in inspection)
    rules = [
        line
        for line in out.splitlines()
        if line.startswith("  ") and line not in limits + presets + inspection
    ]
    for line in rules:
        origin = re.search(r"\(([^()]+):(\d+)\)$", line)
        assert origin, f"no (FILE:LINE) at the end of {line!r}"
        # relative to the rules root (team.yaml's folder); presets to the shipped rules
        assert (ROOT / "rules/examples" / origin[1]).is_file() or (
            ROOT / "rules" / origin[1]
        ).is_file()
    assert (
        "  allow api.github.com ports 80,443 methods GET,HEAD paths /repos/**  (team.yaml:12)"
        in rules
    )
    gist = "  deny  gist.github.com ports 80,443 expires 2027-01-01 [no-gists]  (team.yaml:17)"
    assert gist in rules or any(
        line.startswith("  EXPIRED 2027-01-01: deny  gist.github.com") for line in rules
    )
    assert any(
        line.endswith("[preset:pypi]  (presets/package-registries.yaml:19)") for line in rules
    )


def test_rules_show_profile_after_extends_and_include(capsys):
    assert main(["rules", "show", "--profile", "ci", TEAM]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("profile ci ")
    ids = [re.search(r"\[([^\]]+)\]", line)[1] for line in out[1:] if "[" in line]
    assert ids[:8] == [
        "preset:pypi",
        "preset:npm",
        "preset:crates",
        "preset:go",
        "preset:go-downloads",
        "preset:maven",
        "preset:rubygems",
        "preset:apt",
    ]
    assert ids[-1] == "ci-npm"


def test_rules_show_json(capsys):
    assert main(["rules", "show", "--json", "--profile", "ci", TEAM]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["profile"] == "ci" and shown["fallback"] == "deny"
    assert shown["limits"] == {
        "connections": 512,
        "pending": 64,
        "dns_qps": 50,
        "connection_rate": 200,
        "leaf_rate": 10,
    }
    rule = next(r for r in shown["rules"] if r["origin"] == "team.yaml:12")
    assert rule == {
        "id": "team.yaml:12",
        "action": "allow",
        "targets": ["api.github.com"],
        "ports": [80, 443],
        "methods": ["GET", "HEAD"],
        "paths": ["/repos/**"],
        "origin": "team.yaml:12",
        "expires": None,
        "owner": None,
        "ticket": None,
        "comment": None,
    }


def test_rules_show_defaults_to_the_shipped_rules(capsys):
    assert main(["rules", "show", "-j", "--profile", "default"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["fallback"] == "deny"
    assert "preset:pypi" in [rule["id"] for rule in shown["rules"]]


def test_rules_show_expired(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: old.example\n        id: old\n        expires: 2001-01-01\n"
    )
    assert main(["rules", "show", str(path)]) == 0
    assert "  EXPIRED 2001-01-01: allow old.example ports 80,443 [old]" in capsys.readouterr().out


def test_rules_show_unknown_profile(capsys):
    assert main(["rules", "show", "--profile", "nope", TEAM]) == 2
    assert "no profile 'nope'" in capsys.readouterr().err


# --- rules lint ---------------------------------------------------------------------------


def test_rules_lint_valid(capsys):
    assert main(["rules", "lint", "rules/default.yaml", TEAM]) == 0
    assert capsys.readouterr().out == f"ok: rules/default.yaml, {TEAM}\n"


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (ROOT / "rules" / "presets").glob("*.yaml"))
)
def test_every_shipped_preset_lints(tmp_path, capsys, preset):
    path = tmp_path / "p.yaml"
    path.write_text(f"version: 1\nprofiles:\n  default:\n    include: [{preset}]\n")
    assert main(["rules", "lint", str(path)]) == 0, capsys.readouterr().err


def test_rules_lint_json_valid(capsys):
    assert main(["rules", "lint", "--json", "rules/default.yaml"]) == 0
    assert json.loads(capsys.readouterr().out) == {"valid": True, "errors": [], "expired": []}


def test_rules_lint_json_invalid(capsys):
    assert main(["rules", "lint", "--json", BROKEN]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "valid": False,
        "errors": [
            {
                "file": BROKEN,
                "line": 6,
                "column": 16,
                "message": "'*' would allow everything; use the profile's 'fallback' instead",
            }
        ],
        "expired": [],
    }


def test_rules_lint_several_files_reports_each(capsys):
    other = "tests/fixtures/rules/broken/unknown_fallback.yaml"
    assert main(["rules", "lint", BROKEN, "rules/default.yaml", other]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == [BROKEN, other]


def test_rules_lint_warns_about_expired_rules(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: old.example\n        id: old\n        expires: 2001-01-01\n"
    )
    assert main(["rules", "lint", str(path)]) == 0
    captured = capsys.readouterr()
    assert "warning: rule old expired on 2001-01-01 and no longer matches" in captured.err
    assert main(["rules", "lint", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is True and report["expired"][0]["rule"] == "old"


# --- the installed command -------------------------------------------------------------------


def _installed_sandgate() -> Path:
    for candidate in (
        ROOT / ".venv" / "bin" / "sandgate",
        Path(sys.executable).parent / "sandgate",
    ):
        if candidate.exists():
            return candidate
    pytest.fail("the sandgate console script is not installed next to the test interpreter")


def test_console_script_runs():
    sandgate = str(_installed_sandgate())
    run = subprocess.run(
        [sandgate, "check", "--json", "https://pypi.org/simple/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rule"] == "preset:pypi"

    run = subprocess.run(
        [sandgate, "check", "0x7f.1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1 and "private_address" in run.stdout

    run = subprocess.run(
        [sandgate, "rules", "lint", BROKEN], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert run.stderr.startswith(f"{BROKEN}:6:16: ")


# --- admin conventions ------------------------------------------------------------------------


def test_version_is_the_distribution_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"sandgate {version('sandgate')}\n"


def _every_parser(parser):
    yield parser
    for action in parser._actions:  # argparse keeps subparsers only here
        for child in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict):
                yield from _every_parser(action.choices[child])


def test_every_option_has_help_and_every_json_has_j():
    from sandgate.enforcer.cli import build_parser

    parsers = list(_every_parser(build_parser()))
    assert {p.prog for p in parsers} >= {
        "sandgate check",
        "sandgate rules lint",
        "sandgate gc",
        "sandgate run",
    }
    for parser in parsers:
        for action in parser._actions:
            if action.dest != "help" and not action.choices:
                assert action.help, (
                    f"{parser.prog} {action.option_strings or action.dest}: no help text"
                )
            if "--json" in action.option_strings:
                assert "-j" in action.option_strings, f"{parser.prog} --json has no -j"


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["check", "-j", "pypi.org"], id="check"),
        pytest.param(["rules", "lint", "-j", "rules/default.yaml"], id="lint"),
        pytest.param(["rules", "show", "-j", "--profile", "default"], id="show"),
    ],
)
def test_j_is_json(capsys, argv):
    assert main(argv) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)


@pytest.mark.parametrize("command", [["run", "--", "true"], ["gc"], ["gc", "--dry-run"], ["demo"]])
def test_not_root_is_one_line_and_exit_125(monkeypatch, capsys, command):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(command) == 125
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.startswith(f"sandgate: sandgate {command[0]} needs root")
        and captured.err.count("\n") == 1
    )


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        pytest.param(["run", "--rules", BROKEN, "--", "true"], 2, id="broken-rules"),
        pytest.param(["run", "--", "true"], 125, id="not-root"),
    ],
)
def test_run_collects_garbage_again_after_its_start(monkeypatch, capsys, argv, code):
    """`cmd_run` pauses the cyclic GC while its start imports and loads (cli/run.py):
    it runs again after, also when the start fails (a gateway must not serve for
    hours without it)."""
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(argv) == code
    assert gc.isenabled()


def test_missing_nft_is_one_line_and_exit_125(tmp_path):
    """A real process, so that nothing but main() stands between the error and the terminal."""
    (tmp_path / "bin").mkdir()  # a PATH without nft
    env = {
        "PATH": str(tmp_path / "bin"),
        "SANDGATE_RUN_DIR": str(tmp_path / "run"),
        "SANDGATE_STATE_DIR": str(tmp_path / "state"),
    }
    run = subprocess.run(
        [sys.executable, "-m", "sandgate.enforcer.cli", "run", "--", "true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if os.geteuid() != 0:  # the root check comes first
        assert "needs root" in run.stderr
    else:
        assert (
            run.stderr
            == "sandgate: the 'nft' command is missing; install nftables (Debian: apt-get install nftables)\n"
        )
    assert (run.returncode, run.stdout) == (125, "")
    assert not (tmp_path / "run").exists()  # nothing was set up


def test_gc_dry_run_lists_and_touches_nothing(tmp_path, monkeypatch, capsys):
    """A dead run's state dir, netns and table: listed by --dry-run and left alone,
    then removed by gc. Netlink and nft are stand-ins: a real gc here would also
    sweep up tables of test runs going on in parallel in this namespace."""
    from sandgate.enforcer import netns, nft, service_state
    from sandgate.enforcer import run as runner

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process
    state = tmp_path / "dead0001"
    state.mkdir()
    (state / "pid").write_text(str(dead.pid))
    removed = []
    monkeypatch.setattr(runner, "RUN_DIR", tmp_path)
    monkeypatch.setattr(runner, "STATE_DIR", tmp_path / "no-state")  # no audit journals
    # nor services' state dirs
    monkeypatch.setattr(service_state, "SERVICES_DIR", tmp_path / "no-state" / "services")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(netns, "list_sandbox_nets", lambda: ["dead0001"])
    monkeypatch.setattr(
        netns, "destroy_sandbox_net", lambda run_id: removed.append(f"netns {run_id}")
    )
    monkeypatch.setattr(nft, "list_tables", lambda prefix: [f"{prefix}dead0001"])
    monkeypatch.setattr(nft, "delete_table", lambda table: removed.append(f"table {table}"))
    # Cgroups too: empty ones of other test runs (another RUN_DIR) would be listed; and
    # the id slots other tests' killed runners left records in (the host's).
    monkeypatch.setattr(runner.cgroup, "leftovers", lambda: [])
    monkeypatch.setattr(runner.id_slots, "sweep", lambda pool, dry_run: [])

    assert main(["gc", "--dry-run"]) == 0
    assert capsys.readouterr().out == (
        f"would remove netns {netns.netns_name('dead0001')}\n"
        "would remove nft table sandgate_dead0001\n"
        f"would remove state {state}\n"
    )
    assert removed == [] and state.is_dir()

    assert main(["gc"]) == 0
    assert capsys.readouterr().out.startswith(f"removed netns {netns.netns_name('dead0001')}\n")
    assert removed == ["netns dead0001", "table sandgate_dead0001"] and not state.exists()


# --- expected failures: one line and an exit code, never a traceback ---------------------


def _sandgate(*argv: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(_installed_sandgate()), *argv],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "option",
    ["--audit-log", "--summary-json", "--workspace", "--ro", "--rw", "--hide", "--extra-ca"],
)
def test_a_path_option_through_a_link_loop_is_bad_input(tmp_path, capsys, option):
    (tmp_path / "one").symlink_to(tmp_path / "two")
    (tmp_path / "two").symlink_to(tmp_path / "one")
    with pytest.raises(SystemExit) as exited:
        main(["run", option, str(tmp_path / "one"), "--", "true"])
    assert exited.value.code == 2
    assert "a loop of symbolic links" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["1e999G", "infG", "nan"])
def test_a_size_beyond_any_number_is_bad_input(capsys, size):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--audit-budget", size, "--", "true"])
    assert exited.value.code == 2 and "expected a size" in capsys.readouterr().err


def test_a_rule_file_larger_than_any_is_refused_unread(tmp_path):
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(65 << 20)  # sparse
    got = _sandgate("rules", "lint", str(huge))
    assert got.returncode == 2 and "larger than 64 MiB" in got.stderr, got.stderr


def test_output_nobody_takes_is_not_a_traceback(tmp_path):
    closed = subprocess.Popen(
        [str(_installed_sandgate()), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    closed.stdout.close()  # `sandgate --help | head -0`
    assert closed.wait(timeout=60) == 141 and b"Traceback" not in closed.stderr.read()
    closed.stderr.close()
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    with open("/dev/full", "w") as full:  # stdout on a full disk: not "BROKEN" (1)
        got = _sandgate("audit", "verify", str(log), stdout=full)
    assert got.returncode == 125 and "No space left" in got.stderr and "Traceback" not in got.stderr
