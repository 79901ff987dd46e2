"""The per-request checks taken out of mitmproxy (proxy/lean_mitmproxy.py) change no
result, and hooks dispatched directly reach the same addons in the same order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import pytest
import sandgate.proxy.lean_mitmproxy  # noqa: F401 - before any mitmproxy import
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mitmproxy import addonmanager, exceptions, hooks, http, options
from mitmproxy.master import Master
from mitmproxy.net.http.http1 import read
from mitmproxy.proxy import commands, context, events, layer, layers
from mitmproxy.test import tflow
from mitmproxy.utils import asyncio_utils
from sandgate.proxy.lean_mitmproxy import (
    dispatch_hooks_directly,
    drop_per_request_checks,
    lighter_forks,
    lighter_lookups,
    run_hooks_inline,
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


def before_and_after(monkeypatch, owner, name: str, patch):
    """A runner of a function with mitmproxy's `owner.name`, then with `patch()`
    applied (restored by monkeypatch at the end): (result before, result after)."""
    original = getattr(owner, name)

    def run(fn):
        monkeypatch.setattr(owner, name, original)
        before = fn()
        assert patch() is not False
        assert getattr(owner, name) is not original
        return before, fn()

    return run


@pytest.fixture
def both_dispatchers(monkeypatch):
    """Runs a function with mitmproxy's dispatch, then with the direct one."""
    return before_and_after(
        monkeypatch, addonmanager.AddonManager, "handle_lifecycle", dispatch_hooks_directly
    )


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


# --- hooks run inline (run_hooks_inline) -------------------------------------------


class TwoHooks(layer.Layer):
    """Yields requestheaders (an addon has it: blocks) and response, logging around them."""

    def __init__(self, context, flow):
        super().__init__(context)
        self.flow = flow

    def _handle_event(self, event):
        if isinstance(event, events.Start):
            yield commands.Log("start")
            yield layers.http.HttpRequestHeadersHook(self.flow)
            yield commands.Log("after requestheaders")
            yield layers.http.HttpResponseHook(self.flow)
            yield commands.Log("after response")


class Watchdog:
    def register_activity(self):
        pass

    def disarm(self):
        return contextlib.nullcontext()


def served(addon_hooks: dict, monkeypatch) -> tuple[list, list[str]]:
    """What a connection handler does with TwoHooks' Start: the addons' calls and the
    handler's log lines in one list, and the names of the tasks it started."""
    from mitmproxy.proxy import mode_servers

    log: list = []
    tasks: list[str] = []
    create_task = asyncio_utils.create_task

    def counted(coro, *, name, **kw):
        tasks.append(name)
        return create_task(coro, name=name, **kw)

    monkeypatch.setattr(asyncio_utils, "create_task", counted)

    async def main():
        master = Master(options.Options())
        try:
            master.addons.add(*(Recorder(n, log, h) for n, h in addon_hooks.items()))
            handler = mode_servers.ProxyConnectionHandler.__new__(
                mode_servers.ProxyConnectionHandler
            )
            handler.master, handler.transports, handler.hook_tasks = master, {}, set()
            handler.client = tflow.tclient_conn()
            handler.timeout_watchdog, handler._server_event_lock = Watchdog(), asyncio.Lock()
            handler.log = lambda message, *a, **k: log.append(message)
            ctx = context.Context(handler.client, master.options)
            handler.layer = TwoHooks(ctx, tflow.tflow())
            await handler.server_event(events.Start())
            while handler.hook_tasks:
                await asyncio.sleep(0)
        finally:
            master._legacy_log_events.uninstall()

    asyncio.run(main())
    return log, tasks


@pytest.fixture
def both_event_paths(monkeypatch):
    """Runs a function with mitmproxy's server_event, then with hooks inline."""
    from mitmproxy.proxy import server

    return before_and_after(monkeypatch, server.ConnectionHandler, "server_event", run_hooks_inline)


ADDONS = {"a": {"requestheaders": "ok", "response": "ok"}, "b": {"requestheaders": "ok"}}
IN_ORDER = [
    "start",
    ("a", "requestheaders"),
    ("b", "requestheaders"),
    "after requestheaders",
    ("a", "response"),
    "after response",
]


