"""The events an audit log gave up on when the run ended are not lost (rt47 F4).

A run whose audit log cannot be written at its end (here its --audit-budget, the same
failing write as a full disk) gives up on the queued events after 5 s. It used to
delete the audit journal that held them: the task, which chose that end (it spent the
budget on denied DNS queries, then sent 1 MB on a TLS connection it had opened before,
which goes on during an outage, and exited), left no `connection_end` for the 1 MB
anywhere, where a SIGKILL at the same moment would have kept it. The journal is kept
now; the next open of the log (a second run, without a budget) appends what it holds.
"""

from __future__ import annotations

import json
import re

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
TASK = """
import http.client, socket, time
c = http.client.HTTPSConnection("allowed.test", 443, timeout=10)
c.request("GET", "/"); c.getresponse().read()
for i in range(150):  # denied names: events that spend the audit budget
    try:
        socket.gethostbyname(f"spend-{i}.evil.test")
    except OSError:
        pass
time.sleep(0.5)
c.request("POST", "/drop", body=b"D" * 1_000_000)
print("upload", c.getresponse().status)
c.close()
"""


def test_the_end_of_a_connection_that_went_on_in_an_outage_survives_the_runs_end(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    wd = tmp_path / "wd"
    (wd / "steps").mkdir(parents=True)
    first = sandbox.run(
        net, tmp_path, {"task": sandbox.python(TASK)}, rules=rules, workdir=wd,
        extra=("--audit-budget", "12K"), timeout=120,
    )  # fmt: skip
    print("run 1:", first.returncode, first["task"].out.strip(), "|", first["task"].err[-200:])
    print("run 1 stderr tail:", first.stderr.strip().splitlines()[-4:])
    assert "upload 200" in first["task"].out, first.describe()
    # The user is told where the events it could not write are kept.
    assert re.search(r"of them are kept in its audit journal", first.stderr), first.stderr[-2000:]
    log = wd / "audit.jsonl"
    # The next open of the log (another run, no budget) appends what a journal kept.
    sandbox.run(net, tmp_path, {"noop": "true"}, rules=rules, workdir=wd)
    records = [json.loads(x) for x in log.read_text().splitlines()]
    ends = [r for r in records if r["kind"] == "connection_end" and r.get("name") == "allowed.test"]
    print(
        "connection_end allowed.test:",
        [(r.get("bytes_up"), r.get("detail", "")[-80:]) for r in ends],
    )
    recovered = [r for r in records if r.get("reason") == "audit_recovered"]
    print("audit_recovered:", [r.get("detail", "")[:200] for r in recovered])
    assert any((r.get("bytes_up") or 0) >= 1_000_000 for r in ends), (
        "the connection_end of the 1 MB upload is lost for good (the journal was deleted)"
    )
