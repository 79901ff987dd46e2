"""A deny of a route also takes the route's second name through a PHP front
controller, `/index.php/<route>`: a deny of `/admin/**` refuses `/index.php/admin`
and `/index.php/admin/users`, and the admin handler never runs.

PHP runs `index.php` for `/index.php/admin` with PATH_INFO `/admin` (the built-in
server, Apache's mod_php/FPM with AcceptPathInfo, nginx's `fastcgi_split_path_info`
or Laravel's `try_files ... /index.php` with REQUEST_URI kept), and Symfony's
`Request::getPathInfo()` (Laravel, Drupal 8+, every HttpFoundation app) takes the
script name off REQUEST_URI: the router matches `/admin`. CodeIgniter, Yii, Slim
and WordPress (`/index.php/wp-json/...`) route so too. A deny anchored at the
path's start alone let `/index.php/admin` pass. Found by a red team (session 51).

Controls: the honest routes (`/public/ok`, also through `/index.php/`) are served,
and `/admin`, `/admin/users`, `/ADMIN/users` are refused. The origin is PHP's
server running Debian's Symfony HttpFoundation and Routing
(php-symfony-http-foundation, php-symfony-routing) as a front controller, plain
HTTP, in the fake internet; both gateway paths (`door`, `engine`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.servers import door_and_engine, run_beside

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
PORT = 8088
SYMFONY = Path("/usr/share/php/Symfony/Component")

RULES = door_and_engine(
    f"""\
      - allow: allowed.test
        id: site
        ports: [{PORT}]
        methods: [GET]
        paths: ["/**"]
      - deny: allowed.test
        id: no-admin
        ports: [{PORT}]
        paths: ["/admin/**"]
"""
)

FRONT_CONTROLLER = r"""<?php
require_once '/usr/share/php/Symfony/Component/HttpFoundation/autoload.php';
require_once '/usr/share/php/Symfony/Component/Routing/autoload.php';
use Symfony\Component\HttpFoundation\Request;
use Symfony\Component\HttpFoundation\Response;
use Symfony\Component\Routing\{Route, RouteCollection, RequestContext};
use Symfony\Component\Routing\Matcher\UrlMatcher;
$routes = new RouteCollection();
$routes->add('ok', new Route('/public/ok', ['what' => 'PUBLIC-OK']));
$routes->add('admin', new Route('/admin', ['what' => 'ADMIN-HANDLER']));
$routes->add('users', new Route('/admin/users', ['what' => 'ADMIN-HANDLER']));
$request = Request::createFromGlobals();
$context = (new RequestContext())->fromRequest($request);
try {
  $m = (new UrlMatcher($routes, $context))->match($request->getPathInfo());
  $line = $m['what'] . ' ran for ' . $request->getMethod() . ' ' . $request->getRequestUri()
    . ' (path info ' . $request->getPathInfo() . ')';
  file_put_contents(getenv('SERVED_LOG'), $line . "\n", FILE_APPEND);
  (new Response($line . "\n"))->send();
} catch (Exception $e) { (new Response("no route\n", 404))->send(); }
"""


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_route_is_not_reached_through_the_front_controller(net, tmp_path, profile):
    php = shutil.which("php")
    if not php or not (SYMFONY / "Routing" / "autoload.php").exists():
        pytest.skip("needs php-cli, php-symfony-http-foundation, php-symfony-routing")
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.php").write_text(FRONT_CONTROLLER)
    log = tmp_path / "served.log"
    log.write_text("")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = f"http://allowed.test:{PORT}"
    steps = {
        "honest": sandbox.curl(f"{url}/public/ok"),
        "honest_front": sandbox.curl(f"{url}/index.php/public/ok"),
        # Controls: the route the rule denies, as written and in upper case.
        "admin": sandbox.curl(f"{url}/admin"),
        "admin_users": sandbox.curl(f"{url}/admin/users"),
        "admin_upper": sandbox.curl(f"{url}/ADMIN/users"),
        # The same routes through the front controller.
        "front_admin": sandbox.curl(f"{url}/index.php/admin"),
        "front_admin_users": sandbox.curl(f"{url}/index.php/admin/users"),
    }
    argv = ["env", f"SERVED_LOG={log}", php, "-S", f"{IP}:{PORT}", "-t", str(web)]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PORT}"], steps, rules, profile)
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "PUBLIC-OK ran for GET /public/ok" in result["honest"].out, why
    for control in ("admin", "admin_users", "admin_upper"):
        assert result[control].status == 403, (control, why)
    for other_name in ("front_admin", "front_admin_users"):
        assert result[other_name].status in (400, 403), (other_name, why)
    assert "ADMIN-HANDLER" not in ran, why
