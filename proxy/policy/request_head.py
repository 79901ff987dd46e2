"""One HTTP request head, checked before it is decided: pure, no mitmproxy, no I/O.

`check_head(head, port)` takes what a client sent (method, request target, header
fields, HTTP/2's :authority) as bytes and returns either a `CheckedHead` (the one
host, the path and what to do about an upgrade) or a refusing `Decision`. The addon
calls it through `gate.on_request` for every request on every path (plain HTTP/1,
inspected HTTP/1.1 and HTTP/2); an HTTP/1 parser of sandgate's own would call it too.

What is forwarded must be what was decided, so the check refuses what a server
could read otherwise than the gateway does, instead of guessing which reading the
server picks. Checks, first failure wins:

 1. size: more than MAX_FIELDS header fields or MAX_HEAD_BYTES -> headers_too_large (431);
    a head still unfinished after MAX_HEAD_BYTES is refused so too, before it ends
    (`refuse_unfinished`);
 2. method: an RFC 9110 token in upper case -> else malformed_request;
 3. header names tokens, values free of control bytes (CR, LF, NUL, ... ; HTAB is
    allowed), Content-Length digits and all equal, Transfer-Encoding only `chunked`
    and never with Content-Length (none at all in HTTP/2), no Upgrade in HTTP/2
    -> else malformed_request;
 4. authority: one Host (HTTP/1), or :authority and at most one Host equal to it
    (HTTP/2); an absolute-form target names that same authority; a port, if given,
    is the connection's -> else host_mismatch;
 5. path: `path_problem` (the canonical set, below) -> ambiguous_path; the query
    only visible ASCII without `#` -> else ambiguous_path;
 6. overrides: fields a server may serve the request by instead of its own method,
    path or host, naming another one, are kept in `overrides`, and the gate decides
    the request for each of them too, refusing it where one would not be allowed:
    a method (X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override, a query
    parameter `_method`, `x-tunneled-method`...: a POST becomes a DELETE) ->
    ambiguous_method; a path
    (X-Original-URL, X-Rewrite-URL: IIS's URL Rewrite, Symfony and Zend before 2018;
    WebDAV's Destination, the path a COPY or MOVE writes: an absolute URI, whose
    authority is a host override too) -> ambiguous_path, also when the path named is
    itself ambiguous; a host
    (X-Forwarded-Host, X-Host, X-Original-Host, X-Forwarded-Server,
    X-HTTP-Host-Override, `host=` in Forwarded: Rails' request.host, Django's
    USE_X_FORWARDED_HOST, Werkzeug's ProxyFix, tenants routed by host) -> host_mismatch;
    a method override that is not one token (`DELETE, POST`: Express takes the first)
    -> ambiguous_method; where the application is mounted (SCRIPT_NAME, PATH_INFO,
    X-Script-Name, X-Forwarded-Prefix: gunicorn routes by the path without it) ->
    ambiguous_path, outright;
 7. upgrade: `Upgrade: websocket` alone is a WebSocket request (decided by rules
    with `websocket: true`); any other token list (h2c, `h2c, foo`, websocket with
    others) is removed before forwarding (`strip_upgrade`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote, unquote_plus

from .builtin import deny
from .model import Decision
from .names import folded, parse_host_port
from .reasons import Reason, Verdict

MAX_FIELDS = 100
MAX_HEAD_BYTES = 64 * 1024

# RFC 9110 5.6.2: token = 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_UPPER_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Z-]+")  # a method: one match per request
# Control bytes other than HTAB (RFC 9110 5.5: a field value is VCHAR, SP, HTAB, obs-text).
_FIELD_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Path bytes forwarded as they are: visible ASCII apart from the ones refused below.
_PATH_BYTES = re.compile(r"[!$&'()*+,\-./0-9:=@A-Z_a-z~%]*")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})|%([0-9A-Fa-f]{2})")
_QUERY_BYTES = re.compile(r"[\x21-\x22\x24-\x7e]*")  # visible ASCII without '#'
# Escapes a server may decode before splitting or resolving the path: \, ., ;. An
# escaped '/' is decided in both readings (names.path_readings), where that makes no
# empty or dot segment.
_STRUCTURAL_ESCAPES = {0x5C: "%5C", 0x2E: "%2E", 0x3B: "%3B"}
_ESCAPED_SLASH = re.compile(r"%2[Ff]")
_ESCAPED_END = re.compile(r"%(?:23|3[Ff])")  # '#' and '?': where a decoded path ends
_FOLDED_END = re.compile(r"%(?:23|3[Ff])|[?#]")  # `？` (U+FF1F) folds to '?'
_HEX_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_ESCAPED_PERCENT = re.compile(r"%25")
_ABSOLUTE = re.compile(r"(?i)(https?)://([^/?#]*)(.*)")
# The fields that override the request's method, path or host to the servers that
# honour them (module docstring, 6), by lower-case name: what each overrides.
_OVERRIDES = {
    **dict.fromkeys((b"x-http-method-override", b"x-http-method", b"x-method-override"), "method"),
    **dict.fromkeys((b"x-original-url", b"x-rewrite-url", b"destination"), "path"),
    # Where the application is mounted, which the server takes off the front of the
    # path it routes by (or serves the path from): gunicorn reads SCRIPT_NAME and
    # PATH_INFO from a forwarder (before 22 from anyone; 21 cuts the path at the first
    # occurrence of SCRIPT_NAME anywhere in it), Flask's ReverseProxied recipe
    # X-Script-Name, Spring and ASP.NET X-Forwarded-Prefix. Pyramid's traversal puts
    # X-Vhm-Root in front of the path, from anyone (a red team, session 53). What the
    # server then routes by depends on it and its version: refused, not decided.
    **dict.fromkeys(
        (b"script-name", b"path-info", b"x-script-name", b"x-forwarded-prefix", b"x-vhm-root"),
        "mount",
    ),
    **dict.fromkeys(
        (
            b"x-forwarded-host",
            b"x-host",
            b"x-original-host",
            b"x-forwarded-server",
            b"x-http-host-override",
            b"forwarded",
        ),
        "host",
    ),
    # The port a server reports for the request (Spring, Vert.x, Werkzeug's ProxyFix):
    # another than the connection's is refused, as a host override naming one is.
    b"x-forwarded-port": "port",
}
# `host=` anywhere in a Forwarded field, as Spring, Reactor Netty and Vert.x find it
# (`for="host=evil.test"` and `xhost=evil.test` too), not only RFC 7239's host pairs.
_FORWARDED_HOST = re.compile(r'host\s*=\s*"?([^;,"]*)', re.IGNORECASE)
# The fields check_head reads by name (lower case); others are only checked as fields.
_CGI_READ = frozenset({*_OVERRIDES, b"content-type"})
# What a Content-Type names for a body servers may parse as JSON (form_body.py `_Json`):
# Laravel takes `/json` or `+json` anywhere, Koa's body parsers `application/csp-report`
# too, and Express apps behind AWS SNS `text/plain` (which SNS sends). And for a body
# servers may read as a form (`_form_body`).
JSON_TYPES = ("json", "csp-report", "text/plain")
_FORM_TYPES = ("form", "multipart", *JSON_TYPES)
_READ_FIELDS = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"upgrade",
        b"content-type",
        b"content-encoding",
        *_OVERRIDES,
    }
)
# A query parameter that names a method (`_method=DELETE`), in any spelling a query
# parser decodes: `%5Fmethod`, `_%6Dethod`, upper case; split at '&' and ';'. PHP
# (which Symfony and Laravel read `_method` through) also drops leading spaces of a
# name, turns ' ' and '.' into '_' and ends it at a NUL: `?.method=DELETE` is its
# `_method`; so are `_method%00x=DELETE` and `_method[]=DELETE` (an array of that name).
# Node's qs (Express 4's req.query) and Rack read `[_method]=DELETE` as `_method`.
# The names: `_method` (Rails, Laravel, Symfony, Express's method-override, Hono),
# `x-tunneled-method` (Plack's MethodOverride, Catalyst's REST ForBrowsers; a red team,
# session 52), `x-http-method-override` (Play 1), `_HttpMethod` (Salesforce's REST
# API); and `method` (Restlet's tunnel) where it names a method: APIs use it for
# their own calls (`?method=artist.getInfo`).
QUERY_METHOD_NAMES = frozenset(
    {"_method", "x-tunneled-method", "x-http-method-override", "_httpmethod"}
)
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
     "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK"}
)  # fmt: skip
_QUERY_PARAM = re.compile(r"[^&;]+")
_UNBRACKETED = re.compile(r"[^\[\]]+")
_PHP_MANGLED = str.maketrans(" .", "__")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head as the client sent it. `target` is the HTTP/1 request target
    or HTTP/2's :path; `authority` is HTTP/2's :authority (None in HTTP/1);
    `fields` the header fields in order, names as sent."""

    method: bytes
    target: bytes
    fields: tuple[tuple[bytes, bytes], ...]
    authority: bytes | None = None
    http2: bool = False

    def text(self, value: bytes, limit: int) -> str:
        """`value` for an event: decoded without failing, at most `limit` characters."""
        return value[:limit].decode("utf-8", "backslashreplace")[:limit]


