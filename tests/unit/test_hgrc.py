"""hgrc.code_entries: what of a Mercurial repository's config would run code on the
host (enforcer/sandbox/hgrc.py), read as mercurial/config.py reads it."""

from __future__ import annotations

import pytest
from sandgate.enforcer.sandbox import hgrc

CLONED = """\
# example repository config (see 'hg help config' for more info)
[paths]
default = https://hg.example.test/repo
default:pushurl = ssh://hg.example.test/fork

[ui]
# username = Jane Doe <jdoe@example.com>
username = Jane
"""


def test_what_hg_clone_writes_is_data():
    assert hgrc.code_entries(CLONED) == []
    assert hgrc.code_entries("") == []


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("[hooks]\npre-status = touch x\n", ["hooks.pre-status"]),
        ("[extensions]\nx = /tmp/x.py\n", ["extensions.x"]),
        ("[ui]\nssh = evil\n", ["ui.ssh"]),
        ("[paths]\ndefault = x\n%include other.rc\n", ["line 3: %include"]),
        ("%unset paths.default\n", ["line 1: %unset"]),
        # The rest of a header line is ignored by hg: `[hooks]` is the section.
        ("[paths]\n[hooks]x\npre-status = y\n", ["hooks.pre-status"]),
        ("[paths]\n[hooks]=x\npre-status = y\n", ["hooks.pre-status"]),
        # A form feed, a vertical tab, U+2028 end no line to hg (bytes.splitlines).
        ("[paths]\n#c\f[paths]\n[hooks]\na = b\n", ["hooks.a"]),
        ("[hooks]\na = b\x0b[paths]\nc = d\n", ["hooks.a", "hooks.c"]),
        ("[hooks]\na = b\u2028[paths]\nc = d\n", ["hooks.a", "hooks.c"]),
        # \r alone is a line end to hg.
        ("[paths]\rdefault = x\r[hooks]\ra = b\r", ["hooks.a"]),
        # A value goes on over indented lines (and comment lines) after an item.
        ("[paths]\ndefault = x\n  [hooks]\n#c\n  more\n", []),
        # An indented line with no item before it is an error to hg: code, to be safe.
        ("[paths]\n\n  a = b\n", ["line 3: not hgrc syntax"]),
        ("[paths]\nnot an item\n", ["line 2: not hgrc syntax"]),
        ("[ paths ]\na = b\n", [" paths .a"]),  # hg does not strip a section's name
    ],
)
def test_code_entries(text, found):
    assert hgrc.code_entries(text) == found
