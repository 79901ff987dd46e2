"""The registry of built-in rules: the protections the gateway applies on its own.

Every deny that no rule file wrote names one of these (`builtin:<name>`), so an
admin can look up what it means (docs/rules.md, "Built-in rules", lists each; a
test checks that it does). A module that denies on its own takes its rule from
here, with `builtin_rule(name)` or `deny(name, detail)`; an unknown name is a bug
and raises at import or on first use, never a rule id nobody documented.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import Decision, Rule
from .reasons import Reason, Verdict


@dataclass(frozen=True, slots=True)
class Builtin:
    """One built-in rule: its `rule` (id `builtin:<name>`), the reasons it gives
    (the first is its usual one), and what it means, in one line for admins."""

    rule: Rule
    reasons: tuple[Reason, ...]
    meaning: str

    @property
    def reason(self) -> Reason:
        return self.reasons[0]


def _builtins(*entries: tuple[str, tuple[Reason, ...], str]) -> dict[str, Builtin]:
    return {
        name: Builtin(
            Rule(id=f"builtin:{name}", action=Verdict.DENY, file="<builtin>", line=0),
            reasons,
            meaning,
        )
        for name, reasons, meaning in entries
    }


R = Reason
BUILTINS: dict[str, Builtin] = _builtins(
    # The policy core (proxy/policy/decide.py).
    (
        "private-address",
        (R.PRIVATE_ADDRESS,),
        "the destination is in a private, loopback, link-local, CGNAT, multicast, reserved, unspecified or "
        "cloud-internal range "
        "that no CIDR rule opens",
    ),
    (
        "spoofed-destination",
        (R.SPOOFED_DESTINATION,),
        "a name rule allows the SNI or Host, but the gateway's DNS never gave this sandbox this address for it",
    ),
    ("unknown-profile", (R.UNKNOWN_PROFILE,), "the sandbox's profile is not in the loaded rules"),
    (
        "internal-error",
        (R.INTERNAL_ERROR,),
        "the gateway failed while deciding: it denies, and says so",
    ),
    # The connection gate (proxy/gate.py).
    (
        "policy-changed",
        (R.POLICY_CHANGED,),
        "an open connection that a reloaded policy no longer allows (or one an expired rule allowed): "
        "the gateway closed it",
    ),
    (
        "unknown-sandbox",
        (R.UNKNOWN_SANDBOX,),
        "traffic (a connection or a DNS query) from an address no task owns",
    ),
    (
        "malformed-tls",
        (R.MALFORMED_TLS, R.INVALID_NAME),
        "a ClientHello that cannot be parsed, is split over records, in a record or legacy version no "
        "client sends, or longer than 16 KiB, names no "
        "valid host in its SNI, or, passed through by name, not in the decided spelling (lower case, "
        "no trailing dot)",
    ),
    ("missing-sni", (R.MISSING_SNI,), "TLS without SNI to an address no IP rule allows"),
    (
        "encrypted-client-hello",
        (R.PROTOCOL_NOT_ALLOWED,),
        "a ClientHello carrying encrypted_client_hello (ECH, or ESNI) that an allow by name would pass "
        "through: its SNI is only the outer name, and the server may serve the one it hides",
    ),
    (
        "client-hello-changed",
        (R.SPOOFED_DESTINATION,),
        "after a HelloRetryRequest, a pass-through connection's second ClientHello names another "
        "server than its first, the one decided: the server would serve that one",
    ),
    (
        "resumed-session",
        (R.SPOOFED_DESTINATION,),
        "a TLS 1.2 server resumed a session on a connection passed through by name that the "
        "gateway did not see issued to this sandbox for the same name, address and port: such a "
        "server serves the name the session was made for, not the SNI",
    ),
    (
        "not-http",
        (R.NOT_HTTP,),
        "bytes that are neither TLS nor HTTP on a web port, or where a rule checks methods or paths",
    ),
    (
        "host-mismatch",
        (R.HOST_MISMATCH, R.INVALID_NAME),
        "an HTTP Host that is missing, given twice, invalid, names another port, or disagrees with the SNI, "
        "the destination address, :authority or an absolute-form target; or a host override "
        "(X-Forwarded-Host, X-Host, Forwarded host=, ...) naming a host the rules would not allow there",
    ),
    (
        "malformed-request",
        (R.MALFORMED_REQUEST,),
        "an HTTP request head that is not well-formed (a method that is not a token, control bytes in the "
        "target or a header, a bad header name, conflicting Content-Length/Transfer-Encoding), or one the "
        "gateway's HTTP parser refused with 400; or an HTTP/2 request head its HTTP/2 library refused "
        "(a host other than :authority, userinfo, no authority, CONNECT), which closes the connection "
        "(GOAWAY)",
    ),
    (
        "ambiguous-path",
        (R.AMBIGUOUS_PATH,),
        "a request path a server may read otherwise than the gateway decided it: '#', a backslash, "
        "';', '//', dot segments (also where %2F is read as '/'), %5C %2E %3B, encoded controls or "
        "invalid UTF-8, raw non-ASCII; "
        "or an X-Original-URL or X-Rewrite-URL naming such a path, or one the rules would not allow; "
        "or a mount point (SCRIPT_NAME, PATH_INFO, X-Script-Name, X-Forwarded-Prefix) a server "
        "takes off the path before routing it, or a virtual root (X-Vhm-Root) it puts in front of it",
    ),
    (
        "ambiguous-method",
        (R.AMBIGUOUS_METHOD,),
        "a request whose X-HTTP-Method-Override, X-HTTP-Method or X-Method-Override header, or "
        "a query parameter, form field or JSON body member naming a method (`_method`, "
        "`x-tunneled-method`...), "
        "names another "
        "method than its own that the rules would "
        "not allow there, or a value that is not one method: servers that honour overrides would "
        "run that method, not the one decided",
    ),
    (
        "headers-too-large",
        (R.HEADERS_TOO_LARGE,),
        "a request head with more than 100 header fields or more than 64 KiB (answered 431), "
        "or an upstream response head unfinished after 64 KiB (cut, 502); an HTTP/2 header "
        "block (HEADERS and CONTINUATIONs) of more than 64 KiB closes the connection (GOAWAY "
        "ENHANCE_YOUR_CALM)",
    ),
    (
        "body-too-large",
        (R.BODY_TOO_LARGE,),
        "more than 1 MiB of a request's body arrived while the request was held for approval "
        "(answered 413)",
    ),
    (
        "protocol-not-allowed",
        (R.PROTOCOL_NOT_ALLOWED,),
        "the server switched protocols (101) for a request no websocket rule allowed to upgrade: "
        "the exchange is cut, no tunnel",
    ),
    (
        "tls-rejected-by-client",
        (R.TLS_REJECTED_BY_CLIENT,),
        "under inspection the client refused the gateway's certificate: it pins its own or trusts "
        "another CA; allow the name without methods/paths (pass-through) or give the client the gateway's CA",
    ),
    (
        "tls-handshake-failed",
        (R.PROTOCOL_NOT_ALLOWED, R.MALFORMED_TLS),
        "under inspection the client's TLS handshake with the gateway failed for another reason than "
        "its certificate: no TLS version or cipher in common (the gateway speaks TLS 1.2 and 1.3), or "
        "what followed the ClientHello is not TLS the gateway can read",
    ),
    (
        "no-data",
        (R.NO_DATA,),
        "the connection ended, or timed out, before sending enough bytes to decide on",
    ),
    (
        "sandbox-connections",
        (R.SANDBOX_LIMIT,),
        "the sandbox already held as many open connections as its profile's limits: connections allow",
    ),
    (
        "sandbox-pending",
        (R.SANDBOX_LIMIT,),
        "the sandbox already held as many undecided connections as its profile's limits: pending allow",
    ),
    (
        "sandbox-fair-share",
        (R.SANDBOX_LIMIT,),
        "the sandbox held as many connections as its gateway worker had free of those its "
        "descriptors allow: it waits for its own to close, and others still connect",
    ),
    (
        "sandbox-intake",
        (R.SANDBOX_LIMIT,),
        "the gateway worker was busy setting up new connections, which it then does in "
        "turn per sandbox, and 64 waited, the sandbox's the most of them: refused, where "
        "it would have waited behind every other sandbox's",
    ),
    (
        "sandbox-leaf-rate",
        (R.SANDBOX_LIMIT,),
        "the sandbox had the gateway sign as many new leaf certificates for inspected TLS "
        "lately as its profile's limits: leaf_rate allow a second",
    ),
    (
        "rapid-reset",
        (R.SANDBOX_LIMIT,),
        "more than 100 streams of an HTTP/2 client's connection were reset before their "
        "response ended, at least half of those it opened: by the client (rapid reset, "
        "CVE-2023-44487) or by the gateway for the client's frames (DATA after the "
        "request's end, a window overflow: MadeYouReset, CVE-2025-8671); the gateway "
        "closed the connection with GOAWAY ENHANCE_YOUR_CALM",
    ),
    (
        "control-frame-flood",
        (R.SANDBOX_LIMIT,),
        "an HTTP/2 client sent more than 200 control frames (SETTINGS, PING, PRIORITY, "
        "empty DATA) at once on one connection, or more than 20 a second after that (10 "
        "more for each stream it opened): the gateway closed the connection with GOAWAY "
        "ENHANCE_YOUR_CALM (CVE-2019-9512/9515/9516/9518)",
    ),
    (
        "audit-unavailable",
        (R.AUDIT_UNAVAILABLE,),
        "the audit log could not be written (disk full, its budget reached, out of descriptors): "
        "new connections, requests on open ones and upstream DNS queries are refused until it "
        "can (--on-audit-failure block)",
    ),
    (
        "descriptors-exhausted",
        (R.DESCRIPTORS_EXHAUSTED,),
        "the gateway had no file descriptor to spare: new connections are refused until open "
        "ones close, so that the audit log and the control socket keep theirs",
    ),
    # The DNS filter (proxy/dns/).
    (
        "dns-malformed",
        (R.DNS_MALFORMED,),
        "a DNS message that cannot be parsed, is a response, has several questions or an unknown EDNS version",
    ),
    (
        "dns-qtype",
        (R.DNS_QTYPE_NOT_ALLOWED,),
        "a DNS query whose opcode is not QUERY, class not IN, or type not A, AAAA, CNAME or HTTPS",
    ),
    ("dns-invalid-name", (R.INVALID_NAME,), "a DNS question for something that is not a host name"),
    (
        "dns-upstream",
        (R.DNS_UPSTREAM_FAILURE,),
        "the upstream resolver failed, timed out or answered nonsense, or had no public "
        "address for a placeholder's name after approval (a 502 to the held request)",
    ),
    (
        "dns-rebinding",
        (R.DNS_REBINDING,),
        "addresses in private ranges were removed from an upstream DNS answer",
    ),
    (
        "sandbox-dns-pending",
        (R.SANDBOX_LIMIT,),
        "too many of the sandbox's DNS queries were in flight (128): the query got SERVFAIL",
    ),
    (
        "sandbox-dns-rate",
        (R.SANDBOX_LIMIT,),
        "the sandbox sent more DNS queries a second than its profile's limits: dns_qps allow; "
        "the query got REFUSED (dropped unanswered past `dns_qps` REFUSED a second), and "
        "nothing was forwarded",
    ),
    (
        "sandbox-dns-tcp-share",
        (R.SANDBOX_LIMIT,),
        "the sandbox held as many DNS-over-TCP connections as the gateway worker's DNS "
        "filter had free of the 256 it serves at once (or none were free): the new "
        "connection was closed unanswered; its UDP queries and other sandboxes' "
        "connections go on",
    ),
    # The kernel (enforcer/nft.py), reported by the task runner.
    (
        "firewall",
        (R.DROPPED_BY_FIREWALL,),
        "nftables dropped the sandbox's packets: not TCP, nor DNS to the gateway, or "
        "SYNs past its profile's connection_rate (dropped_connect_flood)",
    ),
    # The task sandbox (enforcer/sandbox/), reported by the task runner.
    (
        "limit-memory",
        (R.TASK_LIMIT,),
        "the task reached its memory limit (--memory) and the OOM killer killed a process of it",
    ),
    (
        "limit-pids",
        (R.TASK_LIMIT,),
        "the task reached its process limit (--pids): a fork or thread was refused",
    ),
    ("limit-cpus", (R.TASK_LIMIT,), "the task was throttled at its CPU limit (--cpus)"),
    (
        "limit-disk",
        (R.TASK_LIMIT,),
        "a file system the task can write fell below its disk reserve (--disk-reserve): "
        "the task was killed",
    ),
    (
        "weakened-user-namespace",
        (R.SANDBOX_WEAKENED,),
        "--allow-weaker-sandbox: no user namespace; the task ran with host ids, capabilities dropped",
    ),
    ("weakened-seccomp", (R.SANDBOX_WEAKENED,), "--allow-weaker-sandbox: no seccomp filter"),
    (
        "weakened-cgroup",
        (R.SANDBOX_WEAKENED,),
        "--allow-weaker-sandbox: no cgroup limits (memory, pids, cpus)",
    ),
    (
        "weakened-workspace-guard",
        (R.SANDBOX_WEAKENED,),
        "--no-workspace-guard: git control files in the workspace were writable and not "
        "checked after the run",
    ),
    (
        "workspace-planted",
        (R.WORKSPACE_PLANTED,),
        "the task left something in its workspace that the host's git or editor would run "
        "(a hook, config naming a program, a `.git` file pointing elsewhere); renamed to "
        "NAME.sandgate-planted after the run",
    ),
    (
        "weakened-idmapped-mount",
        (R.SANDBOX_WEAKENED,),
        "--allow-weaker-sandbox: a writable path without an idmapped mount; files there belong to the task's host id",
    ),
)
del R


def builtin(name: str) -> Builtin:
    """The registry's entry for `name` (without `builtin:`); ValueError if none."""
    try:
        return BUILTINS[name]
    except KeyError:
        raise ValueError(
            f"no built-in rule {name!r}; known: {', '.join(sorted(BUILTINS))}"
        ) from None


def builtin_rule(name: str) -> Rule:
    """The Rule of built-in `name`; ValueError for an unknown name."""
    return builtin(name).rule


def deny(name: str, detail: str = "", reason: Reason | None = None) -> Decision:
    """A deny by built-in `name`, with its usual reason or `reason`, which must be
    one it gives."""
    entry = builtin(name)
    if reason is None:
        reason = entry.reason
    elif reason not in entry.reasons:
        raise ValueError(f"built-in rule {name!r} does not give reason {reason}")
    return Decision(Verdict.DENY, reason, entry.rule, detail=detail)
