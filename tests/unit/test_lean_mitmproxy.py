"""The per-request checks taken out of mitmproxy (proxy/lean_mitmproxy.py) change no result."""

from __future__ import annotations

import asyncio
import dataclasses

import sandgate.proxy.lean_mitmproxy  # noqa: F401 - before any mitmproxy import
from mitmproxy import hooks, http
from mitmproxy.net.http.http1 import read
from mitmproxy.proxy import layers
from mitmproxy.test import tflow
from mitmproxy.utils import asyncio_utils
from sandgate.proxy.lean_mitmproxy import drop_per_request_checks

drop_per_request_checks()


def test_hook_args_are_the_fields_in_order_for_every_hook_class():
    flow = tflow.tflow(resp=True)
    for made in (
        layers.http.HttpRequestHeadersHook(flow),
        layers.http.HttpResponseHook(flow),
        layers.tls.TlsClienthelloHook(data=None),
        hooks.ConfigureHook(updated={"a"}),
    ):
        expected = [getattr(made, f.name) for f in dataclasses.fields(made)]
        assert made.args() == expected
        assert made.args() == expected  # cached the second time


def test_messages_from_the_parser_are_as_before():
    request = read.read_request_head(
        [b"GET /a?b=1 HTTP/1.1\r\n", b"Host: example.com\r\n", b"X: y\r\n"]
    )
    assert (request.method, request.path, request.host_header) == ("GET", "/a?b=1", "example.com")
    assert request.headers["x"] == "y"
    response = read.read_response_head([b"HTTP/1.1 204 No Content\r\n"])
    assert (response.status_code, response.reason.strip()) == (204, "No Content")
    assert http.MessageData.__post_init__ is sandgate.proxy.lean_mitmproxy._no_type_check


def test_tasks_are_still_named_with_their_client():
    async def main():
        task = asyncio_utils.create_task(asyncio.sleep(0), name="handler", client=("10.0.0.2", 5))
        await task
        return task

    task = asyncio.run(main())
    assert task.get_name() == "handler"
    assert task.client == ("10.0.0.2", 5)
    assert task.created > 0
