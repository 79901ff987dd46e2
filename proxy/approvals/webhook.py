"""Approval webhooks: on each new pending approval, POST a JSON document (or a
Slack-compatible `{"text": ...}`) to every `--approval-webhook URL`, signed with
HMAC-SHA256 over the body:

    X-Sandgate-Signature: sha256=<hex of HMAC(secret, body)>

Delivery runs in tasks of its own (the loop is never blocked), each retried with
exponential backoff up to TRIES times; a delivery that fails every try is logged and
counted (`on_failure`, the metric sandgate_approval_webhook_failures_total).
A webhook only tells; decisions come back through the CLI, the page or the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import h11
from sandgate.proxy.approvals.holder import Approvals
from sandgate.proxy.approvals.shown import SHOWN_CHARS

log = logging.getLogger("sandgate.approvals")

TRIES = 5
BACKOFF_S = 1.0  # then 2, 4, 8 s
TIMEOUT_S = 10.0
FORMATS = ("json", "slack")


def check_url(url: str) -> str:
    """The URL if it is http(s)://host[:port]/path; ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url[:100]!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("put no credentials in the URL (the body is signed with the secret)")
    return url


def payload(record: dict, fmt: str, admin_url: str | None = None) -> bytes:
    """The body for one new approval (`Pending.to_dict()`, with `first_seen`)."""
    approve = f"sandgate approvals approve {record['id']}"
    if fmt == "slack":
        text = (
            f"sandgate: task {record['task_id']} (profile {record['profile']}) asks for "
            f"{destination(record, chat_inert)} ({record['shown']['held']}"
            + (f"; bodies: {record['shown']['bodies']}" if record["shown"].get("bodies") else "")
            + "); "
            f"approval {record['id']}, rule {record.get('rule') or '-'}. Decide: `{approve}`"
            + (f" or {admin_url}" if admin_url else "")
        )
        return json.dumps({"text": text}).encode()
    document = {
        "event": "approval_pending",
        "sent_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "destination": destination(record),
        "approval": record,
        "decide": {"cli": approve}
        | (
            {"api": f"{admin_url}api/approvals/{record['id']}", "page": admin_url}
            if admin_url
            else {}
        ),
    }
    return json.dumps(document).encode()


def destination(record: dict, shown: Callable[[str], str] = str) -> str:
    """`METHOD name:port (protocol)/path?query` of an approval record (the held request,
    query included, else the asked method and path), method and target (the task's
    choice) through `shown`, the target cut at SHOWN_CHARS with `... (N more bytes)`
    (the record's `request` has it whole)."""
    where = f"{record['name']}:{record['port']} ({record['protocol']})"
    request = record.get("request")
    if request is not None:
        method, _, target = request.partition(" ")
    elif record.get("method"):
        method, target = record["method"], record.get("path") or ""
    else:
        return where
    more = len(target[SHOWN_CHARS:].encode())
    cut = f"... ({more} more bytes)" if more else ""
    return f"{shown(method)} {where}{shown(target[:SHOWN_CHARS])}{cut}"


def chat_inert(text: str) -> str:
    """`text` (a method or path the task chose) percent-encoded but for letters, digits,
    `-._~`, `/` and `%`, for a chat message: Slack reads `<!channel>` as a mention of
    everyone and `<URL|words>` as a link showing only the words; Mattermost and Teams
    read `@channel` and `[words](URL)`; a backtick would end the command's code span.
    The name needs none of this (canonical: letters, digits, `-` and `.`)."""
    return quote(text, safe="/%")


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass
class Webhooks:
    urls: list[str]
    secret: bytes
    fmt: str = "json"
    admin_url: str | None = None  # the page, named in the payload when there is one
    on_failure: Callable[[], None] = lambda: None
    backoff: float = BACKOFF_S
    tries: int = TRIES

    def __post_init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._unsubscribe: Callable[[], None] | None = None

    def start(self, approvals: Approvals, with_wall_time: Callable[[dict], dict]) -> None:
        def on_change(what: str, record: dict) -> None:
            if what != "new":
                return
            body = payload(with_wall_time(record), self.fmt, self.admin_url)
            for url in self.urls:
                task = asyncio.get_running_loop().create_task(self.deliver(url, body))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        self._unsubscribe = approvals.subscribe(on_change)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    async def deliver(self, url: str, body: bytes) -> bool:
        """POST `body` to `url` until a 2xx, at most `tries` times; False if never."""
        headers = [
            ("content-type", "application/json"),
            ("user-agent", "sandgate-approvals"),
            ("x-sandgate-signature", sign(self.secret, body)),
        ]
        problem = ""
        for attempt in range(self.tries):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    status = await post(url, body, headers)
            except (OSError, TimeoutError, h11.ProtocolError, ssl.SSLError) as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if 200 <= status < 300:
                return True
            problem = f"HTTP {status}"
        log.warning("approval webhook %s failed %d times (last: %s)", url, self.tries, problem)
        self.on_failure()
        return False


async def post(url: str, body: bytes, headers: list[tuple[str, str]]) -> int:
    """One HTTP/1.1 POST (h11 over asyncio streams): the response's status."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    reader, writer = await asyncio.open_connection(
        parts.hostname, port, ssl=ssl.create_default_context() if https else None
    )
    try:
        conn = h11.Connection(h11.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rsplit("@", 1)[-1]
        writer.write(
            conn.send(
                h11.Request(
                    method="POST",
                    target=target,
                    headers=[("host", host), ("content-length", str(len(body))), *headers],
                )
            )
        )
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                return event.status_code
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before a response")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
