"""Broken rule files: one small file per mistake in tests/fixtures/rules/broken/,
headed by the problems the loader must report:

    # expect: LINE: message substring
    # expect: includes/other.yaml:LINE: message substring   (reported in another file)

The loader must report exactly those problems (file and line), all at once, and
`sandgate rules lint` must exit 2 printing them as FILE:LINE:COL: message.
Files in subfolders (includes/) are partners of a case, not cases."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sandgate.enforcer.cli import main
from sandgate.proxy.policy import PolicyError, load_policy

BROKEN = Path(__file__).resolve().parents[1] / "fixtures" / "rules" / "broken"
CASES = sorted(BROKEN.glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: (?:(?P<file>[^:\s]+):)?(?P<line>\d+): (?P<message>.+)$")


def expectations(case: Path) -> list[tuple[Path, int, str]]:
    found = []
    for text in case.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _EXPECT.match(text)
        if match:
            file = (case.parent / match["file"]).resolve() if match["file"] else case.resolve()
            found.append((file, int(match["line"]), match["message"]))
    return found


def test_the_fixture_folder_has_the_cases_it_should():
    names = {c.stem for c in CASES}
    required = {
        "unknown_key",
        "both_allow_and_deny",
        "neither_allow_nor_deny",
        "bare_star",
        "public_suffix_wildcard",
        "middle_wildcard",
        "bad_cidr",
        "port_out_of_range",
        "unknown_method",
        "unknown_fallback",
        "missing_include",
        "circular_include",
        "circular_extends",
        "unknown_extends",
        "duplicate_id",
        "invalid_date",
        "yaml_syntax_error",
        "wrong_version",
        "duplicate_key",
        "empty_file",
        "ip_literal_as_domain",
    }
    assert required <= names, sorted(required - names)
    for case in CASES:
        assert expectations(case), f"{case.name} has no '# expect: LINE: message' header"


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_broken_file_reports_exactly_its_problems(case):
    with pytest.raises(PolicyError) as error:
        load_policy(case)
    unmatched = [(Path(p.file).resolve(), p.line, p.message) for p in error.value.problems]
    for file, line, substring in expectations(case):
        hit = next(
            (u for u in unmatched if u[0] == file and u[1] == line and substring in u[2]), None
        )
        assert hit is not None, (
            f"expected {file.name}:{line}: {substring!r}; got {error.value.problems}"
        )
        unmatched.remove(hit)
    assert not unmatched, f"problems nobody expected: {unmatched}"


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_lint_exits_2_and_prints_file_line_col(case, capsys):
    assert main(["rules", "lint", str(case)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = expectations(case)
    assert len(err) == len(expected), err
    for line in err:
        match = re.fullmatch(r"(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)", line)
        assert match, f"not FILE:LINE:COL: message: {line!r}"
        assert Path(match["file"]).exists()
        assert int(match["col"]) >= 1
    for file, line, substring in expected:
        assert any(
            Path(e.split(":")[0]).resolve() == file
            and e.split(":")[1] == str(line)
            and substring in e
            for e in err
        ), (file, line, substring, err)


def test_lint_json_lists_every_problem(capsys):
    case = BROKEN / "several_errors.yaml"
    assert main(["rules", "lint", "--json", str(case)]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert [e["line"] for e in report["errors"]] == [line for _, line, _ in expectations(case)]
    assert set(report["errors"][0]) == {"file", "line", "column", "message"}


def test_all_problems_of_a_file_are_reported_at_once(tmp_path):
    """Shape, rule, include and extends problems together, across profiles: one pass."""
    path = tmp_path / "many.yaml"
    path.write_text(
        "version: 1\n"  # 1
        "profiles:\n"  # 2
        "  a:\n"  # 3
        "    extends: missing\n"  # 4  unknown extends
        "    include: [nope]\n"  # 5  unknown preset
        "    fallback: allow\n"  # 6  unknown fallback
        "    rules:\n"  # 7
        "      - allow: '*'\n"  # 8  bare star
        "      - allow: a.*.b.example\n"  # 9  middle wildcard
        "        ports: [0]\n"  # 10 port
        "  b:\n"  # 11
        "    rules:\n"  # 12
        "      - deny: 10.0.0.1/8\n"  # 13 bad CIDR
        "        methods: [FETCH]\n"  # 14 unknown method
        "        expires: 2027-13-01\n"  # 15 invalid date
        "        colour: red\n",  # 16 unknown key
        encoding="utf-8",
    )
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert [p.line for p in error.value.problems] == [4, 5, 6, 8, 9, 10, 13, 14, 15, 16]
    assert str(error.value).count(f"{error.value.problems[0].file}:") == 10


def test_errors_in_several_files_are_reported_together(tmp_path):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("version: 1\nprofiles:\n  a:\n    fallback: never\n", encoding="utf-8")
    two.write_text("version: 2\nprofiles:\n  b: {}\n", encoding="utf-8")
    with pytest.raises(PolicyError) as error:
        load_policy([one, two])
    assert {(Path(p.file).name, p.line) for p in error.value.problems} == {
        ("one.yaml", 4),
        ("two.yaml", 1),
    }


def test_a_profile_defined_in_two_files_is_an_error(tmp_path):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    for path in (one, two):
        path.write_text("version: 1\nprofiles:\n  default: {}\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="already defined in"):
        load_policy([one, two])


def test_a_missing_rule_file_is_a_problem_not_a_crash(tmp_path):
    with pytest.raises(PolicyError, match="cannot read rule file"):
        load_policy(tmp_path / "absent.yaml")


def test_nothing_is_half_loaded(tmp_path):
    """One bad rule among good ones: no policy at all, never a policy without it."""
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: pypi.org\n      - deny: evil..test\n",
        encoding="utf-8",
    )
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert [(p.line, p.column) for p in error.value.problems] == [(6, 15)]


def _ipv4_spellings(number: int) -> st.SearchStrategy[str]:
    """Dotted quad, a.b.c, a.b and one number, each part decimal, hex or octal."""
    b = number.to_bytes(4, "big")

    def part(value: int) -> st.SearchStrategy[str]:
        return st.sampled_from([str(value), hex(value), "0" + oct(value)[2:]])

    return st.one_of(
        st.tuples(*(part(x) for x in b)).map(".".join),
        st.tuples(part(b[0]), part(b[1]), part(int.from_bytes(b[2:], "big"))).map(".".join),
        st.tuples(part(b[0]), part(int.from_bytes(b[1:], "big"))).map(".".join),
        part(number),
    )


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1).flatmap(lambda n: st.tuples(st.just(n), _ipv4_spellings(n))))
def test_every_ipv4_spelling_in_a_rule_is_read_as_an_address(case):
    """Never as a domain name: the loader asks for the plain form, or takes it."""
    number, text = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(
            f'version: 1\nprofiles:\n  default:\n    rules:\n      - allow: "{text}"\n',
            encoding="utf-8",
        )
        try:
            policy = load_policy(path)
        except PolicyError as error:
            plain = ipaddress.IPv4Address(number)
            assert [p.message for p in error.problems] == [
                f"write the address {text!r} plainly, as {plain}"
            ]
        else:
            assert text == str(ipaddress.IPv4Address(number))
            assert policy.profiles["default"].rules[0].networks == (ipaddress.ip_network(text),)


def _unreadable(tmp_path: Path, kind: str) -> Path:
    """A rule file path that is not a file one can read as rules."""
    path = tmp_path / f"{kind}.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading would wait for a writer forever
    elif kind == "symlink-loop":
        path.symlink_to(tmp_path / "other.yaml")
        (tmp_path / "other.yaml").symlink_to(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")  # reading would never end
    return path


UNREADABLE = {
    "directory": "Is a directory",
    "fifo": "not a regular file",
    "symlink-loop": "Too many levels of symbolic links",
    "device": "not a regular file",
}


@pytest.mark.parametrize("included", [False, True], ids=["given", "included"])
@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_a_rule_file_that_is_not_a_regular_file_is_a_problem(tmp_path, kind, included):
    """Not a hang (FIFO, device), not a traceback (symlink loop): FILE:LINE:COL."""
    path = _unreadable(tmp_path, kind)
    if included:
        top = tmp_path / "top.yaml"
        top.write_text(
            f"version: 1\nprofiles:\n  default:\n    include: [./{path.name}]\n", encoding="utf-8"
        )
        path = top
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    [problem] = error.value.problems
    assert problem.message.startswith("cannot read rule file ")
    assert problem.message.endswith(UNREADABLE[kind])
    assert problem.line == (4 if included else 1)


@pytest.mark.parametrize("name", ["a\\0b.yaml", "preset\\0"])
def test_an_include_with_a_nul_character_is_a_problem(tmp_path, name):
    """Not a ValueError from the path calls (hypothesis found it): FILE:LINE:COL."""
    path = tmp_path / "rules.yaml"
    path.write_text(f'version: 1\nprofiles:\n  default:\n    include: ["{name}"]\n')
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    [problem] = error.value.problems
    assert (problem.line, problem.column) == (4, 15)
    assert "a NUL character" in problem.message


PRESET = "version: 1\nrules:\n  - allow: example.com\n"


@pytest.mark.parametrize(
    ("owner", "mode", "secret_mode", "refused"),
    [
        pytest.param(65534, 0o644, 0o600, True, id="another-users-file"),
        pytest.param(0, 0o664, 0o600, True, id="roots-file-its-group-may-write"),
        pytest.param(0, 0o644, 0o600, False, id="roots-file"),
        pytest.param(65534, 0o644, 0o644, False, id="another-users-file-readable-include"),
    ],
)
def test_a_rule_file_others_may_write_includes_only_what_anyone_may_read(
    owner, mode, secret_mode, refused
):
    """Found and closed: root read what an include named and quoted its lines in the
    problems (an include of /etc/shadow put its hashes in the log, the audit log and
    the reload's reply). A rule file that others than root may write includes only
    files anyone may read; one only root writes includes what root chooses."""
    with tempfile.TemporaryDirectory() as where:
        os.chmod(where, 0o755)
        secret, rules = Path(where) / "secret.yaml", Path(where) / "rules.yaml"
        secret.write_text(PRESET + "# alice:$6$SECRETHASH\n")
        secret.chmod(secret_mode)
        rules.write_text("version: 1\nprofiles:\n  default:\n    include: [./secret.yaml]\n")
        rules.chmod(mode)
        os.chown(rules, owner, owner)
        if not refused:
            assert load_policy(rules).profiles["default"].rules
            return
        with pytest.raises(PolicyError) as error:
            load_policy(rules)
    [problem] = error.value.problems
    assert "not readable by others (mode 0600)" in problem.message
    assert "SECRETHASH" not in str(error.value)


def test_a_problem_shows_control_characters_escaped(tmp_path):
    """A newline or an escape sequence in an include's name forged a line of the
    service's log and reached the admin's terminal: every problem is one line, its
    control and bidi characters escaped."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        'version: 1\nprofiles:\n  default:\n    include: ["./x\\e]0;pwned\\a\\nFORGED \\u202e"]\n'
    )
    with pytest.raises(PolicyError) as error:
        load_policy(rules)
    text = str(error.value)
    assert "\n" not in text and "\x1b" not in text and "\u202e" not in text
    assert "\\x1b]0;pwned\\x07\\x0aFORGED \\u202e" in text


