"""Package clients other than pip and npm (cargo, go, gem, mvn), the real ones, run in
the sandbox against real registry layouts built on the host with the real tools (a
cargo sparse index, a Go module proxy, a RubyGems full index, a Maven 2 repository),
served by one logging static server in the fake internet: a deny of one package
(and of one version), publish commands against the download-only rule shape, each
client through an inspected HTTPS registry (the JVM's truststore), and two cases the
docs name (crates.io's static host, Go's `GOPROXY=direct` with a vanity page).
A red team found the JVM's untrusted gateway CA and the version deny (session 53)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from support import sandbox
from support.servers import internet_servers, resolver_server
from support.service import TWO_PROFILES, GatewayProcess, attach

pytestmark = pytest.mark.e2e
IP, PORT = "203.0.113.10", 8091
BASE = f"http://allowed.test:{PORT}"

# Debian's Maven repository: the plugins its libmaven-*-plugin-java packages install,
# with every pom and jar they need. The fake registry serves `/maven2/` from it (the
# fake internet has no Maven Central), so each mvn here starts from an empty local
# repository and needs nothing a person put in ~/.m2.
M2 = Path("/usr/share/maven-repo")
# What the mvn builds here fetch from it (the plugins, at the versions Debian bookworm
# has, and the junit-bom plexus-compiler's pom imports), and the package that holds each.
MAVEN_NEEDS = {
    "org/apache/maven/plugins/maven-resources-plugin/3.3.0": "libmaven-resources-plugin-java",
    "org/apache/maven/plugins/maven-compiler-plugin/3.10.1": "libmaven-compiler-plugin-java",
    "org/apache/maven/plugins/maven-deploy-plugin/3.0.0": "libmaven-deploy-plugin-java",
    "org/junit/junit-bom/debian": "junit5",
}
SPARSE_CARGO = (1, 68)  # the first cargo that reads a sparse index without -Z


@functools.cache
def cargo_binary() -> Path:
    """The real cargo binary (copied into the workspace: /root, where rustup keeps its
    toolchains, is a tmpfs in the sandbox): rustup's toolchain's (`rustup which`),
    else the one on PATH (Debian's cargo-web, from scripts/install.sh --test)."""
    rustup = shutil.which("rustup") or shutil.which("rustup", path=str(Path.home() / ".cargo/bin"))
    found = None
    if rustup:
        done = subprocess.run([rustup, "which", "cargo"], capture_output=True, text=True)
        found = done.stdout.strip() if done.returncode == 0 else None
    found = found or shutil.which("cargo")
    if not found:
        pytest.skip("needs cargo 1.68+ (scripts/install.sh --test installs cargo-web)")
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    numbers = tuple(int(n) for n in version.split()[1].split(".")[:2]) if version else (0, 0)
    if numbers < SPARSE_CARGO:
        pytest.skip(f"needs cargo 1.68+ for a sparse index, found {version.strip()}")
    return Path(found).resolve()


# Static files under argv[1]; `/maven2/` falls back to argv[5], Debian's Maven
# repository (the plugins mvn needs); `/api/v1/crates/N/V/download` answers a 302 to `dl302` when the
# file `<root>/dl302` exists (crates.io's API does so, to static.crates.io). Logs
# "METHOD HOST PATH STATUS" of every request, whatever it answers.
SERVER = r"""
import functools, http.server, os, sys, urllib.parse
root, ip, port, log_path, m2 = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
log = open(log_path, "a", buffering=1)
redirect = open(os.path.join(root, "dl302")).read().strip() if os.path.exists(os.path.join(root, "dl302")) else ""

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_request(self, code="-", size="-"):
        log.write(f"{self.command} {self.headers.get('Host')} {self.path} {int(code)}\n")

    def translate_path(self, path):
        local = super().translate_path(path)
        if path.startswith("/maven2/") and not os.path.exists(local):
            rest = urllib.parse.unquote(path.split("?")[0])[len("/maven2/"):]
            return os.path.join(m2, rest)
        return local

    def do_GET(self):
        parts = self.path.split("?")[0].split("/")
        if redirect and len(parts) == 7 and parts[1:4] == ["api", "v1", "crates"] and parts[6] == "download":
            self.send_response(302)
            self.send_header("Location", redirect.format(crate=parts[4], version=parts[5]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        return super().do_GET()

    def refuse(self):
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_POST = do_DELETE = do_PATCH = refuse

server = http.server.ThreadingHTTPServer((ip, port), functools.partial(Handler, directory=root))
if len(sys.argv) > 7:
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[6], sys.argv[7])
    server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def _run(argv, cwd, env=None):
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done


# --- cargo (sparse index) -------------------------------------------------------


def crate_file(work: Path, name: str, mark: str) -> Path:
    """A real .crate of `name` 1.0.0 (cargo package) whose lib.rs holds `mark`."""
    src = work / f"src-{name}"
    (src / "src").mkdir(parents=True)
    (src / "Cargo.toml").write_text(
        f'[package]\nname = "{name}"\nversion = "1.0.0"\nedition = "2021"\n'
        'description = "t"\nlicense = "MIT"\n'
    )
    (src / "src" / "lib.rs").write_text(f'pub const MARK: &str = "{mark}";\n')
    env = {**os.environ, "CARGO_HOME": str(work / ".cargo-build")}
    _run([str(cargo_binary()), "package", "--no-verify", "--allow-dirty", "--offline"], src, env)
    return src / "target" / "package" / f"{name}-1.0.0.crate"


def index_path(name: str) -> str:
    n = name.lower()
    if len(n) <= 2:
        return f"{len(n)}/{n}"
    if len(n) == 3:
        return f"3/{n[0]}/{n}"
    return f"{n[:2]}/{n[2:4]}/{n}"


def cargo_registry(
    root: Path,
    work: Path,
    index: str,
    dl: str,
    crates: dict[str, str],
    stored: str = "{crate}/{version}/download",
    api: str = "",
) -> None:
    """A sparse index at `root/index` (config.json's dl `dl`), each crate's file stored
    at `root/` + `stored` (the dl template's reading)."""
    (root / index).mkdir(parents=True, exist_ok=True)
    (root / index / "config.json").write_text(
        json.dumps({"dl": dl, "api": api or dl.split("/api")[0]})
    )
    for name, mark in crates.items():
        crate = crate_file(work, name, mark)
        data = crate.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        entry = {
            "name": name,
            "vers": "1.0.0",
            "deps": [],
            "cksum": sha,
            "features": {},
            "yanked": False,
        }
        target = root / index / index_path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(entry) + "\n")
        prefix = index_path(name).rsplit("/", 1)[0]
        path = stored.format(
            crate=name, version="1.0.0", prefix=prefix, lowerprefix=prefix.lower(), sha=sha
        )
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


def cargo_steps(registry: str, dep: str, tag: str, cargo: str) -> str:
    """Shell: a project depending on `dep` from the sparse registry `registry`,
    `cargo vendor` (no rustc needed), then the fetched lib.rs printed."""
    return f"""set -e; C=$PWD/cargo; rm -rf c-{tag}; mkdir -p c-{tag}/src; cd c-{tag}
export CARGO_HOME=$PWD/.cargo-home CARGO_NET_RETRY=0 CARGO_HTTP_TIMEOUT=10; mkdir -p $CARGO_HOME
printf '[registries.fake]\\nindex = "{registry}"\\n' > $CARGO_HOME/config.toml
printf '[package]\\nname = "app"\\nversion = "0.1.0"\\nedition = "2021"\\n[dependencies]\\n{dep} = {{ version = "1", registry = "fake" }}\\n' > Cargo.toml
: > src/lib.rs
{cargo} vendor -q vendor >/dev/null
cat vendor/*/src/lib.rs"""


# --- Go module proxy ----------------------------------------------------------------


def escape(module: str) -> str:
    return "".join("!" + c.lower() if c.isupper() else c for c in module)


def go_module(root: Path, module: str, mark: str, version: str = "v1.0.0") -> None:
    base = root / escape(module) / "@v"
    base.mkdir(parents=True, exist_ok=True)
    (base / "list").write_text(version + "\n")
    (base / f"{version}.info").write_text(
        json.dumps({"Version": version, "Time": "2026-01-01T00:00:00Z"})
    )
    gomod = f"module {module}\n\ngo 1.19\n"
    (base / f"{version}.mod").write_text(gomod)
    with zipfile.ZipFile(base / f"{version}.zip", "w") as z:
        z.writestr(f"{module}@{version}/go.mod", gomod)
        z.writestr(f"{module}@{version}/mark.go", f'package x\n\nconst Mark = "{mark}"\n')
    (root / escape(module) / "@latest").write_text((base / f"{version}.info").read_text())


def go_steps(proxy: str, module: str, tag: str, extra: str = "") -> str:
    return f"""set -e; export HOME=$PWD GOPATH=$PWD/go-{tag} GOCACHE=$PWD/gocache-{tag} GOFLAGS=-mod=mod GOSUMDB=off GONOSUMCHECK=1 GOPROXY={proxy} GOTOOLCHAIN=local {extra}
go mod download -json {module}@v1.0.0
cat $GOPATH/pkg/mod/*/*/*@v1.0.0/mark.go $GOPATH/pkg/mod/*/*/*/*@v1.0.0/mark.go 2>/dev/null || true"""


# --- RubyGems -------------------------------------------------------------------------


def gems(root: Path, work: Path, gems: dict[str, str]) -> None:
    """Real .gem files (gem build) under root/gems and the full index (gem generate_index);
    a key NAME or NAME@VERSION (1.0 by default)."""
    (root / "gems").mkdir(parents=True, exist_ok=True)
    for key, mark in gems.items():
        name, _, version = key.partition("@")
        version = version or "1.0"
        src = work / f"gem-{name}-{version}"
        (src / "lib").mkdir(parents=True)
        (src / "lib" / f"{name}.rb").write_text(f'MARK = "{mark}"\n')
        (src / f"{name}.gemspec").write_text(
            f'Gem::Specification.new do |s|\n s.name = "{name}"\n s.version = "{version}"\n'
            f' s.summary = "t"\n s.authors = ["t"]\n s.files = ["lib/{name}.rb"]\n'
            ' s.license = "MIT"\nend\n'
        )
        _run(["gem", "build", f"{name}.gemspec"], src, {**os.environ, "HOME": str(work)})
        shutil.copy(src / f"{name}-{version}.gem", root / "gems")
    _run(["gem", "generate_index", "-d", str(root)], work, {**os.environ, "HOME": str(work)})


def gem_steps(source: str, name: str, tag: str, version: str = "") -> str:
    v = f" -v {version}" if version else ""
    return f"""set -e; rm -rf g-{tag}; mkdir g-{tag}; cd g-{tag}; export HOME=$PWD GEM_HOME=$PWD/gh GEM_SPEC_CACHE=$PWD/sc
gem install --no-document --clear-sources --source {source} --install-dir $PWD/gh {name}{v}
cat gh/gems/*/lib/*.rb"""


# --- Maven --------------------------------------------------------------------------------


def maven_artifact(root: Path, group: str, artifact: str, mark: str, version: str = "1.0") -> None:
    base = root / "maven2" / group.replace(".", "/") / artifact / version
    base.mkdir(parents=True, exist_ok=True)
    pom = (
        f"<project><modelVersion>4.0.0</modelVersion><groupId>{group}</groupId>"
        f"<artifactId>{artifact}</artifactId><version>{version}</version></project>\n"
    )
    (base / f"{artifact}-{version}.pom").write_text(pom)
    with zipfile.ZipFile(base / f"{artifact}-{version}.jar", "w") as z:
        z.writestr("MARK.txt", mark + "\n")
    for f in list(base.iterdir()):
        (base / (f.name + ".sha1")).write_text(hashlib.sha1(f.read_bytes()).hexdigest())


SETTINGS = (
    "<settings><localRepository>LOCAL</localRepository><mirrors><mirror><id>m</id>"
    "<mirrorOf>*</mirrorOf><url>URL</url></mirror></mirrors></settings>"
)
POM = (
    "<project><modelVersion>4.0.0</modelVersion><groupId>t</groupId><artifactId>app</artifactId>"
    "<version>1</version><properties><maven.compiler.source>11</maven.compiler.source>"
    "<maven.compiler.target>11</maven.compiler.target></properties><dependencies><dependency>"
    "<groupId>G</groupId><artifactId>A</artifactId><version>V</version>CLASSIFIER</dependency>"
    "</dependencies><build><plugins><plugin><groupId>org.apache.maven.plugins</groupId>"
    "<artifactId>maven-resources-plugin</artifactId><version>3.3.0</version></plugin><plugin>"
    "<groupId>org.apache.maven.plugins</groupId><artifactId>maven-compiler-plugin</artifactId>"
    "<version>3.10.1</version></plugin></plugins></build></project>"
)


def mvn_steps(mirror: str, coords: str, tag: str, classifier: str = "") -> str:
    """Shell: a project depending on `coords` (G:A:V), `mvn compile` with a settings.xml
    whose only mirror is `mirror`, then the dependency jar's MARK.txt printed."""
    group, artifact, version = coords.split(":")
    pom = POM.replace("<groupId>G", f"<groupId>{group}").replace(
        "<artifactId>A<", f"<artifactId>{artifact}<"
    )
    pom = pom.replace("<version>V<", f"<version>{version}<")
    pom = pom.replace("CLASSIFIER", f"<classifier>{classifier}</classifier>" if classifier else "")
    return f"""set -e; export HOME=$PWD; mkdir -p m-{tag}; cd m-{tag}
printf '%s' '{SETTINGS}' | sed "s#LOCAL#$PWD/repo#; s#URL#{mirror}#" > settings.xml
printf '%s' '{pom}' > pom.xml
mvn -B -q -s settings.xml compile
find repo -name '*.jar' -path '*corp*' -exec unzip -p {{}} MARK.txt \\;"""


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


def rules_text(denies: dict[str, list[str]]) -> str:
    """Profiles `door` and `engine` (the same rules, `websocket: true` on the allow,
    which sends plain HTTP through mitmproxy): GET and HEAD to allowed.test and
    www.allowed.test on PORT (the package-registries preset's shape), and for each
    host of `denies` a deny of its paths."""
    text = "version: 1\nprofiles:\n"
    for profile in ("door", "engine"):
        websocket = "\n        websocket: true" if profile == "engine" else ""
        text += f"""  {profile}:
    fallback: deny
    rules:
      - allow: [allowed.test, www.allowed.test]
        id: {profile}-registry
        ports: [{PORT}]
        methods: [GET, HEAD]{websocket}
"""
        for n, (host, paths) in enumerate(denies.items()):
            text += f"""      - deny: {host}
        id: {profile}-no-secret-{n}
        ports: [{PORT}]
        paths: {json.dumps(paths)}
"""
    return text


def serve(root: Path, log: Path) -> list[list[str]]:
    return [[sandbox.PYTHON, "-I", "-S", "-c", SERVER, str(root), IP, str(PORT), str(log), str(M2)]]


def copy_cargo(workspace: Path) -> None:
    shutil.copy(cargo_binary(), workspace / "cargo")


def need_clients() -> None:
    """Skip unless go, gem and mvn are installed, and Debian's Maven plugins."""
    missing = [tool for tool in ("go", "gem", "mvn") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"needs {missing} (scripts/install.sh --test)")
    missing = [package for path, package in MAVEN_NEEDS.items() if not (M2 / path).is_dir()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} in {M2} (scripts/install.sh --test)")


def run_all(net, tmp_path, root, log, steps, denies, profile="door"):
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(denies))
    with internet_servers(net, serve(root, log), [f"{IP}:{PORT}"]):
        return sandbox.run(
            net, tmp_path, {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules, extra=("--profile", profile), setup=copy_cargo, timeout=300,
        )  # fmt: skip


def describe(result, log: Path) -> str:
    lines = []
    for label, step in result.steps.items():
        if label != "resolve":
            lines.append(f"[{label}] rc={step.rc}\nOUT: {step.out[-600:]}\nERR: {step.err[-600:]}")
    served = [line for line in log.read_text().splitlines() if "/maven2/org/" not in line]
    return "\n".join(lines) + "\nserver:\n" + "\n".join(served)


def served_200(log: Path, needle: str) -> list[str]:
    lines = log.read_text().splitlines()
    return [line for line in lines if needle in line.lower() and line.endswith(" 200")]


def build(tmp_path: Path, extra_gems=None, extra_maven=()) -> Path:
    need_clients()
    root, work = tmp_path / "www", tmp_path / "build"
    root.mkdir()
    work.mkdir()
    crates = {"secret-crate": "SECRET-CRATE", "public-crate": "PUBLIC-CRATE"}
    cargo_registry(
        root,
        work,
        "idx",
        f"{BASE}/api/v1/crates",
        crates,
        stored="api/v1/crates/{crate}/{version}/download",
    )
    go_module(root, "allowed.test/org/secret", "SECRET-GO")
    go_module(root, "allowed.test/org/Secret", "SECRET-GO-UPPER")
    go_module(root, "allowed.test/org/public", "PUBLIC-GO")
    gems(root, work, {"secret-gem": "SECRET-GEM", "public-gem": "PUBLIC-GEM", **(extra_gems or {})})
    maven_artifact(root, "com.corp", "secret-lib", "SECRET-MVN")
    maven_artifact(root, "com.corp", "public-lib", "PUBLIC-MVN")
    for artifact, version, mark in extra_maven:
        maven_artifact(root, "com.corp", artifact, mark, version)
    return root


# Each registry's package denied the way an admin writes it: by its index entry and
# its download (cargo), by its module path on the proxy (Go), by its files (gem: the
# `.gem` and the gemspec gem reads first), by its artifact directory (Maven).
DENIES = {
    "allowed.test": [
        "/idx/se/cr/secret-crate",
        "/api/v1/crates/secret-crate/**",
        "/allowed.test/org/secret/**",
        "/gems/secret-gem-*",
        "/quick/Marshal.4.8/secret-gem-*",
        "/maven2/com/corp/secret-lib/**",
    ]
}


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_each_client_installs_the_others_and_not_the_denied_package(net, tmp_path, profile):
    """cargo (sparse index, by `secret-crate` and `secret_crate`), go (the
    module, and its capitalised twin `Org/Secret` the proxy stores as `!secret`),
    gem (full index; `/info/NAME` of the compact index is asked first) and mvn (the
    jar and a classifier's) get the honest packages and are refused the denied one,
    whose content the server never serves."""
    root = build(tmp_path)
    log = tmp_path / "server.log"
    log.touch()
    reg = f"sparse+{BASE}/idx/"
    steps = {
        "cargo_public": cargo_steps(reg, "public-crate", "p", "$C"),
        "cargo_secret": cargo_steps(reg, "secret-crate", "s", "$C"),
        "cargo_secret_us": cargo_steps(reg, "secret_crate", "u", "$C"),
        "go_public": go_steps(BASE, "allowed.test/org/public", "p"),
        "go_secret": go_steps(BASE, "allowed.test/org/secret", "s"),
        "go_secret_upper": go_steps(BASE, "allowed.test/org/Secret", "S"),
        "gem_public": gem_steps(BASE + "/", "public-gem", "p"),
        "gem_secret": gem_steps(BASE + "/", "secret-gem", "s"),
        "mvn_public": mvn_steps(BASE + "/maven2", "com.corp:public-lib:1.0", "p"),
        "mvn_secret": mvn_steps(BASE + "/maven2", "com.corp:secret-lib:1.0", "s"),
        "mvn_secret_sources": mvn_steps(
            BASE + "/maven2", "com.corp:secret-lib:1.0", "c", "sources"
        ),
    }
    result = run_all(net, tmp_path, root, log, steps, DENIES, profile)
    why = describe(result, log)
    for label, mark in (
        ("cargo_public", "PUBLIC-CRATE"),
        ("go_public", "PUBLIC-GO"),
        ("gem_public", "PUBLIC-GEM"),
        ("mvn_public", "PUBLIC-MVN"),
    ):
        assert mark in result[label].out, (label, why)
    for label in steps:
        if "secret" in label:
            step = result[label]
            assert step.rc != 0 and "SECRET" not in step.out, (label, why)
            assert "403" in step.out + step.err, (label, why)
    assert not [line for line in served_200(log, "secret") if "specs" not in line], why
    assert "/allowed.test/org/!secret/" not in log.read_text(), why
    assert ("deny", "rule_deny", f"{profile}-no-secret-0") in result.verdicts(kind="request"), why


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_deny_ending_in_a_star_segment_leaves_the_next_patch_version_installable(
    net, tmp_path, profile
):
    """A deny takes "any suffix after a `.`" of its last segment, so the plain deny of
    one release, `/gems/plain-gem-1.0.gem` or `/maven2/com/corp/plain-lib/1.0/**`,
    refuses that release (the control) and also 1.0.1 (docs/rules.md: "`/1/**` takes
    `/1.1/`"). The documented recipe, a last segment with a `*` (`/gems/old-gem-1.0.gem*`,
    `/maven2/com/corp/old-lib/1.0/*`), is matched as written: 1.0 is refused, and the
    fixed release 1.0.1 installs."""
    root = build(
        tmp_path,
        extra_gems={
            "old-gem@1.0": "OLD-GEM-1.0",
            "old-gem@1.0.1": "OLD-GEM-1.0.1",
            "plain-gem@1.0": "PLAIN-GEM-1.0",
        },
        extra_maven=[
            ("old-lib", "1.0", "OLD-LIB-1.0"),
            ("old-lib", "1.0.1", "OLD-LIB-1.0.1"),
            ("plain-lib", "1.0", "PLAIN-LIB-1.0"),
        ],
    )
    log = tmp_path / "server.log"
    log.touch()
    # The gem's file alone (not its gemspec, which gem reads first): the recipe is what
    # refuses gem's download.
    denies = {
        "allowed.test": [
            "/gems/old-gem-1.0.gem*",
            "/maven2/com/corp/old-lib/1.0/*",
            "/gems/plain-gem-1.0.gem",
            "/maven2/com/corp/plain-lib/1.0/**",
        ]
    }
    steps = {
        "gem_old": gem_steps(BASE + "/", "old-gem", "o", "1.0"),
        "mvn_old": mvn_steps(BASE + "/maven2", "com.corp:old-lib:1.0", "o"),
        "gem_plain": gem_steps(BASE + "/", "plain-gem", "p", "1.0"),
        "mvn_plain": mvn_steps(BASE + "/maven2", "com.corp:plain-lib:1.0", "p"),
        "gem_fixed": gem_steps(BASE + "/", "old-gem", "f", "1.0.1"),
        "mvn_fixed": mvn_steps(BASE + "/maven2", "com.corp:old-lib:1.0.1", "f"),
    }
    result = run_all(net, tmp_path, root, log, steps, denies, profile)
    why = describe(result, log)
    for label in ("gem_old", "mvn_old", "gem_plain", "mvn_plain"):
        step = result[label]
        assert step.rc != 0 and "403" in step.out + step.err, (label, why)
        assert "OLD-" not in step.out and "PLAIN-" not in step.out, (label, why)
    assert not served_200(log, "/gems/old-gem-1.0.gem "), why
    assert not served_200(log, "/maven2/com/corp/old-lib/1.0/"), why
    assert "OLD-GEM-1.0.1" in result["gem_fixed"].out, why
    assert "OLD-LIB-1.0.1" in result["mvn_fixed"].out, why


@pytest.mark.parametrize("denied", ["api_url", "index_and_static_host"])
def test_a_crate_denied_by_its_api_download_url_comes_from_the_static_host(net, tmp_path, denied):
    """What happens, as docs/rules.md says it (a deny recipe). crates.io's layout: the
    sparse index (index.crates.io), the API (crates.io, whose documented download URL
    `/api/v1/crates/NAME/VER/download` answers a 302 to static.crates.io) and the
    files (static.crates.io). config.json's `dl` names the static host, so cargo
    never asks the API host for a download. Here allowed.test is index and API, www.allowed.test
    the static host, with the same layout. A deny of the API's download URL (what an
    admin finds in crates.io's API docs and in its web page's download link) is
    refused when asked (control), yet cargo gets the crate from the static host.
    Denying the crate's index entry on the index host (and its files on the static
    host) holds."""
    root, work = tmp_path / "www", tmp_path / "build"
    root.mkdir()
    work.mkdir()
    crates = {"secret-crate": "SECRET-CRATE", "public-crate": "PUBLIC-CRATE"}
    static = f"http://www.allowed.test:{PORT}/crates"
    cargo_registry(
        root, work, "cio", static, crates, stored="crates/{crate}/{version}/download", api=BASE
    )
    (root / "dl302").write_text(static + "/{crate}/{version}/download")
    log = tmp_path / "server.log"
    log.touch()
    denies = {
        "api_url": {"allowed.test": ["/api/v1/crates/secret-crate/**"]},
        "index_and_static_host": {
            "allowed.test": ["/cio/se/cr/secret-crate", "/api/v1/crates/secret-crate/**"],
            "www.allowed.test": ["/crates/secret-crate/**"],
        },
    }[denied]
    reg = f"sparse+{BASE}/cio/"
    steps = {
        "cargo_public": cargo_steps(reg, "public-crate", "p", "$C"),
        "cargo_secret": cargo_steps(reg, "secret-crate", "s", "$C"),
        "api_url": sandbox.curl(f"{BASE}/api/v1/crates/secret-crate/1.0.0/download"),
    }
    result = run_all(net, tmp_path, root, log, steps, denies)
    why = describe(result, log)
    assert "PUBLIC-CRATE" in result["cargo_public"].out, why
    assert result["api_url"].status == 403, why
    if denied == "api_url":
        # The bypass an admin meets: the API's URL is refused, the crate is fetched.
        assert "SECRET-CRATE" in result["cargo_secret"].out, why
        assert served_200(log, "www.allowed.test:8091 /crates/secret-crate/1.0.0/download"), why
    else:
        assert result["cargo_secret"].rc != 0 and "403" in result["cargo_secret"].err, why
        assert not served_200(log, "secret-crate"), why


def test_publish_commands_are_refused_by_a_download_only_rule(net, tmp_path):
    """The package-registries preset's download-only promise (its rule shape, on
    allowed.test): `cargo publish` (PUT /api/v1/crates/new, to config.json's api),
    `gem push` (POST /api/v1/gems) and `mvn deploy:deploy-file` (PUT of the jar and pom)
    get 403 `method_not_allowed` and the server sees no write."""
    root = build(tmp_path)
    log = tmp_path / "server.log"
    log.touch()
    reg = f"sparse+{BASE}/idx/"
    cargo = f"""set -e; C=$PWD/cargo; mkdir -p up/src; cd up
export CARGO_HOME=$PWD/.cargo-home CARGO_NET_RETRY=0 CARGO_REGISTRIES_FAKE_TOKEN=t; mkdir -p $CARGO_HOME
printf '[registries.fake]\\nindex = "{reg}"\\n' > $CARGO_HOME/config.toml
printf '[package]\\nname = "upload-crate"\\nversion = "0.1.0"\\nedition = "2021"\\ndescription = "d"\\nlicense = "MIT"\\n' > Cargo.toml
echo 'pub const DATA: &str = "EXFIL";' > src/lib.rs
$C publish --registry fake --no-verify --allow-dirty"""
    gem = f"""set -e; mkdir -p gp/lib; cd gp; export HOME=$PWD GEM_HOST_API_KEY=t
echo 'X = "EXFIL"' > lib/up.rb
printf 'Gem::Specification.new do |s|\\n s.name = "up"\\n s.version = "1.0"\\n s.summary = "t"\\n s.authors = ["t"]\\n s.files = ["lib/up.rb"]\\n s.license = "MIT"\\nend\\n' > up.gemspec
gem build up.gemspec >/dev/null
gem push up-1.0.gem --host {BASE}"""
    settings = SETTINGS
    mvn = f"""set -e; export HOME=$PWD; mkdir -p md; cd md
printf '%s' '{settings}' | sed "s#LOCAL#$PWD/repo#; s#URL#{BASE}/maven2#" > settings.xml
echo EXFIL > data.txt; zip -q up.jar data.txt
mvn -B -q -s settings.xml org.apache.maven.plugins:maven-deploy-plugin:3.0.0:deploy-file -Durl={BASE}/releases -DrepositoryId=r -Dfile=up.jar -DgroupId=com.corp -DartifactId=up -Dversion=1.0 -Dpackaging=jar -DgeneratePom=true"""
    steps = {"cargo_publish": cargo, "gem_push": gem, "mvn_deploy": mvn}
    result = run_all(net, tmp_path, root, log, steps, {"allowed.test": ["/nothing-denied"]})
    why = describe(result, log)
    for label in steps:
        step = result[label]
        said = step.out + step.err
        assert step.rc != 0 and ("403" in said or "method_not_allowed" in said), (label, why)
    lines = log.read_text().splitlines()
    writes = [line for line in lines if line.split(" ", 1)[0] not in ("GET", "HEAD")]
    assert not writes, why
    refused = {(e["verdict"], e["reason"]) for e in result.events(kind="request", verdict="deny")}
    assert refused == {("deny", "method_not_allowed")}, why
    tried = {
        (e.get("method"), e.get("path")) for e in result.events(kind="request", verdict="deny")
    }
    assert {
        ("PUT", "/api/v1/crates/new"),
        ("POST", "/api/v1/gems"),
        ("PUT", "/releases/com/corp/up/1.0/up-1.0.jar"),
    } <= tried, why


# A resolver for the test's own names: allowed.test as the fake internet has it, and
# vanity.example (a Go module's own host) at an address of the test's own.
VANITY_IP, RESOLVER_IP = "203.0.113.77", "203.0.113.154"
RESOLVER = r"""
import struct
NAMES = {"allowed.test": "203.0.113.10", "vanity.example": VANITY_IP}
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((ip, 53))
print("ready", flush=True)
while True:
    q, peer = u.recvfrom(4096)
    name, end = name_of(q)
    qtype = struct.unpack("!H", q[end - 4:end - 2])[0]
    log.write(f"{name} {qtype}\n")
    known = name in NAMES
    answers = b""
    if known and qtype == 1:
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(NAMES[name])
    flags = 0x8180 if known else 0x8183
    head = q[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
    u.sendto(head + q[12:end] + answers, peer)
""".replace("VANITY_IP", repr(VANITY_IP))


def vanity_repo(root: Path, work: Path) -> None:
    """vanity.example's pages: `/org/secret?go-get=1` names the repository
    `/git/other.git` (another name), a bare repository served as dumb HTTP whose tag
    v1.0.0 holds the module's code."""
    (root / "org").mkdir(parents=True)
    meta = (
        '<html><head><meta name="go-import" content="vanity.example/org/secret git '
        'http://vanity.example/git/other.git"></head></html>'
    )
    (root / "org" / "secret").write_text(meta)
    src = work / "vsrc"
    src.mkdir()
    (src / "go.mod").write_text("module vanity.example/org/secret\n\ngo 1.19\n")
    (src / "mark.go").write_text('package x\n\nconst Mark = "SECRET-VIA-VANITY"\n')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    _run([*git, "init", "-q"], src)
    _run([*git, "add", "."], src)
    _run([*git, "commit", "-qm", "v1"], src)
    _run([*git, "tag", "v1.0.0"], src)
    (root / "git").mkdir()
    _run(["git", "clone", "-q", "--bare", str(src), str(root / "git" / "other.git")], work)
    _run(["git", "update-server-info"], root / "git" / "other.git")


@pytest.mark.parametrize("denied", ["proxy_only", "proxy_and_vanity_page"])
def test_a_go_module_denied_on_the_proxy_is_fetched_direct_through_its_vanity_page(
    net, tmp_path, denied
):
    """What happens, as docs/rules.md says it (a deny recipe). The admin denies a Go
    module on the module proxy by its path (`/vanity.example/org/secret/**`,
    proxy.golang.org's layout): `go mod download` through the proxy is refused
    (control). The task sets GOPROXY=direct: go asks the module's own host
    `/org/secret?go-get=1`, whose go-import tag names a repository of another name
    (`/git/other.git`), and clones it (dumb HTTP, GET only). A deny of the module's
    page on its own host holds; the repository itself is then still clonable by its
    URL (deny it too)."""
    if not shutil.which("go"):
        pytest.skip("needs go (scripts/install.sh --test)")
    root, work = tmp_path / "www", tmp_path / "build"
    root.mkdir()
    work.mkdir()
    go_module(root, "vanity.example/org/secret", "SECRET-VIA-PROXY")
    vroot = tmp_path / "vanity"
    vanity_repo(vroot, work)
    log, vlog = tmp_path / "server.log", tmp_path / "vanity.log"
    log.touch()
    vlog.touch()
    denies = {"allowed.test": ["/vanity.example/org/secret/**"]}
    if denied == "proxy_and_vanity_page":
        denies["vanity.example"] = ["/org/secret/**"]
    text = rules_text(denies).replace(
        "[allowed.test, www.allowed.test]", "[allowed.test, vanity.example]"
    )
    text = text.replace("ports: [8091]\n        methods", "ports: [8091, 80]\n        methods")
    text = text.replace(
        "      - deny: vanity.example\n        id: door-no-secret-1\n        ports: [8091]",
        "      - deny: vanity.example\n        id: door-no-secret-1\n        ports: [80]",
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    direct = "GOINSECURE=vanity.example GIT_TERMINAL_PROMPT=0"
    steps = {
        "resolve": sandbox.dig("vanity.example"),
        "via_proxy": go_steps(BASE, "vanity.example/org/secret", "p"),
        "direct": go_steps("direct", "vanity.example/org/secret", "d", direct),
    }
    vserver = [
        sandbox.PYTHON,
        "-I",
        "-S",
        "-c",
        SERVER,
        str(vroot),
        VANITY_IP,
        "80",
        str(vlog),
        str(M2),
    ]
    net.run_in_internet(["ip", "addr", "add", f"{VANITY_IP}/32", "dev", "lo"], check=True)
    try:
        with (
            resolver_server(net, RESOLVER, RESOLVER_IP, tmp_path / "dns.log"),
            internet_servers(
                net, [*serve(root, log), vserver], [f"{IP}:{PORT}", f"{VANITY_IP}:80"]
            ),
        ):
            result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", "door"),
                                 timeout=180, dns_upstream=RESOLVER_IP)  # fmt: skip
    finally:
        net.run_in_internet(["ip", "addr", "del", f"{VANITY_IP}/32", "dev", "lo"])
    why = describe(result, log) + "\nvanity:\n" + vlog.read_text()
    assert "SECRET-VIA-PROXY" not in result["via_proxy"].out, why
    assert "403" in result["via_proxy"].out + result["via_proxy"].err, why
    if denied == "proxy_only":
        assert "SECRET-VIA-VANITY" in result["direct"].out, why
        assert "/git/other.git/info/refs" in vlog.read_text(), why
    else:
        assert "SECRET-VIA-VANITY" not in result["direct"].out, why


TLS_PORT = 8443


def test_each_client_installs_through_an_inspected_https_registry(net, tmp_path):
    """The package-registries preset inspects TLS to every registry it names, Maven
    Central among them. sandgate gives the task the gateway's CA in the system bundle
    and in SSL_CERT_FILE & co, which cargo, go and gem read; a JVM reads only its own
    truststore, so sandgate gives it one with the same certificates (over
    /etc/ssl/certs/java/cacerts, named in JAVA_TOOL_OPTIONS, to which a JAVA_TOOL_OPTIONS
    of --env is added). mvn downloads through the inspected rule, with no
    `tls_rejected_by_client`. Here the registry is https://allowed.test:8443 with a
    GET/HEAD rule (inspected, as the preset)."""
    root = build(tmp_path)
    https = f"https://allowed.test:{TLS_PORT}"
    (root / "idx" / "config.json").write_text(
        json.dumps({"dl": f"{https}/api/v1/crates", "api": https})
    )
    log = tmp_path / "server.log"
    log.touch()
    text = rules_text({"allowed.test": ["/nothing-denied"]}).replace(f"[{PORT}]", f"[{TLS_PORT}]")
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    steps = {
        "cargo_public": cargo_steps(f"sparse+{https}/idx/", "public-crate", "p", "$C"),
        "go_public": go_steps(https, "allowed.test/org/public", "p"),
        "gem_public": gem_steps(https + "/", "public-gem", "p"),
        "mvn_public": mvn_steps(https + "/maven2", "com.corp:public-lib:1.0", "p"),
        "java_options": 'printf "%s\\n" "$JAVA_TOOL_OPTIONS"',
    }
    w = net.workdir
    server = [sandbox.PYTHON, "-I", "-S", "-c", SERVER, str(root), IP, str(TLS_PORT), str(log),
              str(M2), str(w / "server.pem"), str(w / "server.key")]  # fmt: skip
    with internet_servers(net, [server], [f"{IP}:{TLS_PORT}"]):
        result = sandbox.run(
            net, tmp_path, {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules, setup=copy_cargo, timeout=300,
            extra=("--profile", "door", "--env", "JAVA_TOOL_OPTIONS=-Dsandgate.test=given"),
        )  # fmt: skip
    why = describe(result, log)
    for label, mark in (
        ("cargo_public", "PUBLIC-CRATE"),
        ("go_public", "PUBLIC-GO"),
        ("gem_public", "PUBLIC-GEM"),
        ("mvn_public", "PUBLIC-MVN"),
    ):
        assert mark in result[label].out, (label, why)
    options = result["java_options"].out.split()
    assert options[-1] == "-Dsandgate.test=given", options
    assert "-Djavax.net.ssl.trustStoreType=JKS" in options, options
    assert served_200(log, "/maven2/com/corp/public-lib/1.0/public-lib-1.0.jar"), why
    refused = [e for e in result.events() if e.get("reason") == "tls_rejected_by_client"]
    assert not refused, why


# A JVM client of its own: HTTPS with the JDK's default trust, as a build tool has it.
JAVA_FETCH = """public class Fetch { public static void main(String[] a) throws Exception {
  var c = (javax.net.ssl.HttpsURLConnection) new java.net.URL(a[0]).openConnection();
  System.out.println("status " + c.getResponseCode()); } }"""


def test_a_jvm_in_a_task_attached_to_the_service_trusts_its_bundle(net, tmp_path):
    """`sandgate run --gateway`: the service writes the task's truststore beside its
    CA bundle and the attaching runner binds it. The service has --extra-ca (the fake
    internet's CA, a CA of the system bundle's none), so a JVM's HTTPS request to
    allowed.test verifies only through that store; and the store holds each
    certificate of the task's bundle."""
    if not shutil.which("java") or not shutil.which("keytool"):
        pytest.skip("needs default-jdk-headless (scripts/install.sh --test)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    service = GatewayProcess(net, tmp_path, rules, "--workers", "1").start()
    try:
        bundle = "/etc/ssl/certs/ca-certificates.crt"
        steps = {
            "fetch": f"cat > Fetch.java <<'EOF'\n{JAVA_FETCH}\nEOF\n"
            "java Fetch.java https://allowed.test/ 2>&1",
            "options": 'printf "%s\\n" "$JAVA_TOOL_OPTIONS"',
            "in_bundle": f"grep -c 'BEGIN CERTIFICATE' {bundle}",
            "in_store": "keytool -list -cacerts -storepass changeit 2>/dev/null"
            " | grep -c trustedCertEntry",
        }
        result = attach(service, tmp_path, steps, timeout=120)
    finally:
        service.stop()
    assert result.returncode == 0, result.describe()
    assert "status 200" in result["fetch"].out, result.describe()
    assert "-Djavax.net.ssl.trustStoreType=JKS" in result["options"].out, result.describe()
    assert int(result["in_store"].out) == int(result["in_bundle"].out) > 100, result.describe()
