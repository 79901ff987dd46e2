"""A deny naming one object by its number (`/projects/42/**`) also takes the other
spellings of that number that a framework's integer parameter reads as 42, and
the handler of the denied object never runs.

Flask's `<int:pid>` (Werkzeug 3's IntegerConverter: regex `\\d`, then `int()`)
matches `042` and any Unicode decimal digits: `/projects/%D9%A4%D9%A2`
(ARABIC-INDIC `٤٢`) and DEVANAGARI `४२` are project 42. Django's `<int:pk>`
(`[0-9]+`, then `int()`) reads leading zeros; Spring (`Long.valueOf`) reads
`042`, `+42` and `٤٢`; Rails (ActiveRecord's cast of any string to an integer
column) reads `042`, `+42`, `42-my-project` (the `to_param` slug idiom), `42abc`
and ` 42`. A deny that read the path's characters as written (or folded by case
or NFKC, which maps fullwidth `４２` but not `٤٢`) let them all pass. Found by a
red team (session 51).

Controls, per framework: an honest object (`/projects/7`) is served and
`/projects/42` is refused. Origins: Flask 3 and Django 5 from the test venv on
wsgiref; Spring MVC 4.3 on Jetty 9.4 (Debian's jars); Rails 6.1 (Debian's
ruby-actionpack, ruby-activerecord, ruby-sqlite3) on WEBrick. Plain HTTP in the
fake internet; both gateway paths.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import sandbox
from support.servers import door_and_engine, run_beside

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
FLASK, DJANGO = 8088, 8089

RULES = door_and_engine(
    f"""\
      - allow: allowed.test
        id: site
        ports: [{FLASK}, {DJANGO}]
        methods: [GET]
        paths: ["/projects/**"]
      - deny: allowed.test
        id: not-project-42
        ports: [{FLASK}, {DJANGO}]
        paths: ["/projects/42/**"]
"""
)

APP = r"""
import sys, threading
from wsgiref.simple_server import WSGIRequestHandler, make_server
ip, flask_port, django_port, log_path = sys.argv[1:5]
log = open(log_path, "a", buffering=1)

def ran(who, pid, path):
    line = f"{who} ran project {pid} for {path}\n"
    log.write(line)
    return line

from flask import Flask, request
flask_app = Flask("p")

@flask_app.get("/projects/<int:pid>")
def flask_project(pid):
    return ran("FLASK", pid, request.path)

from django.conf import settings
settings.configure(DEBUG=False, ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="x",
                   MIDDLEWARE=[], INSTALLED_APPS=[])
import django
django.setup()
from django.http import HttpResponse
from django.urls import path

def django_project(request, pk):
    body = ran("DJANGO", pk, request.path).encode()
    response = HttpResponse(body)
    response["Content-Length"] = str(len(body))
    return response

urlpatterns = [path("projects/<int:pk>", django_project)]
from django.core.wsgi import get_wsgi_application

class Quiet(WSGIRequestHandler):
    def log_message(self, *a):
        pass

