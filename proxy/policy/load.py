"""Rule files (YAML, version 1) -> CompiledPolicy, or PolicyError naming every mistake.

The file's shape is checked node by node on PyYAML's composed tree, so each problem
carries FILE:LINE:COL. All problems of all files are collected before raising:
an admin fixes a file in one pass. Nothing is half-loaded: either every file,
include and profile is valid and a new CompiledPolicy exists, or nothing changes.

    version: 1
    profiles:
      NAME:
        fallback: deny | ask | audit          (default deny; inherited through extends)
        extends: OTHER-PROFILE
        include: [PRESET-NAME | relative/path.yaml, ...]
        limits: {connections: 512, pending: 64, dns_qps: 50, connection_rate: 200,
                 leaf_rate: 10}               (per sandbox; per key inherited through
                                              extends)
        rules:
          - allow | deny: TARGET or [TARGET, ...]   domain, *.domain, IP or CIDR
            ports: [443, ...]                        default [80, 443]
            methods: [GET, ...]                      needs HTTP inspection
            paths: ["/repos/**", ...]                needs HTTP inspection
            websocket: true                          allows WebSocket upgrades (default false)
            id, comment, owner, ticket, expires: YYYY-MM-DD (or an instant with its zone)

A preset (rules/presets/NAME.yaml) is `version: 1`, optional `description`,
`include`, and `rules`.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import gc
import hashlib
import itertools
import os
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import yaml

from .files import (  # noqa: F401 - re-exported
    DEFAULT_RULES,
    PRESETS_DIR,
    RULES_DIR,
    SHIPPED_RULES_DIR,
    anyone_may_read,
    content_input,
    display_path,
    only_root_writes,
    read_regular_file,
    resolve,
)
from .index import CompiledPolicy, CompiledProfile
from .model import (
    DEFAULT_APPROVAL,
    DEFAULT_LIMITS,
    DEFAULT_PORTS,
    HTTP_METHODS,
    MAX_APPROVAL,
    MAX_LIMITS,
    ApprovalSettings,
    Limits,
    PathPattern,
    Rule,
    parse_duration,
)
from .names import (
    DomainPattern,
    InvalidAddress,
    InvalidName,
    decoded_printable,
    folded,
    module_path,
    parse_domain,
    parse_domain_pattern,
    parse_host_port,
    parse_ip,
    parse_network,
    parse_path,
)
from .problems import PolicyError, Problem
from .reasons import Verdict

RULE_KEYS = {
    "allow",
    "deny",
    "ask",
    "ports",
    "methods",
    "paths",
    "websocket",
    "id",
    "comment",
    "owner",
    "ticket",
    "expires",
}
PROFILE_KEYS = {"fallback", "extends", "include", "rules", "limits", "approval", "description"}
APPROVAL_KEYS = {f.name for f in dataclasses.fields(ApprovalSettings)}
ACTIONS = {"allow": Verdict.ALLOW, "deny": Verdict.DENY, "ask": Verdict.ASK}
# The overlay of rules approved "always" (sandgate approvals approve --always): loaded
# with the rules when it lies next to the first rule file (docs/approvals.md).
APPROVED_FILE = "approved.yaml"
LIMIT_KEYS = {f.name for f in dataclasses.fields(Limits)}
FALLBACKS = {"deny": Verdict.DENY, "ask": Verdict.ASK, "audit": Verdict.AUDIT}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_MAYBE_IPV4 = re.compile(r"[\s0-9a-fA-FxX.]+")  # every IPv4 spelling parse_ip reads fits this
# A rule file nests about 6 deep (file > profiles > profile > rules > rule > list). libyaml
# composes by recursion in C: some 30,000 levels (`[[[[...`, `- - - ...`: a 100 kB file)
# overflow the stack and kill the process. Deeper than this is refused before composing.
MAX_NESTING = 100
# YAML aliases (`*names`) repeat what their anchor (`&names`) holds wherever they stand:
# N aliases of an anchor of N values make N*N values out of a file of N lines, each
# read (and kept) by the loader: a 66 kB file took 3 s and 448 MB. The values aliases
# stand for, over a whole file (nested ones counted out), are bounded by this.
MAX_ALIAS_NODES = 100_000
# Presets including presets, profiles extending profiles: a real policy goes a few
# levels deep. Both are followed by recursion, and some 900 levels (a generated or
# looping-by-copy set of files) ended every load in a RecursionError: a traceback from
# `rules lint`, a start or reload failing with no FILE:LINE. Deeper is a problem here.
MAX_CHAIN = 32


class _YamlLoader(
    getattr(yaml, "CSafeLoader", yaml.SafeLoader)
):  # libyaml when present: same marks
    """Composes nodes with line/column marks; resolves only `null`. The checks below
    read every other scalar as text, and regex tag resolution (ints, floats, dates,
    booleans) would cost a third of the parse of a big file."""


_YamlLoader.yaml_implicit_resolvers = {
    first: kept
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    if (kept := [(tag, regex) for tag, regex in resolvers if tag == "tag:yaml.org,2002:null"])
}


@dataclass
class _Source:
    """One parsed file: where it is, and its top-level node."""

    path: Path
    display: str  # for messages: as the admin would type it (relative to the cwd if below it)
    root: yaml.Node | None
    name: str = ""  # for identity: relative to the rules root, the same from any cwd
    data: bytes = b""  # as read: the policy hash is of these bytes


@dataclass
class _RawProfile:
    name: str
    source: _Source
    node: yaml.Node
    fallback: tuple[Verdict, int] | None = None  # verdict, line
    extends: tuple[str, yaml.Node] | None = None
    includes: list[tuple[str, yaml.Node]] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)  # only the caps the profile sets
    approval: dict[str, float] = field(default_factory=dict)  # only the settings it sets


class _Loader:
    def __init__(self, today: datetime.date, now: float):
        self.today = today
        self.now = now  # rules expired by then are kept aside
        self.root: Path | None = (
            None  # the directory of the first rule file: names are relative to it
        )
        self.problems: list[Problem] = []
        self.sources: dict[Path, _Source] = {}
        # Every path read or tried, in order, with where a name led (a symlink's
        # real path; None for a real path): CompiledPolicy's `paths` and `inputs`.
        self.tried: dict[Path, Path | None] = {}
        self.preset_rules: dict[Path, list[Rule]] = {}
        self.preset_descriptions: dict[str, str] = {}  # by the preset file's stable name
        self.rule_ids: dict[str, Rule] = {}
        # Where each rule's node starts (file, line, column): a node met again there is
        # an alias; two rules on one line are two nodes.
        self.rule_places: dict[str, tuple[str, int, int]] = {}
        # `approved:` sections (the overlay file): profile -> (rules, where named)
        self.approved: dict[str, list[tuple[list[Rule], _Source, yaml.Node]]] = {}
        # One object per distinct port set: 100k rules share a handful, and a shared
        # set stays in the CPU cache while decide() reads it.
        self.port_sets: dict[frozenset[int], frozenset[int]] = {DEFAULT_PORTS: DEFAULT_PORTS}

    # --- problems and node helpers --------------------------------------------------

    def problem(self, source: _Source, node: yaml.Node | None, message: str) -> None:
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
        self.problems.append(Problem(source.display, line, col, message))

    def mapping(
        self, source: _Source, node: yaml.Node, what: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping node as {key: (key_node, value_node)}; reports non-mappings and
        duplicate keys (PyYAML would silently keep the last one)."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(source, node, f"{what} must be a mapping")
            return {}
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                self.problem(source, key_node, f"{what}: keys must be plain words")
            elif key in result:
                self.problem(source, key_node, f"{what}: duplicate key {key!r}")
            else:
                result[key] = (key_node, value_node)
        return result

    def check_keys(self, source, entries, allowed: set[str], what: str) -> None:
        for key, (key_node, _) in entries.items():
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.problem(
                    source, key_node, f"unknown key {key!r} in {what} (expected one of: {hint})"
                )

    def scalar(self, source, node, what: str) -> str | None:
        if (
            isinstance(node, yaml.ScalarNode)
            and node.value != ""
            and node.tag != "tag:yaml.org,2002:null"
        ):
            return node.value
        self.problem(source, node, f"{what} must be a single value")
        return None

    def scalars(self, source, node, what: str) -> list[tuple[str, yaml.Node]]:
        """A scalar or a list of scalars, each with its node (for line numbers)."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if isinstance(node, yaml.SequenceNode) and not items:
            self.problem(source, node, f"{what} must not be an empty list")
        result = []
        for item in items:
            value = self.scalar(source, item, f"each entry of {what}")
            if value is not None:
                result.append((value, item))
        return result

    # --- files ------------------------------------------------------------------------

    def read(self, path: Path, referrer: tuple[_Source, yaml.Node] | None = None) -> _Source | None:
        # Watched by the name it was given too: a symlink swapped to another file
        # (`ln -sfn`) changes that name's target, not the old target's stamp.
        named = Path(os.path.abspath(path))
        path = resolve(path)
        self.tried.setdefault(named, path)
        if path in self.sources:
            return self.sources[path]
        self.tried[path] = None
        display = display_path(path)
        try:
            # Root reads what an include names, and a problem quotes its lines (an
            # include of /etc/shadow put password hashes in the log, the audit log and
            # the reload's reply): a rule file others than root may write includes
            # only what anyone may read.
            if (
                referrer is not None
                and not only_root_writes(referrer[0].path)
                and (why := anyone_may_read(path))
            ):
                raise PermissionError(
                    errno.EACCES,
                    f"{why}; {referrer[0].display} may be written by others than root, "
                    "so what it includes must be readable by anyone",
                )
            data = read_regular_file(path)
        except OSError as e:
            message = f"cannot read rule file {display}: {e.strerror or e}"
            if referrer:
                self.problem(*referrer, message)
            else:
                self.problems.append(Problem(display, 1, 1, message))
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            self.problems.append(
                Problem(
                    display,
                    line,
                    column,
                    f"the file is not UTF-8 (byte {data[e.start]:#04x}); save it as UTF-8",
                )
            )
            return None
        source = _Source(path, display, None, name=self.stable_name(path), data=data)
        try:
            if found := _refused_yaml(text):
                mark, message = found
                self.problems.append(Problem(display, mark.line + 1, mark.column + 1, message))
                return None
            source.root = yaml.compose(text, Loader=_YamlLoader)
        except yaml.reader.ReaderError as e:  # a character YAML does not allow; no mark
            at = max(0, min(e.position, len(text)))
            line = text.count("\n", 0, at) + 1
            column = at - (text.rfind("\n", 0, at) + 1) + 1
            what = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
            self.problems.append(
                Problem(display, line, column, f"YAML syntax error: character {what}: {e.reason}")
            )
            return None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            reason = getattr(e, "problem", None) or str(e)
            # One line, as every problem is: FILE:LINE:COL: message.
            reason = " ".join(reason.split())
            self.problems.append(Problem(display, line, col, f"YAML syntax error: {reason}"))
            return None
        self.sources[path] = source
        if source.root is None:
            self.problems.append(Problem(display, 1, 1, "empty rule file (expected 'version: 1')"))
            return None
        return source

    def stable_name(self, path: Path) -> str:
        """The file's name in rule ids, events and the policy hash: relative to the rules
        root (the first file's directory), or to the shipped rules for a preset; never
        to the working directory, so one rule has one id wherever it was loaded from."""
        if self.root is None:
            self.root = path.parent
        if path.is_relative_to(self.root):
            return path.relative_to(self.root).as_posix()
        if path.is_relative_to(SHIPPED_RULES_DIR):
            return path.relative_to(SHIPPED_RULES_DIR).as_posix()
        return os.path.relpath(path, self.root)

    def file_entries(self, source: _Source, what: str) -> dict | None:
        """The top mapping of a rule or preset file, or None (reported) when it is none:
        not a mapping, or without `version: 1`. Then nothing else of it is read or
        quoted: it may be any file root can read, and an include of /etc/shadow had
        its lines quoted as unknown keys in the logs."""
        root = source.root
        if not isinstance(root, yaml.MappingNode):
            self.problem(source, root, f"{what} must be a mapping, with 'version: 1' at its top")
            return None
        version = next(
            (v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "version"),
            None,
        )
        if version is None:
            self.problem(
                source,
                root,
                "missing 'version: 1' at the top of the file (nothing else of it is read)",
            )
            return None
        if not (isinstance(version, yaml.ScalarNode) and version.value == "1"):
            shown = version.value[:20] if isinstance(version, yaml.ScalarNode) else "?"
            self.problem(
                source, version, f"unsupported version {shown!r}; this sandgate reads version 1"
            )
            return None
        return self.mapping(source, root, what)

    # --- rules ------------------------------------------------------------------------

    def rules(self, source: _Source, node: yaml.Node) -> list[Rule]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(source, node, "'rules' must be a list of rules")
            return []
        return [r for item in node.value if (r := self.rule(source, item)) is not None]

    def rule(self, source: _Source, node: yaml.Node) -> Rule | None:
        entries = self.mapping(source, node, "a rule")
        if not isinstance(node, yaml.MappingNode):
            return None  # reported by mapping(); `{}` goes on to "needs allow or deny"
        errors_before = len(self.problems)
        self.check_keys(source, entries, RULE_KEYS, "a rule")
        actions = [k for k in ACTIONS if k in entries]
        if len(actions) != 1:
            self.problem(
                source,
                node,
                "a rule needs exactly one of 'allow', 'deny' or 'ask'"
                + (f" (it has {' and '.join(actions)})" if actions else ""),
            )
            return None
        action = actions[0]
        domains, networks = [], []
        for text, item in self.scalars(source, entries[action][1], f"'{action}'"):
            target = self.target(source, item, text)
            if target is not None:
                (domains if isinstance(target, DomainPattern) else networks).append(target)
        ports = self.ports(source, entries["ports"][1]) if "ports" in entries else DEFAULT_PORTS
        methods = self.methods(source, entries["methods"][1]) if "methods" in entries else None
        paths = self.paths(source, entries["paths"][1]) if "paths" in entries else None
        websocket = (
            self.websocket(source, entries["websocket"][1]) if "websocket" in entries else False
        )
        meta = {
            k: self.scalar(source, entries[k][1], f"'{k}'")
            for k in ("comment", "owner", "ticket")
            if k in entries
        }
        expires, expires_at = (
            self.expires(source, entries["expires"][1]) if "expires" in entries else None
        ) or (None, None)
        line = node.start_mark.line + 1
        place = (source.name, line, node.start_mark.column + 1)
        rule_id = f"{source.name}:{line}"
        taken = self.rule_places.get(rule_id)
        if taken is not None and taken[:2] == place[:2] and taken != place:
            # Another rule on this line (`rules: [{allow: a}, {allow: b}]`): the column
            # tells this one apart.
            rule_id += f":{place[2]}"
        if "id" in entries:
            given = self.scalar(source, entries["id"][1], "'id'")
            if given is not None and not _ID.fullmatch(given):
                self.problem(
                    source,
                    entries["id"][1],
                    f"rule id {given!r} may use only letters, digits and . _ : / -",
                )
            elif given is not None:
                rule_id = given
        if rule_id in self.rule_ids:
            other = self.rule_ids[rule_id]
            if self.rule_places[rule_id] == place:  # the same node again
                why = (
                    f"the rule at line {line} is used a second time (a YAML alias?): write it "
                    "out where it is needed, each with an id of its own, or share it with "
                    "'extends'"
                )
            else:
                why = f"duplicate rule id {rule_id!r} (first used at {other.origin})"
            self.problem(source, entries.get("id", (node, node))[1], why)
        if len(self.problems) > errors_before:
            return None
        rule = Rule(
            id=rule_id,
            action=ACTIONS[action],
            file=source.name,
            line=line,
            domains=tuple(domains),
            networks=tuple(networks),
            ports=ports,
            methods=methods,
            paths=paths,
            websocket=websocket,
            path_pattern=_compile_paths(paths, action == "deny") if paths else None,
            expires=expires,
            expires_at=expires_at,
            **meta,
        )
        self.rule_ids[rule_id] = rule
        self.rule_places[rule_id] = place
        return rule

    def target(self, source, node, text: str):
        # (_MAYBE_IPV4 first: most targets are names, and parse_ip is the slower test)
        if (
            "/" in text
            or ":" in text
            or (_MAYBE_IPV4.fullmatch(text) and parse_ip(text) is not None)
        ):
            try:
                return parse_network(text)
            except InvalidAddress as e:
                ip = parse_ip(text.partition("/")[0])
                try:
                    host, port = parse_host_port(text)
                except ValueError:
                    host, port = "", None
                if ip is not None and "/" not in text:
                    self.problem(source, node, f"write the address {text!r} plainly, as {ip}")
                elif port is not None and _is_domain(host):
                    self.problem(
                        source,
                        node,
                        f"{text!r}: give the port in 'ports: [{port}]', not after the name",
                    )
                else:
                    self.problem(source, node, str(e))
                return None
        try:
            return parse_domain_pattern(text)
        except InvalidName as e:
            self.problem(source, node, str(e))
            return None

    def ports(self, source, node) -> frozenset[int]:
        ports = set()
        for text, item in self.scalars(source, node, "'ports'"):
            port = _whole_number(text, 65535)
            if port is None:
                self.problem(source, item, f"port {text!r} is not a number from 1 to 65535")
            elif text.startswith("0"):
                # YAML 1.1 readers (PyYAML, yamllint) take 0443 as octal 291.
                self.problem(
                    source,
                    item,
                    f"port {text!r} has a leading zero (octal to YAML 1.1); write {port}",
                )
            else:
                ports.add(port)
        found = frozenset(ports)
        return self.port_sets.setdefault(found, found)

    def methods(self, source, node) -> frozenset[str]:
        methods = set()
        for text, item in self.scalars(source, node, "'methods'"):
            if text.upper() not in HTTP_METHODS:
                self.problem(
                    source,
                    item,
                    f"unknown HTTP method {text!r} (expected one of: {', '.join(sorted(HTTP_METHODS))})",
                )
            else:
                methods.add(text.upper())
        return frozenset(methods)

    def paths(self, source, node) -> tuple[str, ...]:
        paths = []
        for text, item in self.scalars(source, node, "'paths'"):
            if not text.startswith("/"):
                self.problem(source, item, f"path {text!r} must start with '/'")
            elif any("**" in seg and seg != "**" for seg in text.split("/")):
                self.problem(
                    source,
                    item,
                    f"path {text!r}: '**' must be a whole segment ('/a/**/b' or '/a/**')",
                )
            elif not text.isascii():
                # Requests carry such characters escaped (raw, they are refused), and
                # paths are matched escaped: as written, the rule could never match (a
                # deny of `/café/**` let `/caf%C3%A9/menu` through; a red team, session 50).
                escaped = quote(text, safe="".join(map(chr, range(0x21, 0x7F))))
                self.problem(
                    source,
                    item,
                    f"path {text!r} has characters outside ASCII, which requests carry "
                    f"escaped as UTF-8: write {escaped!r}",
                )
            elif parse_path(text) != text:
                # Requests are matched in canonical form (decide), so a rule written
                # otherwise could never match.
                self.problem(
                    source,
                    item,
                    f"path {text!r} is not canonical (requests are matched after "
                    f"resolving '.', '..', '//' and escapes): write {parse_path(text)!r}",
                )
            else:
                paths.append(text)
        return tuple(paths)

    def websocket(self, source, node) -> bool:
        # A plain true or false only: 'yes', 'on' or "true" in quotes are not guessed at.
        plain = isinstance(node, yaml.ScalarNode) and not node.style  # None or "": not quoted
        if not (plain and node.value in ("true", "false")):
            self.problem(source, node, "'websocket' must be true or false")
            return False
        return node.value == "true"

    def expires(self, source, node) -> tuple[datetime.date | datetime.datetime, float] | None:
        """`expires:` as written, and the instant it stops matching (parse_expires)."""
        text = self.scalar(source, node, "'expires'")
        if text is None:
            return None
        try:
            return parse_expires(text)
        except ValueError as e:
            self.problem(source, node, str(e))
            return None

    def limits(self, source, node) -> dict[str, int]:
        """`limits: {connections: N, ...}`: the caps given, each a whole number
        from 1 to its maximum (MAX_LIMITS)."""
        entries = self.mapping(source, node, "'limits'")
        self.check_keys(source, entries, LIMIT_KEYS, "'limits'")
        found = {}
        for key, (_, value_node) in entries.items():
            if key not in LIMIT_KEYS:
                continue
            text = self.scalar(source, value_node, f"'limits: {key}'")
            if text is None:
                continue
            most = getattr(MAX_LIMITS, key)
            if (number := _whole_number(text, most)) is None:
                self.problem(
                    source,
                    value_node,
                    f"limits: {key} {text!r} is not a whole number from 1 to {most}",
                )
            else:
                found[key] = number
        return found

    def approval(self, source, node) -> dict[str, float]:
        """`approval: {hold: 30s, expire_pending: 24h, max_pending_per_sandbox: 20}`:
        the settings given, durations from 1 s up to their maximum (MAX_APPROVAL)."""
        entries = self.mapping(source, node, "'approval'")
        self.check_keys(source, entries, APPROVAL_KEYS, "'approval'")
        found: dict[str, float] = {}
        for key, (_, value_node) in entries.items():
            if key not in APPROVAL_KEYS:
                continue
            text = self.scalar(source, value_node, f"'approval: {key}'")
            if text is None:
                continue
            most = getattr(MAX_APPROVAL, key)
            if key == "max_pending_per_sandbox":
                if (number := _whole_number(text, most)) is None:
                    self.problem(
                        source,
                        value_node,
                        f"approval: {key} {text!r} is not a whole number from 1 to {most}",
                    )
                else:
                    found[key] = number
                continue
            try:
                seconds = parse_duration(text)
            except ValueError as e:
                self.problem(source, value_node, f"approval: {key}: {e}")
                continue
            if not 1 <= seconds <= most:
                self.problem(
                    source,
                    value_node,
                    f"approval: {key} {text!r} must be from 1s to {int(most)}s",
                )
            else:
                found[key] = seconds
        return found

    def approved_sections(self, source: _Source, node: yaml.Node) -> None:
        """`approved: {PROFILE: [rules]}`: rules a human approved for a profile defined
        in a loaded file (the overlay file approved.yaml); added to its own rules."""
        for name, (key_node, rules_node) in self.mapping(source, node, "'approved'").items():
            rules = self.rules(source, rules_node)
            self.approved.setdefault(name, []).append((rules, source, key_node))

    # --- presets and profiles ---------------------------------------------------------

    def include(
        self, source: _Source, node: yaml.Node, name: str, stack: tuple[Path, ...]
    ) -> list[Rule]:
        """The rules of a preset or included file (recursively), cycle-checked."""
        if "\0" in name:  # no file has such a name; the path calls would raise
            self.problem(source, node, f"no such file or preset {name!r}: a NUL character")
            return []
        if "/" in name or name.endswith((".yaml", ".yml")):
            named = Path(os.path.abspath(source.path.parent / name))  # see read
            path = resolve(named)
            self.tried.setdefault(named, path)
        else:
            named = Path(os.path.abspath(PRESETS_DIR / f"{name}.yaml"))
            path = resolve(named)
            if not path.exists():
                known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
                self.problem(
                    source,
                    node,
                    f"unknown preset {name!r} (shipped presets: {known}; or give a path relative to this file)",
                )
                return []
            self.tried.setdefault(named, path)
        if path in stack:
            chain = " -> ".join(display_path(p) for p in (*stack, path))
            self.problem(source, node, f"circular include: {chain}")
            return []
        if len(stack) > MAX_CHAIN:
            self.problem(
                source, node, f"includes nested more than {MAX_CHAIN} deep (from {stack[0].name})"
            )
            return []
        if path in self.preset_rules:
            return self.preset_rules[path]
        included = self.read(path, referrer=(source, node))
        if included is None:
            return []
        entries = self.file_entries(included, "a preset file")
        if entries is None:
            self.preset_rules[path] = []
            return []
        self.check_keys(
            included, entries, {"version", "description", "include", "rules"}, "a preset file"
        )
        description = entries.get("description", (None, None))[1]
        self.preset_descriptions[included.name] = (
            " ".join(description.value.split()) if isinstance(description, yaml.ScalarNode) else ""
        )
        rules: list[Rule] = []
        if "include" in entries:
            for inner, item in self.scalars(included, entries["include"][1], "'include'"):
                rules += self.include(included, item, inner, (*stack, path))
        if "rules" in entries:
            rules += self.rules(included, entries["rules"][1])
        self.preset_rules[path] = rules
        return rules

    def profiles(self, source: _Source) -> dict[str, _RawProfile]:
        entries = self.file_entries(source, "the rule file")
        if entries is None:
            return {}  # reported; what else is wrong would only be noise
        self.check_keys(
            source, entries, {"version", "profiles", "approved", "description"}, "the rule file"
        )
        if "approved" in entries:
            self.approved_sections(source, entries["approved"][1])
        if "profiles" not in entries and "approved" in entries:
            return {}
        if "profiles" not in entries:
            self.problem(
                source,
                source.root,
                "missing 'profiles:' (a rule file defines at least one profile)",
            )
            return {}
        raw: dict[str, _RawProfile] = {}
        defined = self.mapping(source, entries["profiles"][1], "'profiles'")
        if not defined and isinstance(entries["profiles"][1], yaml.MappingNode):
            # Would load as a policy no task can use: every run fails on its profile.
            self.problem(source, entries["profiles"][1], "'profiles' defines no profile")
        for name, (key_node, node) in defined.items():
            profile = _RawProfile(name, source, key_node)
            fields = self.mapping(source, node, f"profile {name!r}")
            self.check_keys(source, fields, PROFILE_KEYS, f"profile {name!r}")
            if "fallback" in fields:
                word = self.scalar(source, fields["fallback"][1], "'fallback'")
                if word is not None and word not in FALLBACKS:
                    self.problem(
                        source,
                        fields["fallback"][1],
                        f"unknown fallback {word!r} (expected deny, ask or audit)",
                    )
                elif word is not None:
                    profile.fallback = (FALLBACKS[word], fields["fallback"][1].start_mark.line + 1)
            if "extends" in fields:
                parent = self.scalar(source, fields["extends"][1], "'extends'")
                if parent is not None:
                    profile.extends = (parent, fields["extends"][1])
            if "include" in fields:
                profile.includes = self.scalars(source, fields["include"][1], "'include'")
            if "rules" in fields:
                profile.rules = self.rules(source, fields["rules"][1])
            if "limits" in fields:
                profile.limits = self.limits(source, fields["limits"][1])
            if "approval" in fields:
                profile.approval = self.approval(source, fields["approval"][1])
            raw[name] = profile
        return raw

    def resolve(self, raw: dict[str, _RawProfile]) -> dict[str, CompiledProfile]:
        for name, sections in self.approved.items():
            for rules, source, node in sections:
                if name in raw:
                    raw[name].rules += rules
                else:
                    self.problem(
                        source,
                        node,
                        f"approved rules for unknown profile {name!r} (known: {', '.join(sorted(raw))})",
                    )
        done: dict[str, tuple[list[Rule], Rule, dict[str, int], dict[str, float]]] = {}

        compiled: dict[str, CompiledProfile] = {}
        for name in raw:
            rules, fallback, limits, approval = self._effective(raw, done, name, (name,))
            rules = _unique(rules)
            active = [r for r in rules if r.live_at(self.now)]
            expired = [r for r in rules if not r.live_at(self.now)]
            compiled[name] = CompiledProfile.build(
                name,
                active,
                fallback,
                expired,
                dataclasses.replace(DEFAULT_LIMITS, **limits),
                dataclasses.replace(DEFAULT_APPROVAL, **approval),
            )
        return compiled

    def _effective(
        self,
        raw: dict[str, _RawProfile],
        done: dict[str, tuple[list[Rule], Rule, dict[str, int], dict[str, float]]],
        name: str,
        chain: tuple[str, ...],
    ) -> tuple[list[Rule], Rule, dict[str, int], dict[str, float]]:
        """Profile `name`'s rules, fallback, limits and approval settings, its
        `extends` chain resolved. A method, not a closure in `resolve`: a recursive
        closure is a reference cycle (the function and its cell), which kept the
        loader and every YAML node alive until the cyclic GC ran, and `load_policy`
        freezes what is alive (gc.freeze: never collected), so each reload of a
        long-running gateway leaked its loader for good."""
        # Memoised: each profile is resolved once, so a cycle is reported once
        # (at the extends that closes it), and an include's errors once per include.
        if name in done:
            return done[name]
        profile = raw[name]
        rules: list[Rule] = []
        fallback: Rule | None = None
        limits: dict[str, int] = {}
        approval: dict[str, float] = {}
        if profile.extends is not None:
            parent, node = profile.extends
            if parent not in raw:
                self.problem(
                    profile.source,
                    node,
                    f"profile {name!r} extends unknown profile {parent!r} (known: {', '.join(sorted(raw))})",
                )
            elif parent in chain:
                cycle = (*chain[chain.index(parent) :], parent)
                self.problem(profile.source, node, f"circular extends: {' -> '.join(cycle)}")
            elif len(chain) > MAX_CHAIN:
                self.problem(
                    profile.source,
                    node,
                    f"extends nested more than {MAX_CHAIN} deep (from profile {chain[0]!r})",
                )
            else:
                inherited_rules, fallback, limits, approval = self._effective(
                    raw, done, parent, (*chain, parent)
                )
                rules = list(inherited_rules)
        for include, node in profile.includes:
            rules += self.include(profile.source, node, include, (profile.source.path,))
        rules += profile.rules
        if profile.fallback is not None or fallback is None:
            verdict, line = profile.fallback or (Verdict.DENY, profile.node.start_mark.line + 1)
            fallback = Rule(
                id=f"{name}:fallback", action=verdict, file=profile.source.name, line=line
            )
        done[name] = (
            rules,
            fallback,
            {**limits, **profile.limits},
            {**approval, **profile.approval},
        )
        return done[name]


