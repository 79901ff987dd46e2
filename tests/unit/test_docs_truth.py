"""What README.md and docs/*.md promise, checked against the code, so that the docs
cannot drift from it unseen: every quoted rule file loads, every console example
prints what the page shows, every `sandgate ... --flag` exists for its command and
every flag is documented, the `sandgate run` flag table and the `--help` defaults
say the parser's defaults, every metric and event field of docs/telemetry.md is
what the code registers, every alert the shipped rules raise is in the alert tables.

Checks that already exist elsewhere are not repeated here: the reasons and built-in
rules of docs/rules.md (test_policy.py), each event field, reason and registered
metric having a row in docs/telemetry.md (test_telemetry_events.py), the gateway's
flags in the systemd files (test_containers_ops.py). This module adds the other
direction of those (the docs name nothing that does not exist) and the rest.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import textwrap
import typing
from pathlib import Path

import pytest
import yaml
from sandgate.enforcer.cli import build_parser, main
from sandgate.proxy.policy.builtin import BUILTINS
from sandgate.proxy.policy.load import load_policy
from sandgate.proxy.policy.reasons import Reason
from sandgate.proxy.telemetry.event import FIELDS, Event

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _section(doc: str, heading: str) -> str:
    """The text under `heading` (a whole heading line) up to the next heading of its level."""
    level = heading.split(" ", 1)[0]
    return _text(ROOT / doc).split(f"\n{heading}\n", 1)[1].split(f"\n{level} ", 1)[0]


def _table_rows(text: str) -> list[list[str]]:
    """The cells of each markdown table row in `text` (header and rule rows included)."""
    return [  # a `\|` is a pipe inside a cell, as markdown has it
        [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def _blocks(language: str) -> list[tuple[str, str]]:
    """(`doc:line`, body) of every fenced block of `language` in the docs."""
    found = []
    for doc in DOCS:
        text = _text(doc)
        for match in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", match.group(1)))
    return found


# --- rule files ----------------------------------------------------------------------------


def _rule_file(body: str) -> str | None:
    """A quoted YAML block as a whole rule file: as is when it is one, a list of rules
    inside a profile, None for a fragment of another shape (a profile's keys)."""
    if re.match(r"(#.*\n)*version:", body):
        return body
    if body.lstrip().startswith("- "):
        return "version: 1\nprofiles:\n  p:\n    rules:\n" + textwrap.indent(
            textwrap.dedent(body), "      "
        )
    return None


YAML_BLOCKS = [(where, body) for where, body in _blocks("yaml") if _rule_file(body)]


def test_the_docs_quote_rule_files():
    assert len(YAML_BLOCKS) >= 6, "the rule-file extraction found (almost) nothing"


@pytest.mark.parametrize(("where", "body"), YAML_BLOCKS, ids=[w for w, _ in YAML_BLOCKS])
def test_every_quoted_rule_file_loads(tmp_path, where, body):
    path = tmp_path / "rules.yaml"
    path.write_text(_rule_file(body), encoding="utf-8")
    files = [path]
    if "\napproved:" in body:  # approved.yaml: loaded next to the rules that define its profiles
        profiles = yaml.safe_load(body)["approved"]
        main_rules = tmp_path / "main.yaml"
        main_rules.write_text(
            "version: 1\nprofiles:\n" + "".join(f"  {name}: {{}}\n" for name in profiles)
        )
        files = [main_rules, path]
    load_policy(files)  # PolicyError (FILE:LINE:COL) when the docs quote a broken file


def test_the_rule_reference_quotes_team_yaml_as_it_is():
    """docs/rules.md: "This is `rules/examples/team.yaml`", and its console examples
    name that file's lines."""
    where, body = next(block for block in YAML_BLOCKS if block[0].startswith("docs/rules.md"))
    assert "This is `rules/examples/team.yaml`" in _text(ROOT / "docs/rules.md")
    assert body == _text(ROOT / "rules/examples/team.yaml"), where


# --- console examples ----------------------------------------------------------------------

# Commands the unit tests may run in-process: they read rule files and print.
OFFLINE = ("rules", "check")
POLICY_HASH = re.compile(r'"policy": "[0-9a-f]{16}"')


def _console_examples() -> list[tuple[str, str, list[str], int | None]]:
    """(`doc:line`, command, expected output lines, expected exit code or None) of
    each `$ sandgate ...` in a ```console block, with `; echo $?` or a following
    `$ echo $?` giving the exit code."""
    examples = []
    for where, body in _blocks("console"):
        doc, first = where.rsplit(":", 1)
        lines = body.rstrip("\n").split("\n")
        starts = [i for i, line in enumerate(lines) if line.startswith("$ ")] + [len(lines)]
        for i, end in zip(starts, starts[1:], strict=False):
            command, output = lines[i][2:], lines[i + 1 : end]
            code = None
            if command.endswith("; echo $?"):
                command, code = command.removesuffix("; echo $?"), int(output.pop())
            elif end < len(lines) and lines[end] == "$ echo $?":
                code = int(lines[end + 1])
            while output and not output[-1]:
                output.pop()
            if command.startswith("sandgate "):
                examples.append((f"{doc}:{int(first) + i + 1}", command, output, code))
    return examples


CONSOLE = _console_examples()


def test_the_docs_have_console_examples_to_check():
    assert sum(1 for _, command, _, _ in CONSOLE if command.split()[1] in OFFLINE) >= 10


@pytest.mark.parametrize(
    ("where", "command", "expected", "code"),
    [example for example in CONSOLE if example[1].split()[1] in OFFLINE],
    ids=[where for where, command, _, _ in CONSOLE if command.split()[1] in OFFLINE],
)
def test_console_examples_print_what_the_docs_show(
    capsys, monkeypatch, where, command, expected, code
):
    monkeypatch.chdir(ROOT)  # the examples' paths are the checkout's
    returned = main(shlex.split(command)[1:])
    out, err = capsys.readouterr()
    # The policy hash of an example changes with every edit of a shipped preset.
    got = POLICY_HASH.sub('"policy": "HASH"', out + err).rstrip("\n").split("\n")
    assert got == [POLICY_HASH.sub('"policy": "HASH"', line) for line in expected], where
    if code is not None:
        assert returned == code, where


def test_the_json_shapes_docs_rules_md_gives_are_printed(capsys, monkeypatch):
    """`--json` prints {"verdict", ...} (check) and, per profile, {"profile", ...} with
    each rule's `id`, `action`, ... (rules show)."""
    monkeypatch.chdir(ROOT)
    text = " ".join(_text(ROOT / "docs/rules.md").split())
    check_keys = re.findall(r'"(\w+)"', re.search(r"`--json` prints `(\{[^`]*\})`", text)[1])
    show = re.search(r"`--json` prints, per profile, `(\{.*?\})` with each rule's (.*?)\.", text)
    main(["check", "--json", "--rules", "rules/examples/team.yaml", "pypi.org"])
    assert list(json.loads(capsys.readouterr().out)) == check_keys
    main(["rules", "show", "--json", "--profile", "default", "rules/examples/team.yaml"])
    shown = json.loads(capsys.readouterr().out)
    top = re.sub(r"\{[^{}]*\}", "", show[1][1:-1])  # the nested objects' keys aside
    assert list(shown) == re.findall(r'"(\w+)"', top)
    for key in ("limits", "presets"):
        nested = re.search(rf'"{key}": \[?(\{{.*?\}})', show[1])[1]
        first = shown[key][0] if isinstance(shown[key], list) else shown[key]
        assert list(first) == re.findall(r'"(\w+)"', nested), key
    assert list(shown["rules"][0]) == re.findall(r"`(\w+)`", show[2])


# --- flags -------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _every_option(parser=None, path=()):
    """(command path, action) of every option of every command."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _every_option(child, (*path, name))
        elif action.option_strings and action.dest != "help":
            yield path, action


def _sandgate_commands(text: str):
    """The words after each `sandgate` the docs show as a command (code spans, code
    blocks and prose alike), continuation lines joined, up to a comment or pipe."""
    text = re.sub(r"\\\n\s*", " ", text)
    command = r"(?:^|[`\s(])(?:\.venv/bin/|sudo )?sandgate((?: [^`\n#|;&]*)?)"
    for match in re.finditer(command, text):
        yield match.group(1).split()


def _unknown_flags(words: list[str], root: argparse.ArgumentParser) -> list[str]:
    """The flags in `sandgate WORDS` that neither the command named there nor a
    command above it takes (`approvals --control S list` is fine)."""
    parser, known, unknown = root, _options(root), []
    for word in words:
        if word == "--":  # the task's own command line follows
            break
        if word in _subcommands(parser):
            parser = _subcommands(parser)[word]
            known |= _options(parser)
        elif (flag := re.match(r"-[-\w]+", word.lstrip("[("))) and flag.group(0) not in known:
            unknown.append(flag.group(0))  # `[--profile` and `(-j` are flags too
    return unknown


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_every_flag_the_docs_give_a_sandgate_command_exists_for_it(doc):
    root = build_parser()
    wrong = [
        f"sandgate {' '.join(words)}: {flag}"
        for words in _sandgate_commands(_text(doc))
        for flag in _unknown_flags(words, root)
    ]
    assert not wrong, f"{doc.name} names flags the command does not take: {wrong}"


def test_the_flag_check_finds_a_wrong_flag():
    root = build_parser()
    assert _unknown_flags(["run", "--bogus", "--", "ls", "--all"], root) == ["--bogus"]
    assert _unknown_flags(["approvals", "--control", "S", "approve", "ID", "--widen"], root) == []
    assert _unknown_flags(["check", "--widen", "x"], root) == ["--widen"]
    assert _unknown_flags(["rules", "show", "[FILE]", "[--profle", "P]"], root) == ["--profle"]


def test_every_option_of_every_command_is_documented():
    docs = "\n".join(_text(doc) for doc in DOCS)
    missing = [
        f"sandgate {' '.join(path)} {action.option_strings}"
        for path, action in _every_option()
        if not any(
            re.search(re.escape(flag) + r"(?![\w-])", docs)
            for flag in action.option_strings
            if flag.startswith("--")
        )
    ]
    assert not missing, f"options no doc mentions: {missing}"


def _stated_default(text: str) -> str | None:
    """A value the help text gives as the default: `(default 30`, `(default: 127.0.0.1:9464;`
    (a number or a path, not words such as "the current directory")."""
    match = re.search(r"\(default:? ([^;,)\s]*[0-9/][^;,)\s]*)", text or "")
    return match.group(1) if match else None


STATED = [(p, a) for p, a in _every_option() if _stated_default(a.help) and a.default is not None]


def test_help_texts_state_defaults():
    assert len(STATED) >= 15


@pytest.mark.parametrize(
    ("path", "action"), STATED, ids=[f"{' '.join(p)} {a.option_strings[-1]}" for p, a in STATED]
)
def test_each_default_a_help_text_states_is_the_parsers(path, action):
    stated = _stated_default(action.help)
    default = action.default
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    assert stated == shown, (
        f"sandgate {' '.join(path)} {action.option_strings[-1]}: help says default {stated}, "
        f"the parser's is {default!r}"
    )


RUN_FLAGS = '## The flags (`sandgate run --help`, "task sandbox")'


def test_the_run_flag_table_of_docs_sandbox_md_matches_run_help():
    run = _subcommands(build_parser())["run"]
    actions = {flag: action for action in run._actions for flag in action.option_strings}
    rows = _table_rows(_section("docs/sandbox.md", RUN_FLAGS))
    rows = [row for row in rows if row[0].startswith("`--")]
    assert len(rows) >= 10
    group = next(g for g in run._action_groups if g.title.startswith("task sandbox"))
    assert {a.option_strings[-1] for a in group._group_actions} == {
        row[0].strip("`").split()[0] for row in rows
    }, "the table and the parser's 'task sandbox' group list different flags"
    for flag_cell, default_cell, _ in rows:
        flag, *metavar = flag_cell.strip("`").split()
        action = actions[flag]
        assert metavar == ([action.metavar] if action.metavar else []), flag
        if isinstance(action.default, str):
            assert default_cell.strip("`") == action.default, flag
        if isinstance(action, argparse._StoreTrueAction):
            assert default_cell in ("off", ""), flag


def test_the_flag_errors_docs_sandbox_md_quotes_are_the_ones_printed(tmp_path):
    from sandgate.enforcer.sandbox import cgroup, spec

    text = _section("docs/sandbox.md", RUN_FLAGS).replace("\n", " ")
    quoted = re.findall(r"`(sandgate: [^`]*)`", text)
    env_file = tmp_path / "F"
    env_file.write_text("A=1\nB=2\nnope\n")
    printed = []
    with pytest.raises(spec.SandboxError) as user:
        spec.parse_user("abc")
    printed.append(str(user.value))
    with pytest.raises(spec.SandboxError) as env:
        spec.parse_env([], [env_file], {}, [])
    printed.append(str(env.value).replace(str(env_file), "F"))
    with pytest.raises(ValueError) as memory:
        cgroup.Limits(memory_bytes=cgroup.parse_size("512K"))
    printed.append(f"limits: {memory.value}")  # the prefix enforcer/sandbox/options.py adds
    assert quoted == [f"sandgate: {message}" for message in printed]


# --- gateway stop and status: what docs/operations.md says they do -------------------------


def _fake_service(monkeypatch, reply: dict) -> list[tuple[str, dict]]:
    from sandgate.enforcer.cli import status

    asked = []

    def ask(path, cmd, **args):
        asked.append((cmd, args))
        return {"ok": True, **reply}

    monkeypatch.setattr(status, "ask", ask)
    return asked


def test_gateway_stop_without_grace_drains_with_the_services_own(monkeypatch, capsys):
    """docs/operations.md: a stop drains for SANDGATE_GRACE (the service's --grace).
    Before, `sandgate gateway stop` always sent 30 s, cutting a 120 s grace short."""
    asked = _fake_service(monkeypatch, {"draining": True, "sandboxes": 3, "grace": 120.0})
    assert main(["gateway", "stop", "--control", "/nonexistent.sock"]) == 0
    assert asked == [("stop", {})]
    assert "grace 120 s" in capsys.readouterr().out


def test_gateway_stop_with_grace_sends_it(monkeypatch, capsys):
    asked = _fake_service(monkeypatch, {"draining": True, "sandboxes": 0, "grace": 5.0})
    assert main(["gateway", "stop", "--control", "/nonexistent.sock", "--grace", "5"]) == 0
    assert asked == [("stop", {"grace": 5.0})]


def test_status_shows_the_spares_and_warm_runners_operations_md_points_at(monkeypatch, capsys):
    _fake_service(
        monkeypatch,
        {
            "pid": 7, "policy": "abc", "rules": 3, "rule_files": ["r.yaml"], "sandboxes": 1,
            "connections": 0, "uptime_s": 5.0, "draining": False, "workers": [{}],
            "spares": 2, "warm_runners": 2, "runners_pid": 99,
        },
    )  # fmt: skip
    assert main(["status", "--control", "/nonexistent.sock"]) == 0
    out = capsys.readouterr().out
    assert "spares 2, warm_runners 2 (runners_pid 99)" in out


# --- telemetry.md ------------------------------------------------------------------------


def _metric_rows() -> list[tuple[str, str, set[str]]]:
    """(name, type, label names) of the table under '## Prometheus metrics'."""
    found = []
    for cells in _table_rows(_section("docs/telemetry.md", "## Prometheus metrics")):
        if len(cells) == 4 and cells[0].startswith("`sandgate_"):
            labels = re.sub(r"\([^)]*\)", "", cells[2]).replace("—", "")
            found.append(
                (
                    cells[0].strip("`"),
                    cells[1],
                    {label.strip().strip("`") for label in labels.split(",") if label.strip()},
                )
            )
    return found


def test_every_documented_metric_is_registered_with_its_type_and_labels():
    from prometheus_client.metrics import MetricWrapperBase
    from support.fakes import wired_metrics

    metrics = wired_metrics(firewall={"dropped_udp": 1})
    registered = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {label for s in family.samples for label in s.labels} - {"le"}
        registered[name] = (family.type, labels)
    for metric in vars(metrics).values():  # label names even before a first sample
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            registered[name] = (registered[name][0], set(metric._labelnames))
    rows = _metric_rows()
    assert len(rows) >= 20
    for name, kind, labels in rows:
        assert name in registered, f"docs/telemetry.md documents {name}, which is not registered"
        assert registered[name] == (kind, labels), name


def test_the_event_field_table_is_the_schema_in_order_with_its_types():
    """The audit line's fields come "in the order of the table above"."""
    rows = [
        (cells[0].strip("`"), cells[1])
        for cells in _table_rows(_section("docs/telemetry.md", "## Event fields"))
        if cells[0].startswith("`")
    ]
    assert [name for name, _ in rows] == list(FIELDS)
    hints = typing.get_type_hints(Event)
    json_type = {str: "string", int: "integer", float: "number"}
    for name, documented in rows:
        types = (*typing.get_args(hints[name]), hints[name])  # `int | None`, or `str`
        python = next(t for t in types if t is not type(None))
        python = str if isinstance(python, type) and issubclass(python, str) else python
        assert json_type[python] == documented, name


def test_telemetry_md_lists_no_reason_that_does_not_exist():
    rows = [
        cells[0].strip("`")
        for cells in _table_rows(_section("docs/telemetry.md", "## Reasons"))
        if cells[0].startswith("`")
    ]
    assert len(rows) == len(set(rows)), "a reason is listed twice"
    assert set(rows) <= {str(reason) for reason in Reason}


def test_every_builtin_rule_the_docs_name_exists():
    ids = {entry.rule.id for entry in BUILTINS.values()}
    for doc in DOCS:
        # `builtin:weakened-<feature>` names a family, not a rule
        named = set(re.findall(r"builtin:[a-z]+(?:-[a-z]+)*(?![-a-z<])", _text(doc)))
        assert named <= ids, f"{doc.name} names built-in rules that do not exist: {named - ids}"


def test_every_test_the_docs_cite_as_evidence_exists():
    """docs/threat-model.md and others name the test that proves a defence."""
    tests = [*(ROOT / "tests").rglob("*.py")]
    modules = {path.stem for path in tests}
    source = "\n".join(_text(path) for path in tests)
    for doc in DOCS:
        for name in set(re.findall(r"\b(test_\w+)\b", _text(doc))) - modules:
            assert f"def {name}(" in source, f"{doc.name} cites {name}, which is no test"


# --- alerts ------------------------------------------------------------------------------


def _shipped_alerts() -> dict[str, str]:
    rules = yaml.safe_load(_text(ROOT / "containers/prometheus/sandgate-alerts.yml"))
    return {
        rule["alert"]: rule["labels"]["severity"]
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_the_alert_table_of_operations_md_is_the_shipped_alerts():
    rows = _table_rows(_section("docs/operations.md", "## What to alert on"))
    table = {cells[0].strip("`"): cells[1] for cells in rows if cells[0].startswith("`Sandgate")}
    assert table == _shipped_alerts()


def test_telemetry_md_names_every_shipped_alert():
    section = _section("docs/telemetry.md", "## Prometheus metrics")
    assert set(re.findall(r"`(Sandgate\w+)`", section)) >= set(_shipped_alerts())
