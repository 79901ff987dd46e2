"""What a human's approval binds to, probed by a hostile task (docs/approvals.md): an
approval lets through exactly what the approver was shown, never more. Each test
proves the forbidden request never reached the fake internet's server."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.sandbox import curl
from support.service import GatewayProcess
from test_approvals_e2e import Task, _pending

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 25s}
    rules:
      - ask: allowed.test
        paths: ["/up/**"]
        id: ask-uploads
      - deny: evil.test
"""


def _service(fakenet, tmp_path, rules_text: str) -> tuple[GatewayProcess, Path]:
    """A gateway service on `rules_text` (its rules file, for a reload), logs cleared."""
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    return GatewayProcess(fakenet, tmp_path, rules).start(), rules


def test_always_for_a_path_with_a_star_is_refused_as_it_would_be_a_glob(fakenet, tmp_path):
    """The task asks for GET /up/** (a legal path: '*' is a plain character in a URL).
    Written into approved.yaml as asked, `paths: ["/up/**"]` would allow every path
    under /up for every task. `--always` is refused (one line, nothing written); the
    exact path approved `--task` goes through, and /up/secret is asked again (denied
    here): the server saw only the approved path."""
    service, _ = _service(fakenet, tmp_path, RULES)
    try:
        task = Task(
            service,
            tmp_path,
            {
                "glob": curl("http://allowed.test/up/**", timeout=40),
                "wait": "until [ -e go ]; do sleep 0.1; done",
                "other": curl("http://allowed.test/up/secret", timeout=40),
            },
        )
        try:
            asked = task.held()
            assert (asked["method"], asked["path"]) == ("GET", "/up/**"), asked
            always = service.ask("approvals", "approve", asked["id"], "--always")
            assert always.returncode == 125, always.stdout + always.stderr
            assert "holds '*', which a rule reads as a wildcard" in always.stderr
            assert len(always.stderr.strip().splitlines()) == 1
            assert not (tmp_path / "approved.yaml").exists()
            assert [a["id"] for a in _pending(service)] == [asked["id"]]  # nothing decided
            exact = service.ask("approvals", "approve", asked["id"], "--task")
            assert exact.returncode == 0, exact.stderr
            (task.steps_dir / "go").touch()
            other = task.held(seen={asked["id"]})
            assert other["path"] == "/up/secret", other
            assert service.ask("approvals", "deny", other["id"]).returncode == 0
        finally:
            (task.steps_dir / "go").touch()
            result = task.finish()
        assert result["glob"].status == 200, result.describe()
        assert result["other"].status == 403, result.describe()
        assert [r["uri"] for r in fakenet.requests_seen()] == ["/up/**"]
    finally:
        service.stop()


def test_a_held_request_approved_after_a_reload_that_denies_it_is_denied(fakenet, tmp_path):
    """The admin sees GET /up/x held and reloads with `deny: allowed.test`; a second
    human, looking at the still-pending approval, approves it. A deny wins over any
    approval (docs/approvals.md): the held request is answered 403 under the new
    policy, and the server got nothing."""
    service, rules = _service(fakenet, tmp_path, RULES)
    try:
        task = Task(service, tmp_path, {"held": curl("http://allowed.test/up/x", timeout=40)})
        try:
            asked = task.held()
            rules.write_text(RULES.replace("deny: evil.test", "deny: [evil.test, allowed.test]"))
            reload = service.ask("reload")
            assert reload.returncode == 0, reload.stderr
            approved = service.ask("approvals", "approve", asked["id"])
            assert approved.returncode == 0, approved.stderr
        finally:
            result = task.finish()
        assert result["held"].status == 403, result.describe()
        assert fakenet.requests_seen() == []
        (request,) = service.events(kind="request", path="/up/x")
        assert (request["verdict"], request["reason"]) == ("deny", "policy_changed"), request
    finally:
        service.stop()


def test_a_held_tls_connection_approved_after_a_reload_that_denies_it_is_closed(fakenet, tmp_path):
    """As above for a connection held at its ClientHello (pass-through TLS): the reload
    revokes it, the late approval does not bring it back, the server got nothing."""
    service, rules = _service(fakenet, tmp_path, RULES.replace('        paths: ["/up/**"]\n', ""))
    try:
        task = Task(service, tmp_path, {"held": curl("https://allowed.test/", timeout=40)})
        try:
            asked = task.held()
            assert asked["protocol"] == "tls", asked
            rules.write_text(rules.read_text().replace("deny: evil.test", "deny: allowed.test"))
            assert service.ask("reload").returncode == 0
            service.ask("approvals", "approve", asked["id"])
        finally:
            result = task.finish()
        assert result["held"].status == 0 and result["held"].rc != 0, result.describe()
        assert fakenet.requests_seen() == []
    finally:
        service.stop()


