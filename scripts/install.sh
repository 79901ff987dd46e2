#!/usr/bin/env bash
# Installs what sandgate needs on a fresh Debian/Ubuntu machine, as root:
#   scripts/install.sh          the gateway: nftables, iproute2, and the fake internet
#                               that `sandgate demo` builds (nginx, dnsmasq), plus .venv
#                               (editable: a checkout for development; admins install the wheel)
#   scripts/install.sh --test   also the test tools (curl, dig, socat, ping, Prometheus)
# Idempotent: packages already present are not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-venv: Debian's python3 has no ensurepip without it; .venv below needs it,
# and so do the wheel test and the sandbox tests, which make venvs of their own.
packages=(nftables iproute2 nginx-light dnsmasq-base ca-certificates python3-venv)
# gcc: the `sandgate` command's native front (enforcer/cli/sandgate.c, compiled by
# setup.py at the pip install below; without it `sandgate` is the Python command).
packages+=(gcc libc6-dev)
if [[ "${1:-}" == "--test" ]]; then
  packages+=(curl dnsutils socat iputils-ping prometheus chromium chromium-driver)  # chromium: the approvals page test (Selenium)
  packages+=(strace)  # a kill at a chosen step of a run (test_crash_points: a delay injected on a syscall)
  packages+=(tmux)  # a real terminal emulator: what the task summary looks like after a hostile task (test_output_injection)
  packages+=(php-cli)  # a server that reads method overrides in PHP's spellings (test_method_override_php, test_form_override_php)
  packages+=(mercurial)  # the host's `hg status` in a workspace the task left (test_workspace_planting_hg)
  packages+=(haproxy)  # an SNI router in front of two tenants at one address (test_sni_routers)
  packages+=(python3-h2)  # an HTTP/2 client sending fields as given, in the sandbox (test_host_router)
  packages+=(default-jdk-headless libspring-web-java)  # Spring's Forwarded parser (test_host_router_forwarded)
  packages+=(apache2 varnish)  # path and Host routers read as written (test_apache_paths, test_path_routers)
  packages+=(git)  # git http-backend behind Apache, a real git server (test_git_repository_stems)
  # frameworks that give a handler other names (test_framework_suffixes): Spring MVC on Jetty, Rails
  packages+=(libjetty9-java libspring-web-servlet-java ruby ruby-actionpack ruby-webrick)
  # a Symfony front controller (test_php_front_controller, test_form_override_php), ActiveRecord ids on SQLite (test_number_spellings)
  packages+=(php-symfony-http-foundation php-symfony-routing ruby-activerecord ruby-sqlite3)
  packages+=(php-laravel-lumen-framework)  # Lumen reads `_method` in a JSON body (test_json_method_overrides)
  command -v npm >/dev/null || packages+=(npm)  # Fastify, a router that folds Unicode case (test_unicode_case_routers)
  # handlers by other names: CherryPy's punctuation, Pyramid's views, Falcon's sinks, Plack's
  # x-tunneled-method (test_handler_name_punctuation, test_prefix_route_denies, ...)
  packages+=(python3-cherrypy3 python3-pyramid python3-falcon libdancer2-perl libplack-middleware-methodoverride-perl)
  # package clients against registry layouts in the fake internet (test_registry_clients):
  # go, gem, mvn (a JVM: the task's truststore), and a cargo that reads a sparse index
  # (1.68+: bookworm's `cargo` is older, its `cargo-web` is new; rustup's is used if present).
  # mvn's plugins come from Debian's Maven repository (/usr/share/maven-repo), which the
  # test's fake registry serves: the fake internet has no Maven Central. junit5 holds the
  # junit-bom that plexus-compiler's pom imports.
  packages+=(golang-go ruby-rubygems maven zip unzip)
  packages+=(libmaven-resources-plugin-java libmaven-compiler-plugin-java libmaven-deploy-plugin-java junit5)
  command -v cargo >/dev/null || [[ -x ~/.cargo/bin/rustup ]] || packages+=(cargo-web)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install.sh: apt-get install ${missing[*]}" >&2
  apt-get update -qq
  # policy-rc.d keeps Debian from starting nginx/prometheus services on the host:
  # sandgate starts its own servers inside network namespaces only.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv's interpreter: the distribution's python3 when it is 3.11 or newer. Debian
# builds it with PGO and LTO and links the interpreter statically; a python built from
# source without --enable-optimizations (pyenv's default) spends ~1.3x the CPU per
# gateway connection and starts in ~6x the time (docs/performance.md, "Session 14").
python=python3
if /usr/bin/python3 -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  python=/usr/bin/python3
fi
# A .venv made by another interpreter is made again (its packages are reinstalled below).
if [[ -e .venv/pyvenv.cfg ]] && ! .venv/bin/python -c 'import os, sys; r = os.path.realpath; sys.exit(r(sys._base_executable) != r(sys.argv[1]))' "$(command -v "$python")" 2>/dev/null; then
  echo "install.sh: .venv was made by another python; making it again with $python" >&2
  rm -rf .venv
fi
"$python" -m venv .venv
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extra}"
if [[ "${1:-}" == "--test" && ! -d .venv/node/node_modules/fastify ]]; then
  npm install --silent --no-audit --no-fund --prefix .venv/node fastify@4 >/dev/null
fi
# Hono's methodOverride, which reads a PUT's form too (test_form_method_overrides)
if [[ "${1:-}" == "--test" && ! -d .venv/node/node_modules/@hono/node-server ]]; then
  npm install --silent --no-audit --no-fund --prefix .venv/node hono@4 @hono/node-server@1 >/dev/null
fi
# Express with body-parser, which inflates a gzip/deflate form before method-override
# reads its _method (test_form_override_compressed)
if [[ "${1:-}" == "--test" && ! -d .venv/node/node_modules/method-override ]]; then
  npm install --silent --no-audit --no-fund --prefix .venv/node express@4 body-parser@2 method-override@3 >/dev/null
fi
# Koa's two body parsers, which parse application/csp-report as JSON, and
# koa-methodoverride (test_json_method_overrides)
if [[ "${1:-}" == "--test" && ! -d .venv/node/node_modules/koa-methodoverride ]]; then
  npm install --silent --no-audit --no-fund --prefix .venv/node koa@2 koa-bodyparser@4 @koa/bodyparser@6 koa-methodoverride@2 >/dev/null
fi
# A package index in the fake internet (test_index_name_redirects), in a venv of its own:
# pypiserver needs a newer pip than .venv's, and test_wheel's fresh venv sees .venv's packages.
if [[ "${1:-}" == "--test" && ! -x .venv/pypiserver/bin/pypi-server ]]; then
  "$python" -m venv .venv/pypiserver
  .venv/pypiserver/bin/pip install -q --disable-pip-version-check "pypiserver>=2.4,<3"
fi