def load_policy(
    paths: list[Path] | Path | str,
    today: datetime.date | None = None,
    now: float | None = None,
) -> CompiledPolicy:
    """Read, validate and compile rule files. Raises PolicyError with every problem.

    `now` (epoch seconds; default: the clock, or the start of `today` when that is
    given) decides which rules have already expired: they are kept aside, reported,
    and never match. Rules that expire later stop matching at their instant, in
    decide() (the facts carry the time); `CompiledPolicy.next_expiry_at` is the first.
    """
    # A load allocates a few objects per YAML node, in a tree without cycles. The
    # cyclic GC would rescan the growing tree again and again: at 100k rules that
    # costs several times the load itself. Paused for the load, then restored.
    # Then the survivors are frozen (moved out of the collected generations): with gc
    # re-enabled, the first collection would otherwise scan every object of a new
    # policy at once, holding the GIL for about a second at 100k rules, which would
    # stall the gateway's loop while a reload's worker thread does it
    # (bench/bench_reload.py). A policy lives until replaced; refcounting frees it then.
    # What the process holds as garbage cycles now (the last load's, a reload's control
    # connection, asyncio's) is collected first: the freeze would keep it for good.
    collecting = gc.isenabled()
    if collecting:
        gc.collect()
    gc.disable()
    try:
        policy = _load(paths, today, now)
        gc.freeze()
        return policy
    finally:
        if collecting:
            gc.enable()