a = make_server(ip, int(flask_port), flask_app, handler_class=Quiet)
b = make_server(ip, int(django_port), get_wsgi_application(), handler_class=Quiet)
threading.Thread(target=b.serve_forever, daemon=True).start()
a.serve_forever()
"""


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_object_is_not_reached_by_another_spelling_of_its_number(net, tmp_path, profile):
    probe = subprocess.run([sys.executable, "-c", "import flask, django"])
    if probe.returncode:
        pytest.skip("needs flask and django")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    app = tmp_path / "app.py"
    app.write_text(APP)
    log = tmp_path / "served.log"
    log.write_text("")
    steps = {}
    for label, port in (("flask", FLASK), ("django", DJANGO)):
        url = f"http://allowed.test:{port}/projects"
        steps[f"{label}_honest"] = sandbox.curl(f"{url}/7")
        steps[f"{label}_control"] = sandbox.curl(f"{url}/42")  # the denied object
        steps[f"{label}_zero"] = sandbox.curl(f"{url}/042")
        steps[f"{label}_zeros"] = sandbox.curl(f"{url}/00042")
    # Unicode decimal digits: Werkzeug's \d and int() read ARABIC-INDIC and
    # DEVANAGARI digits as 42.
    steps["flask_arabic_indic"] = sandbox.curl(f"http://allowed.test:{FLASK}/projects/%D9%A4%D9%A2")
    steps["flask_devanagari"] = sandbox.curl(
        f"http://allowed.test:{FLASK}/projects/%E0%A5%AA%E0%A5%A8"
    )
    argv = [sys.executable, str(app), IP, str(FLASK), str(DJANGO), str(log)]
    result = run_beside(
        net, tmp_path, [argv], [f"{IP}:{FLASK}", f"{IP}:{DJANGO}"], steps, rules, profile
    )
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    for label in ("flask", "django"):
        assert f"{label.upper()} ran project 7" in result[f"{label}_honest"].out, why
        assert result[f"{label}_control"].status == 403, why
    passed = {label: result[label].status for label in steps if result[label].status == 200}
    assert set(passed) == {"flask_honest", "django_honest"}, why
    assert "ran project 42" not in ran, why


# Spring MVC 4.3 (Debian's jars) on Jetty 9.4: `@PathVariable Long id` is bound by
# Long.valueOf, which reads "042", "+42" and Unicode digits ("٤٢") as 42.
JARS = [
    "jetty9-server", "jetty9-servlet", "jetty9-util", "jetty9-http", "jetty9-io",
    "jetty9-security", "servlet-api", "spring3-core", "spring3-beans", "spring3-context",
    "spring3-aop", "spring3-expression", "spring3-web", "spring3-web.servlet",
    "commons-logging",
]  # fmt: skip
SPRING = 8090

SPRING_APP = r"""
import org.eclipse.jetty.server.*;
import org.eclipse.jetty.servlet.*;
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
    @RequestMapping("/projects/{id}") @ResponseBody
    public String project(@PathVariable("id") Long id, HttpServletRequest q) {
      String line = "SPRING ran project " + id + " for " + q.getRequestURI() + "\n";
      synchronized (log) { try { log.write(line); log.flush(); } catch (Exception e) {} }
      return line;
    }
  }
  public static void main(String[] a) throws Exception {
    log = new FileWriter(a[2], true);
    Server s = new Server();
    ServerConnector plain = new ServerConnector(s);
    plain.setHost(a[0]); plain.setPort(Integer.parseInt(a[1]));
    s.setConnectors(new Connector[] {plain});
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


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_spring_object_is_not_reached_by_another_spelling_of_its_number(
    net, tmp_path, profile
):
    import shutil

    jars = [Path("/usr/share/java") / f"{name}.jar" for name in JARS]
    if not shutil.which("javac") or not all(j.exists() for j in jars):
        pytest.skip("needs default-jdk-headless, libjetty9-java, libspring-web-servlet-java")
    cp = ":".join(map(str, jars))
    (tmp_path / "SpringApp.java").write_text(SPRING_APP)
    subprocess.run(
        ["javac", "-nowarn", "--release", "8", "-cp", cp, "-d", str(tmp_path),
         str(tmp_path / "SpringApp.java")], check=True, capture_output=True,
    )  # fmt: skip
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace(f"{FLASK}, {DJANGO}", str(SPRING)))
    log = tmp_path / "served.log"
    log.write_text("")
    url = f"http://allowed.test:{SPRING}/projects"
    steps = {
        "honest": sandbox.curl(f"{url}/7"),
        "control": sandbox.curl(f"{url}/42"),
        "zero": sandbox.curl(f"{url}/042"),
        "plus": sandbox.curl(f"{url}/+42"),
        "arabic_indic": sandbox.curl(f"{url}/%D9%A4%D9%A2"),
        # NumberUtils drops every blank before Long.decode (a red team, session 52)
        "hex_blank": sandbox.curl(f"{url}/0x%202a"),
        "hash_blank": sandbox.curl(f"{url}/%23%202a"),
    }
    argv = ["java", "-Djava.net.preferIPv4Stack=true", "-cp", f"{cp}:{tmp_path}", "SpringApp"]
    argv += [IP, str(SPRING), str(log)]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{SPRING}"], steps, rules, profile)
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "SPRING ran project 7" in result["honest"].out, why
    assert result["control"].status == 403, why
    passed = {label for label in steps if result[label].status == 200}
    assert passed == {"honest"}, why
    assert "ran project 42" not in ran, why


