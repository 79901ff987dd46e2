"""The admin server and the approval webhook on a real loop and loopback sockets:
401 without the token, 403 for a cross-site POST (and nothing decided), the page's
session is a header and never a cookie,
a decision through the API releases the hold, SSE pushes changes, the webhook is
signed and retried, and its failures are counted."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket

import pytest
from sandgate.enforcer.admin import Admin, AdminOptions
from sandgate.enforcer.admin.auth import (
    MAX_FAILING_PEERS,
    SESSION_HEADER,
    FailedCredentials,
    Sessions,
)
from sandgate.enforcer.admin.server import AdminServer
from sandgate.enforcer.run import RunError
from sandgate.proxy.approvals.holder import Answer, Approvals
from sandgate.proxy.approvals.pending import AskKey
from sandgate.proxy.approvals.webhook import Webhooks, payload, sign
from sandgate.proxy.policy.model import ApprovalSettings

KEY = AskKey.make(
    task_id="t1",
    sandbox="10.0.0.2",
    profile="default",
    name="API.example.test.",
    port=443,
    protocol="tls",
)


def _approvals() -> Approvals:
    settings = ApprovalSettings(hold=10.0, expire_pending=60.0, max_pending_per_sandbox=5)
    return Approvals(lambda event: None, lambda profile: settings)


async def _http(port: int, method: str, path: str, headers: dict | None = None, body: bytes = b""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head += f"content-length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    head, _, rest = data.partition(b"\r\n\r\n")
    return status, head.decode(), rest


async def _server():
    approvals = _approvals()
    sessions = Sessions()
    server = AdminServer(approvals, sessions)
    _, port = await server.start("127.0.0.1", 0)
    return approvals, sessions, server, port


def test_the_api_needs_the_token_and_refuses_cross_site_posts():
    async def main():
        approvals, sessions, server, port = await _server()
        hold = asyncio.ensure_future(approvals.hold(KEY, "ask-1", {}))
        await asyncio.sleep(0.05)
        (pending,) = approvals.list()
        assert (await _http(port, "GET", "/api/approvals"))[0] == 401
        wrong = {"authorization": "Bearer nope"}
        assert (await _http(port, "GET", "/api/approvals", wrong))[0] == 401
        bearer = {"authorization": f"Bearer {sessions.token}", "content-type": "application/json"}
        status, _, body = await _http(port, "GET", "/api/approvals", bearer)
        listed = json.loads(body)["approvals"]
        assert status == 200 and listed[0]["name"] == "api.example.test"
        assert {"first_seen", "waiting_s", "held", "sandbox", "protocol"} <= listed[0].keys()
        decision = json.dumps({"decision": "approve", "scope": "task"}).encode()
        cross = {**bearer, "origin": "http://evil.test"}
        status, _, body = await _http(
            port, "POST", f"/api/approvals/{pending['id']}", cross, decision
        )
        assert status == 403 and "cross-site" in json.loads(body)["error"]
        # A logged-in page's session id sent as a cookie (how a browser would attach it
        # on its own, to every port of this host): not a credential.
        session = sessions.login(sessions.token)
        page = {"cookie": f"sandgate_session={session}", "origin": f"http://127.0.0.1:{port}"}
        status, _, _ = await _http(port, "POST", f"/api/approvals/{pending['id']}", page, decision)
        assert status == 401
        # An always rule's expiry that is no date: 400, one line.
        bad = json.dumps({"decision": "approve", "scope": "always", "expires": "soon"}).encode()
        status, _, body = await _http(port, "POST", f"/api/approvals/{pending['id']}", bearer, bad)
        assert status == 400 and "expires 'soon' is not a date" in json.loads(body)["error"]
        assert not hold.done() and approvals.list()  # nothing was decided
        status, _, _ = await _http(port, "POST", "/api/approvals/nosuch", bearer, decision)
        assert status == 404
        status, _, body = await _http(
            port, "POST", f"/api/approvals/{pending['id']}", bearer, decision
        )
        assert status == 200 and json.loads(body)["approval"]["approver"] == "admin (api key)"
        assert (await hold).answer is Answer.GRANTED
        status, _, body = await _http(
            port, "POST", f"/api/approvals/{pending['id']}", bearer, decision
        )
        assert status == 409 and "first decision stands" in json.loads(body)["error"]
        await server.stop()

    asyncio.run(main())


def test_the_page_logs_in_to_a_session_header_and_sets_no_cookie():
    async def main():
        approvals, sessions, server, port = await _server()
        status, head, body = await _http(port, "GET", "/")
        assert status == 200 and b'id="token"' in body and b"Pending approvals" in body
        assert "default-src 'self'" in head and b"<script>" not in body
        origin = {"origin": f"http://127.0.0.1:{port}", "content-type": "application/json"}
        login = json.dumps({"token": sessions.token}).encode()
        status, _, body = await _http(port, "POST", "/login", origin, b'{"token": "wrong"}')
        assert status == 401 and json.loads(body)["error"] == "wrong token"
        assert (await _http(port, "POST", "/login", origin, b"token=x"))[0] == 400
        cross = {**origin, "origin": "http://evil.test"}
        assert (await _http(port, "POST", "/login", cross, login))[0] == 403
        status, head, body = await _http(port, "POST", "/login", origin, login)
        assert status == 200 and "set-cookie" not in head.lower()
        answer = json.loads(body)
        assert answer["approver"] == "admin (web)"
        session = {SESSION_HEADER: answer["session"]}
        # The page is the same with or without a session: it holds no secret.
        assert (await _http(port, "GET", "/", session))[2] == (await _http(port, "GET", "/"))[2]
        hold = asyncio.ensure_future(approvals.hold(KEY, "ask-1", {}))
        await asyncio.sleep(0.05)
        (pending,) = approvals.list()
        decision = json.dumps({"decision": "deny"}).encode()
        target = f"/api/approvals/{pending['id']}"
        status, _, body = await _http(port, "POST", target, {**session, **cross}, decision)
        assert status == 403 and not hold.done()
        status, _, body = await _http(port, "POST", target, {**session, **origin}, decision)
        assert status == 200 and json.loads(body)["approval"]["approver"] == "admin (web)"
        assert (await hold).answer is Answer.DENIED
        # Logged out: the session is refused from then on.
        assert (await _http(port, "POST", "/logout", {**session, **origin}))[0] == 200
        assert (await _http(port, "GET", "/api/approvals", session))[0] == 401
        await server.stop()

    asyncio.run(main())


def test_a_nested_body_is_a_bad_request_not_an_internal_error(caplog):
    # json.loads raised RecursionError: a 500 and a traceback, without a token
    async def main():
        approvals, sessions, server, port = await _server()
        origin = {"origin": f"http://127.0.0.1:{port}", "content-type": "application/json"}
        bearer = {**origin, "authorization": f"Bearer {sessions.token}"}
        deep = b"[" * 5000
        assert (await _http(port, "POST", "/login", origin, deep))[0] == 400
        assert (await _http(port, "POST", "/api/approvals/x", bearer, deep))[0] == 400
        await server.stop()

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.exc_info], caplog.text[-2000:]


def test_server_sent_events_push_a_new_approval():
    async def main():
        approvals, sessions, server, port = await _server()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /api/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {sessions.token}\r\n\r\n".encode()
        )
        await reader.readuntil(b": ping")
        hold = asyncio.ensure_future(approvals.hold(KEY, "ask-1", {}))
        chunk = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        chunk += await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert b"event: change" in chunk and b'"change": "new"' in chunk
        writer.close()
        hold.cancel()
        await server.stop()

    asyncio.run(main())


@pytest.mark.parametrize("fmt", ["json", "slack"])
def test_the_webhook_is_signed_retried_and_counts_failures(fmt):
    async def main():
        got: list[tuple[dict, bytes]] = []
        calls = 0

        async def receiver(reader, writer):
            nonlocal calls
            calls += 1
            head = await reader.readuntil(b"\r\n\r\n")
            headers = dict(
                line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
            )
            body = await reader.readexactly(int(headers["content-length"]))
            status = b"503 Busy" if calls == 1 else b"204 No Content"  # the first try fails
            writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            got.append(({k.lower(): v for k, v in headers.items()}, body))

        receiver_server = await asyncio.start_server(receiver, "127.0.0.1", 0)
        port = receiver_server.sockets[0].getsockname()[1]
        failures = []
        approvals = _approvals()
        hooks = Webhooks(
            [f"http://127.0.0.1:{port}/hook"],
            b"k" * 32,
            fmt,
            None,
            lambda: failures.append(1),
            backoff=0.01,
        )
        hooks.start(approvals, lambda record: {**record, "first_seen": "now"})
        hold = asyncio.ensure_future(approvals.hold(KEY, "ask-1", {}))
        for _ in range(200):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        (_, first), (headers, body) = got
        assert calls == 2 and first == body and not failures
        expected = "sha256=" + hmac.new(b"k" * 32, body, hashlib.sha256).hexdigest()
        assert headers["x-sandgate-signature"] == expected
        document = json.loads(body)
        text = document["text"] if fmt == "slack" else document["approval"]["name"]
        assert "api.example.test" in text
        # A dead receiver: every try fails, the loop goes on, the failure is counted.
        receiver_server.close()
        await receiver_server.wait_closed()
        assert not await hooks.deliver(f"http://127.0.0.1:{port}/hook", b"{}")
        assert failures == [1]
        hold.cancel()
        await hooks.stop()

    asyncio.run(main())


def test_payload_and_signature_are_plain_functions():
    record = {
        "id": "ab12",
        "task_id": "t",
        "profile": "p",
        "name": "x.test",
        "port": 80,
        "protocol": "http",
        "method": "POST",
        "path": "/up",
        "rule": "r",
    }
    assert json.loads(payload(record, "json"))["destination"] == "POST x.test:80 (http)/up"
    assert sign(b"s", b"b") == "sha256=" + hmac.new(b"s", b"b", hashlib.sha256).hexdigest()


@pytest.mark.parametrize("any_port", [True, False])
def test_a_taken_admin_port_means_another_port_or_no_start(any_port, tmp_path, capsys):
    """An embedded run's default port in use (another run has it): any free port, the
    URL printed, and the page answers there. Otherwise (a service, an address given
    explicitly): the start stops (RunError naming --admin-listen), no token written:
    whoever has the port would get the approvers' tokens (rt45 F7)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def main():
        options = AdminOptions(listen=("127.0.0.1", port), any_port_if_taken=any_port)
        admin = Admin(options, _approvals())
        await admin.start(tmp_path / "admin-token", "sandgate")
        try:
            if admin.url is None:
                return None, None
            bound = int(admin.url.rsplit(":", 1)[1].rstrip("/"))
            return bound, (await _http(bound, "GET", "/api/approvals"))[0]
        finally:
            await admin.stop()

    try:
        if not any_port:
            with pytest.raises(RunError) as refused:
                asyncio.run(main())
            assert str(refused.value).startswith(
                f"--admin-listen 127.0.0.1:{port}: cannot listen: Address already in use"
            )
            assert not (tmp_path / "admin-token").exists()
            return
        bound, status = asyncio.run(main())
    finally:
        taken.close()
    err = capsys.readouterr().err
    if any_port:
        assert bound not in (None, port) and status == 401
        assert f"approvals page on http://127.0.0.1:{bound}/" in err and "warning" not in err
        assert (tmp_path / "admin-token").stat().st_mode & 0o777 == 0o600


