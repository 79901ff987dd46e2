"""A deny holds against the other names a framework gives a handler (a red team,
session 51, found both of these past the gateway).

Spring MVC up to 5.2 (Debian's libspring-web-servlet-java is 4.3) registers every
`@RequestMapping("/admin")` also as `/admin.*` (`useSuffixPatternMatch`, on by
default: `/admin.json` asks the same handler for JSON), and Rails routes every
`get "/admin"` as `/admin(.:format)`. A deny took what it names with a trailing `/`
and everything below it, not `/admin.json`, `/admin.` nor `/public/delete-all.x`:
the denied handlers ran. A deny now takes any suffix after a `.` too
(load._compile_paths).

Both frameworks (every one the red team tried) run the GET handler for a HEAD, so
a deny of GET takes HEAD too (model.Rule.matched_methods): `curl -I` ran a
handler denied to GET, with its side effects, and sent back its headers.

The origins are a real Spring MVC DispatcherServlet on Jetty 9.4 (Debian's jars)
and Rails' router on WEBrick (Debian's ruby-actionpack), plain HTTP and TLS, in the
fake internet; their handlers log what they ran. Both gateway paths: `door` (the
front door) and `engine` (mitmproxy; a websocket rule sends the profile there).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.servers import internet_servers

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
PLAIN, TLS = 8088, 8443
JARS = [
    "jetty9-server", "jetty9-servlet", "jetty9-util", "jetty9-http", "jetty9-io",
    "jetty9-security", "servlet-api", "spring3-core", "spring3-beans", "spring3-context",
    "spring3-aop", "spring3-expression", "spring3-web", "spring3-web.servlet",
    "commons-logging",
]  # fmt: skip

RULES = f"""\
version: 1
profiles:
  door:
    rules:
      - allow: allowed.test
        id: door-site
        ports: [{PLAIN}, {TLS}]
        methods: [GET]
        paths: ["/**"]
      - deny: allowed.test
        id: door-no-admin
        ports: [{PLAIN}, {TLS}]
        paths: ["/admin/**", "/public/delete-all"]
      - allow: allowed.test
        id: door-head
        ports: [{PLAIN}, {TLS}]
        methods: [HEAD]
      - deny: allowed.test
        id: door-no-report
        ports: [{PLAIN}, {TLS}]
        methods: [GET]
        paths: ["/public/report"]
  engine:
    rules:
      - allow: allowed.test
        id: engine-site
        ports: [{PLAIN}, {TLS}]
        methods: [GET]
        paths: ["/**"]
        websocket: true
      - deny: allowed.test
        id: engine-no-admin
        ports: [{PLAIN}, {TLS}]
        paths: ["/admin/**", "/public/delete-all"]
      - allow: allowed.test
        id: engine-head
        ports: [{PLAIN}, {TLS}]
        methods: [HEAD]
      - deny: allowed.test
        id: engine-no-report
        ports: [{PLAIN}, {TLS}]
        methods: [GET]
        paths: ["/public/report"]
"""

APP = r"""
import org.eclipse.jetty.server.*;
import org.eclipse.jetty.servlet.*;
import org.eclipse.jetty.util.ssl.SslContextFactory;
import org.springframework.stereotype.Controller;
import org.springframework.web.bind.annotation.*;
import org.springframework.web.context.support.AnnotationConfigWebApplicationContext;
import org.springframework.web.servlet.DispatcherServlet;
import javax.servlet.http.HttpServletRequest;
import java.io.FileWriter;