class FormBody(NamedTuple):
    """A body servers may read as a form: its Content-Type ('' for none) and its
    Content-Encoding ('' for none)."""

    content_type: str
    encoding: str


class CheckedHead(NamedTuple):
    """A head that may be decided: `host` is the one authority (`name[:port]`, as
    sent), `path` the path without the query, exactly as it will be forwarded. (A
    NamedTuple: one is made per request, in a third of a frozen dataclass's time.)"""

    method: str
    host: str
    path: str
    # Asks for a WebSocket upgrade: only rules with websocket: true allow it.
    websocket: bool = False
    strip_upgrade: bool = False  # carries another Upgrade: removed before forwarding
    # (where, field, value) of each override naming another method, path or host
    # than the head's (`x-http-method-override`, "method", "DELETE"): the gate
    # decides those too (`with_overrides`).
    overrides: tuple[tuple[str, str, str], ...] = ()
    # The query as it will be forwarded (None: no '?'): what an approval shows and keys.
    query: str | None = None
    # The upstream connection must close after it: a body on a method whose content
    # has no meaning (`leaves_body_unread`).
    close_upstream: bool = False
    # The Host (or :authority) to forward in place of the one sent, set by the gate
    # on an allowed request whose name is spelled otherwise than decided (`ALLOWED.TEST.`
    # for allowed.test): a server or Host router (HAProxy's `hdr(host) -i`, Envoy's
    # domains) matches the spelling as written and may route it to another tenant.
    forward_host: str | None = None
    # The target (path and query) to forward in place of the one sent, set by the gate
    # likewise where the path is spelled otherwise than decided (`/%70ublic/x` for
    # /public/x): a router that matches the path as sent (HAProxy's `path_beg`,
    # Varnish's `req.url ~`) sent that to another backend.
    forward_target: str | None = None
    # A body that a server may read as a form: a field of it may override the method
    # (form_body.py), read as it streams.
    form_body: FormBody | None = None


