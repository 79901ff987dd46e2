"""A Content-Type naming a multipart boundary more than once is refused, before its
body costs the gateway's loop anything (a red team, session 53, found the cost).

form_body ran one multipart reader per `boundary=` parameter, each searching every
byte of the body: 3000 of them (a 48 KB Content-Type, under MAX_HEAD_BYTES) cost ~4 s
of CPU per MiB, and an 8 MB upload stalled the front door's loop for 10 s (GETs of
the same sandbox, and DNS, waited). Servers take the first boundary or refuse a
second, so the gateway now refuses a Content-Type naming one more than once
(proxy/policy/form_body.py `_readers_for`): the 3000-boundary upload ends at once
and GETs meanwhile stay prompt, as with the control, the same upload with one
boundary. Both gateway paths.
"""

from __future__ import annotations

import base64

import pytest
from support import sandbox
from test_form_method_overrides import RULES, URLS, rack_origin  # noqa: E402

pytestmark = pytest.mark.e2e

SCRIPT = r"""
import subprocess, time
n, url = {n}, "{url}"
open("hog.bin", "w").write("x" * 8_000_000)
ct = "multipart/form-data; " + ";".join("boundary=b%05d" % i for i in range(n))
hog = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{{http_code}} %{{time_total}}",
    "--max-time", "90", "-H", "Content-Type: " + ct, "--data-binary", "@hog.bin", url],
    stdout=subprocess.PIPE, text=True)
time.sleep(1)
worst = 0
for _ in range(8):
    t = time.time()
    subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "30", url])
    worst = max(worst, time.time() - t)
    time.sleep(0.2)
print("upload", hog.communicate()[0])
print("worst %.3f" % worst)
"""


def hog_step(n: int, url: str) -> str:
    code = base64.b64encode(SCRIPT.format(n=n, url=url).encode()).decode()
    return f"echo {code} | base64 -d > hog.py && python3 hog.py"


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_many_boundaries_are_refused_before_they_cost(net, tmp_path, profile):
    servers, log = rack_origin(net, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = URLS["plain"]
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "control": hog_step(1, url),
        "hog": hog_step(3000, url),
    }
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    why = result.describe()
    control = float(result["control"].out.split()[-1])
    hog = float(result["hog"].out.split()[-1])
    print(result["control"].out, result["hog"].out)
    print(f"{profile}: worst GET latency with 1 boundary {control:.3f}s, with 3000 {hog:.3f}s")
    hog_code, upload = result["hog"].out.split()[1:3]
    assert float(result["control"].out.split()[2]) < 10, why
    assert hog_code == "400" and float(upload) < 10 and hog < 0.5, why