def test_wrong_tokens_are_counted_and_logged_by_address_once_a_minute(caplog):
    """A wrong bearer token, a wrong login and a wrong session each count (the metric's
    callback) and the first is logged with the address; the rest of that minute are
    held back and said with the next line. A request with no credential (a page not
    logged in yet) is neither."""

    async def main():
        approvals, sessions = _approvals(), Sessions()
        failures = []
        server = AdminServer(approvals, sessions, on_auth_failure=lambda: failures.append(1))
        clock = [1000.0]
        server.failures.clock = lambda: clock[0]
        _, port = await server.start("127.0.0.1", 0)
        origin = {"origin": f"http://127.0.0.1:{port}", "content-type": "application/json"}
        assert (await _http(port, "GET", "/api/approvals"))[0] == 401  # no credential
        assert failures == [] and "admin:" not in caplog.text
        assert (await _http(port, "GET", "/api/approvals", {"authorization": "Bearer x"}))[0] == 401
        assert (await _http(port, "POST", "/login", origin, b'{"token": "guess"}'))[0] == 401
        assert (await _http(port, "GET", "/api/events", {"x-sandgate-session": "old"}))[0] == 401
        assert len(failures) == 3
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admin:")]
        assert lines == [
            "admin: a wrong token or session for GET /api/approvals from 127.0.0.1 (1 since "
            "the last report of this address; the next within 60 s are counted, not logged)"
        ], lines
        clock[0] += 61
        assert (await _http(port, "POST", "/login", origin, b'{"token": "guess2"}'))[0] == 401
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admin:")]
        assert len(lines) == 2 and "a login with a wrong token from 127.0.0.1 (3 since" in lines[1]
        good = {"authorization": f"Bearer {sessions.token}"}
        assert (await _http(port, "GET", "/api/approvals", good))[0] == 200
        assert len(failures) == 4
        await server.stop()

    with caplog.at_level(logging.WARNING, logger="sandgate.admin"):
        asyncio.run(main())


def test_the_failure_tally_holds_a_bounded_number_of_addresses():
    tally = FailedCredentials(clock=lambda: 5.0)
    for i in range(MAX_FAILING_PEERS + 10):
        assert tally.note(f"10.0.{i // 256}.{i % 256}") == 1
    assert len(tally._peers) == MAX_FAILING_PEERS
    assert tally.note("10.0.0.0") == 1  # forgotten (the oldest), so said again
    assert (
        tally.note(f"10.0.{(MAX_FAILING_PEERS + 9) // 256}.{(MAX_FAILING_PEERS + 9) % 256}") is None
    )
