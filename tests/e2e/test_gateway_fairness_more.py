"""The rest of the gateway's fairness class: N hostile sandboxes on `sandgate gateway
--workers 1` beside one honest sandbox (service.beside_a_crowd), each attack in one
test. Asserted each time: the honest sandbox's HTTPS pass-through connections and
plain HTTP requests (support/crowd.py `HONEST`) all answer 200 within `BOUND` s; the
service's memory (VmRSS of its process tree, from /proc) grows by less than
`RSS_GROWTH_KB`; the audit log verifies; nothing refused without its event and reason.
The measured numbers are printed (`pytest -s`); `SANDGATE_PFAIR_N` overrides N.

- churn (connect, ClientHello, close, as fast as it can): before, 16 churners (each
  some 100-600 connections a second) took the honest requests to 0.6-0.9 s; now each
  sandbox's nftables table drops SYNs past its profile's `connection_rate`, counted
  (`dropped_connect_flood`) and reported in the task's firewall event, and a busy
  worker sets up what it accepted round-robin per sandbox (frontdoor/intake.py).
- names (inspected TLS, a new name each handshake: a leaf certificate each, ~1 ms of
  the worker's CPU): bounded per sandbox by the same connection rate, and the front
  door's leaf contexts by MAX_LEAF_CONTEXTS.
"""

from __future__ import annotations

import json
import os

import pytest
from support.crowd import run_attack
from support.service import running

pytestmark = pytest.mark.e2e

ROUNDS = 10
BOUND = 0.5  # seconds: the slowest honest request asserted
# What grew was the first burst of attaches, not the attack (session 30): 16 idle
# sandboxes grew a fresh service as much as 16 churners. Most of it was libnftables'
# caches of every sandbox's table (63-68 MB; 15-48 once the counters read only its
# own). Since no sandbox's table goes through libnftables (session 31), the churn
# grows the service 4.1-4.8 MB here and the names attack 7.9-8.3. A leak per
# connection would grow far past this bound over the churn's thousands.
RSS_GROWTH_KB = 24 * 1024
RATE = 50  # the hostile profile's connection_rate

RULES = f"""\
version: 1
profiles:
  honest:
    rules:
      - allow: allowed.test
        id: web
  hostile:
    limits: {{connection_rate: {RATE}}}
    rules:
      - allow: allowed.test
        id: web-hostile
  inspecting:
    limits: {{connection_rate: {RATE}}}
    rules:
      - allow: allowed.test
        methods: [GET]
        id: inspected-name
      - allow: 203.0.113.10/32
        methods: [GET]
        id: inspected-any-name
"""


@pytest.fixture
def service(net, tmp_path):
    with running(net, tmp_path, RULES, "--workers", "1", "--warm", "0") as gateway:
        yield gateway


def _crowd_run(service, tmp_path, attack: str, profile: str, n: int):
    return run_attack(service, tmp_path, attack, profile, n, BOUND, RSS_GROWTH_KB, ROUNDS)


def _task_events(service, workdir) -> list[dict]:
    task = json.loads((workdir / "summary.json").read_text())["task_id"]
    service.wait_task_ended(task)
    events = service.events(task_id=task)
    assert not [e for e in events if e.get("reason") == "internal_error"], events[-3:]
    return events


def test_churning_sandboxes_are_held_to_their_connection_rate(service, tmp_path):
    # 16 at RATE: 800 connections a second, more than a worker serves on this 2-core
    # machine. Before the front door's intake (frontdoor/intake.py) they took an
    # honest request to 0.55-1.06 s, and ran with 8; since, max 0.12 s.
    n = int(os.environ.get("SANDGATE_PFAIR_N", 16))
    attackers, ran, _ = _crowd_run(service, tmp_path, "churn", "hostile", n)
    for workdir, saw in attackers:
        events = _task_events(service, workdir)
        # Its table dropped the SYNs past its rate, and the task's end says how many.
        drops = [
            e
            for e in events
            if e["reason"] == "dropped_by_firewall" and "dropped_connect_flood" in e["detail"]
        ]
        assert drops, [e for e in events if e["kind"] == "task"]
        # What got through is about its rate (a burst of RATE, then RATE a second).
        assert saw["ok"] <= RATE * (ran + 2), (saw, ran)
        allowed = [e for e in events if e["kind"] == "connection" and e["verdict"] == "allow"]
        assert len(allowed) <= RATE * (ran + 2), len(allowed)
    service.verify_audit()


def test_inspected_handshakes_for_ever_new_names_stay_within_the_rate(service, tmp_path):
    n = int(os.environ.get("SANDGATE_PFAIR_N", 4))
    attackers, ran, cpu = _crowd_run(service, tmp_path, "names", "inspecting", n)
    handshakes = sum(saw["ok"] for _, saw in attackers)
    assert handshakes > 0
    print(f"names x{n}: {cpu / max(handshakes, 1) * 1000:.2f} ms of service CPU a handshake")
    for workdir, saw in attackers:
        assert saw["ok"] <= RATE * (ran + 2), (saw, ran)
        _task_events(service, workdir)
    service.verify_audit()