# Rails 6.1 (Debian's ruby-actionpack, ruby-activerecord, ruby-sqlite3): the standard
# `Project.find(params[:id])` casts the id as ActiveRecord casts any string to an
# integer column: "042", "+42", "42-x" (the `to_param` slug idiom, "42-my-project"),
# "42abc" are all 42.
RAILS = 8091
RAILS_APP = r"""
require "action_dispatch"
require "action_controller"
require "active_record"
require "webrick"
require "rack/handler/webrick"
ip, port, log, db = ARGV
LOG = File.open(log, "a"); LOG.sync = true
ActiveRecord::Base.establish_connection(adapter: "sqlite3", database: db)
ActiveRecord::Schema.verbose = false
ActiveRecord::Schema.define { create_table(:projects, force: true) { |t| t.string :name } }
class Project < ActiveRecord::Base; end
50.times { |i| Project.create!(name: "project #{i + 1}") }
class ProjectsController < ActionController::Metal
  def show
    project = Project.find(params[:id])
    line = "RAILS ran project #{project.id} for #{request.path}"
    LOG.puts(line)
    self.response_body = line + "\n"
  rescue ActiveRecord::RecordNotFound
    self.status = 404
    self.response_body = "no such project\n"
  end
end
ROUTES = ActionDispatch::Routing::RouteSet.new
ROUTES.draw { resources :projects, only: :show }
s = WEBrick::HTTPServer.new(BindAddress: ip, Port: port.to_i,
  Logger: WEBrick::Log.new(File::NULL), AccessLog: [])
s.mount "/", Rack::Handler::WEBrick, ROUTES
s.start
"""


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_rails_record_is_not_reached_by_another_spelling_of_its_id(net, tmp_path, profile):
    import shutil

    probe = (
        'require "action_dispatch"; require "active_record"; require "sqlite3"; require "webrick"'
    )
    if not shutil.which("ruby") or subprocess.run(["ruby", "-e", probe]).returncode:
        pytest.skip("needs ruby-actionpack, ruby-activerecord, ruby-sqlite3, ruby-webrick")
    app = tmp_path / "rails_app.rb"
    app.write_text(RAILS_APP)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace(f"{FLASK}, {DJANGO}", str(RAILS)))
    log = tmp_path / "served.log"
    log.write_text("")
    url = f"http://allowed.test:{RAILS}/projects"
    steps = {
        "honest": sandbox.curl(f"{url}/7"),
        "control": sandbox.curl(f"{url}/42"),
        "zero": sandbox.curl(f"{url}/042"),
        "plus": sandbox.curl(f"{url}/+42"),
        "slug": sandbox.curl(f"{url}/42-my-project"),
        "letters": sandbox.curl(f"{url}/42abc"),
        "space": sandbox.curl(f"{url}/%2042"),  # String#to_i skips leading spaces
    }
    argv = ["ruby", str(app), IP, str(RAILS), str(log), str(tmp_path / "projects.sqlite3")]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{RAILS}"], steps, rules, profile)
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "RAILS ran project 7" in result["honest"].out, why
    assert result["control"].status == 403, why
    passed = {label for label in steps if result[label].status == 200}
    assert passed == {"honest"}, why
    assert "ran project 42" not in ran, why


# Decimal parsers (session 52): Fastify 4's `Number(request.params.id)` (the common
# `const id = Number(req.params.id)` idiom of Node routers) and PHP 8's `(int)` of a
# path segment read `4.2e1`, `420e-1`, `.42e2` and `41.99999999999999999` (rounded
# to the nearest double) as 42; Number() also skips a byte order mark, PHP's (int) and
# MySQL any text after the number (`4.2e1abc`). An integer's reading stops at the
# point: the deny took none of them.
NODE_PATH = str(Path(__file__).parents[2] / ".venv" / "node" / "node_modules")
NODE, PHP = 8092, 8093

