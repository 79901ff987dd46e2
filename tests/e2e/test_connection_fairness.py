"""Many hostile sandboxes on one gateway worker, each within its profile's caps, and an
honest one beside them: the honest sandbox's new HTTPS pass-through connections and
plain HTTP requests keep completing, fast.

The attacks (support/crowd.py `ATTACK`'s modes), each run by N sandboxes of profile `hostile`:
- `hold`: open as many pass-through TLS connections as the profile allows (full
  handshakes) and keep them: two descriptors each at the worker. The worker is
  started with 2048 descriptors (`prlimit`), so that N caps of 150 add up to more
  than it has, as N caps of 512 do on a host with a larger limit;
- `slowloris`: keep `pending` connections undecided, a ClientHello record header and
  then one byte every 2 s;
- `churn`: connect, send a whole ClientHello (allowed: the gateway connects upstream),
  close, as fast as it can.

The honest sandbox (profile `honest`) then times `ROUNDS` HTTPS requests (a new
connection each: TCP, TLS handshake verified, GET) and as many plain HTTP ones, one
after the other; each has 5 s. Asserted: every one answered 200 within `BOUND` s;
the worker's audit log verifies and has each honest request's allow; every hostile
connection the gateway refused has its denial event (refused at connect: a reason
of the fixed vocabulary, no `internal_error`).

`SANDGATE_PFAIR_N` overrides N for every attack (measured with 4, 8 and 16). The
honest times are printed (`pytest -s`).

Before the fixes: `hold` with 8 sandboxes ran the worker out of descriptors (every
honest connection refused, descriptors_exhausted), and the next attach aborted the
service (libnftables' select() on a descriptor past 1024). `churn` is capped per
sandbox only by its table's `connection_rate` (200 a second by default here), more
than a worker serves: 8 churners took honest requests to p50 0.42-0.70 s, max 1-6 s
(an honest run timed out). Since the front door sets up a busy worker's new
connections round-robin per sandbox (frontdoor/intake.py), p50 0.01-0.24 s, max
0.2-0.65 s in the same hour. What is left of the HTTPS times is mostly outside the
gateway: the fake internet's nginx answers every churned ClientHello the gateway
relays with a handshake, on the same two cores (with the gateway at nice -15, so
relaying more of them: HTTPS p50 0.58 s, plain HTTP 0.07 s).

CI then saw one honest HTTPS request take 1.37 s: a SYN dropped for a full accept
queue (1024) and retried after a second. With two CPU burners beside the test, the
gateway's namespace counted 25-27 ListenOverflows a run and an honest request took
1.48 s; since a wake-up takes a queue past half full whole (door.py `_accept`, the
intake refusing the flood's excess), 0 in 5 runs, max 0.53 s.

CI later saw it again (9 SYNs dropped, an honest request 1.53 s): the churners' nft
buckets (`connection_rate` 200, burst 200) refill while their dropped SYNs wait a
second, and then burst together: the queue grew ~300 in 50 ms and reached 1025 over a
0.18 s turn. Under two CPU burners 37 drops in 4 runs. The queue is now as deep as
somaxconn (4096 here, door.py `LISTEN_BACKLOG`), still taken whole past 512: 0 in 4
runs, max 0.39-0.71 s.
"""

from __future__ import annotations

import ast
import json
import os

import pytest
from sandgate.proxy.limits import connection_budget
from support import sandbox
from support.crowd import ATTACK, HONEST, honest_times, listen_overflows, spread
from support.service import GatewayProcess, beside_a_crowd, counted

pytestmark = pytest.mark.e2e

ROUNDS = 12
BOUND = 1.0  # seconds: the slowest honest request asserted
DESCRIPTORS = 2048  # the worker's RLIMIT_NOFILE in these tests
HOSTILE_CONNECTIONS = 150

RULES = f"""\
version: 1
profiles:
  honest:
    rules:
      - allow: allowed.test
        id: web
  hostile:
    limits: {{connections: {HOSTILE_CONNECTIONS}, pending: 64}}
    rules:
      - allow: allowed.test
        id: web-hostile
"""