def test_inline_hooks_reach_the_same_addons_in_the_same_order_without_tasks(
    both_event_paths, monkeypatch
):
    (log_before, tasks_before), (log_after, tasks_after) = both_event_paths(
        lambda: served(ADDONS, monkeypatch)
    )
    assert log_before == log_after == IN_ORDER
    assert tasks_before == ["handle_hook(requestheaders)", "handle_hook(response)"]
    assert tasks_after == []


@pytest.mark.parametrize(
    "behaviour, logged",
    [
        pytest.param("async", IN_ORDER, id="awaitable-goes-on-in-a-task"),
        pytest.param("raise", IN_ORDER, id="exception-logged-next-addon-called"),
        pytest.param("halt", IN_ORDER[:2] + IN_ORDER[3:], id="halt-stops-the-hook"),
    ],
)
def test_inline_hooks_keep_mitmproxys_handling(both_event_paths, monkeypatch, behaviour, logged):
    addons = {"a": {"requestheaders": behaviour, "response": "ok"}, "b": {"requestheaders": "ok"}}
    (log_before, _), (log_after, tasks_after) = both_event_paths(
        lambda: served(addons, monkeypatch)
    )
    strip = [entry for entry in log_after if not str(entry).startswith("Addon error")]
    assert log_before == log_after
    assert strip == logged
    assert tasks_after == (["handle_hook(requestheaders)"] if behaviour == "async" else [])


def test_a_changed_mitmproxy_keeps_its_own_hook_path(monkeypatch):
    from mitmproxy.proxy import server
    from sandgate.proxy import lean_mitmproxy

    original = server.ConnectionHandler.server_event
    monkeypatch.setattr(server.ConnectionHandler, "server_event", original)
    assert lean_mitmproxy.hook_path_changes() == []  # recorded for the installed mitmproxy
    monkeypatch.setitem(
        lean_mitmproxy.HOOK_PATH_SOURCES, "server.ConnectionHandler.hook_task", "0" * 64
    )
    assert lean_mitmproxy.hook_path_changes() == ["server.ConnectionHandler.hook_task"]
    assert run_hooks_inline() is False
    assert server.ConnectionHandler.server_event is original


class SendsInPieces(layer.Layer):
    """On Start: a head and a body to the client, as two SendData (two TLS records),
    then `then` (e.g. a half-close)."""

    def __init__(self, context, then=()):
        super().__init__(context)
        self.then = then

    def _handle_event(self, event):
        if isinstance(event, events.Start):
            yield commands.SendData(self.context.client, b"head|")
            yield commands.Log("between")
            yield commands.SendData(self.context.client, b"body")
            yield from self.then


class RecordingWriter:
    def __init__(self, calls: list):
        self.calls = calls

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.calls.append(data)

    def write_eof(self) -> None:
        self.calls.append("EOF")


def writing_handler(master, calls: list):
    """A ProxyConnectionHandler, no layer yet, whose client's writes go to `calls`."""
    from mitmproxy.proxy import mode_servers, server

    handler = mode_servers.ProxyConnectionHandler.__new__(mode_servers.ProxyConnectionHandler)
    handler.master, handler.hook_tasks = master, set()
    handler.client = tflow.tclient_conn()
    handler.transports = {handler.client: server.ConnectionIO(writer=RecordingWriter(calls))}
    handler.timeout_watchdog, handler._server_event_lock = Watchdog(), asyncio.Lock()
    handler.log = lambda message, *a, **k: None
    return handler


def written(then=()) -> list:
    """What a connection handler writes to the client for SendsInPieces' Start."""

    calls: list = []

    async def main():
        master = Master(options.Options())
        try:
            handler = writing_handler(master, calls)
            ctx = context.Context(handler.client, master.options)
            handler.layer = SendsInPieces(ctx, [c(ctx.client) for c in then])
            await handler.server_event(events.Start())
        finally:
            master._legacy_log_events.uninstall()

    asyncio.run(main())
    return calls


