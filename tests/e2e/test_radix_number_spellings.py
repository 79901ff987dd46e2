"""A deny naming one object by its number (`/projects/42/**`) also takes the
spellings of 42 that an integer parser with radix prefixes reads, and the handler of
the denied object never runs.

Ruby's `Kernel#Integer` (the strict idiom, `Integer(params[:id])`, instead of
`to_i`) reads a leading `0` as octal (`052`, `00052`, `0_52`), `0d42` and `0D42` as
decimal, and `_` between the digits after a prefix (`0x2_a`, `0b10_1010`). Python's
`int(s, 0)` (base 0: the prefix decides) reads `_` after the prefix as well
(`0x_2a`, `0o_52`); so do Go's `strconv.ParseInt(s, 0, 64)`, which also reads the
octal spellings, C's `strtol` with base 0 and PHP's `intval($s, 0)`. A deny that
read a leading zero as decimal and a prefix only before plain digits let them all
pass (`rule_allow`). Found by a red team (session 52).

The price: under such a deny `/projects/052` is denied for a server that reads it in
base 10 as 52 (as `042` is). Controls: `/projects/7` is served, `/projects/42` and
`/projects/0o52` are refused. Origins: a WEBrick server whose handler calls
`Integer()` (Debian's ruby-webrick), and a Python http.server whose handler calls
`int(s, 0)`; plain HTTP in the fake internet; both gateway paths.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from support import sandbox
from support.servers import door_and_engine, run_beside

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
RUBY, PYTHON = 8094, 8095

RULES = door_and_engine(
    f"""\
      - allow: allowed.test
        id: site
        ports: [{RUBY}, {PYTHON}]
        methods: [GET]
        paths: ["/projects/**"]
      - deny: allowed.test
        id: not-project-42
        ports: [{RUBY}, {PYTHON}]
        paths: ["/projects/42/**"]
"""
)

RUBY_APP = r"""
require "webrick"
ip, port, log = ARGV
LOG = File.open(log, "a"); LOG.sync = true
server = WEBrick::HTTPServer.new(BindAddress: ip, Port: port.to_i,
  Logger: WEBrick::Log.new(File::NULL), AccessLog: [])
server.mount_proc("/projects/") do |request, response|
  id = Integer(request.path.delete_prefix("/projects/")) rescue nil
  if id.nil? || !(1..50).cover?(id)
    response.status = 404
    response.body = "no such project
"
  else
    line = "RUBY ran project #{id} for #{request.path}"
    LOG.puts(line)
    response.body = line + "
"
  end
end
server.start
"""

PYTHON_APP = r"""
import http.server, sys
ip, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            id = int(self.path.removeprefix("/projects/"), 0)
        except ValueError:
            id = None
        if id is None or not 1 <= id <= 50:
            self.send_error(404, "no such project")
            return
        line = f"PYTHON ran project {id} for {self.path}\n"
        with open(log, "a") as f:
            f.write(line)
        body = line.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer((ip, port), Handler).serve_forever()
"""

# What each parser reads as 42 (and the deny took none of).
RUBY_SPELLINGS = {
    "octal": "052",
    "octal_zeros": "00052",
    "octal_underscore": "0_52",
    "hex_underscore": "0x2_a",
    "binary_underscore": "0b10_1010",
    "decimal_prefix": "0d42",
    "decimal_prefix_upper": "0D42",
}
PYTHON_SPELLINGS = {
    "hex_underscore": "0x2_a",
    "binary_underscore": "0b10_1010",
    "hex_prefix_underscore": "0x_2a",
    "octal_prefix_underscore": "0o_52",
}


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_object_is_not_reached_by_a_radix_prefixed_spelling(net, tmp_path, profile):
    ruby = shutil.which("ruby")
    if not ruby or subprocess.run([ruby, "-e", 'require "webrick"']).returncode:
        pytest.skip("needs ruby and ruby-webrick")
    (tmp_path / "app.rb").write_text(RUBY_APP)
    (tmp_path / "app.py").write_text(PYTHON_APP)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "served.log"
    log.write_text("")
    steps = {}
    for label, port, spellings in (
        ("ruby", RUBY, RUBY_SPELLINGS),
        ("python", PYTHON, PYTHON_SPELLINGS),
    ):
        url = f"http://allowed.test:{port}/projects"
        steps[f"{label}_honest"] = sandbox.curl(f"{url}/7")
        steps[f"{label}_control"] = sandbox.curl(f"{url}/42")
        steps[f"{label}_control_0o"] = sandbox.curl(f"{url}/0o52")
        for spelling, segment in spellings.items():
            steps[f"{label}_{spelling}"] = sandbox.curl(f"{url}/{segment}")
    commands = [
        [ruby, str(tmp_path / "app.rb"), IP, str(RUBY), str(log)],
        [sys.executable, str(tmp_path / "app.py"), IP, str(PYTHON), str(log)],
    ]
    listens = [f"{IP}:{RUBY}", f"{IP}:{PYTHON}"]
    result = run_beside(net, tmp_path, commands, listens, steps, rules, profile)
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    for label in ("ruby", "python"):
        assert f"{label.upper()} ran project 7" in result[f"{label}_honest"].out, why
        assert result[f"{label}_control"].status == 403, why
        assert result[f"{label}_control_0o"].status == 403, why
    passed = {label for label in steps if result[label].status == 200}
    assert passed == {"ruby_honest", "python_honest"}, why
    assert "ran project 42" not in ran, why
