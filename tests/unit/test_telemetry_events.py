"""The event schema, the fan-out, the task summary, and the telemetry reference (docs/telemetry.md)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
from sandgate.proxy.policy.model import Decision, Rule
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.audit import audit_members, encode_line
from sandgate.proxy.telemetry.event import (
    CUT_MARKER_MAX,
    FIELD_BOUNDS,
    FIELDS,
    Event,
    EventFanout,
    EventKind,
    bound_text,
)
from sandgate.proxy.telemetry.summary import OTHER_DESTINATIONS, TaskSummary
from support.fakes import wired_metrics

DOCS = Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"


def event(**fields) -> Event:
    base = dict(
        kind=EventKind.CONNECTION,
        verdict=Verdict.DENY,
        reason=Reason.NO_RULE,
        rule_id="default:fallback",
    )
    return Event(**{**base, **fields})


# --- the schema -----------------------------------------------------------------------------


def test_with_fields_is_dataclasses_replace():
    e = event(name="a.test", dst_port=443, latency=0.1)
    assert e.with_fields(task_id="t", name=None) == dataclasses.replace(e, task_id="t", name=None)
    assert e.with_fields() == e
    with pytest.raises(TypeError, match="no field nmae"):
        e.with_fields(nmae="x")


def _same_event(fast: Event, slow: Event) -> None:
    """The same fields, the same order, the same audit bytes (time aside)."""
    assert fast.time == pytest.approx(slow.time, abs=5)
    fast, slow = fast.with_fields(time=1.0), slow.with_fields(time=1.0)
    assert fast == slow and list(vars(fast)) == list(vars(slow)) == list(FIELDS)
    assert audit_members(fast) == audit_members(slow)
    assert encode_line(fast, 7, "0" * 64) == encode_line(slow, 7, "0" * 64)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"name": "a.test", "method": "GET", "path": "/", "latency": 0.25, "dst_port": 80},
        {"name": "n" * 5000, "method": "M" * 40, "path": "/" * 3000, "bytes_up": 0, "time": 5.0},
    ],
)
def test_from_decision_makes_what_the_constructor_makes(fields):
    rule = Rule(id="r1", action=Verdict.ALLOW, file="rules.yaml", line=3)
    long_detail = Decision(Verdict.DENY, Reason.RULE_DENY, rule, detail="d" * 3000)
    for decision in (Decision(Verdict.ALLOW, Reason.RULE_ALLOW, rule, detail="ok"), long_detail):
        fast = Event.from_decision(EventKind.REQUEST, decision, **fields)
        slow = Event(
            kind=EventKind.REQUEST,
            verdict=decision.verdict,
            reason=decision.reason,
            rule_id="r1",
            rule_origin="rules.yaml:3",
            detail=decision.detail,
            **fields,
        )
        _same_event(fast, slow)
        assert len(fast.detail) <= FIELD_BOUNDS["detail"] + CUT_MARKER_MAX
        # A copy bounds what it is given, and keeps what it had as it was (a cut
        # value is not cut again, where dataclasses.replace would).
        changes = {"detail": "x" * 2000, "task_id": "t"}
        copy = fast.with_fields(**changes)
        assert list(vars(copy)) == list(FIELDS)
        for name in FIELDS:
            expected = getattr(fast, name)
            if name in changes:
                expected = bound_text(changes[name], FIELD_BOUNDS.get(name, 10**9))
            assert getattr(copy, name) == expected, name
    with pytest.raises(TypeError, match="nmae"):
        Event.from_decision(EventKind.REQUEST, decision, nmae="x")
    with pytest.raises(TypeError, match="rule_id"):
        Event.from_decision(EventKind.REQUEST, decision, rule_id="twice")
    # The event's own detail instead of the decision's, bounded as any.
    own = Event.from_decision(EventKind.REQUEST, decision, detail="x" * 2000)
    assert own.detail == bound_text("x" * 2000, FIELD_BOUNDS["detail"])
    mine = Event.from_decision(EventKind.REQUEST, decision, detail=None).detail
    assert mine == bound_text(decision.detail, FIELD_BOUNDS["detail"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.name = "changed"


def test_to_dict_is_json_ready_in_field_order_without_nones():
    e = event(name="a.test", dst_port=443)
    record = e.to_dict()
    assert list(record) == [f for f in FIELDS if getattr(e, f) is not None]
    assert record["kind"] == "connection" and type(record["kind"]) is str
    assert type(record["verdict"]) is str and type(record["reason"]) is str
    assert json.loads(json.dumps(record)) == record


def test_fanout_survives_a_broken_sink():
    got = []

    class Broken:
        def emit(self, event):
            raise RuntimeError("boom")

    class Good:
        def emit(self, event):
            got.append(event)

    EventFanout(Broken(), Good()).emit(event())
    assert len(got) == 1


# --- the task summary -------------------------------------------------------------------------


def test_summary_table_blocked_first_with_rule_and_where_the_audit_log_is():
    summary = TaskSummary()
    summary.task_started("t1", "default", "10.213.0.2", ["curl", "x"])
    summary.emit(
        event(
            kind=EventKind.DNS,
            verdict=Verdict.ALLOW,
            reason=Reason.RULE_ALLOW,
            rule_id="r1",
            name="ok.test",
        )
    )
    summary.emit(event(name="evil.test"))
    summary.emit(event(name="evil.test"))
    summary.telemetry.update(
        audit_log="/var/lib/sandgate/audit/t1.jsonl", metrics="http://127.0.0.1:9464/metrics"
    )
    out = io.StringIO()
    summary.print_table(out)
    text = out.getvalue()
    assert "1 allowed, 2 blocked" in text
    assert text.index("evil.test") < text.index("ok.test")
    assert "no_rule / default:fallback" in text
    assert "audit log: /var/lib/sandgate/audit/t1.jsonl" in text
    assert summary.to_dict()["audit_log"] == "/var/lib/sandgate/audit/t1.jsonl"


def test_a_summary_sent_over_the_control_socket_folds_rows_to_fit_and_keeps_every_count():
    summary = TaskSummary()  # 10,000 rows: ~1.5 MB of JSON, over control.MAX_LINE
    for i in range(12_000):
        summary.emit(event(kind=EventKind.DNS, name=f"n{i:05}.{'x' * 60}.evil.test"))
    summary.emit(event(kind=EventKind.CONNECTION, verdict=Verdict.ALLOW, name="ok.test"))
    whole = summary.to_dict()
    assert len(json.dumps(whole)) > 1 << 20
    fitted = summary.to_dict(max_bytes=100_000)
    assert len(json.dumps(fitted)) <= 100_000
    rows = fitted["destinations"]
    assert 100 < len(rows) < 1000
    assert sum(r["count"] for r in rows) == sum(r["count"] for r in whole["destinations"])
    assert sum(r["count"] for r in rows if r["kind"] == "dns") == 12_000
    (allowed,) = [r for r in rows if r["verdict"] == "allow"]  # folded, still counted
    assert (allowed["destination"], allowed["count"]) == (OTHER_DESTINATIONS, 1)
    assert summary.to_dict(max_bytes=10 << 20) == whole  # room enough: unchanged


def test_summary_memory_and_table_stay_short_under_many_names():
    summary = TaskSummary(max_rows=100, max_printed=10)
    for i in range(10_000):
        summary.emit(event(kind=EventKind.DNS, name=f"n{i}.evil.test"))
    assert len(summary.rows) == 101
    assert summary.rows[("dns", OTHER_DESTINATIONS, "deny", "no_rule", "default:fallback")] == 9_900
    out = io.StringIO()
    summary.print_table(out)
    assert "... 91 more rows" in out.getvalue()
    assert len(out.getvalue().splitlines()) < 20


def test_summary_escapes_terminal_control_sequences():
    summary = TaskSummary()
    summary.emit(event(name="evil\x1b]0;pwned\x07.test"))
    out = io.StringIO()
    summary.print_table(out)
    assert "\x1b" not in out.getvalue() and "\\x1b" in out.getvalue()


def test_summary_reports_lost_audit_events():
    summary = TaskSummary()
    summary.telemetry.update(audit_log="/a.jsonl", audit_lost=3)
    out = io.StringIO()
    summary.print_table(out)
    assert "WARNING: 3 events could not be written)" in out.getvalue()
    summary.telemetry.update(audit_kept=2)
    out = io.StringIO()
    summary.print_table(out)
    assert (
        "3 events could not be written; 2 of them are kept in its audit journal" in out.getvalue()
    )


def test_sandgate_run_keeps_an_audit_log_by_default(tmp_path):
    from sandgate.enforcer.run import AUDIT_DIR, RunOptions, TaskRun
    from sandgate.proxy.policy import load_policy
    from sandgate.proxy.policy.load import RULES_DIR

    policy = load_policy([RULES_DIR / "examples" / "demo.yaml"])
    run = TaskRun(RunOptions(command=["true"], policy=policy))
    assert run.audit_path == AUDIT_DIR / f"{run.run_id}.jsonl"
    assert run.opts.metrics_listen == ("127.0.0.1", 9464)
    chosen = TaskRun(RunOptions(command=["true"], policy=policy, audit_log=tmp_path / "a.jsonl"))
    assert chosen.audit_path == tmp_path / "a.jsonl"


# --- docs/telemetry.md ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> str:
    return DOCS.read_text(encoding="utf-8")


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_every_reason_is_documented(docs, reason):
    assert re.search(rf"^\|\s*`{reason}`\s*\|", docs, re.MULTILINE), (
        f"docs/telemetry.md: no row for {reason}"
    )


@pytest.mark.parametrize("field", FIELDS)
def test_every_event_field_is_documented(docs, field):
    assert re.search(rf"^\|\s*`{field}`\s*\|", docs, re.MULTILINE), (
        f"docs/telemetry.md: no row for field {field}"
    )


@pytest.mark.parametrize("value", [*map(str, EventKind), *map(str, Verdict)])
def test_every_kind_and_verdict_is_documented(docs, value):
    assert f"`{value}`" in docs


def test_every_metric_is_documented(docs):
    for family in wired_metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}" in docs, f"docs/telemetry.md does not document {name}"


def test_ocsf_classes_are_mapped(docs):
    for class_name, uid in (
        ("Network Activity", 4001),
        ("HTTP Activity", 4002),
        ("DNS Activity", 4003),
    ):
        assert class_name in docs and str(uid) in docs