def half_close(client):
    return commands.CloseTcpConnection(client, half_close=True)


@pytest.mark.parametrize(
    "then, before, after",
    [
        pytest.param((), [b"head|", b"body"], [b"head|body"], id="one-write-per-event"),
        pytest.param(
            (half_close,), [b"head|", b"body", "EOF"], [b"head|body", "EOF"], id="before-a-close"
        ),
    ],
)
def test_each_events_data_goes_out_in_one_write(both_event_paths, then, before, after):
    assert both_event_paths(lambda: written(then)) == (before, after)


class HeldThenSends(layer.Layer):
    """requestheaders (blocking), then what the layer sends once it was decided."""

    def __init__(self, context, flow):
        super().__init__(context)
        self.flow = flow

    def _handle_event(self, event):
        if isinstance(event, events.Start):
            yield layers.http.HttpRequestHeadersHook(self.flow)
            yield commands.SendData(self.context.client, b"forwarded")


class Holds:
    """An addon that holds every request until `release` is set (an approval)."""

    def __init__(self):
        self.release = asyncio.get_running_loop().create_future()

    def requestheaders(self, flow):
        return self.release


def held() -> tuple[list, list]:
    """What is written while the hook holds the request, and after it is released."""

    calls: list = []

    async def main():
        master = Master(options.Options())
        try:
            holder = Holds()
            master.addons.add(holder)
            handler = writing_handler(master, calls)
            handler.layer = HeldThenSends(
                context.Context(handler.client, master.options), tflow.tflow()
            )
            await handler.server_event(events.Start())
            for _ in range(20):
                await asyncio.sleep(0)
            while_held = list(calls)
            holder.release.set_result(None)
            while handler.hook_tasks:
                await asyncio.sleep(0)
            return while_held, calls
        finally:
            master._legacy_log_events.uninstall()

    return asyncio.run(main())


def test_a_held_request_goes_on_only_once_released(both_event_paths):
    assert both_event_paths(held) == (([], [b"forwarded"]), ([], [b"forwarded"]))


# --- lighter lookups, leaf objects reused -------------------------------------------


def test_header_lookups_give_what_they_gave_without_raising_inside(monkeypatch):
    from mitmproxy.coretypes import multidict

    lighter_lookups()
    headers = http.Headers(
        fields=((b"Host", b"a"), (b"X-Y", b"1"), (b"x-y", b"2"), (b"\xff", b"\xfe"))
    )

    def no_getitem(self, key):
        raise AssertionError("went through __getitem__ and a KeyError")

    monkeypatch.setattr(multidict._MultiDict, "__getitem__", no_getitem)
    assert headers.get("X-y") == "1, 2" and headers.get(b"HOST") == "a"
    assert headers.get("missing") is None and headers.get("missing", "d") == "d"
    assert headers.get_all("x-Y") == ["1", "2"] and headers.get_all("missing") == []
    assert headers.get("\udcff") == "\udcfe"  # surrogateescape both ways, as before
    assert ("host" in headers, b"X-Y" in headers, "missing" in headers) == (True, True, False)


def test_option_reads_copy_only_what_is_mutable(monkeypatch):
    from mitmproxy import optmanager

    lighter_lookups()
    opts = options.Options()
    opts.update(mode=["transparent"])
    copied: list = []
    deepcopy = optmanager.copy.deepcopy
    monkeypatch.setattr(optmanager.copy, "deepcopy", lambda v: copied.append(v) or deepcopy(v))
    assert (opts.listen_port, opts.listen_host, opts.ssl_insecure) == (None, "", False)
    assert copied == []
    modes = opts.mode
    modes.append("changed")  # a list is still a copy: the option is untouched
    assert opts.mode == ["transparent"] and copied == [["transparent"], ["transparent"]]


