"""A WebSocket tunnel approved `--for` a while is closed when the approval ends.

What was wrong (red team `trail`, session 50): docs/approvals.md says "A `--for` grant
ends for what it let through too". At a re-decision the gate decides a tunnel's
upgrade request again (`_request_denial_now`), which returned None for any ASK ("the
human's answer stands") without looking whether that answer had ended, and nothing
re-decided at the approval's end anyway (only connections were watched). The task's
frames after the end reached the server.

What holds now: the tunnel keeps the approval that let its upgrade through
(ConnState.tunnel_grant, watched when it has an end); while the policy asks about the
upgrade the tunnel lives only as long as that approval is in force (gate._exchange_denial),
so at the end it is closed (policy_changed, approval_expired)."""

from __future__ import annotations

import time

import pytest
from support.sandbox import eventually, python
from support.servers import script_server
from support.service import running
from test_approvals_e2e import Task
from test_live_revocation import WS_CLIENT, WS_IP, WS_PORT, WS_SERVER, _seen

pytestmark = pytest.mark.e2e

RULES = f"""\
version: 1
profiles:
  default:
    approval: {{hold: 25s}}
    rules:
      - allow: allowed.test
      - ask: api.allowed.test
        ports: [{WS_PORT}]
        methods: [GET]
        websocket: true
        id: ask-ws
"""


def test_a_websocket_tunnel_approved_for_a_while_is_closed_when_the_approval_ends(
    fakenet, tmp_path
):
    log = tmp_path / "ws.log"
    log.touch()
    with (
        script_server(fakenet, WS_SERVER, WS_IP, str(WS_PORT), str(log)),
        running(fakenet, tmp_path, RULES) as service,
    ):
        # the client sends "after" at a fixed instant well past the grant's end
        send_after = time.time() + 20
        task = Task(service, tmp_path, {"ws": python(WS_CLIENT, str(send_after))})
        try:
            asked = task.held()
            assert asked["method"] == "GET" and asked["port"] == WS_PORT, asked
            approved = service.ask("approvals", "approve", asked["id"], "--for", "4s")
            assert approved.returncode == 0, approved.stderr
            ended = time.time() + 4
            assert eventually(
                lambda: [e for e in _seen(log) if e.get("frame") == "before"], timeout=10
            ), _seen(log)
        finally:
            result = task.finish(timeout=60)
        frames = [e for e in _seen(log) if "frame" in e]
        assert send_after > ended + 5
        closed = service.events(kind="connection", reason="policy_changed")
        assert [e["frame"] for e in frames] == ["before"], (
            f"the tunnel outlived approval {asked['id']} (--for 4s, ended at {ended:.1f}): "
            f"the server got {frames} (the 'after' frame at {send_after:.1f}); "
            f"policy_changed events: {closed}; {result.describe()}"
        )
        assert len(closed) == 1 and f"the end of approval {asked['id']}" in closed[0]["detail"]
        assert "approval_expired" in closed[0]["detail"], closed