def _load(
    paths: list[Path] | Path | str, today: datetime.date | None, now: float | None
) -> CompiledPolicy:
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    if now is None:
        now = _start_of_day(today) if today is not None else time.time()
    loader = _Loader(today or datetime.date.fromtimestamp(now), now)
    raw: dict[str, _RawProfile] = {}
    all_read = True
    paths = [Path(p) for p in paths]
    overlay = approved_overlay(paths)
    if (
        overlay is not None
        and overlay.exists()
        and resolve(overlay) not in {resolve(p) for p in paths}
    ):
        paths.append(overlay)
    for path in paths:
        source = loader.read(Path(path))
        if source is None:
            all_read = False
            continue
        for name, profile in loader.profiles(source).items():
            if name in raw:
                loader.problem(
                    source,
                    profile.node,
                    f"profile {name!r} is already defined in {raw[name].source.display}",
                )
            else:
                raw[name] = profile
    # Resolve extends and includes even when rules had errors, so that an admin sees
    # every problem at once; but not when a file could not be parsed: its profiles
    # are unknown, and every extends of them would be a false alarm.
    profiles = loader.resolve(raw) if all_read else {}
    if loader.problems:
        raise PolicyError(loader.problems, tuple(loader.tried))
    if overlay is not None:
        # Watched (by both names, see read): its creation is a change too.
        loader.tried.setdefault(Path(os.path.abspath(overlay)), resolve(overlay))
        loader.tried.setdefault(resolve(overlay), None)
    digest = hashlib.sha256()
    # What was parsed (not a second read that may differ), by stable name: the same
    # files give the same hash from any working directory.
    for source in sorted(loader.sources.values(), key=lambda s: s.name):
        digest.update(source.name.encode() + b"\0" + source.data + b"\0")
    return CompiledPolicy(
        profiles=profiles,
        files=tuple(s.display for s in loader.sources.values()),
        hash=digest.hexdigest()[:16],
        rule_count=len(loader.rule_ids),
        loaded_on=loader.today,
        preset_descriptions=loader.preset_descriptions,
        paths=tuple(loader.tried),
        inputs=_inputs(loader),
    )


