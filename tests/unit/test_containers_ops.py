"""The operations files under containers/: the systemd unit, its environment file,
compose.yaml with Prometheus and Grafana, and their provisioning.

Nothing here starts a service (no systemd as PID 1, no Docker registry on the
build machines): the files are parsed and checked against each other, against
the gateway's documented command line (docs/operations.md), and with the tools
that validate them where installed (`systemd-analyze verify`, `promtool`).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from test_telemetry_containers import DASHBOARD, in_ci, promtool  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"
UNIT = CONTAINERS / "systemd" / "sandgate-gateway.service"
RUNNERS_UNIT = CONTAINERS / "systemd" / "sandgate-runners.service"
ENV_FILE = CONTAINERS / "systemd" / "sandgate.env"
COMPOSE = CONTAINERS / "compose.yaml"
PROMETHEUS = CONTAINERS / "prometheus" / "prometheus.yml"
DATASOURCES = CONTAINERS / "grafana" / "provisioning" / "datasources" / "sandgate.yml"
DASHBOARD_PROVIDER = CONTAINERS / "grafana" / "provisioning" / "dashboards" / "sandgate.yml"


# `sandgate gateway`'s options as the service's interface documents them.
def _command_flags(command: str) -> set[str]:
    """Every option `sandgate COMMAND` takes, from its parser."""
    from sandgate.enforcer.cli import build_parser

    parser = build_parser(command)._subparsers._group_actions[0].choices[command]
    flags = {flag for action in parser._actions for flag in action.option_strings}
    return {flag for flag in flags if flag.startswith("--")} - {"--help"}


GATEWAY_FLAGS = _command_flags("gateway")
RUNNERS_FLAGS = _command_flags("runners")
DEFAULT_CONTROL = "/run/sandgate/gateway.sock"
DEFAULT_METRICS = "127.0.0.1:9464"


def _unit(path: Path = UNIT) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def _flags(argv: list[str]) -> set[str]:
    return {arg for arg in argv if arg.startswith("--")}


def _unit_environment(path: Path = UNIT) -> dict[str, str]:
    """Environment= defaults of a unit (one assignment per line, as written there)."""
    found = re.findall(r"^Environment=(\w+)=(.*)$", path.read_text(), re.MULTILINE)
    return dict(found)


# --- the systemd unit ---


def test_unit_runs_the_gateway_with_documented_flags_only():
    service = _unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "sandgate" and argv[1] == "gateway"
    assert _flags(argv) <= GATEWAY_FLAGS, _flags(argv) - GATEWAY_FLAGS
    # Every ${VAR} the command uses has a default in the unit.
    used = set(re.findall(r"\$\{?(\w+)\}?", service["ExecStart"]))
    assert used <= set(_unit_environment()), used - set(_unit_environment())
    assert _unit_environment()["SANDGATE_CONTROL"] == DEFAULT_CONTROL
    assert _unit_environment()["SANDGATE_METRICS_LISTEN"] == DEFAULT_METRICS


def test_unit_service_lifecycle_settings():
    service = _unit()["Service"]
    assert service["Type"] == "simple"  # sandgate has no sd_notify
    assert service["EnvironmentFile"] == "-/etc/sandgate/sandgate.env"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure"
    # The stop timeout covers the drain's grace and the teardown after it.
    grace = int(_unit_environment()["SANDGATE_GRACE"])
    assert int(service["TimeoutStopSec"]) >= grace + 15
    assert service["RuntimeDirectory"] == "sandgate"
    assert service["RuntimeDirectoryPreserve"] == "yes"  # live sandboxes' state survives
    assert service["StateDirectory"] == "sandgate"
    assert "Delegate" not in service  # tasks must not live in the service's cgroup


def test_unit_capabilities_are_exactly_the_reasoned_ones():
    service = _unit()["Service"]
    assert set(service["CapabilityBoundingSet"].split()) == {
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_CHOWN",
        "CAP_KILL",
    }
    assert service["AmbientCapabilities"] == ""
    for setting in ("NoNewPrivileges", "LockPersonality", "RestrictRealtime", "ProtectClock"):
        assert service[setting] == "yes", setting
    assert service["SystemCallArchitectures"] == "native"
    assert service["RestrictNamespaces"] == "net"


@pytest.mark.parametrize(
    "setting",
    [
        # Each gives the service a private mount namespace: /run/netns/<name>
        # would be invisible to runners, `ip netns`, gc and a restarted service.
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ReadWritePaths",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "PrivateMounts",
        # Breaks TLS inspection (test below).
        "MemoryDenyWriteExecute",
        "PrivateNetwork",
        "User",
        "DynamicUser",
    ],
)
def test_unit_leaves_out_what_breaks_the_gateway(setting):
    assert setting not in _unit()["Service"]


@pytest.mark.parametrize("shipped", [UNIT, RUNNERS_UNIT], ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(tmp_path, shipped):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    sandgate = shutil.which("sandgate") or str(Path(sys.executable).with_name("sandgate"))
    assert os.access(sandgate, os.X_OK), sandgate
    # The command path is the only part that depends on where sandgate is installed.
    unit = tmp_path / shipped.name
    unit.write_text(shipped.read_text().replace("/usr/local/bin/sandgate", sandgate))
    result = subprocess.run(
        [analyze, "verify", "--man=no", unit], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and unparsable values are warnings with exit 0: any output is a defect.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_env_file_documents_every_option_and_sets_none():
    text = ENV_FILE.read_text()
    assert not [line for line in text.splitlines() if line.strip() and not line.startswith("#")], (
        "the example must only comment: the unit's defaults stay in force"
    )
    assert {f for f in re.findall(r"--[a-z-]+", text)} >= GATEWAY_FLAGS
    assigned = set(re.findall(r"^#(SANDGATE_\w+)=", text, re.MULTILINE))
    assert assigned == set(_unit_environment()) | set(_unit_environment(RUNNERS_UNIT))
    for unit in (UNIT, RUNNERS_UNIT):  # one file, read by both units
        assert _unit(unit)["Service"]["EnvironmentFile"] == "-/etc/sandgate/sandgate.env"


# --- the runners unit: warm runners the hardened gateway unit cannot fork ---


def test_gateway_unit_leaves_the_warm_runners_to_the_runners_unit():
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    assert argv[argv.index("--runners") + 1] == "${SANDGATE_RUNNERS}"
    assert _unit_environment()["SANDGATE_RUNNERS"] == "external"


def test_runners_unit_runs_the_pool_for_the_gateways_socket():
    unit = _unit(RUNNERS_UNIT)
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert Path(argv[0]).name == "sandgate" and argv[1] == "runners"
    assert _flags(argv) <= RUNNERS_FLAGS, _flags(argv) - RUNNERS_FLAGS
    environment = _unit_environment(RUNNERS_UNIT)
    used = set(re.findall(r"\$\{?(\w+)\}?", unit["Service"]["ExecStart"]))
    assert used <= set(environment), used - set(environment)
    # the same control socket as the gateway's: the runners listen next to it
    assert argv[argv.index("--control") + 1] == "${SANDGATE_CONTROL}"
    assert environment["SANDGATE_CONTROL"] == _unit_environment()["SANDGATE_CONTROL"]
    assert "sandgate-gateway.service" in unit["Unit"]["After"].split()
    assert unit["Service"]["Restart"] == "always"  # a dead pool is started again
    # SIGTERM to the pool only: a runner with a run keeps its task, as `sandgate run` would
    assert unit["Service"]["KillMode"] == "process"
    assert unit["Service"]["RuntimeDirectoryPreserve"] == "yes"
    # the tasks' cgroups are made under the unit's, ahead of their runs (attach.InitSeed)
    assert unit["Service"]["Delegate"] == "yes"


@pytest.mark.parametrize(
    "setting",
    [
        # inherited by every task, and a runner refuses callers that may do more
        "CapabilityBoundingSet",
        "NoNewPrivileges",
        "SystemCallFilter",
        "RestrictNamespaces",
        "RestrictAddressFamilies",
        "SystemCallArchitectures",
        "LockPersonality",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "ProtectClock",
        "ProtectHostname",
        "MemoryDenyWriteExecute",
        # a mount namespace of its own: no caller is in it, none is handed over
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ProtectControlGroups",
        "ProtectProc",
        "User",
        "DynamicUser",
        "PrivateUsers",
    ],
)
def test_runners_unit_has_none_of_what_would_stop_its_runners(setting):
    assert setting not in _unit(RUNNERS_UNIT)["Service"]


# --- why MemoryDenyWriteExecute stays off ---

_MDWE_PROBE = textwrap.dedent(
    """
    import errno, mmap, sys
    if sys.argv[1] == "filtered":  # systemd's MemoryDenyWriteExecute=yes, as seccomp rules
        import pyseccomp as s
        W, X = mmap.PROT_WRITE, mmap.PROT_EXEC
        f = s.SyscallFilter(defaction=s.ALLOW)
        f.add_rule(s.ERRNO(errno.EPERM), "mmap", s.Arg(2, s.MASKED_EQ, W | X, W | X))
        for call in ("mprotect", "pkey_mprotect"):
            f.add_rule(s.ERRNO(errno.EPERM), call, s.Arg(2, s.MASKED_EQ, X, X))
        f.load()
    from OpenSSL import SSL
    try:  # mitmproxy sets this on every TLS connection it inspects
        SSL.Context(SSL.TLS_METHOD).set_alpn_select_callback(lambda conn, protos: protos[0])
    except MemoryError as e:
        print("MemoryError:", e)
    else:
        print("callback ok")
    """
)


@pytest.mark.parametrize(
    "mode, expected",
    [
        pytest.param("plain", "callback ok", id="without-filter"),
        pytest.param("filtered", "MemoryError: Cannot allocate write+execute", id="mdwe"),
    ],
)
def test_memory_deny_write_execute_would_break_tls_inspection(mode, expected):
    """If the mdwe case ever prints "callback ok", the unit can turn the option on."""
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_PROBE, mode], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected), result.stdout


# --- compose.yaml, Prometheus, Grafana ---


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each bind mount; named volumes are left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def test_compose_mounts_only_files_that_exist():
    relative = [
        (name, source)
        for name, service in _compose()["services"].items()
        for source, _ in _bind_mounts(service)
        if source.startswith(".")
    ]
    assert relative
    missing = [(name, s) for name, s in relative if not (CONTAINERS / s).exists()]
    assert not missing, missing


def test_compose_named_volumes_are_declared():
    compose = _compose()
    used = {
        v.split(":")[0]
        for service in compose["services"].values()
        for v in service.get("volumes", [])
        if not v.startswith((".", "/"))
    }
    assert used <= set(compose.get("volumes") or {}), used


def test_compose_gateway_runs_the_service_on_the_hosts_network():
    compose = _compose()
    gateway = compose["services"]["gateway"]
    assert gateway["privileged"] is True and gateway["network_mode"] == "host"
    assert gateway["build"]["dockerfile"] == "containers/Dockerfile"
    assert (COMPOSE.parent / gateway["build"]["context"] / "containers" / "Dockerfile").is_file()
    command = gateway["command"]
    assert command[0] == "gateway" and _flags(command) <= GATEWAY_FLAGS
    options = dict(zip(command[1::2], command[2::2], strict=False))
    # The rule file is in the mounted rules folder, and exists in the repository.
    rules_target = dict((t, s) for s, t in _bind_mounts(gateway))["/etc/sandgate/rules"]
    relative_rule = Path(options["--rules"]).relative_to("/etc/sandgate/rules")
    assert (CONTAINERS / rules_target / relative_rule).is_file()
    # The gateway's socket and netns names are on the host, shared with runners.
    targets = {t for _, t in _bind_mounts(gateway)}
    assert {"/run/sandgate", "/run/netns", "/var/lib/sandgate"} <= targets
    assert Path(options["--control"]).parent == Path("/run/sandgate")
    # Prometheus (host network too) scrapes where the gateway listens.
    scraped = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"][0]["static_configs"]
    assert scraped[0]["targets"] == [options["--metrics-listen"]]
    # A `docker stop` drain gets the grace plus teardown time.
    assert int(gateway["stop_grace_period"].rstrip("s")) >= int(options["--grace"]) + 15


def test_compose_task_attaches_to_the_gateways_socket():
    compose = _compose()
    task, gateway = compose["services"]["task"], compose["services"]["gateway"]
    socket = dict(zip(gateway["command"][1::2], gateway["command"][2::2], strict=False))
    assert task["command"][:3] == ["run", "--gateway", socket["--control"]]
    assert task.get("profiles"), "`docker compose up` must not start the example task"


def test_compose_runners_serve_the_gateways_socket_and_the_gateway_forks_none():
    services = _compose()["services"]
    gateway, runners = services["gateway"]["command"], services["runners"]["command"]
    gateway_options = dict(zip(gateway[1::2], gateway[2::2], strict=False))
    runners_options = dict(zip(runners[1::2], runners[2::2], strict=False))
    assert runners[0] == "runners" and _flags(runners) <= RUNNERS_FLAGS
    assert runners_options["--control"] == gateway_options["--control"]
    assert gateway_options["--runners"] == "external"  # else two pools claim one socket
    targets = {t for _, t in _bind_mounts(services["runners"])}
    assert {"/run/sandgate", "/run/netns", "/var/lib/sandgate"} <= targets
    assert services["runners"]["privileged"] is True
    assert not services["runners"].get("profiles"), "`up` starts the runners"


def _mounted_targets(service: str) -> dict[str, Path]:
    """Container path -> repository file, for one compose service."""
    return {
        target: (CONTAINERS / source).resolve()
        for source, target in _bind_mounts(_compose()["services"][service])
        if source.startswith(".")
    }


def test_prometheus_config_loads_the_mounted_alert_rules():
    mounted = _mounted_targets("prometheus")
    command = _compose()["services"]["prometheus"]["command"]
    config_path = next(a.split("=", 1)[1] for a in command if a.startswith("--config.file="))
    assert mounted[config_path] == PROMETHEUS.resolve()
    for rule_file in yaml.safe_load(PROMETHEUS.read_text())["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert in_container in mounted, f"{rule_file} is not mounted next to the config"
        assert mounted[in_container] == (PROMETHEUS.parent / rule_file).resolve()


def test_prometheus_config_passes_promtool(promtool):  # noqa: F811 (fixture)
    result = subprocess.run(
        [promtool, "check", "config", PROMETHEUS], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_grafana_provisions_the_mounted_dashboard():
    mounted = _mounted_targets("grafana")
    provisioning = "/etc/grafana/provisioning/"
    assert mounted[provisioning + "datasources/sandgate.yml"] == DATASOURCES.resolve()
    assert mounted[provisioning + "dashboards/sandgate.yml"] == DASHBOARD_PROVIDER.resolve()
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDER.read_text())["providers"]
    folder = Path(provider["options"]["path"])
    dashboards = [path for target, path in mounted.items() if Path(target).parent == folder]
    assert dashboards == [DASHBOARD.resolve()]


def test_grafana_datasource_is_the_prometheus_of_compose():
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    listen = next(
        a.split("=", 1)[1]
        for a in _compose()["services"]["prometheus"]["command"]
        if a.startswith("--web.listen-address=")
    )
    assert datasource["url"] == f"http://{listen}"


def _datasource_refs(node) -> list[dict]:
    """Every `"datasource": {...}` object in the dashboard JSON."""
    if isinstance(node, list):
        return [ref for item in node for ref in _datasource_refs(item)]
    if not isinstance(node, dict):
        return []
    refs = [node["datasource"]] if isinstance(node.get("datasource"), dict) else []
    return refs + [ref for value in node.values() for ref in _datasource_refs(value)]


def test_dashboard_datasource_resolves_to_the_provisioned_one():
    """Panels use ${datasource}; that variable lists datasources of one type, and
    the provisioned default is of that type, so it is the one chosen."""
    (provisioned,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    prometheus_refs = [r for r in _datasource_refs(dashboard) if r["type"] == "prometheus"]
    assert prometheus_refs
    for ref in prometheus_refs:
        if ref["uid"] == provisioned["uid"]:
            continue
        name = re.fullmatch(r"\$\{(\w+)\}", ref["uid"])
        assert name, f"datasource uid {ref['uid']!r} is neither a variable nor provisioned"
        variable = variables[name.group(1)]
        assert variable["type"] == "datasource"
        assert variable["query"] == provisioned["type"]
    others = {r["type"] for r in _datasource_refs(dashboard)} - {"prometheus", "grafana"}
    assert not others, f"datasources nothing provisions: {others}"
