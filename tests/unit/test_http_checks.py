"""The HTTP request-head check (proxy/policy/request_head.py) and the first-bytes
test for request lines: named cases, then property-based fuzzing (never a crash,
never an allow for malformed input)."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sandgate.proxy.gate import Outcome
from sandgate.proxy.policy import Decision, RequestFacts, decide, load_policy
from sandgate.proxy.policy.request_head import (
    MAX_FIELDS,
    CheckedHead,
    RequestHead,
    check_head,
    connection_without_upgrade,
    path_problem,
    refuse_unfinished,
    starts_like_http,
)
from support.fakes import SANDBOX, make_gate

HOST = ((b"host", b"allowed.test"),)


def head(target=b"/", method=b"GET", fields=HOST, authority=None, http2=False) -> RequestHead:
    return RequestHead(method, target, tuple(fields), authority, http2)


def reason(result) -> str:
    return str(result.reason) if isinstance(result, Decision) else "ok"


# --- named cases ----------------------------------------------------------------------

CASES = [
    # method
    pytest.param(head(method=b"GET"), "ok", id="get"),
    pytest.param(head(method=b"PROPFIND"), "ok", id="extension-method"),
    pytest.param(head(method=b"G\rET"), "malformed_request", id="cr-in-method"),
    pytest.param(head(method=b"GET\x00"), "malformed_request", id="nul-in-method"),
    pytest.param(head(method=b"GET /x"), "malformed_request", id="space-in-method"),
    pytest.param(head(method=b""), "malformed_request", id="empty-method"),
    pytest.param(head(method=b"G(T"), "malformed_request", id="separator-in-method"),
    pytest.param(head(method=b"get"), "malformed_request", id="lower-case-method"),
    pytest.param(head(method=b"DELETe"), "malformed_request", id="mixed-case-method"),
    # header fields
    pytest.param(
        head(fields=HOST + ((b"x", b"a\r\nGET /evil HTTP/1.1"),)),
        "malformed_request",
        id="crlf-in-value",
    ),
    pytest.param(head(fields=HOST + ((b"x", b"a\nb"),)), "malformed_request", id="lf-in-value"),
    pytest.param(head(fields=HOST + ((b"x", b"a\x00b"),)), "malformed_request", id="nul-in-value"),
    pytest.param(
        head(fields=HOST + ((b"x", b"a\x1bb"),)), "malformed_request", id="escape-in-value"
    ),
    pytest.param(head(fields=HOST + ((b"x", b"a\tb"),)), "ok", id="tab-in-value"),
    pytest.param(head(fields=HOST + ((b"x", "é".encode()),)), "ok", id="obs-text-in-value"),
    pytest.param(head(fields=HOST + ((b"x y", b"1"),)), "malformed_request", id="space-in-name"),
    pytest.param(head(fields=HOST + ((b"x:y", b"1"),)), "malformed_request", id="colon-in-name"),
    pytest.param(
        head(fields=HOST + ((b"content-length", b"1, 2"),)), "malformed_request", id="cl-list"
    ),
    pytest.param(
        head(fields=HOST + ((b"content-length", b"5"), (b"Content-Length", b"6"))),
        "malformed_request",
        id="cl-twice",
    ),
    pytest.param(
        head(fields=HOST + ((b"content-length", b"5"), (b"Content-Length", b"5"))),
        "ok",
        id="cl-twice-same",
    ),
    pytest.param(
        head(fields=HOST + ((b"transfer-encoding", b"chunked"), (b"content-length", b"5"))),
        "malformed_request",
        id="te-and-cl",
    ),
    pytest.param(
        head(fields=HOST + ((b"transfer-encoding", b"gzip, chunked"),)),
        "malformed_request",
        id="te-not-chunked",
    ),
    pytest.param(head(fields=HOST + ((b"transfer-encoding", b"Chunked"),)), "ok", id="te-chunked"),
    pytest.param(
        head(
            fields=((b"host", b"allowed.test"), (b"transfer-encoding", b"chunked")),
            authority=b"allowed.test",
            http2=True,
        ),
        "malformed_request",
        id="te-in-h2",
    ),
    pytest.param(
        head(fields=(), authority=b"allowed.test", http2=True, target=b"/x\r\nHost: evil"),
        "malformed_request",
        id="crlf-in-h2-path",
    ),
    pytest.param(
        head(fields=(), authority=b"allowed.test\r\nx", http2=True),
        "malformed_request",
        id="crlf-in-authority",
    ),
    pytest.param(
        head(fields=((b"upgrade", b"h2c"),), authority=b"allowed.test", http2=True),
        "malformed_request",
        id="upgrade-in-h2",
    ),
    # size
    pytest.param(
        head(fields=HOST + ((b"x", b"a" * 70000),)), "headers_too_large", id="one-big-header"
    ),
    pytest.param(
        head(fields=HOST + tuple((b"x%d" % i, b"1") for i in range(MAX_FIELDS))),
        "headers_too_large",
        id="too-many-fields",
    ),
    # authority
    pytest.param(head(fields=()), "host_mismatch", id="no-host"),
    pytest.param(head(fields=HOST + HOST), "host_mismatch", id="two-hosts"),
    pytest.param(
        head(fields=((b"host", b"allowed.test:8080"),)), "host_mismatch", id="host-other-port"
    ),
    pytest.param(head(fields=((b"host", b"allowed.test:80"),)), "ok", id="host-same-port"),
    pytest.param(
        head(fields=((b"host", b"allowed.test:"),)), "host_mismatch", id="host-empty-port"
    ),
    pytest.param(
        head(fields=((b"host", "allowéd.test".encode()),)), "invalid_name", id="host-not-ascii"
    ),
    pytest.param(head(fields=((b"host", b"[2001:db8::1]:80"),)), "ok", id="host-ipv6-bracketed"),
    # nginx splits a bare address at its last colon: not the address the gateway read.
    pytest.param(head(fields=((b"host", b"2001:db8::1"),)), "host_mismatch", id="host-ipv6-bare"),
    pytest.param(
        head(fields=HOST + ((b"x-forwarded-host", b"2001:db8::80"),)),
        "host_mismatch",
        id="host-override-ipv6-bare",
    ),
    pytest.param(head(target=b"http://evil.test/"), "host_mismatch", id="absolute-other-host"),
    pytest.param(
        head(target=b"http://user@allowed.test/"), "host_mismatch", id="absolute-userinfo"
    ),
    pytest.param(head(target=b"http://allowed.test/x"), "ok", id="absolute-same-host"),
    pytest.param(head(target=b"HTTP://ALLOWED.test"), "ok", id="absolute-no-path"),
    pytest.param(head(target=b"ftp://allowed.test/"), "ambiguous_path", id="absolute-other-scheme"),
    pytest.param(head(fields=(), authority=b"allowed.test", http2=True), "ok", id="h2-authority"),
    pytest.param(
        head(fields=((b"host", b"evil.test"),), authority=b"allowed.test", http2=True),
        "host_mismatch",
        id="h2-host-differs",
    ),
    pytest.param(
        head(fields=(), authority=None, http2=True), "host_mismatch", id="h2-no-authority"
    ),
    pytest.param(
        head(target=b"http://allowed.test/", http2=True, fields=(), authority=b"allowed.test"),
        "ambiguous_path",
        id="h2-path-not-a-path",
    ),
    # paths
    pytest.param(head(target=b"*", method=b"OPTIONS"), "ambiguous_path", id="asterisk"),
    pytest.param(head(target=b"/public/x?a=1&b=%2f"), "ok", id="query-kept"),
    pytest.param(head(target=b"/public/x?a#b"), "ambiguous_path", id="hash-in-query"),
    pytest.param(head(target=b"/p\xc3\xa9"), "ambiguous_path", id="raw-utf8"),
]


@pytest.mark.parametrize("request_head, expected", CASES)
def test_check_head(request_head, expected):
    assert reason(check_head(request_head, 80)) == expected


@pytest.mark.parametrize(
    "path, problem",
    [
        ("/", None),
        ("/public/x.tar.gz", None),
        ("/a/", None),
        ("/~user/%41%7E", None),
        ("/caf%C3%A9", None),
        ("/a%20b", None),
        ("/a:b@c!$&'()*+,=", None),
        ("public", "does not start"),
        ("/a#b", "fragment"),
        ("/a\\b", "backslash"),
        ("/a;b", "';'"),
        ("/a;jsessionid=1/b", "';'"),
        ("//a", "empty segment"),
        ("/a//b", "empty segment"),
        ("/a/./b", "dot segment"),
        ("/a/../b", "dot segment"),
        ("/a/..", "dot segment"),
        ("/..", "dot segment"),
        # an escaped '/' is decided in both readings, where neither resolves or merges
        ("/a%2fb", None),
        ("/@scope%2Fname/-/name-1.0.tgz", None),
        ("/a%2F", None),
        ("/a%2F%2Fb", "empty segment"),
        ("/a/%2Fb", "empty segment"),
        ("/%2Fa", "empty segment"),
        ("/a%2F..%2Fb", "'.' or '..' segment"),
        ("/a%2F.", "'.' or '..' segment"),
        ("/..%2fa", "'.' or '..' segment"),
        ("/a%2F%E2%80%A5/b", "'.' or '..'"),  # `‥` read as `..` by NFKC
        # where a proxy that decodes the path once ends it (nginx's `$uri`)
        ("/a/..%3F", "ends a '.' or '..' segment"),
        ("/a/.%23x", "ends a '.' or '..' segment"),
        ("/a/b%2F..%3f", "ends a '.' or '..' segment"),
        ("/a/..%EF%BC%9F", "'.' or '..' segment"),  # `？` folds to '?'
        ("/a/x..%3F", None),
        ("/a/%3F..", None),
        ("/a%5cb", "%5C"),
        ("/a/%2e%2e/b", "%2E"),
        ("/a/.%2E/b", "%2E"),
        ("/a%3bb", "%3B"),
        ("/a%00", "control"),
        ("/a%0d%0a", "control"),
        ("/a%7f", "control"),
        ("/%c0%af", "not UTF-8"),
        ("/%e0%80%af", "not UTF-8"),
        ("/%ed%a0%80", "not UTF-8"),  # a surrogate
        ("/%c3", "not UTF-8"),
        ("/%c3/%a9", "not UTF-8"),  # split across a segment
        ("/%zz", "two hex digits"),
        ("/a%", "two hex digits"),
        ("/a b", "spaces"),
        ("/a\tb", "spaces"),
        ("/é", "spaces, control or non-ASCII"),
    ],
)
def test_path_problem(path, problem):
    found = path_problem(path)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found, found


@pytest.mark.parametrize(
    "upgrade, websocket, strip",
    [
        (None, False, False),
        ([b"websocket"], True, False),
        ([b"WebSocket"], True, False),
        ([b"h2c"], False, True),
        ([b"h2c, foo"], False, True),
        ([b"websocket, h2c"], False, True),
        ([b"websocket", b"websocket"], False, True),
        ([b"foo"], False, True),
        ([b""], False, True),
    ],
)
def test_upgrades(upgrade, websocket, strip):
    fields = HOST + tuple((b"Upgrade", u) for u in upgrade or ())
    checked = check_head(head(fields=fields), 80)
    assert isinstance(checked, CheckedHead)
    assert (checked.websocket, checked.strip_upgrade) == (websocket, strip)


def test_connection_without_upgrade():
    assert connection_without_upgrade("Upgrade, HTTP2-Settings") == ""
    assert connection_without_upgrade("keep-alive, upgrade") == "keep-alive"


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"get / HTTP/1.1\r\n", True),
        (b"GET\t/ HTTP/1.1\r\n", True),
        (b"GET    /x", True),
        (b"GET\x0b/x", True),
        (b"GET\r/x", True),
        (b"M-SEARCH * HTTP/1.1", True),
        (b"GET http://evil.test/ HTTP/1.1", True),
        (b"G", None),
        (b"GET", None),
        (b"GET ", None),
        (b"GET \t ", None),
        (b"GET htt", None),
        (b"SSH-2.0-OpenSSH_9.2\r\n", False),
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", False),
        (b"*1\r\n$4\r\nPING\r\n", False),
        (b"get key\r\n", False),
        (b"\x16\x03\x01\x02\x00", False),
        (b"\x00\x01binary", False),
        (b"GET " + b" " * 2000, True),  # still undecided after MAX_UNDECIDED: HTTP
        # What servers skip first: blank lines (RFC 9112 2.2), any whitespace (http.server)
        (b"\r\nPOST /admin HTTP/1.1\r\n", True),
        (b"\n\n\nPOST /admin HTTP/1.1\r\n", True),
        (b" \t\x85GET /", True),
        (b"\r\n", None),
        (b"\r\n\r\nPO", None),
        (b"\r\nSSH-2.0-OpenSSH_9.2\r\n", False),
        # a method of any length
        (b"DELETE" + b"X" * 40 + b" /admin HTTP/1.1\r\n", True),
        (b"X" * 200, None),
        (b"X" * 2000, True),
        # what str.split() splits at in a line read as Latin-1
        (b"GET\x1c/admin HTTP/1.1\r\n", True),
        (b"GET\xa0/admin HTTP/1.1\r\n", True),
        # any target, once the line ends in a version; HTTP/0.9's GET without one
        (b"GET admin HTTP/1.1\r\n", True),
        (b"POST admin\x85http/1.0\n", True),
        (b"GET admin\r\n", True),
        (b"GET admin", None),
        (b"AUTH secret\r\n", False),
        (b"SET key value\r\n", False),
    ],
)
def test_starts_like_http(data, expected):
    assert starts_like_http(data) is expected


def test_deny_path_rules_ignore_case_allow_rules_do_not(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: allowed.test\n        paths: ['/public/**']\n"
        "      - deny: allowed.test\n        paths: ['/public/admin/**']\n        id: no-admin\n"
    )
    policy = load_policy([rules])

    def verdict(path):
        d = decide(
            policy,
            RequestFacts(profile="default", port=443, method="GET", path=path, name="allowed.test"),
        )
        return str(d.reason)

    assert verdict("/public/x") == "rule_allow"
    assert verdict("/public/ADMIN/keys") == "rule_deny"
    assert verdict("/Public/x") == "path_not_allowed"


def test_websocket_needs_a_rule_that_says_so(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: allowed.test\n"
        "      - allow: ws.allowed.test\n        websocket: true\n        id: ws\n"
    )
    policy = load_policy([rules])

    def verdict(name, websocket):
        facts = RequestFacts(
            profile="default", port=80, method="GET", path="/", name=name, websocket=websocket
        )
        d = decide(policy, facts)
        return str(d.verdict), str(d.reason), d.rule_id

    assert verdict("allowed.test", False)[:2] == ("allow", "rule_allow")
    assert verdict("allowed.test", True) == ("deny", "protocol_not_allowed", "default:fallback")
    assert verdict("ws.allowed.test", True) == ("allow", "rule_allow", "ws")


@pytest.mark.parametrize("value", ["yes", '"true"', "1", "[true]"])
def test_websocket_must_be_a_plain_boolean(tmp_path, value):
    from sandgate.proxy.policy import PolicyError

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nprofiles:\n  default:\n    rules:\n      - allow: a.test\n        websocket: {value}\n"
    )
    with pytest.raises(PolicyError, match=r"rules.yaml:6:20: 'websocket' must be true or false"):
        load_policy([rules])


# --- through the gate -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"get / HTTP/1.1\r\n", b"GET\t/ HTTP/1.1\r\n", b"GET  /x HTTP/1.1\r\n", b"gEt\x0b/"],
)
def test_an_oddly_written_request_line_on_a_raw_tcp_port_is_http(tmp_path, data):
    # Port 22 of allowed.test is relayed as raw TCP (ssh.allowed.test's binding); a
    # request line there must still meet the Host check.
    gate = make_gate(tmp_path)
    state = gate.on_connect(1, SANDBOX, 40000, "203.0.113.10", 22)
    assert gate.on_first_bytes(state, data) is Outcome.HTTP


def test_a_tls_1_3_record_version_on_a_raw_tcp_port_is_decided_by_sni(tmp_path):
    from support.fakes import client_hello

    gate = make_gate(tmp_path)
    state = gate.on_connect(1, SANDBOX, 40000, "203.0.113.66", 22)
    hello = bytearray(client_hello("evil.test"))
    hello[1:3] = b"\x03\x04"
    assert gate.on_first_bytes(state, bytes(hello)) is Outcome.REJECT
    assert gate.events[-1].protocol == "tls" and gate.events[-1].name == "evil.test"


# --- fuzzing: never a crash, never an allow for malformed input -----------------------

_bytes = st.binary(max_size=60)
_fields = st.lists(st.tuples(_bytes, _bytes), max_size=6)


@settings(max_examples=400, deadline=None)
@given(
    method=_bytes, target=_bytes, fields=_fields, authority=st.none() | _bytes, http2=st.booleans()
)
def test_any_head_is_checked_without_a_crash(method, target, fields, authority, http2):
    result = check_head(RequestHead(method, target, tuple(fields), authority, http2), 80)
    assert isinstance(result, CheckedHead | Decision)
    if isinstance(result, Decision):
        assert not result.allowed and result.rule.id.startswith("builtin:")


_CONTROL = st.sampled_from([b"\r", b"\n", b"\x00", b"\r\n", b"\x7f", b"\x01"])


@settings(max_examples=300, deadline=None)
@given(
    where=st.sampled_from(["method", "target", "value", "authority", "host"]),
    control=_CONTROL,
    before=st.binary(max_size=10),
    after=st.binary(max_size=10),
    http2=st.booleans(),
)
def test_a_control_byte_anywhere_is_never_allowed(where, control, before, after, http2):
    assume(http2 or where != "authority")  # HTTP/1 has no :authority
    parts = {
        "method": b"GET",
        "target": b"/public/x",
        "value": b"1",
        "authority": b"allowed.test",
        "host": b"allowed.test",
    }
    parts[where] = before + control + after
    fields = ((b"host", parts["host"]), (b"x-a", parts["value"]))
    result = check_head(
        RequestHead(
            parts["method"], parts["target"], fields, parts["authority"] if http2 else None, http2
        ),
        80,
    )
    assert isinstance(result, Decision) and not result.allowed


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="/.%2fFeE5cC;\\#aA", max_size=16))
def test_an_accepted_path_is_its_own_canonical_form_up_to_escapes(path):
    from sandgate.proxy.policy.names import parse_path

    path = "/" + path
    if path_problem(path) is None:
        # Nothing left for a server to resolve: no dot segments, no '//', also where an
        # escaped '/' is read as one. Canonicalising only decodes escapes of unreserved
        # characters.
        split = re.sub("%2[fF]", "/", parse_path(path))
        assert "/./" not in split and "//" not in split and not split.endswith("/.")
        assert parse_path(path).count("/") == path.count("/")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_first_bytes_never_crash(data):
    assert starts_like_http(data) in (True, False, None)


@pytest.mark.parametrize(
    "start, method, target",
    [
        pytest.param(b"GET /endless HTTP/1.1\r\nX: aaaa", b"GET", b"/endless", id="headers"),
        pytest.param(b"GET /" + b"a" * 5000, b"GET", b"/" + b"a" * 2047, id="endless-target"),
        pytest.param(b"\x00\xff", b"\x00\xff", b"", id="no-request-line"),
    ],
)
def test_an_unfinished_head_is_refused_431_naming_its_request_line(start, method, target):
    head, decision = refuse_unfinished(start, 70_000)
    assert (head.method, head.target, head.fields) == (method, target, ())
    assert (decision.reason, decision.rule.id) == ("headers_too_large", "builtin:headers-too-large")
    assert "70000 bytes" in decision.detail