def _inputs(loader: _Loader) -> tuple[tuple[str, str | None], ...]:
    """What the loader found at each path it tried (files.input_now's form): where a
    name led, the bytes it parsed, no file. From what it saw, never read again."""
    read = {path: content_input(source.data) for path, source in loader.sources.items()}
    return tuple(
        (str(path), f"-> {led}" if led is not None and led != path else read.get(path))
        for path, led in loader.tried.items()
    )


def approved_overlay(paths: list[Path]) -> Path | None:
    """Where `always` approvals go, and are loaded from: approved.yaml next to the
    first rule file; None for the shipped rules (package data is no place to write)."""
    if not paths:
        return None
    first = resolve(Path(paths[0]))
    if first.name == APPROVED_FILE or first.parent == SHIPPED_RULES_DIR.resolve():
        return None
    return first.parent / APPROVED_FILE


def _compile_paths(globs: tuple[str, ...], deny: bool = False) -> PathPattern:
    """Path globs as one anchored regex: `*` stays inside a segment, `**` crosses '/'
    (`/a/**/b` matches `/a/b` and `/a/x/y/b`; `/a/**` matches `/a/` and everything
    below it, but not `/a`: a router written for `/a/`, HAProxy's `path_beg /a/`,
    nginx's `location /a/`, serves `/a` from another backend; a red team, session 50).
    Compiled once, at load.

    A deny rule's globs match more widely, as lenient servers read paths: ignoring
    case (`/ADMIN` is `/admin` to some servers; Unicode case and compatibility forms
    too, names.folded), with everything below what they name (`/admin/`, which
    Express routes to `/admin`, and `/admin.cgi/x`, which runs admin.cgi with the path
    info `/x` in Apache, PHP and every CGI server), and with any suffix after a `.`
    (`/admin.json`: Spring MVC to 5.2 maps every `/p` as `/p.*`, Rails as
    `/p(.:format)`; a red team, session 51): a deny must hold wherever a server serves
    the resource it names. Its segments named with known extensions take their stem
    too (_stem: `/org/secret.git/**` takes `/org/secret/info/refs`), and its
    punctuation stands for any (_denied_literal)."""
    parts = []
    if any("%2F" in glob for glob in globs):  # and with an escaped '/' read as one
        globs = tuple(dict.fromkeys([*globs, *(glob.replace("%2F", "/") for glob in globs)]))
    stems: dict[str, str] = {}  # a stem: the glob it was taken from
    if deny:  # escaped as written and as a decoding server reads it (names.path_readings)
        plain = [decoded_printable(glob) for glob in globs]
        globs = tuple(dict.fromkeys([*globs, *plain, *map(folded, plain)]))
        # and a Go module path written escaped as the proxy reads it (`!e` is `E`)
        globs = tuple(dict.fromkeys([*globs, *(module_path(glob) for glob in globs)]))
        stems = {stem: glob for glob in globs for stem in _stems(glob) if stem != glob}
        stems = {stem: glob for stem, glob in stems.items() if stem not in globs}
        globs = (*globs, *sorted(stems))
    linear = False  # some glob has two wildcards before its end: RE2 (PathPattern)
    for glob in globs:
        # A deny's tail: what it names, and below it or a suffix of it. A repository's
        # stem's: only below it, with its own extension, or the names a forge serves it
        # by (_REPOSITORY_TAIL; `/org/chart.git/**` must not take `/org/chart.js.git`,
        # another repository; a red team, session 52). Rails' `(.:format)` serves a stem
        # with any suffix (`/gems/x.js` for `/gems/x.json`).
        named = _last_name(stems[glob]) if glob in stems else ""
        repository = named.lower().endswith(_REPOSITORY) and _last_name(glob) != named
        below = _REPOSITORY_TAIL if repository else "(?:[/.].*)?"
        if deny and len(glob) > 1:
            glob = glob.removesuffix("/")
        pattern = ""
        pieces = re.split(r"(/\*\*(?=/|$)|\*)", glob)
        for at, piece in enumerate(pieces):
            last = at == len(pieces) - 2 and glob.endswith("/**")
            if piece == "/**":
                # An allow's trailing `/a/**` takes `/a/` and below, not `/a` (above).
                pattern += ("/.*" if not deny else below) if last else "(?:/.*)?"
            elif piece == "*":
                pattern += "[^/]*"
            elif deny:
                after_star, before_star = (
                    at > 0 and pieces[at - 1] == "*",
                    pieces[at + 1 : at + 2] == ["*"],
                )
                pattern += _denied_literal(piece, after_star, before_star)
            else:
                pattern += re.escape(piece)
        # A trailing `/**` (or the deny's tail) matches whatever is left: it never
        # backtracks into a failure. The wildcards before it do.
        inner = pieces[:-2] if glob.endswith("/**") else pieces
        linear |= "/**" in inner or sum(piece in ("/**", "*") for piece in inner) >= 2
        if deny and glob != "/" and not glob.endswith("/**"):
            pattern += below
        parts.append(pattern)
    flags = re.DOTALL | (re.IGNORECASE if deny else 0)
    return PathPattern(re.compile("|".join(f"(?:{p})" for p in parts), flags), linear)