NODE_APP = r"""
const fs = require('fs');
const [ip, port, log] = process.argv.slice(2);
const app = require('fastify')();
app.get('/projects/:id', async (request, reply) => {
  const id = READ_ID;
  if (!Number.isInteger(id) || id < 1 || id > 50) { reply.code(404); return 'no such project\n'; }
  const line = `NODE ran project ${id} for ${request.url}\n`;
  fs.appendFileSync(log, line);
  return line;
});
app.listen({ host: ip, port: +port });
"""

NUMBER, INT = "Number(request.params.id)", "(int) urldecode($m[1])"  # how they read the id
PHP_APP = r"""<?php
$path = parse_url($_SERVER["REQUEST_URI"], PHP_URL_PATH);
if (!preg_match('#^/projects/([^/]+)$#', $path, $m)) { http_response_code(404); exit; }
$id = READ_ID;
if ($id < 1 || $id > 50) { http_response_code(404); echo "no such project\n"; exit; }
$line = "PHP ran project $id for {$_SERVER['REQUEST_URI']}\n";
file_put_contents(getenv("SERVED_LOG"), $line, FILE_APPEND);
echo $line;
"""

DECIMAL_SPELLINGS = {
    "exponent": "4.2e1",
    "exponent_plus": "4.2E%2B1",
    "negative_exponent": "420e-1",
    "leading_point": ".42e2",
    "tiny_mantissa": "0.0000000000000000000000000000000042e34",
    "rounded_up": "41.99999999999999999",
}


def node_and_php(net, tmp_path, profile, steps, node_id=NUMBER, php_id=INT):
    """`steps` run beside the Fastify and PHP origins (NODE, PHP), which read the
    project's id with `node_id` and `php_id`, under RULES on their ports: the result,
    and the projects they ran."""
    import os
    import shutil

    node, php = shutil.which("node"), shutil.which("php")
    env = {**os.environ, "NODE_PATH": NODE_PATH}
    if (
        not node
        or not php
        or subprocess.run([node, "-e", "require('fastify')"], env=env).returncode
    ):
        pytest.skip("needs node, fastify 4 and php-cli (scripts/install.sh --test)")
    (tmp_path / "app.js").write_text(NODE_APP.replace("READ_ID", node_id))
    (tmp_path / "index.php").write_text(PHP_APP.replace("READ_ID", php_id))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace(f"{FLASK}, {DJANGO}", f"{NODE}, {PHP}"))
    log = tmp_path / "served.log"
    log.write_text("")
    commands = [
        ["env", f"NODE_PATH={NODE_PATH}", node, str(tmp_path / "app.js"), IP, str(NODE), str(log)],
        ["env", f"SERVED_LOG={log}", php, "-S", f"{IP}:{PHP}", str(tmp_path / "index.php")],
    ]
    listens = [f"{IP}:{NODE}", f"{IP}:{PHP}"]
    result = run_beside(net, tmp_path, commands, listens, steps, rules, profile)
    return result, log.read_text()


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_object_is_not_reached_by_a_decimal_spelling_of_its_number(net, tmp_path, profile):
    steps = {}
    for label, port in (("node", NODE), ("php", PHP)):
        url = f"http://allowed.test:{port}/projects"
        steps[f"{label}_honest"] = sandbox.curl(f"{url}/7")
        steps[f"{label}_control"] = sandbox.curl(f"{url}/42")
        for spelling, segment in DECIMAL_SPELLINGS.items():
            steps[f"{label}_{spelling}"] = sandbox.curl(f"{url}/{segment}")
    steps["node_byte_order_mark"] = sandbox.curl(f"http://allowed.test:{NODE}/projects/%EF%BB%BF42")
    steps["php_text_after"] = sandbox.curl(f"http://allowed.test:{PHP}/projects/4.2e1abc")
    result, ran = node_and_php(net, tmp_path, profile, steps)
    why = f"{result.describe()}\nserver:\n{ran}"
    for label in ("node", "php"):
        assert f"{label.upper()} ran project 7" in result[f"{label}_honest"].out, why
        assert result[f"{label}_control"].status == 403, why
    passed = {label for label in steps if result[label].status == 200}
    assert passed == {"node_honest", "php_honest"}, why
    assert "ran project 42" not in ran, why


