"""A repository denied by its clone URL (`deny: paths: ["/git/org/secret.git/**"]`)
is not cloned by its other name, `/git/org/secret`, which git servers serve as the
same repository.

git http-backend finds a repository by the path the client names or that path with
`.git` (or `/.git`) added (`enter_repo(path, 0)` in git's path.c tries the suffixes
"/.git", "", ".git/.git", ".git"), and so do GitHub, GitLab, Gitea and cgit: `git
clone https://host/org/secret` clones `secret.git`. An allowed repository's submodule
`url = ../secret` names it that way with no trick at all. A deny took what its glob
names with a suffix after it (`/x` also takes `/x.json`) but never the stem of a name
written with one, so `/git/org/secret/info/refs` and `/git/org/secret/git-upload-pack`
passed and the denied repository was cloned (a red team found it, session 52). A
deny's segment written with an extension now takes its stem too (load._stem).

The other tests here guard what held: a deny written without `.git`, redirects from
an allowed repository to the denied one, and dumb HTTP's `http-alternates`.

The server is Debian's `git http-backend` behind Apache (`ScriptAlias /git/
/usr/lib/git-core/git-http-backend/`, `GIT_PROJECT_ROOT`, as git-http-backend(1)
documents it), serving bare repositories under `org/`, in the fake internet; Apache's
access log says what it served. Both gateway paths: `door` (the front door) and
`engine` (mitmproxy; a `websocket: true` rule sends the profile's plain HTTP there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from support import sandbox
from support.servers import listening

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test in the fake internet
BASE = "http://allowed.test:8088/git"
SECRET_MARK = "SECRET-REPOSITORY-CONTENT"
PUBLIC_MARK = "public repository content"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"

CONF = """\
ServerRoot /etc/apache2
DefaultRuntimeDir @DIR@
PidFile @DIR@/httpd.pid
Mutex file:@DIR@ default
LoadModule mpm_prefork_module /usr/lib/apache2/modules/mod_mpm_prefork.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule alias_module /usr/lib/apache2/modules/mod_alias.so
LoadModule cgi_module /usr/lib/apache2/modules/mod_cgi.so
LoadModule env_module /usr/lib/apache2/modules/mod_env.so
User www-data
Group www-data
ServerName allowed.test
ErrorLog @DIR@/error.log
LogLevel warn
LogFormat "request=\\"%r\\" status=%>s" plain
CustomLog @DIR@/access.log plain
Listen @IP@:8088
<Directory />
    Require all denied
</Directory>
<Directory /usr/lib/git-core>
    Require all granted
</Directory>
SetEnv GIT_PROJECT_ROOT @DIR@/repos
SetEnv GIT_HTTP_EXPORT_ALL 1
ScriptAlias /git/ /usr/lib/git-core/git-http-backend/
Redirect 301 /git/org/mirror.git /git/org/secret.git
Alias /static/ @DIR@/repos/
<Directory @DIR@/repos>
    Require all granted
</Directory>
Redirect 302 /git/org/moved /git/org/secret
"""

PROFILE = """\
  {profile}:
    fallback: deny
    rules:
      - allow: allowed.test
        id: {profile}-git-fetch
        ports: [8088]
        methods: [GET, HEAD]{websocket}
      - allow: allowed.test
        id: {profile}-git-upload-pack
        ports: [8088]
        methods: [POST]
        paths: ["/git/*/*/git-upload-pack"]
      - deny: allowed.test
        id: {profile}-no-secret-repo
        ports: [8088]
        paths: ["{denied}"]