public class SpringApp {
  static FileWriter log;
  @Controller
  public static class Routes {
    @RequestMapping("/public/ok") @ResponseBody
    public String ok(HttpServletRequest q) { return ran("PUBLIC-OK", q); }
    @RequestMapping("/admin") @ResponseBody
    public String admin(HttpServletRequest q) { return ran("ADMIN-HANDLER", q); }
    @RequestMapping("/admin/users") @ResponseBody
    public String users(HttpServletRequest q) { return ran("ADMIN-HANDLER", q); }
    @RequestMapping("/public/delete-all") @ResponseBody
    public String deleteAll(HttpServletRequest q) { return ran("DELETE-ALL-HANDLER", q); }
    @RequestMapping("/public/report") @ResponseBody
    public String report(HttpServletRequest q) { return ran("REPORT-HANDLER", q); }
    static String ran(String what, HttpServletRequest q) {
      String line = what + " ran for " + q.getMethod() + " " + q.getRequestURI() + "\n";
      synchronized (log) { try { log.write(line); log.flush(); } catch (Exception e) {} }
      return line;
    }
  }
  public static void main(String[] a) throws Exception {
    log = new FileWriter(a[3], true);
    Server s = new Server();
    ServerConnector plain = new ServerConnector(s);
    plain.setHost(a[0]); plain.setPort(Integer.parseInt(a[1]));
    SslContextFactory.Server tls = new SslContextFactory.Server();
    tls.setKeyStorePath(a[4]); tls.setKeyStorePassword("changeit"); tls.setKeyStoreType("PKCS12");
    ServerConnector secure = new ServerConnector(s, tls);
    secure.setHost(a[0]); secure.setPort(Integer.parseInt(a[2]));
    s.setConnectors(new Connector[] {plain, secure});
    ServletContextHandler h = new ServletContextHandler();
    AnnotationConfigWebApplicationContext ctx = new AnnotationConfigWebApplicationContext();
    ctx.register(Routes.class);
    h.addServlet(new ServletHolder(new DispatcherServlet(ctx)), "/");
    s.setHandler(h);
    s.start();
    s.join();
  }
}
"""


def classpath() -> str:
    jars = [Path("/usr/share/java") / f"{name}.jar" for name in JARS]
    missing = [j.name for j in jars if not j.exists()]
    if missing or not shutil.which("javac"):
        pytest.skip(
            f"needs default-jdk-headless, libjetty9-java, libspring-web-servlet-java: {missing}"
        )
    return ":".join(str(j) for j in jars)


def spring_app(net, tmp_path: Path):
    cp = classpath()
    src = tmp_path / "SpringApp.java"
    src.write_text(APP)
    subprocess.run(
        ["javac", "-nowarn", "--release", "8", "-cp", cp, "-d", str(tmp_path), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    keystore = tmp_path / "server.p12"
    subprocess.run(
        ["openssl", "pkcs12", "-export", "-in", str(net.workdir / "server.pem"),
         "-inkey", str(net.workdir / "server.key"), "-out", str(keystore),
         "-passout", "pass:changeit"],
        check=True, capture_output=True,
    )  # fmt: skip
    log = tmp_path / "spring.log"
    log.write_text("")
    argv = ["java", "-Djava.net.preferIPv4Stack=true", "-cp", f"{cp}:{tmp_path}", "SpringApp"]
    argv += [IP, str(PLAIN), str(TLS), str(log), str(keystore)]
    return internet_servers(net, [argv], [f"{IP}:{PLAIN}", f"{IP}:{TLS}"]), log


# Rails 6.1's router (Debian's ruby-actionpack) on WEBrick, plain and TLS: every
# `get "/admin"` is `/admin(.:format)`, so `/admin.json` runs the same action.
RAILS_APP = r"""
require "action_dispatch"
require "action_controller"
require "webrick"
require "webrick/https"
require "openssl"
require "rack/handler/webrick"
ip, plain, tls, log, cert, key = ARGV
LOG = File.open(log, "a"); LOG.sync = true
class AdminController < ActionController::Metal
  def ran(what); LOG.puts("#{what} ran for #{request.method} #{request.path}"); self.response_body = "#{what} ran for #{request.method} #{request.path}\n"; end
  def show; ran("ADMIN-HANDLER"); end
  def destroy_all; ran("DELETE-ALL-HANDLER"); end
  def report; ran("REPORT-HANDLER"); end
  def ok; ran("PUBLIC-OK"); end
end
ROUTES = ActionDispatch::Routing::RouteSet.new
ROUTES.draw do
  get "/admin", to: "admin#show"
  get "/admin/users", to: "admin#show"
  get "/public/delete-all", to: "admin#destroy_all"
  get "/public/report", to: "admin#report"
  get "/public/ok", to: "admin#ok"
