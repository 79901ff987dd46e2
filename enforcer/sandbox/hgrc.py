"""Which entries of a Mercurial repository's config the host's `hg` would act on as
code, pure.

`hg` reads `.hg/hgrc` (and `.hg/hgrc-not-shared`) of the repository it runs in, and
trusts it when its owner is the user who runs `hg`: through the idmapped workspace,
a file the task writes is the workspace owner's, so it is trusted. Such a file runs
code on the next `hg status` (a shell prompt's, an editor's): `[hooks] pre-status =
CMD`, `[extensions] x = /path/x.py`, `[ui] ssh`, merge tools, `%include` of more.
As for git (gitconfig.py), the check goes the other way: everything is code but what
`hg clone` writes itself and a user sets for ordinary work (`[paths]`, `[ui]
username`). A line this reader cannot follow counts as code: fail closed.

The syntax is mercurial/config.py `parse`, line by line with its own regular
expressions (ASCII white space; lines split at \n, \r\n and \r as bytes.splitlines
does: a form feed is not a line end to hg, and a reader that split there too would
see a `[paths]` header that hg does not): `%include FILE`, blank and comment lines
(`#` or `;` in the first column), `[section]` (the rest of the line ignored),
`name = value`, a value continued on lines that start with white space, `%unset
NAME`; anything else is an error to hg (which then runs nothing).
"""

from __future__ import annotations

import re

# (section, name): "*" is any name. Nothing here names a program or a file to read:
# [paths] are URLs and local paths of other clones (and their :sub-options), pulled
# from or pushed to only when the user asks.
DATA_ENTRIES = frozenset({("paths", "*"), ("ui", "username")})

_LINES = re.compile(r"\r\n|\r|\n")
_SECTION = re.compile(r"\[([^\[]+)\]", re.ASCII)
_ITEM = re.compile(r"([^=\s][^=]*?)\s*=\s*(.*\S|)", re.ASCII)
_CONTINUED = re.compile(r"\s+(\S|\S.*\S)\s*$", re.ASCII)
_EMPTY = re.compile(r"(;|#|(\s*$))", re.ASCII)
_COMMENT = re.compile(r"(;|#)")
_DIRECTIVE = re.compile(r"%(include|unset)\s", re.ASCII)


def code_entries(text: str) -> list[str]:
    """The `section.name` of every entry that is not plain data (DATA_ENTRIES), in
    order, each once; a directive (`%include`: more config) or a line hg cannot parse
    is one entry saying what it is."""
    found: list[str] = []
    section, continued = "", False
    for number, line in enumerate(_LINES.split(text.removeprefix("\ufeff")), 1):
        if continued and (_COMMENT.match(line) or _CONTINUED.match(line)):
            continue
        continued = False
        if directive := _DIRECTIVE.match(line):
            found.append(f"line {number}: %{directive.group(1)}")
        elif _EMPTY.match(line):
            continue
        elif section_match := _SECTION.match(line):
            section = section_match.group(1)
        elif item := _ITEM.match(line):
            continued, name = True, item.group(1)
            if (section, "*") in DATA_ENTRIES or (section, name) in DATA_ENTRIES:
                continue
            if (key := f"{section}.{name}") not in found:
                found.append(key)
        else:
            found.append(f"line {number}: not hgrc syntax")
    return found
