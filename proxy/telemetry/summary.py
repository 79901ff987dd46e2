"""The task summary: what the person who ran the task sees at the end.

One row per (destination, verdict, reason, rule): the destination is the name when
there is one (SNI, Host, DNS question), else IP:port. Blocked rows come first,
each with the rule to ask about. The table on stderr shows at most `max_printed`
rows (the JSON has them all); at most `max_rows` distinct rows are kept, later
destinations are counted under "(other destinations)" so that a task resolving
a million random names cannot grow the gateway's memory.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TextIO

from sandgate.proxy.policy.names import format_host_port
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import EncodedEvent, Event, EventKind

BLOCKED = (Verdict.DENY, Verdict.ASK)
OTHER_DESTINATIONS = "(other destinations)"
SUPPRESSED_DESTINATIONS = "(suppressed in the audit log)"
_NO_ROW = (EventKind.TASK, EventKind.POLICY, EventKind.CONNECTION_END)
# The summary follows the task's own output on the same terminal, which the task may
# have left hiding or garbling what comes next. Undone first, where it is a terminal:
TERMINAL_RESET = (
    "\x1b7\x1b[r\x1b8"  # a scroll region of a few lines: the whole screen again (DECSTBM),
    # the cursor where it was (DECSC/DECRC)
    "\x1b[0m"  # concealed, black-on-black or blinking text: plain again (SGR 0)
    "\x1b(B\x0f"  # line-drawing glyphs for letters: ASCII in G0, G0 in use (SCS, SI)
    "\x1b]8;;\x1b\\"  # an open hyperlink the rows would be the text of: closed (OSC 8)
)


def row_destination(event: Event) -> str | None:
    """The destination of `event`'s row in a task summary: the name, else IP:port;
    None for the kinds that get no row (task, policy, connection_end). A gateway
    worker sends it with each event (`EncodedEvent.destination`)."""
    if event.kind in _NO_ROW:
        return None
    return event.name or (format_host_port(event.dst_ip, event.dst_port) if event.dst_ip else "?")


class TaskSummary:
    def __init__(self, *, max_rows: int = 10_000, max_printed: int = 40) -> None:
        self.rows: Counter[tuple[str, str, str, str, str]] = Counter()
        self.firewall: dict[str, int] = {}
        self.task: dict = {}
        self.telemetry: dict = {}  # where the audit log and the metrics went
        self.start_event: Event | None = None
        self.max_rows, self.max_printed = max_rows, max_printed

    def emit(self, event: Event | EncodedEvent) -> None:
        if event.__class__ is EncodedEvent:
            destination = event.destination
        else:
            destination = row_destination(event)
        if destination is None:
            return
        key = (
            str(event.kind),
            destination,
            str(event.verdict),
            str(event.reason),
            event.rule_id or "",
        )
        # An aggregate record of the audit rate limit stands for N events. A run's
        # summary sees each event itself (the limit is in front of the audit log
        # only); a summary fed audit lines must count N, not 1.
        suppressed = (key[0], SUPPRESSED_DESTINATIONS, *key[2:]) if event.suppressed else None
        self.rows[suppressed or self._kept(key)] += event.suppressed or 1

    def emit_batch(self, events: list[Event | EncodedEvent]) -> None:
        """`emit` for each of `events`: the batch's rows counted first, then each
        distinct row added once (in the order first seen: the same rows, and the same
        `max_rows` overflow, as one by one)."""
        counts: Counter[tuple] = Counter()
        for event in events:
            if event.__class__ is EncodedEvent:
                if event.destination is not None:
                    counts[(event.kind, event.destination, event.verdict, event.reason,
                            event.rule_id)] += 1  # fmt: skip
                continue
            self._add_counts(counts)  # an `Event` (one of the service's): in its place
            counts.clear()
            self.emit(event)
        self._add_counts(counts)

    def _add_counts(self, counts: Counter[tuple]) -> None:
        rows = self.rows
        for (kind, destination, verdict, reason, rule_id), n in counts.items():
            rows[
                self._kept((str(kind), destination, str(verdict), str(reason), rule_id or ""))
            ] += n

    def _kept(self, key: tuple) -> tuple:
        """`key`, or its "other destinations" row once `max_rows` rows are kept."""
        if key not in self.rows and len(self.rows) >= self.max_rows:
            return (key[0], OTHER_DESTINATIONS, *key[2:])
        return key

    def task_started(self, task_id: str, profile: str, sandbox: str, command: list[str]) -> None:
        self.task = {"task_id": task_id, "profile": profile, "sandbox": sandbox, "command": command}
        self.start_event = Event(
            kind=EventKind.TASK,
            verdict=Verdict.ALLOW,
            reason=Reason.RULE_ALLOW,
            task_id=task_id,
            sandbox=sandbox,
            profile=profile,
            detail="task started: " + " ".join(command)[:500],
        )

    def task_ended(self, task_id: str, duration: float, exit_code: int | None = None) -> None:
        self.task["duration"] = round(duration, 3)
        if exit_code is not None:
            self.task["exit_code"] = exit_code

    def firewall_drops(self, counters: dict[str, int]) -> None:
        self.firewall = {name: n for name, n in counters.items() if n}

    def to_dict(self, max_bytes: int | None = None) -> dict:
        """The summary as JSON-ready data. `max_bytes`: its JSON stays within that many
        bytes (a gateway service's detach reply is one line of the control socket,
        which the runner refuses past control.MAX_LINE: a task that resolved thousands
        of names would lose its whole summary): the rows that do not fit are folded
        into "(other destinations)" rows, one per kind, verdict, reason and rule, their
        counts kept."""
        rows = sorted(self.rows.items(), key=_blocked_first)
        data = {**self.task, "destinations": [], "firewall_drops": self.firewall, **self.telemetry}
        if max_bytes is not None:
            rows = _fitted(rows, max_bytes - len(json.dumps(data)))
        data["destinations"] = [_row_dict(key, n) for key, n in rows]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TaskSummary:
        """The summary a gateway service sent back (to_dict's shape), to print it here."""
        summary = cls()
        keys = (
            "task_id",
            "profile",
            "sandbox",
            "command",
            "duration",
            "exit_code",
            "limits_hit",
            "sandbox_weakened",
            "workspace_planted",
            "workspace_not_renamed",
            "self_test",
        )
        summary.task = {k: data[k] for k in keys if k in data}
        for row in data.get("destinations", []):
            key = (row["kind"], row["destination"], row["verdict"], row["reason"], row["rule"])
            summary.rows[key] = row["count"]
        summary.firewall = dict(data.get("firewall_drops", {}))
        summary.telemetry = {
            k: data[k] for k in ("audit_log", "audit_lost", "audit_kept", "metrics") if k in data
        }
        return summary

    def print_table(self, out: TextIO) -> None:
        if out.isatty():
            out.write(TERMINAL_RESET)
        rows = sorted(self.rows.items(), key=_blocked_first)
        allowed = sum(n for (_, _, v, _, _), n in rows if v not in BLOCKED)
        blocked = sum(n for (_, _, v, _, _), n in rows if v in BLOCKED)
        print(
            f"\nsandgate: task {self.task.get('task_id', '?')} (profile {self.task.get('profile', '?')}): "
            f"{allowed} allowed, {blocked} blocked",
            file=out,
        )
        shown = rows[: self.max_printed]
        if shown:
            width = min(48, max(len(d) for (_, d, _, _, _), _ in shown))
            print(
                f"  {'VERDICT':7} {'KIND':10} {'DESTINATION':{width}} {'N':>4}  REASON / RULE",
                file=out,
            )
            for (kind, dest, verdict, reason, rule), n in shown:
                dest = _printable(dest)
                print(
                    f"  {verdict:7} {kind:10} {dest[:width]:{width}} {n:>4}  {reason} / {rule}",
                    file=out,
                )
        if len(rows) > len(shown):
            print(
                f"  ... {len(rows) - len(shown)} more rows (--summary-json FILE has them all)",
                file=out,
            )
        for name, n in sorted(self.firewall.items()):
            print(f"  firewall: {name} {n} packets", file=out)
        if blocked:
            print(
                "  To ask for access, show the blocked rows to your network admins "
                "(sandgate check TARGET explains a verdict).",
                file=out,
            )
        if any(r == Reason.TLS_REJECTED_BY_CLIENT for (_, _, _, r, _), _ in rows):
            print(
                "  hint: a client refused the gateway's certificate (tls_rejected_by_client): it\n"
                "  pins its own or trusts only its own CA bundle. Point it at the bundle sandgate\n"
                "  sets (SSL_CERT_FILE), or ask for a rule without methods/paths (pass-through).",
                file=out,
            )
        if self.telemetry.get("audit_log"):
            lost, kept = self.telemetry.get("audit_lost"), self.telemetry.get("audit_kept")
            warning = ""
            if lost:
                where = (
                    f"; {kept} of them are kept in its audit journal: the next open of the "
                    "log, or `sandgate gc`, appends them"
                    if kept
                    else ""
                )
                warning = f"  (WARNING: {lost} events could not be written{where})"
            print(f"  audit log: {self.telemetry['audit_log']}{warning}", file=out)
        if self.telemetry.get("metrics"):
            print(f"  metrics: {self.telemetry['metrics']}", file=out)
        if outcome := task_outcome(self.task):
            print(f"  task: {outcome}", file=out)


def task_outcome(task: dict) -> str:
    """What sandgate itself established about the task: its exit code, the limits it
    hit, the protections it ran without. The table's last line, because it is the one
    line the task cannot have written: sandgate's earlier warnings went to the same
    terminal before or during the task, which may have erased them (a clear screen
    and scrollback) or printed look-alikes ("sandgate: ...", exit 125)."""
    parts = []
    if task.get("exit_code") is not None:
        parts.append(f"exit code {task['exit_code']}")
    if task.get("limits_hit"):
        parts.append("limits hit: " + ", ".join(map(str, task["limits_hit"])))
    if task.get("sandbox_weakened"):
        features = ", ".join(map(str, task["sandbox_weakened"]))
        parts.append(f"WEAKER SANDBOX (--allow-weaker-sandbox): no {features}")
    if planted := task.get("workspace_planted"):
        parts.append(_planted_outcome(planted, task.get("workspace_not_renamed") or []))
    return _printable("; ".join(parts))


def _planted_outcome(planted: list, not_renamed: list) -> str:
    """What the task planted for the host, and how many of those paths are still live
    there: a path the check could not rename aside (or could not check) is never
    counted among the renamed ones (`workspace_not_renamed`, enforcer/sandbox/planting.py)."""
    if not not_renamed:
        return (
            f"PLANTED for the host's git or editor, renamed to *.sandgate-planted: "
            f"{len(planted)} path(s), first {str(planted[0])[:200]}"
        )
    renamed = max(len(planted) - len(not_renamed), 0)
    return (
        f"PLANTED for the host's git or editor: {len(planted)} path(s), "
        f"{len(not_renamed)} NOT renamed (still live or not checked: look before running "
        f"git or an editor there), first {str(not_renamed[0])[:200]}; "
        f"{renamed} renamed to *.sandgate-planted"
    )


def _row_dict(key: tuple, n: int) -> dict:
    kind, destination, verdict, reason, rule = key
    return {"kind": kind, "destination": destination, "verdict": verdict, "reason": reason,
            "rule": rule, "count": n}  # fmt: skip


def _fitted(rows: list[tuple[tuple, int]], budget: int) -> list[tuple[tuple, int]]:
    """`rows` (in order) whose JSON list fits in `budget` bytes: the first ones as they
    are, the rest folded into OTHER_DESTINATIONS rows (room for those is kept first:
    at most one per kind, verdict, reason and rule)."""
    sizes = [len(json.dumps(_row_dict(key, n))) + 2 for key, n in rows]
    if sum(sizes) <= budget:
        return rows
    folded_keys = {(k[0], OTHER_DESTINATIONS, *k[2:]) for k, _ in rows}
    room = budget - sum(len(json.dumps(_row_dict(k, 10**12))) + 2 for k in folded_keys)
    kept: list[tuple[tuple, int]] = []
    folded: Counter[tuple] = Counter()
    for (key, n), size in zip(rows, sizes, strict=True):
        if size <= room and key[1] != OTHER_DESTINATIONS:
            kept.append((key, n))
            room -= size
        else:
            folded[(key[0], OTHER_DESTINATIONS, *key[2:])] += n
    return kept + list(folded.items())


def _blocked_first(item) -> tuple:
    (kind, dest, verdict, reason, rule), n = item
    return (verdict not in BLOCKED, dest, kind)


def _printable(text: str) -> str:
    """No terminal control sequences from a sandbox's names reach the user's terminal."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