end
quiet = { Logger: WEBrick::Log.new(File::NULL), AccessLog: [] }
a = WEBrick::HTTPServer.new(BindAddress: ip, Port: plain.to_i, **quiet)
b = WEBrick::HTTPServer.new(BindAddress: ip, Port: tls.to_i, SSLEnable: true,
  SSLCertificate: OpenSSL::X509::Certificate.new(File.read(cert)),
  SSLPrivateKey: OpenSSL::PKey.read(File.read(key)), **quiet)
[a, b].each { |s| s.mount "/", Rack::Handler::WEBrick, ROUTES }
Thread.new { b.start }
a.start
"""


def rails_app(net, tmp_path: Path):
    probe = 'require "action_dispatch"; require "webrick"'
    if not shutil.which("ruby") or subprocess.run(["ruby", "-e", probe]).returncode:
        pytest.skip("needs ruby, ruby-actionpack and ruby-webrick")
    app = tmp_path / "rails_app.rb"
    app.write_text(RAILS_APP)
    log = tmp_path / "rails.log"
    log.write_text("")
    argv = ["ruby", str(app), IP, str(PLAIN), str(TLS), str(log)]
    argv += [str(net.workdir / "server.pem"), str(net.workdir / "server.key")]
    return internet_servers(net, [argv], [f"{IP}:{PLAIN}", f"{IP}:{TLS}"]), log


def url(path: str, tls: bool) -> str:
    return f"https://allowed.test:{TLS}{path}" if tls else f"http://allowed.test:{PLAIN}{path}"


def suffix_steps() -> dict[str, str]:
    steps = {}
    for tls in (False, True):
        via = "tls" if tls else "plain"
        steps[f"honest_{via}"] = sandbox.curl(url("/public/ok", tls))
        # Controls: the names the rules deny are refused.
        steps[f"admin_{via}"] = sandbox.curl(url("/admin", tls))
        steps[f"admin_users_{via}"] = sandbox.curl(url("/admin/users", tls))
        steps[f"delete_all_{via}"] = sandbox.curl(url("/public/delete-all", tls))
        # The same handlers by the names Spring's suffix pattern gives them.
        steps[f"admin_json_{via}"] = sandbox.curl(url("/admin.json", tls))
        steps[f"admin_dot_{via}"] = sandbox.curl(url("/admin.", tls))
        steps[f"delete_all_x_{via}"] = sandbox.curl(url("/public/delete-all.x", tls))
        # A deny of GET: HEAD runs the same handler.
        steps[f"report_{via}"] = sandbox.curl(url("/public/report", tls))
        steps[f"report_head_{via}"] = sandbox.curl("-I", url("/public/report", tls))
    return steps


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_spring_handler_is_not_reached_by_a_suffix(net, tmp_path, profile):
    steps = suffix_steps()
    servers, log = spring_app(net, tmp_path)
    check_suffixes(net, tmp_path, profile, steps, servers, log)


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_rails_action_is_not_reached_by_a_format(net, tmp_path, profile):
    steps = suffix_steps()
    del steps["admin_dot_plain"], steps["admin_dot_tls"]  # Rails wants a format after '.'
    servers, log = rails_app(net, tmp_path)
    check_suffixes(net, tmp_path, profile, steps, servers, log)


def check_suffixes(net, tmp_path, profile, steps, servers, log):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with servers:
        result = sandbox.run(
            net, tmp_path, {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules, extra=("--profile", profile),
        )  # fmt: skip
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    for via in ("plain", "tls"):
        assert "PUBLIC-OK ran for GET /public/ok" in result[f"honest_{via}"].out, why
        for control in ("admin", "admin_users", "delete_all", "report"):
            assert result[f"{control}_{via}"].status == 403, (control, via, why)
        for other_name in ("admin_json", "admin_dot", "delete_all_x", "report_head"):
            if f"{other_name}_{via}" in result.steps:
                assert result[f"{other_name}_{via}"].status == 403, (other_name, via, why)
    # No denied handler ran, by any name or method.
    assert "ADMIN-HANDLER" not in ran, why
    assert "DELETE-ALL-HANDLER" not in ran, why
    assert "REPORT-HANDLER" not in ran, why