def check_head(head: RequestHead, port: int) -> CheckedHead | Decision:
    """The checked head, or the Decision refusing it (see the module docstring)."""
    fields = head.fields
    size = len(head.method) + len(head.target) + len(head.authority or b"")
    size += sum(len(name) + len(value) + 4 for name, value in fields)
    if len(fields) > MAX_FIELDS or size > MAX_HEAD_BYTES:
        return deny(
            "headers-too-large",
            detail=f"{len(fields)} header fields, {size} bytes; "
            f"at most {MAX_FIELDS} fields and {MAX_HEAD_BYTES} bytes",
        )
    if not _UPPER_TOKEN.fullmatch(head.method) or len(head.method) > 32:
        if len(head.method) > 32 or not _TOKEN.fullmatch(head.method):
            return _malformed(f"method {head.text(head.method, 40)!r} is not an HTTP token")
        # Rules match methods upper-cased, but methods are case-sensitive (RFC 9110
        # 9.1): `get` is GET to a lenient server and some other method to a strict one,
        # so a `methods: [GET]` rule would let through a method it never named.
        return _malformed(f"method {head.text(head.method, 40)!r} is not upper case")
    by_name = _read_fields(fields)
    if by_name is None:
        return _field_problem(head)
    # Only a Host (the usual head) leaves nothing for the framing checks to find.
    problem = _framing_problem(by_name, head.http2) if len(by_name) > (b"host" in by_name) else None
    if problem:
        return _malformed(problem)
    if _FIELD_CONTROL.search(head.target) or (
        head.authority is not None and _FIELD_CONTROL.search(head.authority)
    ):
        return _malformed("control characters in the request target or :authority")
    try:
        target = head.target.decode("ascii")
    except UnicodeDecodeError:
        return deny("ambiguous-path", detail="non-ASCII bytes in the request target")
    try:
        host = _authority(head, by_name.get(b"host", []))
    except UnicodeDecodeError:
        return deny("host-mismatch", reason=Reason.INVALID_NAME, detail="non-ASCII Host")
    except ValueError as e:
        return deny("host-mismatch", detail=str(e))
    if not target.startswith("/"):
        absolute = _ABSOLUTE.fullmatch(target) if not head.http2 else None
        if absolute is None:
            return deny("ambiguous-path", detail=f"request target {target[:80]!r} is not a path")
        if absolute.group(2).lower() != host.lower():
            return deny(
                "host-mismatch",
                detail=f"the request target names {absolute.group(2)[:80]!r}, Host {host[:80]!r}",
            )
        target = absolute.group(3) or "/"
    error = _port_problem(host, port)
    if error:
        return deny("host-mismatch", detail=error)
    path, question, query = target.partition("?")
    refused = ambiguous_target(path, query if question else None)
    if refused is not None:
        return refused
    method = head.method.decode("ascii")
    websocket, strip = _upgrade(by_name.get(b"upgrade"))
    has_fields = len(by_name) > (b"host" in by_name)  # (a Host alone overrides nothing)
    overrides = _overrides(method, path, host, by_name, query) if has_fields or query else ()
    for where, field, value in overrides:
        if field == "mount":
            return deny(
                "ambiguous-path",
                detail=f"{where} names {value[:200]!r}: a server that honours it routes the "
                f"path {path[:200]!r} by what is left of it, which depends on the server",
            )
        if field == "method" and (refused := not_one_method(where, value)) is not None:
            return refused
        if field == "path" and (why := path_problem(value)) is not None:
            return deny("ambiguous-path", detail=f"{where} names {value[:200]!r}: {why}")
        if field == "host" and (why := _port_problem(value, port)) is not None:
            return deny("host-mismatch", detail=f"{where}: {why}")
        if field == "port" and value != str(port):
            return deny(
                "host-mismatch",
                detail=f"{where} names port {value[:40]!r}; the connection goes to port "
                f"{port}: a server that honours it takes the request for that port's",
            )
    overrides = tuple(o for o in overrides if o[1] != "port")  # its own port: nothing to decide
    close = leaves_body_unread(head.method) and _has_body(by_name)
    form = _form_body(by_name, head.http2, head.method) if head.method != b"GET" else None
    return CheckedHead(
        method, host, path, websocket, strip, overrides, query if question else None, close,
        form_body=form,
    )  # fmt: skip