"""


def rules_text(denied: str) -> str:
    """The git recipe of docs/rules.md plus a deny of `denied`, as the profiles `door`
    and `engine` (its `websocket: true` sends plain HTTP through mitmproxy)."""
    door = PROFILE.format(profile="door", websocket="", denied=denied)
    engine = PROFILE.format(profile="engine", websocket="\n        websocket: true", denied=denied)
    return "version: 1\nprofiles:\n" + door + engine


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def _bare_repo(path: Path, mark: str, work: Path) -> None:
    work.mkdir()
    _git("init", "-q", "-b", "main", ".", cwd=work)
    (work / "README.txt").write_text(mark + "\n")
    _git("add", "README.txt", cwd=work)
    _git("-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-q", "-m", "x", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(path), cwd=work.parent)


def _app_with_submodule(path: Path, secret: Path, work: Path) -> None:
    """org/app.git: an allowed repository whose submodule `lib` is `../secret` (git
    resolves it against the superproject's URL: `.../org/secret`, no `.git`)."""
    head = subprocess.run(
        ["git", "--git-dir", str(secret), "rev-parse", "main"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    work.mkdir()
    _git("init", "-q", "-b", "main", ".", cwd=work)
    (work / ".gitmodules").write_text('[submodule "lib"]\n\tpath = lib\n\turl = ../secret\n')
    _git("add", ".gitmodules", cwd=work)
    _git("update-index", "--add", "--cacheinfo", f"160000,{head},lib", cwd=work)
    _git("-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-q", "-m", "x", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(path), cwd=work.parent)


def _borrower(path: Path, secret: Path, alternate: str) -> None:
    """A repository for the dumb protocol (static files) whose refs are the secret
    repository's and whose objects are none: its `objects/info/http-alternates`
    sends the client to the secret repository's objects."""
    _git("init", "-q", "--bare", str(path), cwd=path.parent)
    head = subprocess.run(
        ["git", "--git-dir", str(secret), "rev-parse", "main"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (path / "packed-refs").write_text(f"{head} refs/heads/main\n")
    (path / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "info" / "refs").write_text(f"{head}\trefs/heads/main\n")
    (path / "objects" / "info" / "http-alternates").write_text(alternate + "\n")
    _git("update-server-info", cwd=secret)


def _repos(repos: Path, top: Path) -> None:
    """org/public.git, org/secret.git, the superproject org/app.git and two dumb
    repositories borrowing the secret one's objects."""
    _bare_repo(repos / "public.git", PUBLIC_MARK, top / "w1")
    _bare_repo(repos / "secret.git", SECRET_MARK, top / "w2")
    _app_with_submodule(repos / "app.git", repos / "secret.git", top / "w3")
    _borrower(repos / "borrow.git", repos / "secret.git", "/static/org/secret.git/objects")
    _borrower(repos / "borrow-rel.git", repos / "secret.git", "../../secret.git/objects")


@contextlib.contextmanager
def git_apache(net, populate=_repos):
    """Apache + git http-backend on IP:8088 serving the bare repositories
    `populate(repos, top)` makes under `org/` (`repos`), `top` its scratch."""
    top = Path(tempfile.mkdtemp(prefix="sgt-git-apache-"))
    try:
        top.chmod(0o755)
        repos = top / "repos" / "org"
        repos.mkdir(parents=True)
        populate(repos, top)
        # Apache's children run as www-data: git refuses a repository another user owns.
        subprocess.run(["chown", "-R", "www-data:www-data", str(top / "repos")], check=True)
        config = top / "httpd.conf"
        config.write_text(CONF.replace("@DIR@", str(top)).replace("@IP@", IP))
        (top / "access.log").write_text("")
        process = subprocess.Popen(
            ["ip", "netns", "exec", net.internet_ns, "apache2", "-f", str(config), "-DFOREGROUND"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "APACHE_LOG_DIR": str(top)},
            start_new_session=True,
        )
        try:
            up = sandbox.eventually(lambda: listening(net, [f"{IP}:8088"]), timeout=15)
            assert up, (top / "error.log").read_text() if (top / "error.log").exists() else "no log"
            yield top
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(15)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def clone(url: str, into: str) -> str:
    return f"git -c http.followRedirects=true clone -q {url} {into} && cat {into}/README.txt"


def run(net, tmp_path, steps, denied: str, profile: str, populate=_repos):
    """`steps` in a sandbox of `profile`, the rules denying `denied`, with the git
    server of `populate`'s repositories up: the result, and Apache's access log
    ("request=... status=...")."""
    if not shutil.which("apache2") or not Path(HTTP_BACKEND).exists():
        pytest.skip("needs apache2 and git (scripts/install.sh --test)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(denied))
    with git_apache(net, populate) as top:
        result = sandbox.run(
            net, tmp_path, {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules, extra=("--profile", profile),
        )  # fmt: skip
        log = (top / "access.log").read_text()
    return result, log


def secret_served(log: str) -> list[str]:
    """The access log's lines where Apache served something of org/secret."""
    return [line for line in log.splitlines() if "/org/secret" in line and "status=200" in line]


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_repository_denied_by_its_clone_url_is_not_cloned_without_dot_git(net, tmp_path, profile):
    steps = {
        "public": clone(f"{BASE}/org/public.git", "p"),
        "control": clone(f"{BASE}/org/secret.git", "c1"),
        "control_upper": clone(f"{BASE}/ORG/Secret.git", "c2"),
        "without_dot_git": clone(f"{BASE}/org/secret", "c3"),
        "slash_dot_git": clone(f"{BASE}/org/secret.git/.git", "c4"),
        "ls_remote": f"git ls-remote {BASE}/org/secret",
        "submodule": (
            f"git -c protocol.file.allow=never clone -q --recurse-submodules {BASE}/org/app.git a"
            " ; cat a/lib/README.txt"
        ),
    }
    result, log = run(net, tmp_path, steps, "/git/org/secret.git/**", profile)
    why = f"{result.describe()}\napache:\n{log}"
    assert PUBLIC_MARK in result["public"].out, why  # the honest clone works
    assert "app.git/info/refs" in log, why  # and so does the superproject's
    # The control: the repository as the deny names it, and in upper case.
    for label in ("control", "control_upper", "slash_dot_git"):
        assert SECRET_MARK not in result[label].out, (label, why)
        assert result[label].rc != 0 and "403" in result[label].err, (label, why)
    # The same repository without `.git`; and an allowed repository's submodule
    # `../secret`, which is that URL with no trick at all.
    for label in ("without_dot_git", "ls_remote", "submodule"):
        assert SECRET_MARK not in result[label].out, (label, why)
        assert "refs/heads/main" not in result[label].out, (label, why)
        assert "403" in result[label].err, (label, why)
    denied = {e.get("path", "").split("?")[0] for e in result.events(reason="rule_deny")}
    assert {"/git/org/secret/info/refs"} <= denied, why
    assert result.verdicts(reason="rule_deny") == {
        ("deny", "rule_deny", f"{profile}-no-secret-repo")
    }, why
    assert secret_served(log) == [], why


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_repository_denied_without_dot_git_holds(net, tmp_path, profile):
    """The other way round held already: a deny of `/git/org/secret/**` takes
    `secret.git` (a suffix after a `.`), `secret/.git` and any case."""
    steps = {
        "public": clone(f"{BASE}/org/public.git", "p"),
        "plain": clone(f"{BASE}/org/secret", "c1"),
        "dot_git": clone(f"{BASE}/org/secret.git", "c2"),
        "slash_dot_git": clone(f"{BASE}/org/secret/.git", "c3"),
        "upper": clone(f"{BASE}/Org/SECRET.GIT", "c4"),
    }
    result, log = run(net, tmp_path, steps, "/git/org/secret/**", profile)
    why = f"{result.describe()}\napache:\n{log}"
    assert PUBLIC_MARK in result["public"].out, why
    for label in ("plain", "dot_git", "slash_dot_git", "upper"):
        assert SECRET_MARK not in result[label].out, (label, why)
        assert result[label].rc != 0 and "403" in result[label].err, (label, why)
    assert secret_served(log) == [], why


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_redirect_from_an_allowed_repository_to_the_denied_one_is_decided_again(
    net, tmp_path, profile
):
    """The server (Apache's `Redirect`) answers an allowed repository's URL with a
    redirect to the denied one on the same host: git follows it (http.followRedirects)
    through the gateway, which decides the redirected request and refuses it; so
    does curl -L."""
    steps = {
        "public": clone(f"{BASE}/org/public.git", "p"),
        "redirected": clone(f"{BASE}/org/mirror.git", "c1"),
        "redirected_302": clone(f"{BASE}/org/moved", "c2"),
        "curl_follow": sandbox.curl("-L", f"{BASE}/org/mirror.git/HEAD"),
    }
    result, log = run(net, tmp_path, steps, "/git/org/secret/**", profile)
    why = f"{result.describe()}\napache:\n{log}"
    assert PUBLIC_MARK in result["public"].out, why
    for label in ("redirected", "redirected_302"):
        assert SECRET_MARK not in result[label].out and result[label].rc != 0, (label, why)
    assert result["curl_follow"].status == 403, why
    assert any("mirror.git" in line and "status=301" in line for line in log.splitlines()), why
    assert secret_served(log) == [], why


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_http_alternates_to_the_denied_repository_are_decided(net, tmp_path, profile):
    """Dumb HTTP: an allowed repository's `objects/info/http-alternates` names the
    denied repository's objects (absolute, and relative with `..`): git fetches them
    through the gateway, which refuses them."""
    steps = {
        "control_static": sandbox.curl("http://allowed.test:8088/static/org/secret.git/HEAD"),
        "absolute": clone("http://allowed.test:8088/static/org/borrow.git", "c1"),
        "relative": clone("http://allowed.test:8088/static/org/borrow-rel.git", "c2"),
    }
    result, log = run(net, tmp_path, steps, "/static/org/secret/**", profile)
    why = f"{result.describe()}\napache:\n{log}"
    assert result["control_static"].status == 403, why
    for label in ("absolute", "relative"):
        assert SECRET_MARK not in result[label].out and result[label].rc != 0, (label, why)
    assert any("borrow.git/info/refs" in line for line in log.splitlines()), why
    assert secret_served(log) == [], why
