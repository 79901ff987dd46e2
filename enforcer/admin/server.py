"""The admin HTTP server on the gateway's loop (`--admin-listen`, default
127.0.0.1:9465): the approvals page, its JSON API and its live updates (SSE).
HTTP/1.1 with h11 (a protocol with no I/O) over asyncio streams.

    GET  /                        the page (its login form, or the approvals once logged in)
    POST /login                   {"token": "..."} -> {"session": ID, "approver": "alice (web)"}
    POST /logout                  ends the session in X-Sandgate-Session
    GET  /static/app.js, app.css  the page's script and style (CSP: default-src 'self')
    GET  /api/approvals           pending approvals
    GET  /api/approvals/recent    recent decisions
    GET  /api/approvals/ID        one approval
    POST /api/approvals/ID        {"decision": "approve"|"deny", "scope": "once"|"task"|"for"|"always",
                                   "duration": "1h", "ticket": "...", "expires": "2026-06-30"|"30d",
                                   "widen": "*.example.com"}
    GET  /api/events              Server-Sent Events: one `change` per new/decided/expired approval

Decisions go through the control socket's code (enforcer/approvals_control.py), so the
CLI, the page and the API behave the same. Authentication (bearer keys, the page's
session header, no cookies) and the same-origin check: auth.py. A
sandbox never reaches this server: its nftables table drops every packet to a local
address of the gateway's host (enforcer/nft.py, `dropped_to_gateway`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources

from sandgate.enforcer import approvals_control
from sandgate.enforcer.admin.auth import (
    SESSION_HEADER,
    Caller,
    FailedCredentials,
    Sessions,
    post_refusal,
    presents_credentials,
)
from sandgate.proxy.approvals.holder import Approvals
from sandgate.proxy.approvals.pending import ApprovalError
from sandgate.proxy.policy.model import parse_duration
from sandgate.proxy.policy.names import format_host_port

log = logging.getLogger("sandgate.admin")

MAX_BODY = 64 * 1024
MAX_HEAD = 16 * 1024
IDLE_S = 60.0
# A request's head must arrive within HEAD_S of the wait for it (the connection's start,
# or the end of the previous response), and the whole request within REQUEST_S:
# otherwise a client sending a byte a minute (slowloris) keeps a connection for ever.
HEAD_S = 10.0
REQUEST_S = 30.0
# Connections open at once (the page's live updates hold one per tab), in all and per
# address: past them a new connection takes the place of the one that has waited longest
# for a request's head, or, none waiting, is closed at once (and logged): idle
# connections from a local user can neither take the gateway's descriptors nor keep
# the approvers out.
MAX_CLIENTS = 64
MAX_CLIENTS_PER_ADDRESS = 32
SSE_PING_S = 15.0
SCOPES = {
    "once": "once",
    "task": "task",
    "for": "duration",
    "duration": "duration",
    "always": "always",
}
SECURITY_HEADERS = [
    ("content-security-policy", "default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "same-origin"),
    ("cache-control", "no-store"),
]
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}

# h11 is imported by the first connection (`_load_h11`), not with this module: every
# `sandgate run` starts this server and few are ever visited, and h11's import (the
# regexes of its grammar) is ~10 ms of a run's start.
h11 = None


def _load_h11() -> None:
    global h11
    if h11 is None:
        import h11 as module

        h11 = module


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, document) -> Response:
    return Response(status, json.dumps(document).encode() + b"\n")


def error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


def with_wall_time(record: dict, clock_now: float) -> dict:
    """`first_seen` (ISO 8601, UTC) from the approvals' monotonic `created`."""
    seen = time.time() - (clock_now - record["created"])
    return {**record, "first_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seen))}


class AdminServer:
    def __init__(self, approvals: Approvals, sessions: Sessions, on_auth_failure=lambda: None):
        """`on_auth_failure()`: once per wrong token or session (the metric)."""
        self.approvals = approvals
        self.sessions = sessions
        self.on_auth_failure = on_auth_failure
        self.failures = FailedCredentials()
        self.server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None
        self.allowed_origins: set[str] = set()
        self._any_host = False  # listening on every address: the Host the client used
        self._clients: set[asyncio.Task] = set()
        self._per_address: dict[str, int] = {}
        # Connections waiting for a request's head (none under way, no live updates):
        # task -> (since when, its address). The oldest goes for a new one past the caps.
        self._waiting: dict[asyncio.Task, tuple[float, str]] = {}
        self.refused = 0  # connections closed at once: past MAX_CLIENTS (per address)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._client, host, port)
        self.address = self.server.sockets[0].getsockname()[:2]
        port = self.address[1]
        loopback = host in ("127.0.0.1", "::1", "localhost")
        names = {host, "localhost", "127.0.0.1", "::1"} if loopback else {host}
        self.allowed_origins = {f"http://{format_host_port(n, port)}" for n in names}
        self._any_host = host in ("0.0.0.0", "::", "")
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(self._clients, timeout=2)

    def _evict(self, peer: str | None) -> bool:
        """Make room: cancel the connection (of `peer`; None: of anyone) that has waited
        longest for a request's head. False if none waits: every one is busy (a request,
        live updates), which only a logged-in approver can keep open."""
        waiting = [
            (since, task) for task, (since, at) in self._waiting.items() if peer in (None, at)
        ]
        if not waiting:
            return False
        _, task = min(waiting, key=lambda item: item[0])
        del self._waiting[task]
        task.cancel()
        return True

    # --- HTTP/1.1 with h11 -------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else "an unknown address"  # tallied by address
        if (
            len(self._clients) >= MAX_CLIENTS
            or self._per_address.get(peer, 0) >= MAX_CLIENTS_PER_ADDRESS
        ) and not self._evict(peer if len(self._clients) < MAX_CLIENTS else None):
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "admin: connection from %s closed at once: %d open (at most %d, %d per "
                    "address); %d refused so far",
                    peer,
                    len(self._clients),
                    MAX_CLIENTS,
                    MAX_CLIENTS_PER_ADDRESS,
                    self.refused,
                )
            writer.close()
            return
        self._clients.add(task)
        self._per_address[peer] = self._per_address.get(peer, 0) + 1
        log.info("admin connection from %s", peername)
        _load_h11()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                self._waiting[task] = (asyncio.get_running_loop().time(), peer)
                try:
                    got = await self._read_request(conn, reader)
                finally:
                    self._waiting.pop(task, None)
                if got is None:
                    return
                request, body = got
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers
                }
                path = request.target.decode("latin-1")
                if request.method == b"GET" and path == "/api/events":
                    await self._events(conn, reader, writer, headers, peer)
                    return
                try:
                    response = await self.route(request.method.decode(), path, headers, body, peer)
                except Exception:  # noqa: BLE001 - one bad request never takes the server down
                    log.exception("admin request %s %s failed", request.method, path[:100])
                    response = error(500, "internal error (see the gateway's log)")
                await self._send(conn, writer, response)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as e:
            status = getattr(e, "error_status_hint", 400)
            with contextlib.suppress(Exception):
                await self._send(conn, writer, error(status, f"bad request: {e}"))
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(task)
            self._waiting.pop(task, None)
            left = self._per_address.pop(peer, 1) - 1
            if left > 0:
                self._per_address[peer] = left
            writer.close()

    async def _read_request(self, conn: h11.Connection, reader) -> tuple[h11.Request, bytes] | None:
        """The next request and its body, or None (the client closed). TimeoutError past
        a read idle IDLE_S, a head not complete HEAD_S or a request REQUEST_S after the
        wait for it began."""
        request, body = None, bytearray()
        now = asyncio.get_running_loop().time()
        head_by, request_by = now + HEAD_S, now + REQUEST_S
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                now = asyncio.get_running_loop().time()
                by = min(head_by if request is None else request_by, now + IDLE_S)
                async with asyncio.timeout_at(by):
                    data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)

    async def _send(self, conn: h11.Connection, writer, response: Response) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *SECURITY_HEADERS,
            *response.headers,
        ]
        if conn.our_state is not h11.SEND_RESPONSE:
            return
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)))
        writer.write(conn.send(h11.Data(data=response.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    # --- routes ------------------------------------------------------------------------------

    def _origins(self, headers: dict[str, str]) -> set[str]:
        """Where a POST may come from: this server's own address (on a wildcard listen
        address, as the client named it in Host)."""
        if self._any_host and "host" in headers:
            return self.allowed_origins | {f"http://{headers['host'].lower()}"}
        return self.allowed_origins

    async def route(
        self, method: str, path: str, headers: dict[str, str], body: bytes, peer: str = "?"
    ) -> Response:
        path = path.split("?", 1)[0]
        caller = self.sessions.caller(headers)
        if path.startswith("/static/") and method == "GET":
            return self._static(path.removeprefix("/static/"))
        if path == "/" and method == "GET":
            return self._page()
        if path in ("/login", "/logout") and method == "POST":
            refusal = post_refusal(headers, self._origins(headers))
            if refusal:
                return error(403, refusal)
            return self._login(path, caller, body, peer)
        if not path.startswith("/api/approvals"):
            return error(404, f"no such page {path[:100]!r}")
        if caller is None:
            self._refused(headers, peer, f"{method} {path[:100]}")
            return error(401, "missing or wrong token (Authorization: Bearer TOKEN, or log in)")
        rest = path.removeprefix("/api/approvals").strip("/")
        if method == "GET":
            return self._get(rest)
        if method == "POST" and rest and "/" not in rest:
            try:
                request = json.loads(body or b"{}")
            except (ValueError, RecursionError):  # RecursionError: [[[[... too deep
                request = None
            if not isinstance(request, dict):
                return error(400, "the body must be a JSON object")
            refusal = post_refusal(headers, self._origins(headers))
            if refusal:
                return error(403, refusal)
            return await self.decide(rest, request, caller)
        return error(405, f"{method} {path[:100]}: not here")

    def _get(self, rest: str) -> Response:
        now = self.approvals.clock()
        if rest == "":
            return json_response(
                200, {"approvals": [with_wall_time(a, now) for a in self.approvals.list()]}
            )
        if rest == "recent":
            return json_response(
                200, {"recent": [with_wall_time(a, now) for a in self.approvals.recent()[:50]]}
            )
        try:
            return json_response(200, {"approval": with_wall_time(self.approvals.get(rest), now)})
        except ApprovalError as e:
            return error(404, str(e))

    async def decide(self, pending_id: str, request: dict, caller: Caller) -> Response:
        """A decision, through the control socket's code path: 404 for an unknown id,
        409 for one decided before (or being decided), 400 for a bad request."""
        decision = request.get("decision")
        if decision not in ("approve", "deny"):
            return error(400, 'decision must be "approve" or "deny"')
        command: dict = {"cmd": decision, "id": pending_id}
        if decision == "approve":
            scope = SCOPES.get(str(request.get("scope", "once")))
            if scope is None:
                return error(400, 'scope must be "once", "task", "for" or "always"')
            command["scope"] = scope
            if scope == "duration":
                try:
                    command["duration"] = parse_duration(str(request.get("duration", "")))
                except ValueError as e:
                    return error(400, f"duration: {e}")
            for field in ("ticket", "expires", "widen"):  # handle() checks each's scope
                if request.get(field):
                    command[field] = str(request[field])
            if request.get("seen") is not None:  # the revision the page showed: handle() checks
                command["seen"] = request["seen"]
        try:
            self.approvals.get(pending_id)
        except ApprovalError as e:
            return error(404, str(e))
        reply = await approvals_control.handle(self.approvals, command, caller.approver)
        if reply.get("ok"):
            return json_response(200, {"approval": reply["approval"]})
        conflict = ("already", "changed since", "is being approved")  # decided, moved on, deciding
        status = 409 if any(word in reply["error"] for word in conflict) else 400
        return error(status, reply["error"])

    def _refused(self, headers: dict[str, str], peer: str, what: str) -> None:
        """A request refused for its credentials: a wrong token or session (not none at
        all: a page not logged in yet) is counted and told to the admin's log."""
        if presents_credentials(headers):
            self._failed(peer, f"a wrong token or session for {what}")

    def _failed(self, peer: str, what: str) -> None:
        self.on_auth_failure()
        count = self.failures.note(peer)
        if count is not None:
            log.warning(
                "admin: %s from %s (%d since the last report of this address; "
                "the next within %.0f s are counted, not logged)",
                what, peer, count, self.failures.window,
            )  # fmt: skip

    def _login(self, path: str, caller: Caller | None, body: bytes, peer: str) -> Response:
        if path == "/logout":
            if caller is not None and caller.session:
                self.sessions.logout(caller.session)
            return json_response(200, {})
        try:
            request = json.loads(body or b"{}")
        except (ValueError, RecursionError):  # RecursionError: [[[[... too deep
            request = None
        token = request.get("token") if isinstance(request, dict) else None
        if not isinstance(token, str):
            return error(400, 'the body must be {"token": "..."}')
        session = self.sessions.login(token.strip())
        if session is None:
            self._failed(peer, "a login with a wrong token")
            return error(401, "wrong token")
        approver = self.sessions.caller({SESSION_HEADER: session}).approver
        return json_response(200, {"session": session, "approver": approver})

    def _page(self) -> Response:
        """The same page for everyone: what it shows comes from the API, with the
        session its script keeps (auth.py)."""
        page = resources.files("sandgate.enforcer.admin").joinpath("static/index.html").read_bytes()
        return Response(200, page, "text/html; charset=utf-8")

    def _static(self, name: str) -> Response:
        if name not in STATIC:
            return error(404, "no such file")
        data = resources.files("sandgate.enforcer.admin").joinpath(f"static/{name}").read_bytes()
        return Response(200, data, STATIC[name])

    # --- live updates --------------------------------------------------------------------------

    async def _events(self, conn: h11.Connection, reader, writer, headers: dict, peer: str) -> None:
        caller = self.sessions.caller(headers)
        if caller is None:
            self._refused(headers, peer, "GET /api/events")
            await self._send(conn, writer, error(401, "missing or wrong token"))
            return
        try:
            writer.write(
                conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[("content-type", "text/event-stream"), *SECURITY_HEADERS],
                    )
                )
            )
            async for change in approvals_control.changes(self.approvals, reader, SSE_PING_S):
                if change is None:  # subscribed, or quiet for a while
                    data = ": ping\n\n"
                else:
                    record = with_wall_time(change[1], self.approvals.clock())
                    document = json.dumps({"change": change[0], "approval": record})
                    data = f"event: change\ndata: {document}\n\n"
                writer.write(conn.send(h11.Data(data=data.encode())))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
