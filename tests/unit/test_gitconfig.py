"""The git config reader of the workspace guard (enforcer/sandbox/gitconfig.py): which
keys count as code, and that a file it cannot follow counts as code too."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from sandgate.enforcer.sandbox.gitconfig import code_keys, parse_config

CLONED = """\
[core]
\trepositoryformatversion = 0
\tfilemode = true
\tbare = false
\tlogallrefupdates = true
[remote "origin"]
\turl = https://example.test/repo.git
\tfetch = +refs/heads/*:refs/remotes/origin/*
[branch "main"]
\tremote = origin
\tmerge = refs/heads/main
[submodule "lib/x"]
\turl = ../x.git
\tactive = true
[user]
\tname = "Agent ; not a comment"
\temail = agent@example.test # a comment
"""


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param(CLONED, [], id="what-git-writes-for-a-clone"),
        pytest.param("", [], id="empty"),
        pytest.param("\ufeff[core]\n\tbare = false\n", [], id="byte-order-mark"),
        pytest.param("[core]\n\tfsmonitor = touch /tmp/x\n", ["core.fsmonitor"], id="fsmonitor"),
        pytest.param("[CORE]\n\tHooksPath = h\n", ["core.hookspath"], id="case-insensitive"),
        pytest.param(
            "[core] sshCommand = evil\n", ["core.sshcommand"], id="variable-on-header-line"
        ),
        pytest.param('[filter "x"]\n\tclean = evil\n', ["filter.x.clean"], id="filter-driver"),
        pytest.param("[diff]\n\texternal = evil\n", ["diff.external"], id="diff-external"),
        pytest.param("[include]\n\tpath = ../x\n", ["include.path"], id="include"),
        pytest.param(
            '[includeIf "gitdir:/"]\n\tpath = x\n', ["includeif.gitdir:/.path"], id="include-if"
        ),
        pytest.param("[core.x]\n\tfsmonitor = e\n", ["core.x.fsmonitor"], id="legacy-subsection"),
        pytest.param(
            '[remote "o"]\n\turl = x\n\tuploadpack = evil\n',
            ["remote.o.uploadpack"],
            id="uploadpack",
        ),
        pytest.param(
            "[user]\n\tname = a \\\n\n[core]\n\tpager = evil\n", ["core.pager"], id="continuation"
        ),
        pytest.param(
            '[user]\n\tname = "x # y" ; [core] pager = z\n', [], id="comment-after-quoted-value"
        ),
        pytest.param("[alias]\n\tco = !evil\n", ["alias.co"], id="alias"),
        pytest.param("[core]\n\tfsmonitor\n", ["core.fsmonitor"], id="bare-name-is-true"),
    ],
)
def test_code_keys(text, expected):
    assert code_keys(text) == expected


@pytest.mark.parametrize(
    "text, line",
    [
        pytest.param("fsmonitor = x\n", 1, id="variable-before-section"),
        pytest.param("[core\n", 1, id="unterminated-header"),
        pytest.param('[core "x]\n', 1, id="unterminated-subsection"),
        pytest.param("[core]\n\t9x = 1\n", 2, id="bad-name"),
        pytest.param('[core]\n\tx = "open\n', 2, id="unterminated-quote"),
        pytest.param("[core]\n\tx = a\\q\n", 2, id="unknown-escape"),
        pytest.param("[core]\n\tx = a\\", 2, id="continuation-at-end"),
        pytest.param("[core]\n\tx y\n", 2, id="missing-equals"),
    ],
)
def test_what_the_reader_cannot_follow_is_code(text, line):
    with pytest.raises(ValueError, match=f"^line {line}: "):
        parse_config(text)
    assert code_keys(text)[0].startswith(f"unreadable config (line {line}: ")


def test_values_as_git_reads_them():
    entries = parse_config('[a "Sub \\" x"]\n\tk = " two  spaces "  tail # c\n\tb\n')
    assert [(e.key, e.value) for e in entries] == [
        ('a.Sub " x.k', " two  spaces   tail"),
        ('a.Sub " x.b', None),
    ]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize(
    "text",
    [
        CLONED,
        "[core] fsmonitor = a\n",
        '[x "y"]\n\tk = "q;#" # c\n',
        "[a]\n\tk = one \\\n  two\n",
        '[includeIf "gitdir:/w/"]\n\tpath = p\n',
    ],
)
def test_the_same_keys_as_git_reads(tmp_path, text):
    """Differential: the keys are those `git config --list` finds in the same file."""
    path = tmp_path / "config"
    path.write_text(text)
    listed = subprocess.run(
        ["git", "config", "--file", str(path), "--list", "--name-only"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert [e.key for e in parse_config(text)] == listed
