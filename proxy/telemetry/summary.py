"""The task summary: what the person who ran the task sees at the end.

One row per (destination, verdict, reason, rule): the destination is the name when
there is one (SNI, Host, DNS question), else IP:port. Blocked rows come first,
each with the rule to ask about.
"""

from __future__ import annotations

from collections import Counter
from typing import TextIO

from proxy.policy.reasons import Reason, Verdict
from proxy.telemetry.event import Event, EventKind

BLOCKED = (Verdict.DENY, Verdict.ASK)


class TaskSummary:
    def __init__(self) -> None:
        self.rows: Counter[tuple[str, str, str, str, str]] = Counter()
        self.firewall: dict[str, int] = {}
        self.task: dict = {}
        self.start_event: Event | None = None

    def emit(self, event: Event) -> None:
        if event.kind in (EventKind.TASK, EventKind.POLICY):
            return
        destination = event.name or (f"{event.dst_ip}:{event.dst_port}" if event.dst_ip else "?")
        self.rows[(str(event.kind), destination, str(event.verdict), str(event.reason), event.rule_id or "")] += 1

    def task_started(self, task_id: str, profile: str, sandbox: str, command: list[str]) -> None:
        self.task = {"task_id": task_id, "profile": profile, "sandbox": sandbox, "command": command}
        self.start_event = Event(kind=EventKind.TASK, verdict=Verdict.ALLOW, reason=Reason.RULE_ALLOW,
                                 task_id=task_id, sandbox=sandbox, profile=profile,
                                 detail="task started: " + " ".join(command)[:500])

    def task_ended(self, task_id: str, duration: float) -> None:
        self.task["duration"] = round(duration, 3)

    def firewall_drops(self, counters: dict[str, int]) -> None:
        self.firewall = {name: n for name, n in counters.items() if n}

    def to_dict(self) -> dict:
        return {
            **self.task,
            "destinations": [
                {"kind": k, "destination": d, "verdict": v, "reason": r, "rule": rule, "count": n}
                for (k, d, v, r, rule), n in sorted(self.rows.items(), key=_blocked_first)
            ],
            "firewall_drops": self.firewall,
        }

    def print_table(self, out: TextIO) -> None:
        rows = sorted(self.rows.items(), key=_blocked_first)
        allowed = sum(n for (_, _, v, _, _), n in rows if v not in BLOCKED)
        blocked = sum(n for (_, _, v, _, _), n in rows if v in BLOCKED)
        print(f"\nsandgate: task {self.task.get('task_id', '?')} (profile {self.task.get('profile', '?')}): "
              f"{allowed} allowed, {blocked} blocked", file=out)
        if rows:
            width = min(48, max(len(d) for (_, d, _, _, _), _ in rows))
            print(f"  {'VERDICT':7} {'KIND':10} {'DESTINATION':{width}} {'N':>4}  REASON / RULE", file=out)
            for (kind, dest, verdict, reason, rule), n in rows:
                print(f"  {verdict:7} {kind:10} {dest[:width]:{width}} {n:>4}  {reason} / {rule}", file=out)
        for name, n in sorted(self.firewall.items()):
            print(f"  firewall: {name} {n} packets", file=out)
        if blocked:
            print("  To ask for access, show the blocked rows to your network admins "
                  "(sandgate check TARGET explains a verdict).", file=out)


def _blocked_first(item) -> tuple:
    (kind, dest, verdict, reason, rule), n = item
    return (verdict not in BLOCKED, dest, kind)