# Methods whose content has no defined meaning (RFC 9110 9.3.1 GET, 9.3.2 HEAD, 9.3.5
# DELETE, 9.3.7 OPTIONS, 9.3.8 TRACE).
CONTENT_UNDEFINED = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})


def _has_body(by_name: dict[bytes, list[bytes]]) -> bool:
    """Whether the head declares a body: chunked, or a Content-Length other than 0."""
    if b"transfer-encoding" in by_name:
        return True
    return any(v.strip() != b"0" for v in by_name.get(b"content-length", ()))


def declared_length(fields: tuple[tuple[bytes, bytes], ...]) -> int | None:
    """A checked head's Content-Length (check_head refused several different ones and
    any that is no number); None: it has none."""
    for name, value in fields:
        if name.lower() == b"content-length":
            return int(value)
    return None


def form_body(head: RequestHead) -> FormBody | None:
    """check_head's `form_body` of `head`, for an adapter that sees a request's body
    come before its head is decided (mitmproxy's path reads it meanwhile)."""
    if head.method == b"GET":
        return None
    return _form_body(_read_fields(head.fields) or {}, head.http2, head.method)


def _form_body(by_name: dict[bytes, list[bytes]], http2: bool, method: bytes) -> FormBody | None:
    """The body of a request that servers may read as a form, whose fields may
    override its method (form_body.py): urlencoded, multipart or JSON (Laravel reads a
    JSON body's members as its form's), on any method but GET (Hono's methodOverride
    reads a PUT's form too), and a POST's without a Content-Type (Rack reads it as a
    form). Several fields of a name are read together."""
    lengths = by_name.get(b"content-length", ())
    if not (_has_body(by_name) or (http2 and not lengths)):
        return None
    content_type = b", ".join(by_name.get(b"content-type", ())).decode("latin-1")
    lowered = content_type.lower()
    if lowered.strip() and not any(kind in lowered for kind in _FORM_TYPES):
        return None
    if not lowered.strip() and method != b"POST":
        return None
    encoding = b", ".join(by_name.get(b"content-encoding", ())).decode("latin-1")
    return FormBody(content_type, encoding)


def leaves_body_unread(method: bytes) -> bool:
    """Whether a request of `method` (upper case: check_head refuses others), when it
    has a body (a Content-Length other than 0, chunked, or HTTP/2 DATA to come), must
    be the last on its upstream connection, which is then sent `Connection: close`.

    Many servers never read a body they got with a GET (RFC 9110 9.3.1 names this as
    a request-smuggling risk), and one that keeps the connection (Python's
    http.server at HTTP/1.1) then reads the body as the next request: `GET
    /public/ok` with the body `GET /private ...` ran /private there, a request no
    rule decided. Refusing such bodies would break clients that send them on purpose
    (Elasticsearch's GET _search, kubectl's DELETE with options); told to close, a
    server that left the body unread never parses it, and one that reads bodies
    (nginx, Node, Go) reads it as the body it is."""
    return method in CONTENT_UNDEFINED


# Field names seen before, each an HTTP token, with its lower case: a task sends the
# same few names in every request, so the token check and lower() run once per name.
# Sound to keep: a name is a token or not forever. Bounded: past _MAX_KNOWN_NAMES
# (a task can send any names) new ones are checked every time.
_KNOWN_NAMES: dict[bytes, bytes] = {}
_MAX_KNOWN_NAMES = 4096


def _read_as(lower: bytes) -> bytes:
    """The name a field is read by: its own, but an override's or the Content-Type's in
    any spelling that a CGI-style server files under the same variable
    (HTTP_X_HTTP_METHOD_OVERRIDE: '_' and, in PHP, '.' for '-'): `X_HTTP_METHOD_OVERRIDE`,
    `X_Forwarded_Host` are ones, and `Content_Type`, which Symfony takes as the
    Content-Type where there is none (a red team, session 54: Lumen read a JSON body
    so typed). Not `Content_Length`: it is no framing field to any parser."""
    spelled = lower.replace(b"_", b"-").replace(b".", b"-")
    return spelled if spelled in _CGI_READ else lower