# The extensions a server also serves a resource without, which a deny glob's stem
# drops (_stem): a repository's, formats (Rails' `(.:format)`, Spring's suffixes),
# documents, archives and dumps (Apache's MultiViews), keys and configuration, scripts.
# Not any `.x`: `lodash.merge`, `socket.io` and `chart.js` name npm packages whose
# stems are other packages (a red team, session 52).
_EXTENSIONS = frozenset(
    """
    git hg svn
    json xml yaml yml csv tsv txt md html htm xhtml atom rss pdf doc docx xls xlsx
    tar gz tgz bz2 tbz xz txz zst lz lzma zip 7z rar whl egg gem jar war ear deb rpm apk
    sql db sqlite sqlite3 dump bak old orig backup
    jpg jpeg png gif svg webp ico bmp tif tiff heic mp3 m4a ogg oga wav flac mp4 m4v webm
    avi mov mkv wmv exe msi dmg iso img bin dll so ppt pptx odt ods odp rtf epub ps eps
    woff woff2 ttf otf eml mbox ics vcf
    pem key crt p12 pfx env ini conf cfg toml properties
    php php3 php4 php5 php7 phtml phar cgi fcgi pl py rb asp aspx jsp jspx do action cfm
    """.split()  # noqa: SIM905 (a table, read by eye)
)
_REPOSITORY = (".git", ".hg", ".svn")
# The names a forge serves a repository by besides its own: its wiki (Gitea's
# `x.wiki.git`, `x.wiki`) and its activity feeds (Gitea's and GitLab's `x.rss`, `x.atom`).
_REPOSITORY_TAIL = r"(?:\.wiki)?(?:\.(?:git|hg|svn|rss|atom))?(?:/.*)?"


