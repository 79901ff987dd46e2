"""The events a task's runner emits about the task itself (not its traffic): the
kernel's drops, the limits it hit, the protections it went without, its end.

Pure builders, shared by the embedded gateway (enforcer/run.py) and the gateway
service (enforcer/service.py), so both write the same lines for the same thing.
`where` carries the task's identity: task_id, sandbox, profile.
"""

from __future__ import annotations

from sandgate.proxy.policy.builtin import builtin_rule
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import Event, EventKind

LIMITS = ("memory", "pids", "cpus", "disk")
SANDBOX_FEATURES = ("user-namespace", "seccomp", "cgroup", "idmapped-mount", "workspace-guard")


def _by_rule(name: str, verdict: Verdict, reason: Reason, detail: str, **where) -> Event:
    rule = builtin_rule(name)
    return Event(
        kind=EventKind.TASK,
        verdict=verdict,
        reason=reason,
        rule_id=rule.id,
        rule_origin=rule.origin,
        detail=detail[:1000],
        **where,
    )


def firewall_drops(counters: dict[str, int], **where) -> list[Event]:
    """One event per nftables drop counter that counted."""
    events = []
    for name, packets in sorted(counters.items()):
        if packets:
            kind = name.removeprefix("dropped_")
            event = _by_rule(
                "firewall",
                Verdict.DENY,
                Reason.DROPPED_BY_FIREWALL,
                f"the firewall dropped {packets} packets ({name})",
                **where,
            )
            events.append(
                event.with_fields(protocol=kind) if kind in ("udp", "icmp", "ipv6") else event
            )
    return events


def task_limit(limit: str, detail: str, **where) -> Event:
    """The task ran into a cgroup limit (`limit` is one of LIMITS)."""
    return _by_rule(f"limit-{limit}", Verdict.DENY, Reason.TASK_LIMIT, detail, **where)


def sandbox_weakened(feature: str, why: str, **where) -> Event:
    """--allow-weaker-sandbox: the task ran without `feature` (one of SANDBOX_FEATURES)."""
    return _by_rule(
        f"weakened-{feature}",
        Verdict.AUDIT,
        Reason.SANDBOX_WEAKENED,
        f"the sandbox runs without {feature}: {why}",
        **where,
    )


def workspace_planted(detail: str, **where) -> Event:
    """The task left code for the host in its workspace (enforcer/sandbox/planting.py);
    `detail` names the path, why, and what was done with it."""
    return _by_rule("workspace-planted", Verdict.DENY, Reason.WORKSPACE_PLANTED, detail, **where)


def task_ended(why: str, duration: float, **where) -> Event:
    return Event(
        kind=EventKind.TASK,
        verdict=Verdict.ALLOW,
        reason=Reason.RULE_ALLOW,
        detail=f"task ended: {why}",
        duration=round(duration, 6),
        **where,
    )