def _read_fields(fields: tuple[tuple[bytes, bytes], ...]) -> dict[bytes, list[bytes]] | None:
    """The values of the fields check_head reads (host, content-length, ...) by lower
    case name, or None if some name is not a token or some value holds a control byte
    (`_field_problem` says which). The values are checked in one search over all of
    them: a control byte in their concatenation is in one of them."""
    by_name: dict[bytes, list[bytes]] = {}
    known = _KNOWN_NAMES
    for name, value in fields:
        lower = known.get(name)
        if lower is None:
            if not _TOKEN.fullmatch(name):
                return None
            lower = _read_as(name.lower())
            if len(known) < _MAX_KNOWN_NAMES:
                known[name] = lower
        if lower in _READ_FIELDS:
            by_name.setdefault(lower, []).append(value)
    if fields and _FIELD_CONTROL.search(b"".join([value for _, value in fields])):
        return None
    return by_name


def _field_problem(head: RequestHead) -> Decision:
    """The refusal of the first field (in order) that `_read_fields` did not take."""
    for name, value in head.fields:
        if not _TOKEN.fullmatch(name):
            return _malformed(f"header name {head.text(name, 40)!r} is not an HTTP token")
        if _FIELD_CONTROL.search(value):
            return _malformed(
                f"control characters in header {head.text(name, 40)}: {head.text(value, 200)!r}"
            )
    raise AssertionError("_read_fields refused a head whose every field is sound")


def refuse_unfinished(start: bytes, size: int) -> tuple[RequestHead, Decision]:
    """A head that has not ended after `size` (> MAX_HEAD_BYTES) bytes, `start` its
    first bytes: its request line as far as it goes (for the event), and the
    431 refusing it. Refused before its end, since an HTTP parser would buffer it
    until then, however long that is."""
    line = start.split(b"\n", 1)[0].rstrip(b"\r")
    method, _, rest = line.partition(b" ")
    target = rest.rsplit(b" ", 1)[0] if b" HTTP/" in rest else rest
    decision = deny(
        "headers-too-large",
        detail=f"the request head has not ended after {size} bytes; at most {MAX_HEAD_BYTES}",
    )
    return RequestHead(method[:32], target[:2048], ()), decision


def ambiguous_target(path: str, query: str | None) -> Decision | None:
    """The ambiguous_path denial of a request target's path and query (None: no '?'),
    or None when both are forwarded as they are (also for `sandgate check`)."""
    why = path_problem(path)
    if why is None and query is not None and not _QUERY_BYTES.fullmatch(query):
        why = "control, space, '#' or non-ASCII characters in the query"
    return None if why is None else deny("ambiguous-path", detail=f"{why}: {path[:200]!r}")


def path_problem(path: str) -> str | None:
    """Why `path` (no query) may mean something else to a server, or None: it is then
    decided and forwarded in names.parse_path's form (escapes of unreserved
    characters decoded, hex upper-cased: gate._as_decided), which every server reads
    alike.

    Refused: not starting with '/'; '#'; a backslash; ';' (path parameters); an
    empty segment ('//') other than a trailing '/'; '.' or '..' segments, also where
    an escaped '/' (%2F) is read as one; escapes of '\\', '.', ';' (%5C %2E %3B, any
    case); escapes of control bytes;
    escaped bytes that are not strict UTF-8 (overlong forms like %C0%AF); an escaped
    '%' that forms an escape once decoded (%2561); a '%' without two hex digits;
    spaces, controls or raw non-ASCII characters."""
    if not path.startswith("/"):
        return "the path does not start with '/'"
    if not _PATH_BYTES.fullmatch(path):
        for char, why in (("#", "a fragment ('#')"), ("\\", "a backslash"), (";", "';'")):
            if char in path:
                return why
        return "spaces, control or non-ASCII characters"
    # (Substring tests first: most paths have neither, and splitting costs more.)
    if "//" in path:  # an empty segment, other than a trailing '/'
        return "an empty segment ('//')"
    if "/." in path and any(s in (".", "..") for s in path.split("/")):
        return "a dot segment"
    if "%" in path:
        return _escape_problem(path)
    return None