def _stems(glob: str) -> list[str]:
    """`glob` with the known extensions (_EXTENSIONS) that end its segments without a
    `*` taken off, in each segment or not: servers serve the same resource by its
    stem. git http-backend, GitHub, GitLab and Gitea serve `/org/secret` as the
    repository `secret.git`; Rails' `(.:format)` serves `/gems/secret.json` also as
    `/gems/secret` and `/gems/secret.yaml`; Apache's MultiViews serves `/dl/x` for
    `x.tar.gz` (a red team, session 52), and only the last segment by its stem: a
    directory `docs.old` is named as it is (`/site/docs.old/secret` for
    `secret.pdf`). A glob with more than _MOST_STEMMED such segments is taken
    with all of them stemmed or none."""
    choices = [
        (segment,) if "*" in segment or (stem := _segment_stem(segment)) == segment
        else (segment, stem)
        for segment in glob.split("/")
    ]  # fmt: skip
    if sum(len(choice) == 2 for choice in choices) > _MOST_STEMMED:
        return [glob, "/".join(choice[-1] for choice in choices)]
    return ["/".join(picked) for picked in itertools.product(*choices)]


_MOST_STEMMED = 4  # segments with a stem that _stems combines freely: 16 globs


def _last_name(glob: str) -> str:
    """A glob's last segment but a trailing `/**` or `/`."""
    return glob.removesuffix("/**").rstrip("/").rpartition("/")[2]


