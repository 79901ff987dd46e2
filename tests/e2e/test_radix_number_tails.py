"""A deny of a number takes its radix spellings followed by a character that is no
digit of that radix: parsers stop there.

A deny's number segment takes its hex, binary and octal forms (load._number), and
anything after them that does not go on with the number. The radix forms allowed no
letter after them, but a letter past the radix's digits ends the number as `-` does
(a red team found it, session 53):

- JavaScript's `parseInt(s)` without a radix (the idiom the `radix` lint rule exists
  for; here Fastify 4 from the test venv) reads `0x2ag` as 0x2a, 42;
- PHP's `intval($s, 0)` (strtol's base 0: `0x` hex, `0b` binary, a leading `0`
  octal) reads `0x2ag`, `052z`, `0528` (octal stops at `8`) and `0b101010z` as 42.

Each form now ends where a digit of its base does not follow. Controls:
`/projects/42` and `/projects/0x2a` are refused, `/projects/7` is served. Plain HTTP in
the fake internet; both gateway paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.servers import door_and_engine, run_beside

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
NODE, PHP = 8092, 8093
NODE_PATH = str(Path(__file__).parents[2] / ".venv" / "node" / "node_modules")

RULES = door_and_engine(
    f"""\
      - allow: allowed.test
        id: site
        ports: [{NODE}, {PHP}]
        methods: [GET]
        paths: ["/projects/**"]
      - deny: allowed.test
        id: not-project-42
        ports: [{NODE}, {PHP}]
        paths: ["/projects/42/**"]
"""
)

NODE_APP = r"""
const fs = require('fs');
const [ip, port, log] = process.argv.slice(2);
const app = require('fastify')();
app.get('/projects/:id', async (request, reply) => {
  const id = parseInt(request.params.id);
  if (!Number.isInteger(id) || id < 1 || id > 50) { reply.code(404); return 'no such project\n'; }
  const line = `NODE ran project ${id} for ${request.url}\n`;
  fs.appendFileSync(log, line);
  return line;
});
app.listen({ host: ip, port: +port });
"""

PHP_APP = r"""<?php
$path = parse_url($_SERVER["REQUEST_URI"], PHP_URL_PATH);
if (!preg_match('#^/projects/([^/]+)$#', $path, $m)) { http_response_code(404); exit; }
$id = intval(urldecode($m[1]), 0);
if ($id < 1 || $id > 50) { http_response_code(404); echo "no such project\n"; exit; }
$line = "PHP ran project $id for {$_SERVER['REQUEST_URI']}\n";
file_put_contents(getenv("SERVED_LOG"), $line, FILE_APPEND);
echo $line;
"""

TRICKS = {
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
    node, php = shutil.which("node"), shutil.which("php")
    env = {**os.environ, "NODE_PATH": NODE_PATH}
    if (
        not node
        or not php
        or subprocess.run([node, "-e", "require('fastify')"], env=env).returncode
    ):
        pytest.skip("needs node, fastify 4 and php-cli (scripts/install.sh --test)")
    (tmp_path / "app.js").write_text(NODE_APP)
    (tmp_path / "index.php").write_text(PHP_APP)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "served.log"
    log.write_text("")
    steps = {}
    for label, port in (("node", NODE), ("php", PHP)):
        url = f"http://allowed.test:{port}/projects"
        steps[f"{label}_honest"] = sandbox.curl(f"{url}/7")
        steps[f"{label}_control"] = sandbox.curl(f"{url}/42")
        steps[f"{label}_control_hex"] = sandbox.curl(f"{url}/0x2a")
    for label, (port, segment) in TRICKS.items():
        steps[label] = sandbox.curl(f"http://allowed.test:{port}/projects/{segment}")
    commands = [
        ["env", f"NODE_PATH={NODE_PATH}", node, str(tmp_path / "app.js"), IP, str(NODE), str(log)],
        ["env", f"SERVED_LOG={log}", php, "-S", f"{IP}:{PHP}", str(tmp_path / "index.php")],
    ]
    listens = [f"{IP}:{NODE}", f"{IP}:{PHP}"]
    result = run_beside(net, tmp_path, commands, listens, steps, rules, profile)
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    for label in ("node", "php"):
        assert f"{label.upper()} ran project 7" in result[f"{label}_honest"].out, why
        assert result[f"{label}_control"].status == 403, why
        assert result[f"{label}_control_hex"].status == 403, why
    passed = [label for label in TRICKS if result[label].status != 403]
    assert not passed, f"not refused by the deny: {passed}\n{why}"
    assert "ran project 42" not in ran, why