def _escape_problem(path: str) -> str | None:
    run = bytearray()  # consecutive escaped bytes from 0x80: must be strict UTF-8
    end, high = -1, False
    for match in _ESCAPE.finditer(path):
        if match.group(1) is None:
            return "'%' without two hex digits"
        byte = int(match.group(1), 16)
        if run and match.start() != end:
            if problem := _run_problem(run):
                return problem
            run.clear()
        end = match.end()
        if byte in _STRUCTURAL_ESCAPES:
            return f"an encoded '\\', '.' or ';' ({_STRUCTURAL_ESCAPES[byte]})"
        if byte < 0x20 or byte == 0x7F:
            return "an encoded control character"
        if byte >= 0x80:
            run.append(byte)
            high = True
        elif run:
            if problem := _run_problem(run):
                return problem
            run.clear()
    if run and (problem := _run_problem(run)):
        return problem
    if _ESCAPED_SLASH.search(path):
        # npm's `/@scope%2fname` is one name to the registry, two segments to a server
        # that decodes before it routes (nginx): decided in both readings, it must make
        # no segment such a server would resolve or merge
        path = _ESCAPED_SLASH.sub("/", path)
        if "//" in path:
            return "an encoded '/' (%2F) that makes an empty segment"
        if any(s in (".", "..") for s in path.split("/")):
            return "an encoded '/' (%2F) that makes a '.' or '..' segment"
    if _ESCAPED_END.search(path) and _ends_in_a_dot_segment(_ESCAPED_END.split(path, 1)[0]):
        # A proxy that decodes the path once (nginx's `$uri`) ends it there: `/public/..%3F`
        # is `/public/..?` to the next server, which resolves it to `/` (a red team,
        # session 52).
        return "an encoded '?' or '#' that ends a '.' or '..' segment"
    if high:
        fold = folded(path)
        if any(s in (".", "..") for s in fold.split("/")) or _ends_in_a_dot_segment(
            _FOLDED_END.split(fold, 1)[0]
        ):
            # `‥` (U+2025), `．．`: a dot segment to a server that normalises NFKC
            return "escaped characters a server may read as a '.' or '..' segment"
    if _ESCAPED_PERCENT.search(path) and _HEX_ESCAPE.search(unquote(path)):
        # A proxy that decodes the path once and passes it on unescaped (Apache's
        # `RewriteRule ... [P,NE]`) has its server decode it again: `/%2561dmin` is
        # `/admin` there (a red team, session 50). Decoded once a path, not once an
        # escape: 15,000 `%25` took the loop two minutes.
        return "an escaped '%' that makes an escape once decoded ('%2561' is '%61')"
    return None


def _ends_in_a_dot_segment(path: str) -> bool:
    return path.endswith(("/.", "/.."))


def _run_problem(run: bytearray) -> str | None:
    """Why a run of escaped bytes from 0x80 may mean something else to a server: not
    strict UTF-8 (overlong forms, surrogates), or a character a server that folds
    case or compatibility forms reads as `/ \\ ; %` (`%EF%BC%8F`, fullwidth `/`; a red
    team, session 51). One read as letters, digits or other punctuation is decided in
    that reading too (names.folded; `?` and `#` cut it there): `…` or `？` in a path
    are common enough (a Wikipedia title) to be served."""
    try:
        text = run.decode("utf-8")
    except UnicodeDecodeError:
        return "escaped bytes that are not UTF-8 (an overlong form?)"
    from .ascii_folds import FOLDS, STRUCTURAL  # only for paths with such escapes

    if STRUCTURAL.isdisjoint(text):
        return None
    char = next(c for c in text if c in STRUCTURAL)
    return f"an escaped U+{ord(char):04X}, which a server may read as {FOLDS[char]!r}"


# field -> (what it is called in a denial, what a server does with it, the denial)
_OVERRIDDEN = {
    "method": ("the request is", "runs", "ambiguous-method"),
    "path": ("the request's path is", "serves", "ambiguous-path"),
    "host": ("the request's Host is", "serves", "host-mismatch"),
}


def with_overrides(
    decision: Decision, head: CheckedHead, decide_as: Callable[[CheckedHead], Decision]
) -> Decision:
    """`decision` for `head`, or the denial of an override: a server that honours one
    runs the method, or serves the path or host, it names (module docstring, 6), so
    a request not already denied passes only where what each override names would be
    allowed too (always where no rule reads it). `decide_as`: the decision for
    `head` with another method, path or host."""
    if not head.overrides or decision.verdict is Verdict.DENY:
        return decision
    return refused_override(head, head.overrides, decide_as) or decision


def refused_override(
    head: CheckedHead,
    overrides: tuple[tuple[str, str, str], ...],
    decide_as: Callable[[CheckedHead], Decision],
) -> Decision | None:
    """The denial of the first of `overrides` (where, field, value) that names a
    method, path or host the rules would not allow for `head`; None: none does."""
    for where, field, value in overrides:
        if field == "host" and not _spelled_as_decided(value):
            return deny(
                "host-mismatch",
                detail=f"{where} names {value[:200]!r}, spelled otherwise than a host the "
                "gateway forwards (a lower-case name without a trailing dot, a port "
                "without leading zeros, not 80 or 443): a server or router that honours "
                "it may read another host in it",
            )
        other = decide_as(head._replace(**{field: value}, overrides=()))
        if not other.allowed:
            called, does, rule = _OVERRIDDEN[field]
            return deny(
                rule,
                detail=f"{where} names {value!r}, {called} {getattr(head, field)[:200]!r}: a "
                f"server that honours it {does} {value!r}, which is not allowed here "
                f"({other.reason}: {other.detail[:200]})",
            )
    return None