def test_leaf_certificate_and_key_are_converted_once(tmp_path):
    from cryptography import x509
    from mitmproxy.certs import CertStore
    from OpenSSL import crypto
    from sandgate.proxy.gateway_ca import ensure_ec_ca
    from sandgate.proxy.lean_mitmproxy import reuse_leaf_objects

    reuse_leaf_objects()
    ensure_ec_ca(tmp_path)
    store = CertStore.from_store(tmp_path, "mitmproxy", 2048)
    entry = store.get_cert("a.test", [x509.DNSName("a.test")])
    assert store.get_cert("a.test", [x509.DNSName("a.test")]) is entry  # mitmproxy's cache
    cert = entry.cert.to_pyopenssl()
    assert entry.cert.to_pyopenssl() is cert
    assert cert.to_cryptography() == entry.cert._cert
    key = crypto.PKey.from_cryptography_key(entry.privatekey)
    assert crypto.PKey.from_cryptography_key(entry.privatekey) is key
    assert key.to_cryptography_key().private_numbers() == entry.privatekey.private_numbers()
    public = crypto.PKey.from_cryptography_key(entry.privatekey.public_key())
    assert public is not crypto.PKey.from_cryptography_key(entry.privatekey.public_key())


# --- ClientHellos read by sandgate's parser (parse_client_hellos_lean) ---------------


def tls_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def two_names_hello() -> bytes:
    """A minimal hello whose server_name lists two names: sandgate's parser refuses it."""
    names = b"\x00\x00\x06a.test" + b"\x00\x00\x06b.test"
    server_name = b"\x00\x00" + (len(names) + 2).to_bytes(2, "big") + len(names).to_bytes(2, "big")
    extensions = server_name + names
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


@pytest.fixture
def lean_hellos(monkeypatch):
    from mitmproxy.proxy.layers import tls as tls_layer
    from sandgate.proxy.lean_mitmproxy import parse_client_hellos_lean

    original = tls_layer.parse_client_hello
    monkeypatch.setattr(tls_layer, "parse_client_hello", original)
    parse_client_hellos_lean()
    assert tls_layer.parse_client_hello is not original
    return original, tls_layer.parse_client_hello


@pytest.mark.parametrize(
    "hello",
    [
        pytest.param(tls_hello("a.test", ["h2", "http/1.1"]), id="sni-alpn"),
        pytest.param(tls_hello("b.test"), id="sni"),
        pytest.param(tls_hello(None, ["http/1.1"]), id="alpn-no-sni"),
        pytest.param(tls_hello("under_score.test"), id="sni-mitmproxy-takes-as-host"),
        pytest.param(tls_hello("-bad-.test"), id="sni-not-a-host-name-is-none"),
    ],
)
def test_lean_hello_reads_as_mitmproxys(lean_hellos, hello):
    kaitai, lean = lean_hellos
    expected, got = kaitai(hello), lean(hello)
    assert type(got).__name__ == "LeanClientHello"
    assert got.__dict__.get("_client_hello") is None  # not parsed by Kaitai
    assert (got.sni, got.alpn_protocols) == (expected.sni, expected.alpn_protocols)
    assert got.raw_bytes() == expected.raw_bytes()
    # What no gateway addon reads is still there, from Kaitai on demand.
    assert (got.cipher_suites, got.extensions) == (expected.cipher_suites, expected.extensions)
    assert lean(hello[:40]) is None and lean(hello + b"\x17\x03\x03\x00\x01x").sni == got.sni


