"""The one vocabulary of verdicts and reasons.

Every event, audit-log line, metric label and 403 page names one `Reason` from
here; docs/rules.md and docs/telemetry.md list each (a test checks that they do).
Values are stable strings: dashboards and SIEM rules key on them.
"""

from enum import StrEnum


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"  # hold and ask a human (docs/approvals.md)
    AUDIT = "audit"  # allowed, but recorded as what a deny fallback would have blocked


class Reason(StrEnum):
    # Rule outcomes.
    RULE_ALLOW = "rule_allow"  # an allow rule matched
    RULE_DENY = "rule_deny"  # a deny rule matched (deny wins over allow)
    RULE_ASK = "rule_ask"  # an ask rule matched: a human decides (held, then approved or not)
    NO_RULE = "no_rule"  # nothing matched: the profile's fallback answered
    PORT_NOT_ALLOWED = "port_not_allowed"  # a rule names the destination, not this port
    METHOD_NOT_ALLOWED = "method_not_allowed"  # a rule names the destination, not this method
    PATH_NOT_ALLOWED = "path_not_allowed"  # a rule names the destination, not this path
    # Destinations no name rule can open.
    PRIVATE_ADDRESS = "private_address"  # private/loopback/link-local/CGNAT/multicast/unspecified
    INVALID_NAME = "invalid_name"  # not a domain: NUL, empty label, too long, IP literal ...
    # Connection-level checks at the gateway.
    SPOOFED_DESTINATION = "spoofed_destination"  # SNI/Host name never resolved to this IP
    HOST_MISMATCH = "host_mismatch"  # HTTP Host/:authority disagrees with SNI or destination
    MISSING_SNI = "missing_sni"  # TLS without SNI and no IP rule allows the address
    MALFORMED_TLS = "malformed_tls"  # ClientHello could not be parsed
    NOT_HTTP = "not_http"  # bytes on a port that expects HTTP or TLS are neither
    NO_DATA = "no_data"  # the client closed before sending enough bytes to decide on
    PROTOCOL_NOT_ALLOWED = "protocol_not_allowed"  # e.g. an upgrade (WebSocket, h2c) not allowed
    BODY_TOO_LARGE = "body_too_large"
    # An HTTP request head sandgate will not forward (proxy/policy/request_head.py).
    MALFORMED_REQUEST = "malformed_request"  # not a token method, control bytes, bad framing ...
    AMBIGUOUS_PATH = "ambiguous_path"  # a path servers may read otherwise than it was decided
    # A method override (X-HTTP-Method-Override, `_method=`) naming another method.
    AMBIGUOUS_METHOD = "ambiguous_method"
    HEADERS_TOO_LARGE = (
        "headers_too_large"  # too many header fields or bytes (431); a response head too (502)
    )
    # Under inspection the client refused the gateway's certificate (a pinned or private CA).
    TLS_REJECTED_BY_CLIENT = "tls_rejected_by_client"
    # A sandbox over a cap of its profile's `limits:` (open or undecided connections,
    # DNS queries a second or in flight): one sandbox cannot starve the others.
    SANDBOX_LIMIT = "sandbox_limit"
    # DNS filter.
    DNS_QTYPE_NOT_ALLOWED = "dns_qtype_not_allowed"  # only A, AAAA, CNAME, HTTPS are answered
    DNS_REBINDING = "dns_rebinding"  # an upstream answer pointed at a private address
    DNS_MALFORMED = "dns_malformed"
    DNS_UPSTREAM_FAILURE = "dns_upstream_failure"
    # Approvals.
    APPROVAL_GRANTED = "approval_granted"
    APPROVAL_DENIED = "approval_denied"
    APPROVAL_UNAVAILABLE = "approval_unavailable"  # ask, but this gateway has no approvals
    APPROVAL_REQUESTED = "approval_requested"  # a pending approval was opened (kind approval)
    APPROVAL_PENDING = (
        "approval_pending"  # held for `hold` without a decision: 403/closed, still pending
    )
    APPROVAL_EXPIRED = "approval_expired"  # nobody decided within `expire_pending`
    APPROVAL_QUEUE_FULL = "approval_queue_full"  # max_pending_per_sandbox pending, or 10,000 in all
    # Kernel drops (counted by nftables, reported per task).
    DROPPED_BY_FIREWALL = "dropped_by_firewall"
    # The task sandbox.
    TASK_LIMIT = "task_limit"  # the task hit a cgroup limit (memory: OOM kill, pids: fork refused)
    SANDBOX_WEAKENED = "sandbox_weakened"  # --allow-weaker-sandbox: a kernel feature was missing
    # The task left a git hook or config (or editor settings) in its workspace that
    # would run code on the host; renamed aside after the run (docs/sandbox.md).
    WORKSPACE_PLANTED = "workspace_planted"
    # The gateway worker serving the sandbox died (`gateway --workers N`): its open
    # connections were cut, new ones waited in the listen queue until the restart.
    WORKER_RESTARTED = "worker_restarted"
    # The gateway itself.
    UNKNOWN_SANDBOX = "unknown_sandbox"  # traffic from an address no task owns
    UNKNOWN_PROFILE = "unknown_profile"
    POLICY_LOADED = "policy_loaded"
    POLICY_INVALID = "policy_invalid"  # a reload failed; the last good policy stays
    POLICY_CHANGED = (
        "policy_changed"  # an open connection the reloaded policy (or an expiry) denies: closed
    )
    # The audit log cannot be written (disk full, its budget reached, no descriptor):
    # with --on-audit-failure block (the default) new connections are refused.
    AUDIT_UNAVAILABLE = "audit_unavailable"
    # The process that wrote the audit log before was killed (SIGKILL, the OOM killer):
    # what it had not written was read back from its audit journal and appended.
    AUDIT_RECOVERED = "audit_recovered"
    # The gateway process has no file descriptor to spare: new connections are refused
    # until open ones close, so the audit log and control socket keep theirs.
    DESCRIPTORS_EXHAUSTED = "descriptors_exhausted"
    INTERNAL_ERROR = "internal_error"  # anything unexpected: fail closed, still report