# A deny of some methods and paths for allowed.test, and `FALLBACK` / `EXTRA` for the
# rest: what an approval (or an auditing fallback) lets through must still meet them.
DENY_WRITES = """\
version: 1
profiles:
  default:
    fallback: FALLBACK
    approval: {hold: 25s}
    rules:
      - deny: allowed.test
        methods: [POST, PUT, PATCH, DELETE]
        id: never-write
      - deny: allowed.test
        paths: ["/admin/**"]
        id: never-admin
EXTRA"""


@pytest.mark.parametrize("how", ["fallback-ask", "ask-rule", "fallback-audit"])
def test_what_an_approval_lets_through_still_meets_the_deny_rules_of_its_requests(
    fakenet, tmp_path, how
):
    """The approver is shown `allowed.test:443`; an approved connection used to be
    passed through uninspected, so a deny of POST or /admin never saw the request
    (nginx served POST /admin/upload). It is inspected now: a GET goes through, the
    POST is refused and the server never got it. Under `fallback: audit` nobody is
    asked, and the same holds."""
    fallback = {"fallback-ask": "ask", "ask-rule": "deny", "fallback-audit": "audit"}[how]
    extra = "      - ask: allowed.test\n        id: ask-it\n" if how == "ask-rule" else ""
    service, _ = _service(
        fakenet, tmp_path, DENY_WRITES.replace("FALLBACK", fallback).replace("EXTRA", extra)
    )
    post = ("-X", "POST", "--data", "repository-secrets", "https://allowed.test/admin/upload")
    try:
        task = Task(
            service,
            tmp_path,
            {
                "get": curl("https://allowed.test/", timeout=40),
                "post": curl(*post, timeout=40),
            },
        )
        try:
            seen: set[str] = set()
            seen_ids = []
            for _ in ("get", "post") if how != "fallback-audit" else ():
                asked = task.held(seen)
                seen.add(asked["id"])
                seen_ids.append(asked["id"])
                approved = service.ask("approvals", "approve", asked["id"])
                assert approved.returncode == 0, approved.stderr
        finally:
            result = task.finish()
        assert result["get"].status == 200, result.describe()
        assert result["post"].status == 403, result.describe()
        served = [(r["method"], r["uri"]) for r in fakenet.requests_seen()]
        assert served == [("GET", "/")], served
        (denied,) = service.events(kind="request", method="POST")
        assert (denied["verdict"], denied["reason"]) == ("deny", "rule_deny"), denied
        assert denied["rule_id"] in ("never-write", "never-admin"), denied
        if how != "fallback-audit":  # the GET rests on its connection's approval: no second ask
            (get,) = service.events(kind="request", method="GET")
            assert (get["reason"], get["approval_id"]) == ("approval_granted", seen_ids[0]), get
    finally:
        service.stop()


EVIL_IP = "203.0.113.66"
ASK_EVERYTHING = """\
version: 1
profiles:
  default:
    fallback: ask
    approval: {hold: 25s}
    rules:
      - deny: forbidden.test
"""


def test_a_fallback_ask_never_holds_a_name_sent_to_an_address_it_was_not_resolved_to(
    fakenet, tmp_path
):
    """`fallback: ask` answers for a name: the approver is shown api.allowed.test. A
    task that sent that name (SNI, Host) to an address of its choosing had the bytes go
    there once approved, and a `--for` grant opened the name to every address. Such a
    connection is refused at once (spoofed_destination), nobody is asked, and the
    chosen server gets nothing; an honest ask still works, and its grant opens only
    the name's own addresses."""
    service, _ = _service(fakenet, tmp_path, ASK_EVERYTHING)
    spoofs = {
        "tls": curl("--resolve", f"api.allowed.test:443:{EVIL_IP}", "https://api.allowed.test/x"),
        "http": curl("-H", "Host: api.allowed.test", f"http://{EVIL_IP}/y"),
    }
    try:
        honest = Task(service, tmp_path, {"honest": curl("https://api.allowed.test/", timeout=40)})
        try:
            asked = honest.held()
            approved = service.ask("approvals", "approve", asked["id"], "--for", "1h")
            assert approved.returncode == 0, approved.stderr
        finally:
            first = honest.finish()
        assert first["honest"].status == 200, first.describe()
        spoofing = Task(service, tmp_path, spoofs).finish()
        assert _pending(service) == []  # nobody was asked
        assert spoofing["tls"].status == 0 and spoofing["http"].status == 403, spoofing.describe()
        assert fakenet.requests_seen(EVIL_IP) == []
        refused = [e for e in service.events(reason="spoofed_destination")]
        assert {e["kind"] for e in refused} >= {"connection", "request"}, refused
    finally:
        service.stop()