SHADOW = "root:*:20228:0:99999:7:::\nalice:$6$salt$SECRETHASH:20000:0:99999:7:::\n"
DEPLOY = 65534  # a deploy user who may write where the rule files are


@pytest.fixture
def deploy_dir():
    """(a root-only stand-in for /etc/shadow, a directory the deploy user owns)."""
    with tempfile.TemporaryDirectory() as where:
        os.chmod(where, 0o755)
        secret, deploy = Path(where) / "shadow", Path(where) / "deploy"
        secret.write_text(SHADOW)
        secret.chmod(0o600)
        deploy.mkdir()
        os.chown(deploy, DEPLOY, DEPLOY)
        yield secret, deploy


def _problems(rules: Path) -> str:
    with pytest.raises(PolicyError) as error:
        load_policy(rules)
    return str(error.value)


def test_the_top_rule_file_as_a_link_to_a_root_only_file_is_not_quoted(deploy_dir):
    """Found by the second red team: the deploy user replaced the service's rule file,
    in a directory it may write, with a link to a root-only file. A file without
    `version: 1` at its top is read no further, so nothing of it is quoted."""
    secret, deploy = deploy_dir
    (deploy / "rules.yaml").symlink_to(secret)
    text = _problems(deploy / "rules.yaml")
    assert "SECRETHASH" not in text and "alice" not in text
    assert "missing 'version: 1' at the top of the file (nothing else of it is read)" in text