def test_hellos_sandgate_refuses_are_mitmproxys_to_read(lean_hellos):
    kaitai, lean = lean_hellos
    hello = two_names_hello()
    got = lean(hello)
    assert type(got).__name__ == "ClientHello"
    assert got.sni == kaitai(hello).sni
    with pytest.raises(ValueError):
        lean(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # not a ClientHello, as before


def _u16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _ext(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + _u16(data)


_NAMES = [
    b"a.test",
    b"b.test",
    b"",
    b"A.TEST",
    b"a.test.",
    b"x_y.test",
    b"\xff",
    b"a..b",
    b"1.2.3.4",
]
_EXTENSIONS = st.one_of(
    st.lists(st.tuples(st.sampled_from([0, 0, 1]), st.sampled_from(_NAMES)), max_size=3).map(
        lambda names: _ext(0, _u16(b"".join(bytes([t]) + _u16(n) for t, n in names)))
    ),
    st.lists(st.sampled_from([b"h2", b"", b"http/1.1", b"x"]), max_size=3).map(
        lambda protocols: _ext(0x10, _u16(b"".join(bytes([len(p)]) + p for p in protocols)))
    ),
    st.builds(_ext, st.sampled_from([0, 0x10, 0x2B]), st.binary(max_size=12)),
)


@settings(max_examples=300, deadline=None)
@example([_ext(0, _u16(b"\x00" + _u16(b"a..b")))], b"")  # not a host name to mitmproxy
@example([_ext(0x10, _u16(b"\x02h2\x00"))], b"")  # an empty ALPN name
@given(st.lists(_EXTENSIONS, max_size=4), st.sampled_from([b"", b"\x00", b"\x00\x00\x00\x00"]))
def test_generated_hellos_the_gate_takes_read_as_mitmproxys(extensions, trailing):
    """Duplicate extensions, two names, empty ALPN names, trailing bytes: when the front
    door's parser takes a hello, mitmproxy's layer (lean) reads the SNI and ALPN Kaitai
    reads, and the SNI is the gate's (or None, where mitmproxy takes no host name)."""
    from mitmproxy.proxy.layers import tls as tls_layer
    from sandgate.proxy import clienthello

    kaitai = tls_layer.parse_client_hello
    lean = _lean_parser()
    block = b"".join(extensions)
    body = b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
    body += _u16(block) + trailing
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    hello = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
    try:
        gate = clienthello.parse_client_hello(hello)
    except ValueError:
        return  # refused at the front door: never reaches mitmproxy

    def read(parse):
        try:
            parsed = parse(hello)
        except ValueError:
            return "refused"
        return parsed.sni, parsed.alpn_protocols

    theirs, ours = read(kaitai), read(lean)
    assert ours == theirs
    assert ours == "refused" or ours[0] in (None, gate.sni)


def _lean_parser():
    from mitmproxy.proxy.layers import tls as tls_layer
    from sandgate.proxy.lean_mitmproxy import parse_client_hellos_lean

    original = tls_layer.parse_client_hello
    try:
        parse_client_hellos_lean()
        return tls_layer.parse_client_hello
    finally:
        tls_layer.parse_client_hello = original


# --- forks, gc ----------------------------------------------------------------------


def test_a_forked_context_is_the_same_without_a_server_made(monkeypatch):
    import uuid

    made = []
    uuid4 = uuid.uuid4
    monkeypatch.setattr(uuid, "uuid4", lambda: made.append(1) or uuid4())
    parent = context.Context(tflow.tclient_conn(), options.Options())
    parent.server.address = ("203.0.113.10", 443)
    parent.layers = ["a", "b"]

    def fork():
        made.clear()
        child = parent.fork()
        child.layers.append("c")  # the child's own list
        return (
            vars(child).keys(),
            child.server is parent.server,
            child.client is parent.client,
            child.options is parent.options,
            child.layers,
            parent.layers,
            len(made),
        )

    before, after = before_and_after(monkeypatch, context.Context, "fork", lighter_forks)(fork)
    assert before[:-1] == after[:-1]
    assert after[3:6] == (True, ["a", "b", "c"], ["a", "b"])
    assert (before[-1], after[-1]) == (1, 0)  # mitmproxy's made (and dropped) a Server


def test_the_engine_freezes_what_lives_once_mitmproxy_runs():
    import gc

    from sandgate.proxy.engine import settle_gc

    gc.unfreeze()
    try:
        settle_gc()
        assert gc.get_freeze_count() > 10_000  # this process's modules, mitmproxy's among them
    finally:
        gc.unfreeze()


def test_a_context_with_more_to_copy_keeps_mitmproxys_fork(monkeypatch):
    init, original = context.Context.__init__, context.Context.fork

    def init_with_more(self, *a, **kw):
        init(self, *a, **kw)
        self.extra = "state a plain copy would lose"

    monkeypatch.setattr(context.Context, "__init__", init_with_more)
    monkeypatch.setattr(context.Context, "fork", original)
    assert lighter_forks() is False
    assert context.Context.fork is original
