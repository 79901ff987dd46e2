"""The per-request checks taken out of mitmproxy (proxy/lean_mitmproxy.py) change no
result, and hooks dispatched directly reach the same addons in the same order."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
import sandgate.proxy.lean_mitmproxy  # noqa: F401 - before any mitmproxy import
from mitmproxy import addonmanager, exceptions, hooks, http, options
from mitmproxy.master import Master
from mitmproxy.net.http.http1 import read
from mitmproxy.proxy import commands, context, events, layer, layers
from mitmproxy.test import tflow
from mitmproxy.utils import asyncio_utils
from sandgate.proxy.lean_mitmproxy import (
    dispatch_hooks_directly,
    drop_per_request_checks,
    unblock_unhandled_hooks,
)

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


class Recorder:
    """An addon that records the hooks it gets, in a log shared by all of them."""

    def __init__(self, name: str, log: list, hooks_: dict):
        self.name, self.log = name, log
        for hook, behaviour in hooks_.items():
            setattr(self, hook, self._hook(hook, behaviour))

    def _hook(self, hook, behaviour):
        if behaviour == "async":

            async def record(*args):
                await asyncio.sleep(0)
                self.log.append((self.name, hook))

            return record

        def record(*args):
            self.log.append((self.name, hook))
            if behaviour == "raise":
                raise ValueError("boom")
            if behaviour == "halt":
                raise exceptions.AddonHalt()

        return record


def dispatched(addon_hooks: dict, hook_factory, change=None) -> list:
    """The (addon, hook) calls of dispatching one hook, twice (cache warm), with
    `change(master, log)` in between if given."""
    log: list = []

    async def main():
        master = Master(options.Options())
        master.addons.add(*(Recorder(n, log, h) for n, h in addon_hooks.items()))
        try:
            await master.addons.handle_lifecycle(hook_factory())
            if change is not None:
                change(master, log)
            await master.addons.handle_lifecycle(hook_factory())
        finally:
            master._legacy_log_events.uninstall()  # a log handler bound to this loop

    asyncio.run(main())
    return log


@pytest.fixture
def both_dispatchers(monkeypatch):
    """Runs a function with mitmproxy's dispatch, then with the direct one."""
    original = addonmanager.AddonManager.handle_lifecycle

    def run(fn):
        monkeypatch.setattr(addonmanager.AddonManager, "handle_lifecycle", original)
        before = fn()
        dispatch_hooks_directly()  # restored by monkeypatch at the end
        assert addonmanager.AddonManager.handle_lifecycle is not original
        return before, fn()

    return run


def request_hook():
    return layers.http.HttpRequestHeadersHook(tflow.tflow())


def test_direct_dispatch_calls_the_same_addons_in_the_same_order(both_dispatchers, caplog):
    addons = {
        "a": {"requestheaders": "ok", "update": "ok"},
        "b": {"requestheaders": "raise"},  # logged; the next addon still gets the hook
        "c": {"response": "ok"},
        "d": {"requestheaders": "async"},
    }
    caplog.set_level(logging.ERROR)
    before, after = both_dispatchers(lambda: dispatched(addons, request_hook))
    assert after == before
    assert after[:4] == [
        ("a", "requestheaders"),
        ("b", "requestheaders"),
        ("d", "requestheaders"),
        ("a", "update"),
    ]
    assert "Addon error: boom" in caplog.text


def test_addon_halt_stops_the_hook(both_dispatchers):
    addons = {"a": {"requestheaders": "halt"}, "b": {"requestheaders": "ok"}}
    before, after = both_dispatchers(lambda: dispatched(addons, request_hook))
    assert after == before == [("a", "requestheaders"), ("a", "requestheaders")]


def test_an_addon_added_or_removed_later_is_seen(both_dispatchers):
    def change(master, log):
        master.addons.remove(master.addons.get("a"))
        master.addons.add(Recorder("late", log, {"requestheaders": "ok"}))

    addons = {"a": {"requestheaders": "ok"}, "b": {"requestheaders": "ok"}}
    before, after = both_dispatchers(lambda: dispatched(addons, request_hook, change))
    assert (
        after
        == before
        == [
            ("a", "requestheaders"),
            ("b", "requestheaders"),
            ("b", "requestheaders"),
            ("late", "requestheaders"),
        ]
    )


@pytest.fixture
def hook_classes_restored():
    """unblock_unhandled_hooks changes hook classes: put them back afterwards."""
    saved = {cls: cls.__dict__.get("blocking") for cls in hooks.all_hooks.values()}
    yield
    for cls, blocking in saved.items():
        if blocking is not None:
            cls.blocking = blocking
        elif "blocking" in cls.__dict__:
            delattr(cls, "blocking")


class HookThenLog(layer.Layer):
    """Yields the response hook, then a log line."""

    def _handle_event(self, event):
        yield layers.http.HttpResponseHook(tflow.tflow(resp=True))
        yield commands.Log("after the hook")


def commands_on_start() -> list[str]:
    ctx = context.Context(tflow.tclient_conn(), options.Options())
    return [type(c).__name__ for c in HookThenLog(ctx).handle_event(events.Start())]


def test_hooks_no_addon_has_no_longer_pause_the_layer(hook_classes_restored):
    assert commands_on_start() == ["HttpResponseHook"]  # paused until HookCompleted
    log: list = []

    async def main():
        master = Master(options.Options())
        try:
            master.addons.add(Recorder("a", log, {"requestheaders": "ok"}))
            return unblock_unhandled_hooks(master.addons)
        finally:
            master._legacy_log_events.uninstall()

    unblocked = asyncio.run(main())
    assert "response" in unblocked and "tls_established_server" in unblocked
    assert "requestheaders" not in unblocked
    assert layers.http.HttpRequestHeadersHook.blocking is True  # an addon has it: waits
    assert layers.http.HttpResponseHook.blocking is False
    assert commands_on_start() == ["HttpResponseHook", "Log"]  # goes on at once