SCENARIOS = [
    pytest.param("hold", 8, HOSTILE_CONNECTIONS, id="hold"),
    pytest.param("slowloris", 16, 64, id="slowloris"),
    # Before the intake: 8 churners took the honest requests to 1.2 s and more on this
    # 2-core machine (the module's docstring); they ran with 4 (0.55 s).
    pytest.param("churn", 8, 0, id="churn"),
]


@pytest.fixture
def service(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    gateway = GatewayProcess(
        net,
        tmp_path,
        rules,
        "--workers",
        "1",
        "--warm",
        "0",
        wrap=("prlimit", f"--nofile={DESCRIPTORS}:{DESCRIPTORS}"),
    ).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _task_id(workdir) -> str:
    return json.loads((workdir / "summary.json").read_text())["task_id"]


@pytest.mark.parametrize(("attack", "default_n", "count"), SCENARIOS)
def test_an_honest_sandbox_connects_fast_beside_many_hostile_ones(
    service, tmp_path, attack, default_n, count
):
    n = int(os.environ.get("SANDGATE_PFAIR_N", default_n))
    shared, _ = sandbox.shared_dir(tmp_path)
    overflows = listen_overflows(service.fakenet.host_ns)
    run = beside_a_crowd(
        service,
        tmp_path,
        [(ATTACK, (attack, str(shared), str(i), str(count)), "hostile") for i in range(n)],
        (HONEST, (str(shared), str(ROUNDS)), "honest"),
        up_timeout=60,
    )
    hostile, honest, honest_err, errs = run
    assert (shared / "honest-times").exists(), honest_err[-2000:]
    times = honest_times(shared)
    # SYNs the gateway's namespace dropped for a full accept queue (the front door
    # takes a queue past half full whole): one of the honest sandbox's costs it 1 s.
    overflows = listen_overflows(service.fakenet.host_ns) - overflows
    seen = [ast.literal_eval((shared / f"done-{i}").read_text()) for i in range(n)]
    for kind in ("https", "http"):
        p50, most = spread(times, kind)
        print(f"\n{attack} x{n}: honest {kind} p50 {p50:.3f} s, max {most:.3f} s")
    print(f"{attack} x{n}: hostile saw {seen}; honest {times}; SYNs dropped {overflows}")
    failed = [t for t in times if t[2] != "HTTP/1.1 200 OK"]
    assert not failed, (failed, errs[0][-1000:])
    assert max(t for _, t, _ in times) < BOUND, (times, f"SYNs dropped: {overflows}")
    # The audit log: the chain verifies, every honest request's allow is in it, and every
    # hostile connection refused at connect has its denial with a reason.
    honest_id = _task_id(honest[1])
    service.wait_task_ended(honest_id)
    allowed = [
        e for e in service.events(task_id=honest_id) if e["kind"] in ("connection", "request")
    ]
    assert sum(e["verdict"] == "allow" for e in allowed) >= 2 * ROUNDS, allowed
    for (_, workdir), saw in zip(hostile, seen, strict=True):
        task = _task_id(workdir)
        service.wait_task_ended(task)
        events = service.events(task_id=task)
        assert not [e for e in events if e.get("reason") == "internal_error"], events[-3:]
        denials = [e for e in events if e["verdict"] == "deny" and e["kind"] == "connection"]
        # No sandbox ran the worker out of descriptors.
        assert not [e for e in denials if e["reason"] == "descriptors_exhausted"], denials[-3:]
        if attack == "hold":
            # Each handshake the gateway refused is a fair-share denial in the log (a
            # slowloris or churned connection the client cannot tell refused: its TCP
            # connect succeeds before the gateway accepts it).
            refused = [e for e in denials if e["rule_id"] == "builtin:sandbox-fair-share"]
            assert counted(refused) == saw["refused"], (saw, denials[-3:])
    if attack == "hold" and n * HOSTILE_CONNECTIONS > connection_budget(DESCRIPTORS):
        assert sum(saw["refused"] for saw in seen) > 0, seen  # the fair share was reached
    service.verify_audit()