def _spelled_as_decided(host: str) -> bool:
    """Whether a host override is spelled as the gateway forwards the Host it decided
    (gate._as_decided): a lower-case name, no trailing dot, a port (if any) without
    leading zeros and not a scheme's default (80, 443), which clients leave out. The
    request's own Host is forwarded so; an override goes on as sent, so it must
    already be."""
    try:
        name, port = parse_host_port(host, default_port=0)
    except ValueError:
        return False
    _, colon, written = host.rpartition("]")[2].rpartition(":")  # after an IPv6's brackets
    return (
        name == name.lower()
        and not name.endswith(".")
        and not (colon and (written[0] == "0" or port in (80, 443)))
    )


def _overrides(
    method: str, path: str, host: str, by_name: dict[bytes, list[bytes]], query: str
) -> tuple[tuple[str, str, str], ...]:
    """The overrides in the head that name another method, path or host than the
    head's own: (where, field, the value named). A method upper-cased (servers
    upper-case overrides); a path without its query; every host of a list
    (X-Forwarded-Host: a, b: Rails takes the last, others the first)."""
    found = []
    for name, values in by_name.items():
        field = _OVERRIDES.get(name)
        if field is None:
            continue
        for value in values:
            text = value.strip().decode("ascii", "replace")
            if field == "method":
                named = [text.upper()]
            elif field == "mount":
                named = [text] if text.strip("/") else []  # '' or '/': mounted at the root
            elif field == "path":
                absolute = _ABSOLUTE.fullmatch(text)
                if absolute is not None:  # Destination: http://host/path
                    if absolute.group(2).lower() != host.lower():
                        found.append((name.decode(), "host", absolute.group(2)[:200]))
                    text = absolute.group(3) or "/"
                named = [text.partition("?")[0]]
            elif name == b"forwarded":  # RFC 7239: `for=...;host="a:80", host=b`
                named = [found.strip() for found in _FORWARDED_HOST.findall(text)]
            else:
                named = [h.strip() for h in text.split(",")]
            own = {"method": method, "path": path, "host": host, "mount": "", "port": ""}[field]
            for one in named:
                # A host spelled otherwise than decided goes on as sent: refused below
                # (`with_overrides`), even where it names the request's own.
                same = one == own if field != "host" else one == own and _spelled_as_decided(one)
                if one and not same:
                    found.append((name.decode(), field, one[:200]))
    if "meth" in query.lower() or "%" in query:
        for param in _QUERY_PARAM.findall(query):
            key, _, value = param.partition("=")
            if (named := method_override(key, value, method)) is not None:
                found.append((f"the query's {named[0]}", "method", named[1]))
    return tuple(found)


def not_one_method(where: str, value: str) -> Decision | None:
    """The denial of a method override whose value is not one method token."""
    if _TOKEN.fullmatch(value.encode("utf-8", "surrogateescape")):
        return None
    return deny(
        "ambiguous-method",
        detail=f"{where} names {value[:40]!r}, not one method: servers read such a "
        "value differently (Express's method-override takes the first of a list and "
        "trims Unicode spaces)",
    )


def override_name(key: str) -> str | None:
    """The method override a query or form parameter named `key` (as sent, escaped)
    is to the servers that read one (`QUERY_METHOD_NAMES`, and `method`), in lower
    case; None: it is none."""
    # PHP ends a name at its first NUL (`_method%00x`) and at `[` (`_method[]`: an
    # array of that name); Node's qs and Rack take a name in brackets as the
    # name (`[_method]=`, `[_method]x=`): the first run of it without brackets.
    name = unquote_plus(key).split("\x00", 1)[0].lstrip(" ")
    name = first.group() if (first := _UNBRACKETED.search(name)) else ""
    name = name.translate(_PHP_MANGLED).strip().lower()
    return name if name in QUERY_METHOD_NAMES or name == "method" else None


def method_override(key: str, value: str, method: str) -> tuple[str, str] | None:
    """(the override's name, the method it names, upper case) if the parameter
    `key=value` (as sent, escaped) overrides `method` with another one; else None.
    `method` overrides only where its value is an HTTP method: APIs use it for their
    own calls."""
    name = override_name(key)
    if name is None:
        return None
    named = unquote_plus(value).strip().upper()
    if named == method or (name == "method" and named not in _METHODS):
        return None
    return name, named[:40]


