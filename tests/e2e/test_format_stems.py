"""A registry API denied by the URL an admin sees, format and all
(`deny: paths: ["/api/v1/gems/secret-gem.json"]`), is not served in another format
or with none.

RubyGems.org is a Rails app: its API names a gem as `/api/v1/gems/NAME.json` (the
URL in RubyGems' docs and in every client's log), and Rails routes `get
"/api/v1/gems/:id"` as `/api/v1/gems/:id(.:format)`, so it serves the same gem as
`/api/v1/gems/secret-gem`, `.yaml`, `.xml`, ... A deny took what its glob names with
a suffix after it (`/x` also takes `/x.json`) but never the stem of a name written
with one: the denied gem was served as `.yaml` and bare (a red team found it, session
52; the same class as test_git_repository_stems.py). A deny's segment written with
an extension now takes its stem too (load._stem), and the stem takes any suffix.

The origin is Rails' router (Debian's ruby-actionpack) on WEBrick, in the fake
internet; its handler logs what it served. Both gateway paths: `door` (the front
door) and `engine` (mitmproxy; a `websocket: true` rule sends the profile's plain
HTTP there).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from support import sandbox
from support.servers import door_and_engine, run_beside

pytestmark = pytest.mark.e2e

IP, PLAIN = "203.0.113.10", 8088

RAILS_APP = r"""
require "action_dispatch"
require "action_controller"
require "webrick"
require "rack/handler/webrick"
ip, plain, log = ARGV
LOG = File.open(log, "a"); LOG.sync = true
class GemsController < ActionController::Metal
  def show
    LOG.puts("served #{params[:id]} for #{request.path}")
    self.response_body = "GEM-METADATA name=#{params[:id]} format=#{params[:format]}\n"
  end
end
ROUTES = ActionDispatch::Routing::RouteSet.new
ROUTES.draw do
  get "/api/v1/gems/:id", to: "gems#show"
end
s = WEBrick::HTTPServer.new(BindAddress: ip, Port: plain.to_i, Logger: WEBrick::Log.new(File::NULL), AccessLog: [])
s.mount "/", Rack::Handler::WEBrick, ROUTES
s.start
"""

RULES = door_and_engine(f"""\
- allow: allowed.test
  id: registry
  ports: [{PLAIN}]
  methods: [GET, HEAD]
- deny: allowed.test
  id: no-secret-gem
  ports: [{PLAIN}]
  paths: ["/api/v1/gems/secret-gem.json"]
""")


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_gem_denied_by_its_json_url_is_not_served_in_another_format(net, tmp_path, profile):
    probe = 'require "action_dispatch"; require "webrick"'
    if not shutil.which("ruby") or subprocess.run(["ruby", "-e", probe]).returncode:
        pytest.skip("needs ruby, ruby-actionpack and ruby-webrick (scripts/install.sh --test)")
    app, log = tmp_path / "registry.rb", tmp_path / "registry.log"
    app.write_text(RAILS_APP)
    log.write_text("")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    base = f"http://allowed.test:{PLAIN}/api/v1/gems"
    steps = {
        "honest": sandbox.curl(f"{base}/rails.json"),
        "honest_yaml": sandbox.curl(f"{base}/rails.yaml"),
        "control": sandbox.curl(f"{base}/secret-gem.json"),
        "control_upper": sandbox.curl(f"{base}/Secret-Gem.JSON"),
        "yaml": sandbox.curl(f"{base}/secret-gem.yaml"),
        "xml": sandbox.curl(f"{base}/secret-gem.xml"),
        "bare": sandbox.curl(f"{base}/secret-gem"),
        # Rails routes any format, not only those a stem knows (a red team, session 52)
        "js": sandbox.curl(f"{base}/secret-gem.js"),
        "unknown": sandbox.curl(f"{base}/secret-gem.x"),
    }
    argv = ["ruby", str(app), IP, str(PLAIN), str(log)]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PLAIN}"], steps, rules, profile)
    served = log.read_text()
    why = f"{result.describe()}\nserver:\n{served}"
    assert "GEM-METADATA name=rails format=json" in result["honest"].out, why
    assert "GEM-METADATA name=rails format=yaml" in result["honest_yaml"].out, why
    # The control (the URL as denied, and in upper case), then the other formats: all
    # refused by the deny (the gateway's 403 page names the URL it refused).
    for label in ("control", "control_upper", "yaml", "xml", "bare", "js", "unknown"):
        assert result[label].status == 403, (label, why)
    assert result.verdicts(reason="rule_deny") == {
        ("deny", "rule_deny", f"{profile}-no-secret-gem")
    }, why
    assert "served secret-gem" not in served.lower(), why
