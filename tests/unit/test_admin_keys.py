"""Named admin keys (issue 10: "who decided is recorded ... the API key's name"): the
keys file, the `sandgate approvals keys` command, and the server recording the key's
name, refusing a revoked key at once (bearer and page session alike)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from sandgate.enforcer.admin.auth import SESSION_HEADER, Sessions
from sandgate.enforcer.admin.keys import (
    KeyFile,
    KeyFileError,
    digest,
    find,
    parse_keys,
    read_keys,
)
from sandgate.enforcer.admin.server import AdminServer
from sandgate.enforcer.cli import main
from sandgate.proxy.approvals.holder import Answer, Approvals
from sandgate.proxy.approvals.pending import AskKey
from sandgate.proxy.policy.model import ApprovalSettings

HAND = "a-hand-written-token-of-32-chars"


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("alice", "2: expected NAME TOKEN", id="no-token"),
        pytest.param("alice a b", "2: expected NAME TOKEN", id="three-words"),
        pytest.param("admin " + HAND, "2: the key name 'admin' is the generated", id="reserved"),
        pytest.param("-x " + HAND, "2: key name '-x'", id="bad-name"),
        pytest.param("bob short", "2: key 'bob': a token needs at least 24", id="short"),
        pytest.param(f"carol {HAND}\ncarol {HAND}x", "3: key 'carol' appears twice", id="twice"),
    ],
)
def test_a_bad_keys_file_is_one_line_naming_file_and_line(text, message):
    with pytest.raises(KeyFileError, match=f"^keys:{message}"):
        parse_keys("# header\n" + text, "keys")


def test_keys_are_stored_as_hashes_and_found_by_token():
    keys = parse_keys(f"alice sha256:{digest('alice-token')}\nbob {HAND}\n", "k")
    assert keys == {"alice": digest("alice-token"), "bob": digest(HAND)}
    assert find(keys, "alice-token") == "alice" and find(keys, HAND) == "bob"
    assert find(keys, "alice-token ") is None and find(keys, "") is None


def test_the_cli_adds_prints_once_lists_and_revokes(tmp_path, capsys):
    path = tmp_path / "state" / "admin-keys"
    assert main(["approvals", "keys", "add", "alice", "--file", str(path)]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert len(token) >= 40 and "not stored (only its hash)" in err
    assert token not in path.read_text()  # only its hash
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_keys(path) == {"alice": digest(token)}
    # the same name twice, a bad name: one line, exit 125, the file unchanged
    assert main(["approvals", "keys", "add", "alice", "--file", str(path)]) == 125
    assert "a key named 'alice' exists" in capsys.readouterr().err
    assert main(["approvals", "keys", "add", "admin", "--file", str(path)]) == 125
    assert main(["approvals", "--json", "keys", "list", "--file", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == ["admin", "alice"]
    assert main(["approvals", "keys", "revoke", "alice", "--file", str(path)]) == 0
    assert read_keys(path) == {}
    capsys.readouterr()
    assert main(["approvals", "keys", "revoke", "alice", "--file", str(path)]) == 125
    err = capsys.readouterr().err
    assert "no key named 'alice'" in err and len(err.strip().splitlines()) == 1


def test_a_keys_file_others_may_write_gives_no_keys(tmp_path, caplog):
    path = tmp_path / "admin-keys"
    path.write_text(f"alice {HAND}\n")
    path.chmod(0o620)
    with pytest.raises(KeyFileError, match="writable by it only"):
        read_keys(path)
    assert KeyFile(path).keys() == {}  # fail closed, with a warning
    assert "no named admin keys" in caplog.text
    path.chmod(0o600)
    assert Sessions(keys=KeyFile(path).keys).key_for(HAND) == "alice"


KEY = AskKey.make(
    task_id="t1", sandbox="10.0.0.2", profile="default", name="a.test", port=443, protocol="tls"
)


async def _http(port: int, method: str, path: str, headers: dict, body: bytes = b""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write((head + f"content-length: {len(body)}\r\n\r\n").encode() + body)
    data = await reader.read()
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(data.split(b" ", 2)[1]), head.decode(), rest


def test_a_named_key_decides_as_its_name_and_is_refused_once_revoked(tmp_path, capsys):
    path = tmp_path / "admin-keys"
    for name in ("alice", "bob"):
        assert main(["approvals", "keys", "add", name, "--file", str(path)]) == 0
    alice, bob = capsys.readouterr().out.split()
    settings = ApprovalSettings(hold=10.0, expire_pending=60.0, max_pending_per_sandbox=5)

    async def scenario():
        approvals = Approvals(lambda event: None, lambda profile: settings)
        sessions = Sessions(keys=KeyFile(path).keys)
        server = AdminServer(approvals, sessions)
        _, port = await server.start("127.0.0.1", 0)
        origin = {"origin": f"http://127.0.0.1:{port}"}
        form = {**origin, "content-type": "application/json"}
        login = json.dumps({"token": bob}).encode()
        status, _, body = await _http(port, "POST", "/login", form, login)
        assert status == 200 and json.loads(body)["approver"] == "bob (web)"
        session = {SESSION_HEADER: json.loads(body)["session"]}
        assert (await _http(port, "GET", "/api/approvals", session))[0] == 200
        hold = asyncio.ensure_future(approvals.hold(KEY, "ask-1", {}))
        await asyncio.sleep(0.05)
        (pending,) = approvals.list()
        bearer = {"authorization": f"Bearer {alice}", "content-type": "application/json"}
        decision = json.dumps({"decision": "approve", "scope": "task"}).encode()
        status, _, body = await _http(
            port, "POST", f"/api/approvals/{pending['id']}", bearer, decision
        )
        assert status == 200 and json.loads(body)["approval"]["approver"] == "alice (api key)"
        assert (await hold).answer is Answer.GRANTED
        # Revoked: refused at the very next request, the bearer and bob's page session.
        assert main(["approvals", "keys", "revoke", "alice", "--file", str(path)]) == 0
        assert main(["approvals", "keys", "revoke", "bob", "--file", str(path)]) == 0
        refused = [
            (await _http(port, "GET", "/api/approvals", bearer))[0],
            (await _http(port, "GET", "/api/approvals", session))[0],
            (await _http(port, "POST", "/login", form, login))[0],
        ]
        # the generated token still works: it is the key `admin`
        admin = {"authorization": f"Bearer {sessions.token}"}
        still = (await _http(port, "GET", "/api/approvals", admin))[0]
        await server.stop()
        return refused, still

    refused, still = asyncio.run(scenario())
    assert refused == [401, 401, 401] and still == 200


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_keys_file_that_is_not_a_regular_file_is_an_error_not_a_wait(tmp_path, kind):
    """A FIFO would block the open, and the gateway's start, forever."""
    path = tmp_path / "admin-keys"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(KeyFileError, match=f"^{path}: not a regular file$"):
        read_keys(path)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_webhook_secret_that_is_not_a_regular_file_is_an_error_not_a_wait(tmp_path, kind):
    """The same for --approval-webhook-secret: the gateway reads it as it starts."""
    import argparse

    from sandgate.enforcer.cli.common import UsageError, admin_settings

    path = tmp_path / "webhook.key"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    args = argparse.Namespace(
        admin_listen="off",
        approval_webhook=["http://127.0.0.1:9/hook"],
        approval_webhook_secret=path,
        approval_webhook_format="json",
        admin_keys=None,
    )
    with pytest.raises(UsageError, match=f"^--approval-webhook-secret {path}: "):
        admin_settings(args)