def _framing_problem(by_name: dict[bytes, list[bytes]], http2: bool) -> str | None:
    lengths = by_name.get(b"content-length", [])
    codings = by_name.get(b"transfer-encoding", [])
    if any(not (v.strip().isdigit() and v.strip().isascii()) for v in lengths):
        return "Content-Length is not a number"
    if len({v.strip() for v in lengths}) > 1:
        return "several different Content-Length values"
    if codings and (http2 or lengths):
        return "Transfer-Encoding " + ("in HTTP/2" if http2 else "with Content-Length")
    if codings and b",".join(codings).strip().lower() != b"chunked":
        return "a Transfer-Encoding other than chunked"
    if http2 and b"upgrade" in by_name:
        return "Upgrade in HTTP/2"
    return None


def _authority(head: RequestHead, hosts: list[bytes]) -> str:
    """The one authority of the request; ValueError naming what disagrees."""
    if len(hosts) > 1:
        raise ValueError(f"{len(hosts)} Host headers")
    host = hosts[0].decode("ascii").strip() if hosts else None
    if head.authority is not None:
        authority = head.authority.decode("ascii")
        if host is not None and host.lower() != authority.lower():
            raise ValueError(f"Host {host[:80]!r} differs from :authority {authority[:80]!r}")
        host = authority
    if not host:
        raise ValueError("request without a Host header")
    return host


def _port_problem(host: str, port: int) -> str | None:
    try:
        name, named = parse_host_port(host, default_port=0)
    except ValueError as e:
        return f"Host: {e}"
    if ":" in name and not host.startswith("["):
        # RFC 3986 puts an IPv6 address in brackets; bare, servers split it at its
        # last colon (nginx), which the gateway would read as part of the address.
        return f"Host {host[:80]!r}: an IPv6 address goes in brackets"
    if named not in (0, port):
        return f"Host {host[:80]!r} names port {named}; the connection goes to port {port}"
    return None


def _upgrade(values: list[bytes] | None) -> tuple[bool, bool]:
    """(websocket, strip) for the Upgrade header values."""
    if values is None:
        return False, False
    tokens = [t.strip().lower() for v in values for t in v.split(b",")]
    if tokens == [b"websocket"]:
        return True, False
    return False, True


def connection_without_upgrade(value: str) -> str:
    """A Connection header's value without the tokens a removed upgrade needs."""
    kept = [t.strip() for t in value.split(",")]
    return ", ".join(t for t in kept if t and t.lower() not in ("upgrade", "http2-settings"))


def _malformed(detail: str) -> Decision:
    return deny("malformed-request", detail=detail)


# --- first bytes --------------------------------------------------------------------

# What HTTP/1 servers skip before a request line or split it at. RFC 9112 2.2 has a
# server skip empty lines first (nginx, Apache and Node's llhttp do). Python's
# http.server splits the line, decoded as Latin-1, with str.split(): it skips any
# leading whitespace and splits at \x1c-\x1f, \x85 and \xa0 too. A lone CR
# separates (lines end at LF; mitmproxy's parser splits at any whitespace).
_BLANK = rb" \t\x0b\x0c\x1c-\x1f\x85\xa0"
_LEADING = re.compile(rb"[\r\n" + _BLANK + rb"]*")
_METHOD_AND_SPACE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[" + _BLANK + rb"]|\r(?!\n))+")
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*:")
MAX_UNDECIDED = 1024


def starts_like_http(data: bytes) -> bool | None:
    """Whether `data`, a connection's first bytes, may be an HTTP/1 request line:
    True, False, or None (too few bytes to tell). Generous on purpose: anything some
    HTTP server may read as a request must be decided as one, else on a raw-TCP port
    it would skip the Host, method and path checks of the other names served at that
    address. After any blank lines and whitespace (`_LEADING`), a method token of any
    case and length, any run of whitespace, then a target starting with '/', '*' or
    `scheme:`; any other target once its line ends in an HTTP version, or is HTTP/0.9's
    `GET target` (http.server takes both). Still undecided after MAX_UNDECIDED bytes:
    HTTP (its parser refuses what is not)."""
    leading = _LEADING.match(data).end()
    start = _METHOD_AND_SPACE.match(data, leading)
    if start is None:
        # Only blanks and token bytes so far: the method may still be coming.
        if leading < len(data) and _TOKEN.fullmatch(data, leading) is None:
            return False
        return None if len(data) < MAX_UNDECIDED else True
    rest = data[start.end() :]
    if rest[:1] in (b"/", b"*") or _SCHEME.match(rest):
        return True
    end = data.find(b"\n", start.end())
    if end < 0:  # the target, or the line, is still coming
        return None if len(data) < MAX_UNDECIDED else True
    words = data[leading:end].decode("latin-1").split()
    return words[-1].upper().startswith("HTTP/") or (len(words) == 2 and words[0] == "GET")