def _segment_stem(segment: str) -> str:
    head, _, extension = segment.rpartition(".")
    if f".{extension.lower()}" in _REPOSITORY and head and not head.endswith("."):
        return head  # a repository's name may hold a `.json` of its own
    stem = segment
    while "." in stem[1:]:
        head, _, extension = stem.rpartition(".")
        if extension.lower() not in _EXTENSIONS or head.endswith("."):
            break
        stem = head
    return stem


def _denied_literal(piece: str, after_star: bool, before_star: bool) -> str:
    """A deny glob's text between wildcards as a regex: as written, but a whole segment
    of digits as every spelling of its number that servers' number parsers read so
    (_number): Flask's and Django's `<int:>` and Python's int(), Spring's
    `@PathVariable Long`, Rails' `find` (to_i), JavaScript's Number() and parseInt() serve
    `042`, `+42`, `%2042`, `4_2`, `0x2a`, `42-my-project` as 42 (a red team, session
    51); and its punctuation as any (_ANY_PUNCTUATION). A segment cut by a `*` is a
    file name's pattern, as written: `/packages/evil_pkg-*` must not take
    `evil_pkg_extras-1.0.whl`, another project's (a red team, session 52)."""
    segments = piece.split("/")
    for at, segment in enumerate(segments):
        whole = (at > 0 or not after_star) and (at < len(segments) - 1 or not before_star)
        if not whole:
            segments[at] = re.escape(segment)
        elif segment.isascii() and segment.isdigit():
            segments[at] = _number(int(segment))
        else:
            segments[at] = "".join(
                _ANY_PUNCTUATION if char in _PUNCTUATION else re.escape(char) for char in segment
            )
    return "/".join(segments)


# ASCII punctuation but `/` and `%` (a segment's break, an escape's start). CherryPy's
# dispatcher (and TurboGears' crank) reads each of them in a segment as `_`:
# `/admin-panel`, `/admin~panel` and `/admin%7Bpanel` run the handler `admin_panel` (a
# red team, session 52); PyPI (PEP 503) reads `-`, `_` and `.` alike in a project's
# name, crates.io `-` and `_`. In a deny glob each one stands for any of them, and for
# the escapes of `%`, `#` and `?`, which requests keep escaped (names._KEPT_ESCAPED)
# and cheroot decodes before CherryPy reads them as `_` too.
_PUNCTUATION = frozenset(string.punctuation) - {"/", "%"}
_ANY_PUNCTUATION = "(?:[" + re.escape("".join(sorted(_PUNCTUATION))) + "]|%2[35]|%3F)"


