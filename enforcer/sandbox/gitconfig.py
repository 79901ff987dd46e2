"""Which keys of a git config file the host's git would act on as code, pure.

A task may leave a repository in the workspace whose config (`.git/config`,
`config.worktree`, a bare repository's `config`) names a program: `core.fsmonitor`,
`core.hooksPath`, `core.sshCommand`, `diff.external`, a filter or merge driver, an
`include.path` to more of the same... and the user's next `git status` on the host
runs it. Listing the dangerous keys would be a race against every git release, so
the check goes the other way: `code_keys` returns every key that is NOT one git
itself writes for ordinary work (init, clone, remote, branch tracking, fetch,
worktrees, submodules, sparse checkout, user identity). An unknown key, like a file
this reader cannot follow, counts as code: fail closed.

The reader follows git's syntax (config.c `git_parse_source`): `[section]`,
`[section "subsection"]`, the old `[section.subsection]`, a variable on the same
line as its header, `name = value` or a bare `name` (true), quotes, backslash
escapes, a backslash at the end of a line continuing the value, `#` and `;`
comments. It raises ValueError naming the line for anything else.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

# Keys git writes for ordinary work, none of which names a program or another file
# to read. `*` is any subsection (a remote's, a branch's, a submodule's name).
DATA_KEYS = frozenset(
    {
        "core.repositoryformatversion",
        "core.filemode",
        "core.bare",
        "core.logallrefupdates",
        "core.ignorecase",
        "core.precomposeunicode",
        "core.symlinks",
        "core.autocrlf",
        "core.eol",
        "core.safecrlf",
        "core.sparsecheckout",
        "core.sparsecheckoutcone",
        "core.quotepath",
        "core.abbrev",
        "core.untrackedcache",
        "core.commitgraph",
        "core.multipackindex",
        "extensions.objectformat",
        "extensions.worktreeconfig",
        "extensions.refstorage",
        "remote.*.url",
        "remote.*.pushurl",
        "remote.*.fetch",
        "remote.*.push",
        "remote.*.tagopt",
        "remote.*.mirror",
        "remote.*.prune",
        "branch.*.remote",
        "branch.*.merge",
        "branch.*.rebase",
        "branch.*.pushremote",
        "branch.*.description",
        "submodule.*.url",
        "submodule.*.active",
        "submodule.*.branch",
        "user.name",
        "user.email",
        "init.defaultbranch",
        "pull.rebase",
        "pull.ff",
        "push.default",
        "push.autosetupremote",
        "fetch.prune",
        "gc.auto",
        "color.ui",
        "index.version",
        "feature.manyfiles",
    }
)
MAX_CONFIG_BYTES = 1 << 20  # a bigger file is not read: it counts as code

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_SECTION = re.compile(r"[A-Za-z0-9.-]+")


@dataclass(frozen=True)
class ConfigEntry:
    """One variable: `key` in git's canonical form (section and name lower case, the
    subsection as written), and its value (None for a bare name, which is true)."""

    section: str
    subsection: str | None
    name: str
    value: str | None
    line: int

    @property
    def key(self) -> str:
        middle = f".{self.subsection}" if self.subsection is not None else ""
        return f"{self.section}{middle}.{self.name}"

    @property
    def pattern(self) -> str:
        """The key with its subsection as `*`, as DATA_KEYS lists it."""
        return f"{self.section}.*.{self.name}" if self.subsection is not None else self.key


def parse_config(text: str) -> list[ConfigEntry]:
    """Every variable of a git config file, in order; ValueError("line N: ...")."""
    entries: list[ConfigEntry] = []
    lines = text.removeprefix("\ufeff").split("\n")
    section: tuple[str, str | None] | None = None
    index = 0
    while index < len(lines):
        number, rest = index + 1, lines[index].strip(" \t\r")
        index += 1
        if rest.startswith("["):
            section, rest = _header(rest, number)
            rest = rest.strip(" \t\r")
        if not rest or rest[0] in "#;":
            continue
        if section is None:
            raise ValueError(f"line {number}: a variable before any [section]")
        match = _NAME.match(rest)
        if match is None:
            raise ValueError(f"line {number}: not a variable name: {rest[:40]!r}")
        name, rest = match.group(0).lower(), rest[match.end() :].lstrip(" \t")
        value = None
        if rest and rest[0] not in "#;\r":
            if rest[0] != "=":
                raise ValueError(f"line {number}: expected '=' after {name!r}")
            value, index = _value(rest[1:], lines, index, number)
        entries.append(ConfigEntry(section[0], section[1], name, value, number))
    return entries


def _header(text: str, number: int) -> tuple[tuple[str, str | None], str]:
    """`[section]`, `[section "sub"]` or `[section.sub]`; returns it and what follows."""
    match = _SECTION.match(text, 1)
    if match is None:
        raise ValueError(f"line {number}: a malformed section header")
    name, at = match.group(0), match.end()
    if text[at : at + 1] == "]":
        section, _, legacy = name.partition(".")
        if not section:
            raise ValueError(f"line {number}: a malformed section header")
        return (section.lower(), legacy.lower() if legacy else None), text[at + 1 :]
    if text[at : at + 2] != ' "' or "." in name:
        raise ValueError(f"line {number}: a malformed section header")
    sub, at = [], at + 2
    while at < len(text) and text[at] != '"':
        if text[at] == "\\":
            at += 1
            if at >= len(text):
                break
        sub.append(text[at])
        at += 1
    if text[at : at + 2] != '"]':
        raise ValueError(f"line {number}: an unterminated subsection name")
    return (name.lower(), "".join(sub)), text[at + 2 :]


_ESCAPES = {"n": "\n", "t": "\t", "b": "\b", '"': '"', "\\": "\\"}


def _value(text: str, lines: list[str], index: int, number: int) -> tuple[str, int]:
    """A value from after its '=', following continuation lines; returns it and the
    index of the next unread line."""
    out: list[str] = []
    quoted = False
    pending_space = ""
    at = 0
    while True:
        if at >= len(text) or text[at] == "\r" and at == len(text) - 1:
            if quoted:
                raise ValueError(f"line {number}: an unterminated quoted value")
            return "".join(out), index
        c = text[at]
        at += 1
        if c == "\\":
            if at >= len(text):  # a continuation: the value goes on on the next line
                if index >= len(lines):
                    raise ValueError(f"line {number}: a continuation at the end of the file")
                text, at, index = lines[index], 0, index + 1
                continue
            escaped = _ESCAPES.get(text[at])
            if escaped is None:
                raise ValueError(f"line {number}: an unknown escape \\{text[at]}")
            out.append(pending_space + escaped)
            pending_space, at = "", at + 1
        elif c == '"':
            quoted = not quoted
        elif not quoted and c in "#;":
            return "".join(out), index
        elif not quoted and c in " \t":
            if out:
                pending_space += c
        else:
            out.append(pending_space + c)
            pending_space = ""


def code_keys(text: str) -> list[str]:
    """The keys of a config file that are not plain data (DATA_KEYS), in order, each
    once; a file that cannot be read as git config is one entry saying why."""
    try:
        entries = parse_config(text)
    except ValueError as e:
        return [f"unreadable config ({e})"]
    found: list[str] = []
    for entry in entries:
        if entry.pattern not in DATA_KEYS and entry.key not in found:
            found.append(entry.key)
    return found


# What a repository's own config (one that was there before the task) names on disk,
# for the guard to protect when it lies in the workspace. Keys whose whole value is a
# path; of every other key that is not data, each word of the value with a `/` in it
# (a shell command's `./scripts/x`, `!tools/lint.sh`), URLs aside. A word without one
# is looked up on PATH by the shell git starts, not in the work tree.
PATH_NAMES = frozenset({"path", "hookspath", "attributesfile"})
# Keys whose value is a path git only reads as data or works in, never runs or reads
# as config (naming them would make, say, a submodule's work tree read-only).
DATA_PATH_KEYS = frozenset(
    {
        "core.worktree",
        "core.excludesfile",
        "commit.template",
        "blame.ignorerevsfile",
        "mailmap.file",
        "diff.orderfile",
        "gpg.ssh.allowedsignersfile",
        "lfs.fetchinclude",
        "lfs.fetchexclude",
        "http.cookiefile",
        "http.sslcainfo",
    }
)
_BOOLEANS = frozenset({"", "true", "false", "yes", "no", "on", "off", "1", "0"})
_SHELL_PUNCTUATION = "();|&<>`$\"'"


@dataclass(frozen=True)
class NamedPath:
    """A file or directory a config entry names: `text` as written (`~` not expanded).
    An `include` is more config, relative to the including file's directory; anything
    else git runs (or what is in it), relative to the work tree's top."""

    entry: ConfigEntry
    text: str
    include: bool

    def describe(self) -> str:
        return f"{self.entry.key} = {self.entry.value}"


def named_paths(entries: list[ConfigEntry]) -> list[NamedPath]:
    """The paths a config's entries name, in order (see PATH_NAMES)."""
    found = []
    for entry in entries:
        value = entry.value
        if entry.pattern in DATA_KEYS or entry.key in DATA_PATH_KEYS or value is None:
            continue
        if value.strip().lower() in _BOOLEANS:
            continue
        include = entry.section in ("include", "includeif") and entry.name == "path"
        if entry.name in PATH_NAMES:
            found.append(NamedPath(entry, value.strip(), include))
            continue
        for word in _words(value.strip().removeprefix("!")):
            word = word.rsplit("=", 1)[-1].strip(_SHELL_PUNCTUATION)
            if ("/" in word or word.startswith("~")) and "://" not in word:
                found.append(NamedPath(entry, word, include=False))
    return found


def _words(command: str) -> list[str]:
    """A shell command's words as sh would split them, roughly (a quote or operator
    that shlex cannot follow: split at white space; a path word is found either way)."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        return list(lexer)
    except ValueError:
        return command.split()