# Decimals that truncate to the number: PHP's `(int)` and `intval()` of a numeric
# string (PHP 7.1 and later; Python's `int(float(s))` too) go through the float and
# truncate it toward zero, so `4.25e1`, `420.5e-1`, `.425e2` and `4.2999e1` are 42.
# A reading of whole values only let them pass. Found by a red team (session 52).
TRUNCATED_SPELLINGS = {
    "exponent": "4.25e1",
    "exponent_plus": "4.25E%2B1",
    "negative_exponent": "420.5e-1",
    "leading_point": ".425e2",
    "nines": "4.2999e1",
}


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_object_is_not_reached_by_a_decimal_that_truncates_to_its_number(
    net, tmp_path, profile
):
    import shutil

    php = shutil.which("php")
    if not php:
        pytest.skip("needs php-cli (scripts/install.sh --test)")
    (tmp_path / "index.php").write_text(PHP_APP.replace("READ_ID", INT))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace(f"{FLASK}, {DJANGO}", str(PHP)))
    log = tmp_path / "served.log"
    log.write_text("")
    url = f"http://allowed.test:{PHP}/projects"
    steps = {
        "honest": sandbox.curl(f"{url}/7"),
        "control": sandbox.curl(f"{url}/42"),
        "control_decimal": sandbox.curl(f"{url}/4.2e1"),  # a whole value, denied before
        "control_point": sandbox.curl(f"{url}/42.5"),  # `42` then a non-digit
    }
    for label, segment in TRUNCATED_SPELLINGS.items():
        steps[label] = sandbox.curl(f"{url}/{segment}")
    argv = ["env", f"SERVED_LOG={log}", php, "-S", f"{IP}:{PHP}", str(tmp_path / "index.php")]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PHP}"], steps, rules, profile)
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "PHP ran project 7" in result["honest"].out, why
    for control in ("control", "control_decimal", "control_point"):
        assert result[control].status == 403, why
    passed = {label for label in steps if result[label].status == 200}
    assert passed == {"honest"}, why
    assert "ran project 42" not in ran, why


# Radix spellings with a character after them that is no digit of their base
# (session 53): JavaScript's `parseInt(s)` without a radix (the idiom the `radix` lint
# rule exists for) reads `0x2ag` as 0x2a, 42; PHP's `intval($s, 0)` (strtol's base
# 0) reads `0x2ag`, `052z`, `0528` (octal stops at `8`) and `0b1010102` as 42. The
# radix forms allowed no letter after them; each now ends where a digit of its base
# does not follow (load._number). Found by a red team.
RADIX_TAILS = {
    "node_hex_g": (NODE, "0x2ag"),
    "node_hex_upper": (NODE, "0X2AZ"),
    "php_hex_g": (PHP, "0x2ag"),
    "php_octal_z": (PHP, "052z"),
    "php_octal_8": (PHP, "0528"),
    "php_binary_2": (PHP, "0b1010102"),
}


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_object_is_not_reached_by_a_radix_spelling_with_a_letter_after_it(
    net, tmp_path, profile
):
    steps = {}
    for label, port in (("node", NODE), ("php", PHP)):
        url = f"http://allowed.test:{port}/projects"
        steps[f"{label}_honest"] = sandbox.curl(f"{url}/7")
        steps[f"{label}_control"] = sandbox.curl(f"{url}/42")
        steps[f"{label}_control_hex"] = sandbox.curl(f"{url}/0x2a")
    for label, (port, segment) in RADIX_TAILS.items():
        steps[label] = sandbox.curl(f"http://allowed.test:{port}/projects/{segment}")
    result, ran = node_and_php(
        net, tmp_path, profile, steps, "parseInt(request.params.id)", "intval(urldecode($m[1]), 0)"
    )
    why = f"{result.describe()}\nserver:\n{ran}"
    for label in ("node", "php"):
        assert f"{label.upper()} ran project 7" in result[f"{label}_honest"].out, why
        assert result[f"{label}_control"].status == 403, why
        assert result[f"{label}_control_hex"].status == 403, why
    passed = [label for label in RADIX_TAILS if result[label].status != 403]
    assert not passed, f"not refused by the deny: {passed}\n{why}"
    assert "ran project 42" not in ran, why