def _number(value: int) -> str:
    """A path segment that number parsers read as `value` (matched ignoring case): any
    blanks or `+` first (`-` too for 0), then its decimal digits after any zeros, with
    `_` or blanks between them (Python's int() takes `4_2`; Spring drops every blank),
    or its hex (`0x2a`, `#2a`: Spring's), binary (`0b101010`) or octal (`0o52`) form
    (JavaScript's Number()), also with a leading zero for octal (`052`: Ruby's
    Integer(), Go's ParseInt(s, 0), C's strtol(s, 0), Java's Long.decode), `0d` for
    decimal (Ruby), and `_` after the prefix and between digits (`0x_2a`, `0b10_1010`:
    Ruby, Go, Python's int(s, 0); a red team, session 52); then nothing more, or
    anything that does not go on with the number in its base (to_i and parseInt stop
    there: `42abc`, `42_`, `42 x`, `42.json`, `0x2ag`). No lookahead: RE2 has none
    (PathPattern)."""
    gap = "[ _]*"  # `_` or blanks: int()'s `4_2`, Spring drops every blank (`0x 2a`)
    lead = "[ +-]*" if value == 0 else "[ +]*"
    decimal = f"(?:0{gap})*" + gap.join(str(value)) if value else f"0(?:{gap}0)*"
    # Each form ends where a digit of its base does not follow: parseInt() and PHP's
    # intval($s, 0) read `0x2ag`, `052z`, `0528` and `0b1010102` as 42 (a red team,
    # session 53).
    forms = "|".join(
        f"{prefix}{gap}(?:0{gap})*" + gap.join(digits) + f"(?:[^{others}/][^/]*)?"
        for prefix, digits, others in (
            (f"(?:0{gap}x|#|%23)", f"{value:x}", "0-9a-f"),
            (f"0{gap}b", f"{value:b}", "01"),
            (f"0(?:{gap}o)?", f"{value:o}", "0-7"),
            (f"0{gap}d", str(value), "0-9"),
        )
    )
    return f"{lead}(?:{decimal}(?:[^0-9/][^/]*)?|{forms})"


def parse_expires(text: str) -> tuple[datetime.date | datetime.datetime, float]:
    """A rule's `expires:` as written, and the instant (epoch seconds) it stops
    matching: a date is the last day the rule applies (to the end of that day, local
    time); an instant needs its time zone (`2026-06-30T18:00:00Z`, `...+02:00`).
    ValueError, one line, naming the forms."""
    if "T" not in text and " " not in text.strip():
        try:
            day = datetime.date.fromisoformat(text)
        except ValueError:
            pass
        else:
            if day == datetime.date.max:
                # 9999-12-31 ("never") has no next day to start (date + 1 day overflows):
                # its end is its start plus 24 h.
                return day, _start_of_day(day) + 86400
            return day, _start_of_day(day + datetime.timedelta(days=1))
    try:
        instant = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"expires {text!r} is not a date or an instant; write YYYY-MM-DD "
            "or YYYY-MM-DDTHH:MM:SSZ"
        ) from None
    if instant.tzinfo is None:
        raise ValueError(f"expires {text!r} has no time zone; add one ({text}Z for UTC, or +HH:MM)")
    return instant, instant.timestamp()


def _start_of_day(day: datetime.date) -> float:
    """Local midnight at the start of `day`, in epoch seconds."""
    return datetime.datetime.combine(day, datetime.time()).timestamp()


def _whole_number(text: str, most: int) -> int | None:
    """`text` as a whole number from 1 to `most`, or None. isascii: str.isdigit() also
    takes other scripts' digits ('８０'). The length first: int() raises past 4300
    digits (sys.get_int_max_str_digits), and so many are out of range anyway."""
    digits = text.lstrip("0")
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(most)):
        return None
    number = int(digits or "0")
    return number if 1 <= number <= most else None


def _is_domain(text: str) -> bool:
    try:
        parse_domain(text)
    except InvalidName:
        return False
    return True


def _unique(rules: list[Rule]) -> list[Rule]:
    """Rules in first-seen order, each once (a preset may be included twice)."""
    seen: set[str] = set()
    return [r for r in rules if not (r.id in seen or seen.add(r.id))]


def _refused_yaml(text: str) -> tuple[yaml.Mark, str] | None:
    """Where and why `text` is refused before it is composed, or None:
    - nested deeper than MAX_NESTING (libyaml composes by recursion in C);
    - an explicit tag (`!!binary ZXZpbC50ZXN0`, `!!str`, `!x`): the loader reads every
      value as the text written, which other YAML tools (reviewers' editors, yq, policy
      checkers) would read as something else (`!!binary` decodes to `evil.test`);
    - aliases that stand for more than MAX_ALIAS_NODES values in all.
    Nesting needs an opening bracket or an indicator per level, within a line or by
    indenting further, a tag a `!` and an alias an anchor (`&`): a file without `!` or
    `&`, with few brackets and short lines, is passed without parsing; otherwise the
    parser's events are counted (no recursion), which costs about a seventh of a compose."""
    bound = text.count("[") + text.count("{") + 2 * max(map(len, text.splitlines()), default=0)
    if bound <= MAX_NESTING and "!" not in text and "&" not in text:
        return None
    depth = 0
    nodes = 0  # every value so far, each alias counted as the values it stands for
    expanded = 0  # of which aliases stood for
    sizes: dict[str, int] = {}  # anchor -> how many values it stands for
    open_anchors: list[tuple[str | None, int]] = []  # per open collection: its anchor, `nodes` then
    try:
        for event in yaml.parse(text, Loader=_YamlLoader):
            if isinstance(event, yaml.AliasEvent):
                size = sizes.get(event.anchor, 1)
                nodes += size
                expanded += size
                if expanded > MAX_ALIAS_NODES:
                    return event.start_mark, (
                        f"YAML aliases here stand for more than {MAX_ALIAS_NODES} values in "
                        "all (each alias repeats what its anchor holds); write the values "
                        "out, or share rules with 'extends' or 'include'"
                    )
                continue
            if isinstance(event, yaml.NodeEvent) and getattr(event, "tag", None) is not None:
                return event.start_mark, (
                    f"YAML tags are not supported ({str(event.tag)[:40]!r}): every value is "
                    "read as the text written, which tools that read tags would take for "
                    "something else; remove the tag (quote the value if it must be text)"
                )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_NESTING:
                    return event.start_mark, (
                        f"nested more than {MAX_NESTING} levels deep (a rule file needs about 6)"
                    )
                nodes += 1
                open_anchors.append((event.anchor, nodes))
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                anchor, started = open_anchors.pop()
                if anchor is not None:
                    sizes[anchor] = nodes - started + 1
            elif isinstance(event, yaml.ScalarEvent):
                nodes += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
    except yaml.YAMLError:
        return None  # compose reports it, with its mark
    return None
