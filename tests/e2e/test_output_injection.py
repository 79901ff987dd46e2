"""Strings a hostile task chooses, shown to a person: each stays inert text.

A sandboxed task asks for a request path built to do something where a person reads
it. The HTTP checks already refuse `<>[]|` and backticks in a path (so no Slack
`<!channel>` or `<URL|words>`, no Markdown `[words](URL)`), but `@` is a path
character: `@channel`, `@all`, `@here` notify every member of a Mattermost channel
the "slack" format posts to, `*`, `_`, `~` restyle the text. The request is held for
approval, so it reaches the approval webhook, and the approvals CLI lists it. The
chat text must carry none of that syntax (the path percent-encoded), while the JSON
format and the CLI keep the exact path.

The task's own output goes to the caller's terminal, and the summary of `sandgate
run` follows it there: a task that leaves the terminal concealing text, drawing
letters as lines, or scrolling only two lines must not hide the summary. A real
terminal emulator (tmux) runs `sandgate run`; what it shows is read back.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time

import pytest
from support import sandbox
from support.service import GatewayProcess, WebhookReceiver, attach

pytestmark = pytest.mark.e2e

# What the task leaves its terminal in, after a forged summary line; whether that line
# stays on the screen (the summary writes over it when the cursor was left above it).
TERMINAL_STATES = [
    pytest.param(r"\033[8m", True, id="concealed"),
    pytest.param(r"\033[30;40m", True, id="black-on-black"),
    pytest.param(r"\033(0", True, id="line-drawing-letters"),
    pytest.param(r"\033[1;2r\033[2;1H", True, id="two-line-scroll-region"),
]
FORGED = "sandgate: task 00000000 (profile default): 0 allowed, 0 blocked"
# What tmux's `capture-pane -e` writes for plain text: the default colours, G0.
PLAIN = re.compile(r"\x1b\[(0|39|49)m|\x0f")

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 1s}
    rules:
      - ask: allowed.test
        methods: [GET]
        id: ask-get
"""

# A path the HTTP checks accept (request_head.path_problem) that is markup in a chat
# message: mentions of everyone, emphasis, a mail link's address.
HOSTILE_PATH = "/@channel/@all/@here/*Approved*/_by_/~admin~/mailto:x@evil.test"


@pytest.mark.parametrize("fmt", ["slack", "json"])
def test_a_path_held_for_approval_is_no_markup_in_the_webhook_or_the_cli(fakenet, tmp_path, fmt):
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    receiver = WebhookReceiver(fakenet, tmp_path, 8098)
    service = GatewayProcess(
        fakenet,
        tmp_path,
        rules,
        *receiver.options,
        "--approval-webhook-format",
        fmt,
    ).start()
    try:
        result = attach(
            service,
            tmp_path,
            {
                "held": f"curl -sS -g --path-as-is --max-time 10 -w '\\n%{{http_code}}' "
                f"'http://allowed.test{HOSTILE_PATH}'"
            },  # fmt: skip
        )
        assert result["held"].out.strip().splitlines()[-1] == "403", result.describe()
        assert "needs a human's approval" in result["held"].out, result.describe()
        # Held, never forwarded: the server got nothing.
        assert fakenet.requests_seen() == []

        (post,) = receiver.posts()
        document = json.loads(post["body"])
        listed = service.ask("approvals", "list")
        assert listed.returncode == 0, listed.stderr
        (line,) = listed.stdout.splitlines()  # one approval, one line
        assert HOSTILE_PATH in line  # a terminal shows it as it is: no control characters
        if fmt == "json":  # a machine gets the exact path
            assert document["approval"]["path"] == HOSTILE_PATH
            assert document["destination"].endswith(HOSTILE_PATH)
            return
        text = document["text"]
        assert "/%40channel/%40all/%40here/%2AApproved%2A/_by_/~admin~/mailto%3Ax%40evil" in text
        # No mention, no bold, no code span but the command's.
        for markup in ("@", "*"):
            assert markup not in text, (markup, text)
        assert re.findall("`[^`]*`", text) == [f"`sandgate approvals approve {document_id(line)}`"]
    finally:
        service.stop()
        receiver.stop()


def document_id(line: str) -> str:
    """The approval id, first on a line of `sandgate approvals list`."""
    return line.split()[0]


@pytest.mark.parametrize(("leaves", "forged_stays"), TERMINAL_STATES)
def test_the_summary_after_the_tasks_output_shows_on_a_real_terminal(
    fakenet, tmp_path, leaves, forged_stays
):
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nprofiles:\n  default:\n    rules: []\n")
    workdir = sandbox._workdir(tmp_path)
    # From the screen's top left (what sandgate printed before the task is not
    # where the task's own output lands), the forged summary, then the state left.
    task = f"printf '\\033[2J\\033[H{FORGED}\\n{leaves}'; exit 3"
    argv = sandbox._argv(fakenet, workdir, ["sh", "-c", task], rules, ())
    done = tmp_path / "done"
    command = shlex.join(["ip", "netns", "exec", fakenet.host_ns, *argv])
    socket = tmp_path / "tmux.sock"
    tmux = ["tmux", "-S", str(socket), "-f", "/dev/null"]
    subprocess.run(
        [*tmux, "new-session", "-d", "-x", "120", "-y", "40", "--", "sh", "-c",
         f"{command}; echo $? > {done}.part; mv {done}.part {done}; sleep 600"],
        check=True,
    )  # fmt: skip
    # The exit code is written aside and renamed: `> done` creates the file before
    # echo fills it, and a poll in between read it empty (one CI run).
    try:
        assert sandbox.eventually(done.exists, timeout=60)
        assert done.read_text().strip() == "3"  # the task ran, and its exit code is the run's
        time.sleep(0.2)  # tmux has drawn what it read
        shown = subprocess.run(
            [*tmux, "capture-pane", "-p", "-e"], capture_output=True, text=True, check=True
        ).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    summary = json.loads((workdir / "summary.json").read_text())
    header = f"sandgate: task {summary['task_id']} (profile default): 0 allowed, 0 blocked"
    lines = [PLAIN.sub("", line) for line in shown.splitlines()]
    assert (FORGED in shown) is forged_stays  # the task's output was shown
    # The summary, every line of it on the screen, in plain text.
    at = lines.index(header) if header in lines else None
    assert at is not None, shown
    assert lines[at + 1].startswith("  audit log: "), shown
    assert not re.search(r"[\x00-\x1f]", lines[at] + lines[at + 1]), shown