def test_an_include_named_where_others_may_write_is_not_quoted(deploy_dir):
    """Root's own file includes ./deploy/team.yaml; the deploy user made it a link to a
    root-only file (whose name they choose, the file is root's)."""
    secret, deploy = deploy_dir
    top = deploy.parent / "rules.yaml"
    top.write_text("version: 1\nprofiles:\n  default:\n    include: [./deploy/team.yaml]\n")
    (deploy / "team.yaml").symlink_to(secret)
    assert "SECRETHASH" not in _problems(top)


def test_an_include_swapped_for_a_link_as_it_is_read_is_not_quoted(deploy_dir):
    """The deploy user kept exchanging its own readable include with a link to a
    root-only file (renameat2 RENAME_EXCHANGE) between the check and the open: 12 %
    of loads quoted it. Whatever is opened, a file that is no rule file is not."""
    secret, deploy = deploy_dir
    rules, team, other = deploy / "rules.yaml", deploy / "team.yaml", deploy / "other"
    rules.write_text("version: 1\nprofiles:\n  default:\n    include: [./team.yaml]\n")
    team.write_text("version: 1\nrules:\n  - allow: example.com\n")
    for path in (rules, team):
        os.chown(path, DEPLOY, DEPLOY)
    other.symlink_to(secret)
    libc = ctypes.CDLL(None, use_errno=True)
    stop = threading.Event()

    def exchange() -> None:
        a, b = str(team).encode(), str(other).encode()
        while not stop.is_set():
            libc.renameat2(-100, a, -100, b, 2)  # AT_FDCWD, RENAME_EXCHANGE

    racer = threading.Thread(target=exchange)
    racer.start()
    try:
        deadline, loads = time.monotonic() + 2, 0
        while time.monotonic() < deadline:
            loads += 1
            try:
                load_policy(rules)
            except PolicyError as e:
                assert "SECRETHASH" not in str(e), f"quoted after {loads} loads"
    finally:
        stop.set()
        racer.join()
