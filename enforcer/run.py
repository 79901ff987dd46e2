"""`sandgate run`: one command in a fresh sandbox whose only way out is an embedded gateway.

Order matters for safety. Up: sandbox network (no route out: nothing forwards
for it), gateway listeners, nftables table, then the task. Down: the task, the
sandbox network, then the table and the gateway — the sandbox never exists
without the table. A SIGKILLed run leaves netns, veth and table behind but no
listener, so the sandbox has no egress; `sandgate gc` removes the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import random
import secrets
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sandgate.enforcer import java_truststore, netns, nft, priority, process_stamp
from sandgate.enforcer.admin import Admin, AdminOptions
from sandgate.enforcer.sandbox import cgroup, id_slots, planting, prepare, spec
from sandgate.enforcer.summary_file import SummaryFile, SummaryFileError
from sandgate.proxy.frontdoor.poller import new_event_loop
from sandgate.proxy.gateway import Gateway, GatewayConfig, asks, inspects
from sandgate.proxy.policy import CompiledPolicy
from sandgate.proxy.policy.names import format_host_port
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.telemetry import task_events
from sandgate.proxy.telemetry.audit import (
    AuditJournalError,
    AuditLog,
    AuditLogError,
    journal_log,
)
from sandgate.proxy.telemetry.event import Event, EventKind
from sandgate.proxy.telemetry.flood import FloodLimits
from sandgate.proxy.telemetry.flood_sink import RateLimitedAudit
from sandgate.proxy.telemetry.metrics import Metrics
from sandgate.proxy.telemetry.summary import TaskSummary

log = logging.getLogger("sandgate.run")

RUN_DIR = Path(os.environ.get("SANDGATE_RUN_DIR", "/run/sandgate"))
# A state dir naming no owner yet is taken for a run setting up for this long (gc).
SETUP_GRACE_S = 60.0
STATE_DIR = Path(os.environ.get("SANDGATE_STATE_DIR") or "/var/lib/sandgate")
AUDIT_DIR = STATE_DIR / "audit"  # a run's audit log when --audit-log is not given: <run id>.jsonl
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TABLE_PREFIX = "sandgate_"
CA_ENV_VARS = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "CURL_CA_BUNDLE",
)
EXIT_SETUP = 125
# A task that ignores the stop signals cannot hold this process, its gateway and its
# network up until someone SIGKILLs it (which leaves them for `sandgate gc`): after
# spec.STOP_GRACE seconds, or a second signal, it is killed (an attached run alike).
STOP_GRACE = spec.STOP_GRACE


class RunError(Exception):
    """The sandbox or gateway could not be set up; the message says what to do."""


@dataclass
class RunOptions:
    command: list[str]
    policy: CompiledPolicy
    profile: str = "default"
    dns_upstreams: list[str] = field(default_factory=list)
    audit_log: Path | None = None  # None: AUDIT_DIR/<run id>.jsonl (kept after the run)
    audit_budget: int | None = None  # bytes for the log and its rotated files; None: no cap
    on_audit_failure: str = "block"  # or "continue": see --on-audit-failure
    audit_limits: FloodLimits = field(default_factory=FloodLimits)  # --audit-rate, --audit-burst
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9464)  # None: no /metrics
    metrics_listen_given: bool = False  # by --metrics-listen: a port in use stops the run
    admin: AdminOptions = field(default_factory=AdminOptions)  # the approvals page, webhooks
    summary_json: Path | None = None
    extra_ca: list[str] = field(default_factory=list)  # --extra-ca's PEM, read once (cli/common.py)
    pool: str = str(netns.DEFAULT_POOL)
    quiet: bool = False
    sandbox: spec.SandboxOptions = field(default_factory=spec.SandboxOptions)
    limits: cgroup.Limits = field(default_factory=cgroup.Limits)
    probe: str | None = None  # "all": `sandgate selftest`, the probes are the task
    stop_grace: float = STOP_GRACE  # --stop-grace
    # The task's init started ahead by the command line (attach.InitSeed.spawn), to be
    # given its cgroup once the network exists; None: forked then (`_init_seed`).
    seed: object | None = None


def check_prerequisites(command: str = "run") -> None:
    """Root and `nft`, which every command that builds or removes sandboxes needs;
    `command` names it in the message."""
    if os.geteuid() != 0:
        raise RunError(
            f"sandgate {command} needs root (it makes or removes network namespaces and "
            f"nftables tables); try: sudo sandgate {command} ..."
        )
    if shutil.which("nft") is None:
        raise RunError(
            "the 'nft' command is missing; install nftables (Debian: apt-get install nftables)"
        )


def default_dns_upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's resolvers, as the gateway's upstream (the gateway runs in the host netns)."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return []
    return [
        parts[1] for line in lines if len(parts := line.split()) >= 2 and parts[0] == "nameserver"
    ]


def dns_upstreams(given: list[str]) -> list[str]:
    """The resolvers the DNS filter forwards to: as given, else the host's."""
    upstreams = given or default_dns_upstreams()
    if not upstreams:
        raise RunError("no DNS upstream: pass --dns-upstream IP (none found in /etc/resolv.conf)")
    return upstreams


def os_error_text(e: OSError) -> str:
    """`PATH: why` for an OSError, without Python's `[Errno N]`."""
    why = e.strerror or str(e)
    return f"{e.filename}: {why}" if e.filename else why


def make_dir(path: Path, what: str) -> None:
    """`path` and its parents made unless they are there, or a RunError naming `what`
    (the variable or option that picked it): a file in its place, a read-only or full
    file system is the machine's state, not a bug."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is in its place" if isinstance(e, FileExistsError) else os_error_text(e)
        raise RunError(f"cannot make the directory {path} ({what}): {why}") from None


# Run ids are 8 hex digits (they name the netns, veth, table and cgroup, whose names
# are short): 2^32 of them, so a burst of runs, or a run beside the audit logs of every
# past one, can draw one in use. An id is a run's once its state dir is made by it.
RUN_ID_ATTEMPTS = 16


def claim_run_id(first: str | None = None, taken=None) -> str:
    """A run id whose state dir `RUN_DIR/<id>` this call made: `first` if it is free,
    else a fresh random one. `mkdir` without exist_ok is the claim (atomic: of two
    runs drawing one id, one makes the dir, the other draws again), so no two runs
    share an id's netns, veth, table, cgroup or state dir. `taken(id)`: whether the
    id is in use otherwise (e.g. a kept audit log of that name). RunError when the
    dir cannot be made, or no free id was drawn. Root's alone (0700): the task's
    spec in it holds its environment, `--env` and `--env-file` values included."""
    make_dir(RUN_DIR, "SANDGATE_RUN_DIR")
    draws = (secrets.token_hex(4) for _ in range(RUN_ID_ATTEMPTS))
    for run_id in itertools.chain([first] if first else [], draws):
        if taken is not None and taken(run_id):
            continue
        try:
            (RUN_DIR / run_id).mkdir(mode=0o700)
        except FileExistsError:
            continue
        except OSError as e:
            raise RunError(
                f"cannot make the directory {RUN_DIR / run_id} (SANDGATE_RUN_DIR): {os_error_text(e)}"
            ) from None
        return run_id
    raise RunError(f"no free run id in {RUN_DIR} after {RUN_ID_ATTEMPTS} draws (SANDGATE_RUN_DIR)")


def open_audit_log(path: Path, budget: int | None = None) -> AuditLog:
    """The audit log at `path`, with its journal (`audit_journal`): a killed run or
    service that wrote it before has what it had not written appended first."""
    journal = audit_journal(path)
    try:
        audit = AuditLog(path, max_total_bytes=budget, journal=journal)
    except AuditJournalError as e:
        raise RunError(f"{e} (under the state directory: SANDGATE_STATE_DIR)") from None
    except AuditLogError as e:
        raise RunError(f"{e} (--audit-log FILE picks another place)") from None
    return audit


def audit_journal(path: Path) -> Path:
    """The journal of the audit log at `path` (proxy/telemetry/blackbox.py): under the
    state dir (hidden from the sandboxes), named for the log's absolute path, so the
    next process that opens that log finds it."""
    name = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:20]
    return STATE_DIR / "audit-journal" / f"{name}.ring"


# The sandbox addresses are the host's to share (its network namespace's): every run
# and service on it, whatever its RUN_DIR, picks and assigns its /30 under this lock.
ADDRESS_LOCK = Path("/run/sandgate-addresses.lock")


def make_sandbox_net(run_id: str, pool_text: str, picked=None) -> netns.SandboxNet:
    """Netns and veth of sandbox `run_id` on a free /30 of the pool (`_pick_addresses`),
    `picked(gateway_ip, sandbox_ip)` called before they are made (the service records
    them for gc). The pick and the assignment are one step for every maker on the
    host (`ADDRESS_LOCK`): picked apart, two runs of a burst that drew one /30 (1 in
    16,384 a pair; ~7% of 50 runs have a pair) both found it free and both took it,
    and the host's routes sent one sandbox's packets down the other's veth."""
    with _address_lock():
        gateway_ip, sandbox_ip = _pick_addresses(pool_text)
        if picked is not None:
            picked(gateway_ip, sandbox_ip)
        return netns.create_sandbox_net(run_id, gateway_ip, sandbox_ip)


@contextlib.contextmanager
def _address_lock():
    """ADDRESS_LOCK held (flock: a killed holder releases it). A /run where it cannot
    be made (read-only) leaves the pick unlocked, as it was: a collision then fails
    that run's network, it never mixes two sandboxes (`_pick_addresses` checks)."""
    try:
        lock = os.open(ADDRESS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # closing releases the lock


def _host_addresses() -> set[str]:
    """The IPv4 addresses of this network namespace's interfaces."""
    from sandgate.enforcer.rtnl import Rtnl

    with Rtnl() as rtnl:
        return rtnl.ipv4_addresses()


def _pick_addresses(pool_text: str):
    """A free /30 of the pool: random, checked against the host's addresses (under
    ADDRESS_LOCK: `make_sandbox_net`)."""
    from ipaddress import IPv4Network

    pool = IPv4Network(pool_text)
    used = _host_addresses()
    for _ in range(64):
        gateway_ip, sandbox_ip = netns.allocate_addresses(
            pool, random.randrange(pool.num_addresses // 4)
        )
        if str(gateway_ip) not in used:
            return gateway_ip, sandbox_ip
    raise RunError(f"no free /30 found in sandbox pool {pool}")


def write_own_file(path: Path, text: str) -> None:
    """A file of this run's (or service's) own state; a failure (a full /run) names it."""
    try:
        path.write_text(text)
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None


def _ca_bundle_text(extra: list[str]) -> str:
    """The system's bundle and the PEM certificates in `extra`."""
    parts = [SYSTEM_CA_BUNDLE.read_text()] if SYSTEM_CA_BUNDLE.exists() else []
    parts += extra
    return "\n".join(part.rstrip() + "\n" for part in parts)


def _write_ca_bundle(path: Path, extra: list[str]) -> None:
    """The system's bundle and the PEM certificates in `extra`, at `path`."""
    write_own_file(path, _ca_bundle_text(extra))


def java_truststore_file(extra: list[str], fallback: Path) -> Path:
    """The Java truststore of what _write_ca_bundle writes for `extra`: kept in the
    state cache once per system bundle and `extra` (`fallback`: where it is written
    when the cache cannot be)."""
    try:
        return java_truststore.cached(
            STATE_DIR / "cache",
            java_truststore.cache_key(SYSTEM_CA_BUNDLE, extra),
            lambda: _ca_bundle_text(extra),
            fallback,
        )
    except OSError as e:
        raise RunError(f"cannot write {fallback}: {e.strerror or e}") from None


class TaskRun:
    def __init__(self, opts: RunOptions):
        self.opts = opts
        self._use_id(secrets.token_hex(4))  # a draw; the run's once claimed (_setup)
        self.claimed = False  # whether this run made its state dir: then its id is its own
        self.summary = TaskSummary()
        self.audit: AuditLog | None = None
        self.metrics = Metrics()
        self.net: netns.SandboxNet | None = None
        self.gateway: Gateway | None = None
        self.child = None  # attach.ForkedInit: the sandbox init, forked from this process
        self.seed = opts.seed  # attach.InitSeed: the task's init, made ahead in its cgroup
        self.exit_code: int | None = None
        self.sandbox_ip: str | None = None
        self.sandbox: prepare.PreparedSandbox | None = None
        self._gaps_reported = 0
        self.control: asyncio.AbstractServer | None = None  # approvals (RUN_DIR/<id>/control.sock)
        self.admin: Admin | None = None  # the approvals page and webhooks
        self._metrics_started = False
        self._stopping = None  # attach.StopGrace, once the task runs
        self._stop_timer: asyncio.TimerHandle | None = None  # the grace's end, on the loop
        self._disk = None  # attach.DiskGuard, once the task runs
        self._disk_timer: asyncio.TimerHandle | None = None  # its next check
        self.terminal = None  # terminal_relay.SharedTerminal: the caller's, which the task shares
        self.stdio = None  # shared_stdio.SharedStdio: the caller's stdout and stderr, likewise

    def _use_id(self, run_id: str) -> None:
        self.run_id = run_id
        self.dir = RUN_DIR / run_id
        self.table = TABLE_PREFIX + run_id
        self.audit_path = self.opts.audit_log or AUDIT_DIR / f"{run_id}.jsonl"

    async def run(self) -> int:
        started = time.monotonic()
        try:
            summary_file = SummaryFile(self.opts.summary_json) if self.opts.summary_json else None
        except SummaryFileError as e:
            raise RunError(str(e)) from None
        try:
            await self._setup()
            log.info("sandbox ready in %.0f ms", (time.monotonic() - started) * 1000)
            code = await self._run_task()
            # The init killed by a signal (the OOM killer often picks it, the largest
            # process): a shell's 128+N, as an attached run reports, not -N's low byte.
            self.exit_code = code if code >= 0 else 128 - code
        finally:
            await self._teardown(time.monotonic() - started)
            self.summary.task_ended(self.run_id, time.monotonic() - started, self.exit_code)
            if not self.opts.quiet:
                self.summary.print_table(sys.stderr)
            summary_written = summary_file is None or summary_file.write(
                self.summary.to_dict(), self.exit_code
            )
        return self.exit_code if summary_written else EXIT_SETUP

    async def _setup(self) -> None:
        opts = self.opts
        if opts.profile not in opts.policy.profiles:
            raise RunError(
                f"no profile {opts.profile!r} in the rules (profiles: {', '.join(opts.policy.profiles)})"
            )
        upstreams = dns_upstreams(opts.dns_upstreams)
        # A default audit log is named by the id: one kept from a past run is not ours.
        kept = None if opts.audit_log else lambda r: (AUDIT_DIR / f"{r}.jsonl").exists()
        self._use_id(claim_run_id(self.run_id, kept))
        self.claimed = True
        self.summary.telemetry["audit_log"] = str(self.audit_path)
        # The audit log opens in a thread while the network is made (its journal made,
        # its directory listed for rotated files: ~5 ms, mostly the kernel's): nothing
        # before the gateway emits, and the gateway waits for both.
        opening = asyncio.ensure_future(
            asyncio.to_thread(open_audit_log, self.audit_path, opts.audit_budget)
        )
        try:
            write_own_file(self.dir / "pid", process_stamp.stamp(os.getpid()))  # pid and start: gc
            # The walk of the workspace (planting.py: what is there before the task) in a
            # thread while the network and the gateway are made: mostly directory reads
            # (~27 ms for a checkout with a venv), beside the kernel's waits for the netns.
            surveying = None
            if opts.sandbox.workspace_guard and opts.sandbox.writable:
                surveying = asyncio.ensure_future(
                    asyncio.to_thread(
                        prepare.walk_before, opts.sandbox.writable, STATE_DIR / "cache"
                    )
                )
            self.net = await asyncio.to_thread(make_sandbox_net, self.run_id, opts.pool)
        finally:
            # Whatever failed: a log that opened records the run that was not started;
            # one that did not is the error said (the other, if any, its context).
            self.audit = await opening
        gateway_ip, sandbox_ip = self.net.gateway_ip, self.net.sandbox_ip
        # After the netns: `sandgate gc` of another RUN_DIR keeps a cgroup of no run of
        # its own only while that run's netns exists (its cgroup is empty until joined).
        with warnings.catch_warnings():  # Python 3.12+ warns of any fork in a threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            self.seed = _init_seed(self.run_id, opts.limits, self.seed)

        inspection = inspects(opts.policy, opts.profile)
        upstream_ca = self.dir / "upstream-ca.pem"
        _write_ca_bundle(upstream_ca, opts.extra_ca)
        self.gateway = Gateway(
            GatewayConfig(
                listen_host=str(gateway_ip),
                dns_upstreams=upstreams,
                confdir=STATE_DIR / "ca",
                upstream_ca=upstream_ca,
            ),
            opts.policy,
            self.summary,
            RateLimitedAudit(self.audit, opts.audit_limits, self.metrics.count_suppressed),
            self.metrics,
        )
        if opts.on_audit_failure == "block":
            self.gateway.guard_audit(self.audit)
        # The CA the task trusts is made now if its rules inspect; mitmproxy starts
        # only if they ask or allow websockets, else with the first connection that
        # needs it (an h2-only client): inspected HTTPS/1.1 is the front door's.
        try:
            await self.gateway.start(profile=opts.profile)
        except OSError as e:  # a listener refused (an LSM, a port rule), its CA: said
            raise RunError(f"the gateway did not start: {os_error_text(e)}") from None
        # Approvals (this run's control socket, the page, the webhooks) where the rules
        # may ask a human; rules that never ask hold nothing to approve: ~10 ms of the
        # start (the page's imports, two listeners) saved (docs/performance.md).
        if asks(opts.policy, opts.profile):
            try:
                await self._serve_control()
            except OSError as e:
                raise RunError(
                    f"cannot serve this run's approvals on {self.dir / 'control.sock'}: "
                    f"{os_error_text(e)}"
                ) from None
            if opts.probe is None:
                self.admin = Admin(
                    opts.admin,
                    self.gateway.approvals,
                    self.metrics.approval_webhook_failures.inc,
                    self.metrics.admin_auth_failures.inc,
                )
                await self.admin.start(self.dir / "admin-token", "sandgate", opts.quiet)
        if opts.metrics_listen is not None and opts.metrics_listen_given:
            # Given explicitly: listened on before the task starts, or the run stops here
            # (docs/operations.md); the default address may be another run's (a warning).
            self._start_metrics()
        self.gateway.emit(
            Event(
                kind=EventKind.POLICY,
                verdict=Verdict.ALLOW,
                reason=Reason.POLICY_LOADED,
                detail=f"{opts.policy.rule_count} rules, profiles {', '.join(opts.policy.profiles)}, "
                f"from {', '.join(opts.policy.files)}"[:1000],
            )
        )
        self.sandbox_ip = str(sandbox_ip)
        self.gateway.add_sandbox(Sandbox(str(sandbox_ip), self.run_id, opts.profile))
        table = nft.RulesetConfig(
            table=self.table,
            sandbox_ifaces=self.net.host_if,
            proxy_port=self.gateway.proxy_port,
            dns_port=self.gateway.dns_port,
            **nft.table_rates(opts.policy.limits_for(opts.profile)),
        )
        # this run's own id: created, not replaced (nft.render_ruleset says why)
        await asyncio.to_thread(nft.load_table, table, new=True)

        write_own_file(
            self.dir / "resolv.conf",
            f"# written by sandgate: the gateway's DNS filter\n"
            f"nameserver {gateway_ip}\noptions edns0\n",
        )
        surveyed = await surveying if surveying is not None else None
        self.sandbox = self._prepare_sandbox(inspection, surveyed)
        self.summary.task_started(self.run_id, opts.profile, str(sandbox_ip), opts.command)
        for gap in self.sandbox.gaps:  # into the summary, which task_started begins
            self._emit_weakened(gap)
        self.gateway.emit(self.summary.start_event)
        # On disk before the task runs: a log that cannot be written (a full disk from
        # the start) then refuses the task's first connection, not only those after the
        # writer's first failed write (its thread writes every 50 ms).
        await asyncio.to_thread(functools.partial(self.audit.drain, 2.0, while_writable=True))

    async def _serve_control(self) -> None:
        """The run's own control socket, for approvals from a second terminal."""
        from sandgate.enforcer import approvals_control
        from sandgate.proxy.policy import load_policy
        from sandgate.proxy.policy.load import approved_overlay

        policy = self.opts.policy
        top = [policy.paths[0]] if policy.paths else []

        async def reload(actor: str) -> list[str]:
            try:
                new = await asyncio.to_thread(load_policy, top)
                # As at the start: a file the reload reads anew (an include added
                # since) must be out of the task's reach too.
                for rules in top:
                    spec.check_rule_files(
                        rules, new.paths, self.opts.sandbox.writable,
                        spec.protected_paths([STATE_DIR, RUN_DIR]),
                    )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - PolicyError: its problems, one line each
                return str(e).splitlines() or [type(e).__name__]
            self.gateway.swap_policy(new, cause=actor)
            return []

        self.gateway.approvals.on_always = approvals_control.always_writer(
            approved_overlay(top), reload
        )
        self.control_path = self.dir / "control.sock"
        self.control = await approvals_control.serve(self.control_path, self.gateway.approvals)
        if not self.opts.quiet:
            print(
                f"sandgate: approvals for this run: sandgate approvals --control {self.control_path} list",
                file=sys.stderr,
            )

    def _start_metrics(self) -> None:
        """Serve /metrics (once). On the default address a port in use (another run, say)
        costs the metrics, never the task; an address given with --metrics-listen that
        cannot be listened on stops the run (RunError) before its task starts."""
        if self._metrics_started:
            return
        self._metrics_started = True
        self.metrics.watch_gateway(self.gateway)
        self.metrics.watch_audit(self.audit)
        self.metrics.watch_firewall(lambda: nft.read_counters(self.table))
        if self.opts.metrics_listen is None:
            return
        host, port = self.opts.metrics_listen
        try:
            host, port = self.metrics.serve(host, port)
        except OSError as e:
            if self.opts.metrics_listen_given:
                from sandgate.enforcer.admin import listen_refusal

                raise RunError(listen_refusal("--metrics-listen", host, port, e)) from None
            print(
                f"sandgate: warning: no metrics for this run: cannot listen on {host}:{port}: "
                f"{e.strerror or e} (--metrics-listen HOST:PORT picks another)",
                file=sys.stderr,
            )
            return
        where = format_host_port(host, port)
        self.summary.telemetry["metrics"] = f"http://{where}/metrics"
        log.info("metrics on http://%s/metrics", where)

    def _prepare_sandbox(
        self, inspection: bool, surveyed: planting.Survey | None = None
    ) -> prepare.PreparedSandbox:
        """The task's side of the sandbox. The CA bundle and its variables only where
        they change something (inspection, --extra-ca): set to the plain system bundle
        they would override a tool's own CA option (pip --cert, git http.sslCAInfo)."""
        opts = self.opts
        binds = [(self.dir / "resolv.conf", Path(os.path.realpath("/etc/resolv.conf")))]
        sandgate_env = {"SANDGATE_TASK_ID": self.run_id}
        extra = opts.extra_ca + ([self.gateway.proxy.ca_cert.read_text()] if inspection else [])
        if extra:
            ca_bundle = self.dir / "ca-bundle.pem"
            _write_ca_bundle(ca_bundle, extra)
            # Over the system's bundle, so that clients that only read that trust it too.
            target = SYSTEM_CA_BUNDLE.resolve() if SYSTEM_CA_BUNDLE.exists() else ca_bundle
            binds.append((ca_bundle, target))
            sandgate_env.update(dict.fromkeys(CA_ENV_VARS, str(target)))
            java_bind, java_env = java_truststore.sandbox_setup(
                java_truststore_file(extra, self.dir / "java-cacerts.jks")
            )
            binds.append(java_bind)
            sandgate_env.update(java_env)
        state = [STATE_DIR, RUN_DIR]
        for root in ([opts.sandbox.workspace] if opts.sandbox.workspace else []) + list(
            opts.sandbox.rw
        ):
            if self.audit_path.resolve().is_relative_to(root):
                raise RunError(
                    f"the audit log {self.audit_path} is inside {root}, which the task can write: "
                    "it could rewrite the evidence (put --audit-log elsewhere)"
                )
        hidden = [p for p in state if p.exists()] + (
            [self.audit_path] if self.audit_path.exists() else []
        )
        seed = self.seed
        if seed is not None and not seed.usable():
            seed.discard()  # the run goes on as without it: a cgroup of its own, joined
            self.seed = seed = None
        try:
            return prepare.prepare(
                self.dir,
                self.run_id,
                opts.sandbox,
                opts.limits,
                netns=f"/run/netns/{self.net.netns}",
                argv=opts.command,
                env=sandgate_env,
                file_binds=binds,
                hidden=hidden,
                protected=spec.protected_paths(state),
                probe=opts.probe,
                seccomp_cache=STATE_DIR / "cache",
                walks=STATE_DIR / "cache",
                runner_joins=True,
                cgroup_ahead=seed.cgroup if seed is not None else None,
                surveyed=surveyed,
            )
        except spec.SandboxError as e:
            raise RunError(str(e)) from None
        except OSError as e:  # its seccomp program or spec (a full /run, say)
            raise RunError(
                f"cannot prepare the sandbox in {self.dir}: {os_error_text(e)}"
            ) from None

    async def _run_task(self) -> int:
        """The sandbox init is the one started ahead (`self.seed`: an interpreter of its
        own, started as the run began, whose start fell beside the run's imports), or,
        without one (a run without limits, a seed that failed), forked from this
        process now, as an attached run does: it is imported here already, and a fork
        skips an interpreter start and those imports (~20-30 ms, on the start's path
        this late). This process has other threads by now (the audit writer, the
        metrics server, asyncio's executor); a forked child touches none of their
        state: it closes every descriptor but the init's, runs init.main and leaves
        with os._exit, and the modules it uses are imported before the fork."""
        from sandgate.enforcer.attach import STOP_SIGNALS, DiskGuard, ForkedInit, StopGrace
        from sandgate.enforcer.shared_stdio import SharedStdio
        from sandgate.enforcer.terminal_relay import SharedTerminal

        sandbox = self.sandbox
        self.terminal = SharedTerminal.of_caller()  # as the task finds it
        self.stdio = SharedStdio()  # the caller's stdout and stderr, which the task shares
        with warnings.catch_warnings():  # Python 3.12+ warns of any fork in a threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            self.child = ForkedInit(sandbox.spec_path, keep=sandbox.init_fds, seed=self.seed)
        if self.terminal is not None:
            self.terminal.guard()  # only now: the init and the task keep SIGTTOU's default
        self._stopping = StopGrace(self.child, self.opts.stop_grace)
        self._disk = DiskGuard(self.child, self.opts.sandbox)
        # Before the task can start (it waits for the join), and kept until the run
        # ends (its after-run check included): a signal from then on ends the run in
        # order, whoever made the terminal send it.
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._forward_signal, signum)
        try:
            if self.seed is None:
                # The init builds its file view while this joins it to the task's cgroup
                # (the first cgroup write after an idle spell waits out an RCU grace period).
                await asyncio.to_thread(sandbox.join, self.child.pid)
            sandbox.started()
            # /metrics from here, not before the task: its server thread imports the WSGI
            # side (wsgiref, http.server, email, ...: ~10 ms of CPU, holding the GIL) as it
            # starts, which now overlaps the task instead of delaying its start.
            self._start_metrics()
            if self._disk.every is not None:
                self._watch_disk()
            return await self._child_exit()
        finally:
            if self._disk_timer is not None:
                self._disk_timer.cancel()
            if self._stop_timer is not None:
                self._stop_timer.cancel()

    def _watch_disk(self) -> None:
        """The disk reserve checked every `DiskGuard.every` s while the task runs (one
        statvfs per file system: microseconds); `_disk_timer` the next check."""

        def check() -> None:
            self._disk.check()
            self._disk_timer = loop.call_later(self._disk.every, check)

        loop = asyncio.get_running_loop()
        self._disk_timer = loop.call_later(self._disk.every, check)

    async def _child_exit(self) -> int:
        """The init's exit code (negative: killed by that signal), awaited on a pidfd."""
        child = self.child
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(child.pid)
        try:
            while child.poll() is None:
                exited = loop.create_future()
                loop.add_reader(pidfd, lambda f=exited: f.done() or f.set_result(None))
                try:
                    await exited
                finally:
                    loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)
        return child.returncode

    def _forward_signal(self, signum: int) -> None:
        """The first stop signal goes to the task, with `stop_grace` seconds to end;
        a second one, or the grace's end, kills it (its init: the PID namespace goes).
        As an attached run (attach.StopGrace), the grace's end a timer of the loop."""
        stopping = self._stopping
        stopping.signal(signum)
        if stopping.deadline is not None and self._stop_timer is None:
            # (a hair past the deadline: the loop may run a timer up to its clock's
            # resolution early, and `check` kills only from the deadline on)
            self._stop_timer = asyncio.get_running_loop().call_later(
                stopping.left(time.monotonic()) + 0.01,
                lambda: stopping.check(time.monotonic()),
            )

    async def _teardown(self, duration: float) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL)
            await self._child_exit()
        if self.seed is not None:
            self.seed.discard()  # unless it became the init: then its cgroup is the sandbox's
        if self.sandbox is not None:
            self.sandbox.collect()
            if self.sandbox.self_test and self.opts.probe is None:
                held = sum(p["ok"] for p in self.sandbox.self_test)
                self.summary.task["self_test"] = {
                    "held": held,
                    "probes": len(self.sandbox.self_test),
                    "ms": self.sandbox.self_test_ms,
                }

        # The task's side (the walk of its workspace, its cgroup) and the network's
        # (`unwire`) go at once, in two threads: the network's is mostly the kernel's
        # RCU waits (~20 ms), the walk mostly directory reads (~27 ms for a checkout
        # with a venv, 10,000 entries); one after the other they added up. Both end
        # before this goes on, whichever fails.
        def unwired() -> dict[str, int]:
            if not self.claimed:  # the id, and a netns or table of that name, may be another run's
                return {}
            return unwire(self.run_id, self.table, had_net=self.net is not None)

        def finished() -> tuple[list[planting.Planted], list]:
            """What the task planted (renamed aside), then its cgroup removed: the
            limits it hit. Its init is gone by now; check_workspace ends the rest."""
            if self.sandbox is None:
                return [], []
            try:
                planted = self.sandbox.check_workspace()
            finally:  # whatever the check met: the cgroup and the id slot go
                hits = self.sandbox.finish()
            return planted, hits

        done = await asyncio.gather(
            asyncio.to_thread(finished), asyncio.to_thread(unwired), return_exceptions=True
        )
        if self.terminal is not None:  # every process of the task is gone: before any line
            self.terminal.give_back()
        if self.stdio is not None:
            self.stdio.give_back()
        if self._stopping is not None:
            from sandgate.enforcer.attach import print_kill_notices

            print_kill_notices(self._stopping, self._disk)
        if "self_test" in self.summary.task and not self.opts.quiet:
            tested = self.summary.task["self_test"]
            print(
                f"sandgate: self-test: {tested['held']}/{tested['probes']} probes held "
                f"({tested['ms']} ms, before the task)",
                file=sys.stderr,
            )
        for result in done:
            if isinstance(result, BaseException):
                raise result
        (planted, limits_hit), counters = done
        limits_hit += self._disk.hits() if self._disk is not None else []
        self.summary.firewall_drops(counters)
        if self.control is not None:
            self.control.close()
        if self.admin is not None:
            await self.admin.stop()
        if self.gateway is not None:
            for gap in self.sandbox.gaps[self._gaps_reported :] if self.sandbox else []:
                self._emit_weakened(gap)
            for hit in limits_hit:
                self._emit_limit(hit)
            for item in planted:
                self._emit_planted(item)
            self._emit_task_end(counters, duration)
            await self.gateway.stop()
        elif self.audit is not None:  # set up no further than its audit log: its end said
            self.audit.emit(
                task_events.task_ended("was not started", duration, **self._task_fields())
            )
        self.metrics.stop()
        if self.audit is not None:
            self.audit.close()
            self.summary.telemetry["audit_lost"] = self.audit.lost
            if self.audit.given_up:
                self.summary.telemetry["audit_kept"] = self.audit.given_up
        if self.claimed:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _task_fields(self) -> dict:
        return {"task_id": self.run_id, "sandbox": self.sandbox_ip, "profile": self.opts.profile}

    def _emit_weakened(self, gap: prepare.Gap) -> None:
        """A protection this run goes without (--allow-weaker-sandbox): said and recorded."""
        self._gaps_reported += 1
        self.summary.task.setdefault("sandbox_weakened", []).append(gap.feature)
        print(f"sandgate: warning: weaker sandbox: no {gap.feature}: {gap.why}", file=sys.stderr)
        self.gateway.emit(task_events.sandbox_weakened(gap.feature, gap.why, **self._task_fields()))

    def _emit_limit(self, hit) -> None:
        self.summary.task.setdefault("limits_hit", []).append(hit.limit)
        detail = f"the task hit its {hit.limit} limit {hit.count} times: {hit.detail}"
        self.gateway.emit(task_events.task_limit(hit.limit, detail, **self._task_fields()))

    def _emit_planted(self, item: planting.Planted) -> None:
        """Code the task left for the host in its workspace: said, recorded, renamed aside
        (or, where it could not be, said to be still live)."""
        self.summary.task.setdefault("workspace_planted", []).append(str(item.path)[:300])
        if not item.renamed:
            self.summary.task.setdefault("workspace_not_renamed", []).append(str(item.path)[:300])
        print(f"sandgate: warning: the task planted {item.describe()}", file=sys.stderr)
        self.gateway.emit(task_events.workspace_planted(item.describe(), **self._task_fields()))

    def _emit_task_end(self, counters: dict[str, int], duration: float) -> None:
        """The kernel's drops (one event per counter that counted), then the task's end."""
        for event in task_events.firewall_drops(counters, **self._task_fields()):
            self.gateway.emit(event)
        ended = "was not started" if self.exit_code is None else f"exit code {self.exit_code}"
        self.gateway.emit(task_events.task_ended(ended, duration, **self._task_fields()))


def _init_seed(run_id: str, limits: cgroup.Limits, spawned=None):
    """The task's init in its cgroup, made now (attach.InitSeed): `spawned` (started
    ahead by the command line) told to join it, else one forked now; or None where
    the run has no limit to set or no cgroup can be made ahead (the run then makes
    its own, or says why it cannot, as before). A process's first move into a cgroup
    waits out an RCU grace period: ~14 ms of an embedded start on this project's host
    while the init waited for it (bench_start), now spent beside the network's and
    the gateway's setup. Its process group stays this process's (the terminal's
    foreground job), as the init's always was in an embedded run."""
    from sandgate.enforcer.attach import InitSeed

    made = None
    try:
        if limits.controllers():
            # The name create() gives it: `sandgate gc` knows it for this live run's.
            made = cgroup.TaskCgroup.ahead(f"{cgroup.PREFIX}{run_id}")
            if spawned is None:
                return InitSeed(made, own_group=False)
            spawned.join(made)
            return spawned
    except (cgroup.CgroupError, OSError):
        if spawned is None and made is not None:
            made.remove()
    if spawned is not None:
        spawned.discard()  # and its cgroup, once given
    return None


def unwire(run_id: str, table: str, *, had_net: bool = True, count: bool = True) -> dict[str, int]:
    """A sandbox's network and table go, and the sandbox never has a path out without
    its table: first its veth's host end goes down (`netns.cut_off`: no path at all),
    then the table, then the netns's name, the kernel deleting it and the veth
    (`netns.release_sandbox_net`). Without a link to take down (a half-made network),
    the network goes first, the veth deleted here, then the table. Returns the
    table's drop counters, final once the link is down (unless `count` is False: the
    caller read them already). Before all that, the sockets the task's processes left
    in the netns are given up on (`netns.give_up_orphans`)."""
    cut = False
    if had_net:
        with contextlib.suppress(OSError):  # no netns (a half-made network): nothing in it
            netns.give_up_orphans(run_id)
        with contextlib.suppress(Exception):  # no link, or netlink refused: the old order
            cut = netns.cut_off(run_id)
        if not cut:
            netns.destroy_sandbox_net(run_id)
    counters: dict[str, int] = {}
    with contextlib.suppress(nft.NftError):
        if count:
            counters = nft.read_counters(table)
    with contextlib.suppress(nft.NftError):
        nft.delete_table(table)
    if cut:
        netns.release_sandbox_net(run_id)
    return counters


def _run_loop(main):
    """asyncio.run on a loop whose epoll set the front door shares (one epoll_wait per
    loop pass for asyncio's descriptors and the door's: proxy/frontdoor/poller.py)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


def run(opts: RunOptions) -> int:
    check_prerequisites()
    priority.raise_gateway_priority()  # this process is the task's gateway
    try:
        return _run_loop(TaskRun(opts).run())
    except (RunError, netns.SandboxNetError, nft.NftError) as e:
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_SETUP
    except OSError as e:  # a file of the run it cannot write (a full /run, say): torn down, said
        print(f"sandgate: the run failed: {os_error_text(e)}", file=sys.stderr)
        return EXIT_SETUP


def selftest(opts: RunOptions) -> tuple[int, list[dict]]:
    """A probe task in a real sandbox with these rules: what a hostile task would try,
    and what it saw. Exit status 0 only when every probe was held."""
    check_prerequisites()
    run = TaskRun(dataclasses.replace(opts, probe="all", command=["sandgate-selftest"], quiet=True))
    try:
        code = _run_loop(run.run())
    except (RunError, netns.SandboxNetError, nft.NftError) as e:
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_SETUP, []
    probes = run.sandbox.self_test if run.sandbox else []
    return (code if probes else EXIT_SETUP), probes


class Collected(NamedTuple):
    """What gc removed (with `dry_run`: would remove), and what it left, saying why."""

    removed: list[str]
    kept: list[str]


def gc(dry_run: bool = False) -> Collected:
    """Remove what SIGKILLed runs left: their netns and veth first, then their tables,
    cgroups (killing what is left in them), id slots and state dirs; then what killed
    gateway services on other control sockets left (their state directories and guard
    tables: service_state.py). With `dry_run`, touch nothing.

    Only runs known to be dead are touched: a state directory under RUN_DIR whose
    process is gone. `sg-*` namespaces without one may belong to another host
    namespace or another tool, and are left alone. Tables are per network namespace:
    a `sandgate_*` table here of a dead run, or of no run and no netns, is this
    host's leftover; one with a netns and no state dir here is another RUN_DIR's.
    Safe beside runs that start meanwhile (the listings' order, below).
    """
    removed = []

    def drop(what: str, action) -> None:
        if not dry_run and action() is False:
            return  # gone since it was listed: removed by its own run, not by gc
        removed.append(what)

    # Listed in the reverse of the order a run makes them (state dir, netns, table,
    # cgroup): whatever is listed of a run starting meanwhile has what it made before
    # in the listings after. Read first, the state dirs missed a run that started
    # between the two, whose new table and (empty) cgroup were taken for leftovers of
    # no run and removed under it.
    tables, cgroups = nft.list_tables(TABLE_PREFIX), cgroup.leftovers()
    nets = set(netns.list_sandbox_nets())
    # A sandbox of a live gateway service is the service's to remove, whatever its runner.
    runs = {d.name: _owned(d) for d in RUN_DIR.glob("*") if d.is_dir()}
    live = {run_id for run_id, alive in runs.items() if alive}
    dead = set(runs) - live
    for run_id in sorted(dead & nets):
        drop(f"netns {netns.netns_name(run_id)}", lambda r=run_id: netns.destroy_sandbox_net(r))
    for table in tables:
        run_id = table[len(TABLE_PREFIX) :]
        # A table of no run here whose netns exists is a live sandbox of another
        # RUN_DIR (another service, a run with its own SANDGATE_RUN_DIR): theirs.
        if run_id in dead or (run_id not in runs and run_id not in nets):
            drop(f"nft table {table}", lambda t=table: nft.delete_table(t))
    # leftovers() lists live runs' cgroups too: only a dead run's, or an empty one that no
    # run owns (every run has its state dir for as long as its cgroup exists; a warm
    # runner's `sandgate-warm-*` holds its init-to-be while the runner lives). Cgroups
    # are the host's, whatever the RUN_DIR: one of no run here whose netns exists is a
    # run of another RUN_DIR setting up (empty until its init joins).
    for path in cgroups:
        run_id = Path(path).name.removeprefix(cgroup.PREFIX)
        if run_id in dead or (run_id not in runs and run_id not in nets and _empty_cgroup(path)):
            drop(f"cgroup {path}", lambda p=path: cgroup.remove_path(p))
    # A killed runner's id slot, once its task's cgroup is gone (id_slots.sweep).
    removed += id_slots.sweep(id_slots.host_id_pool(), dry_run=dry_run)
    for run_id in sorted(dead):
        drop(
            f"state {RUN_DIR / run_id}",
            lambda r=run_id: shutil.rmtree(RUN_DIR / r, ignore_errors=True),
        )
    for journal, log_path in _left_journals():
        drop(
            f"audit journal {journal} (what it holds appended to {log_path})",
            lambda j=journal, p=log_path: _append_left_journal(j, p),
        )
    from sandgate.enforcer import service_state  # it imports this module

    kept: list[str] = []
    service_state.collect(drop, kept.append)
    return Collected(removed, kept)


def _left_journals() -> list[tuple[Path, Path]]:
    """(journal, its audit log) of each audit journal a killed run or service left
    (`audit_journal`): one whose log no process holds (the lock)."""
    found = []
    for journal in sorted((STATE_DIR / "audit-journal").glob("*.ring")):
        if ".worker-" in journal.name:
            continue  # read with its service's journal
        try:
            log_path = journal_log(journal)
            # Not through a link, and not waiting on a FIFO someone put there: the
            # AuditLog that appends would refuse either, and say so.
            fd = os.open(log_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # no log to append to: left as it is
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Still there once the lock is ours? A run removes its journal before it lets
            # go of the lock (AuditLog.close): one that ended since the glob took its
            # journal with it, and there is nothing to append (gc said it removed one).
            left = journal.exists()
        except BlockingIOError:
            continue  # a live process writes that log
        finally:
            os.close(fd)
        if left:
            found.append((journal, log_path))
    return found


def _append_left_journal(journal: Path, log_path: Path) -> None:
    """Open the log with its journal (which appends what the killed process had not
    written, proxy/telemetry/audit.py) and close it (which removes the journal)."""
    try:
        AuditLog(log_path, journal=journal).close()
    except AuditLogError as e:
        log.error("sandgate gc: %s", e)


def _empty_cgroup(path: str) -> bool:
    try:
        return not Path(path, "cgroup.procs").read_text().strip()
    except OSError:
        return False


def _owned(run_dir: Path) -> bool:
    """Whether a run's state dir has a live owner: the run (or the attached runner)
    its pid file names, or the gateway service of its service.json; each recorded
    with its start time (`process_stamp`), so a pid the kernel gave to another
    process since does not count. A dir that names no owner yet is a run setting up
    (between its mkdir and its pid file), for `SETUP_GRACE_S`."""
    try:
        state = json.loads((run_dir / "service.json").read_text())
        service = process_stamp.alive(int(state["service_pid"]), state.get("service_start"))
    except (OSError, ValueError, KeyError, TypeError):
        service = None
    try:  # a pid file being written (empty, half) names no one yet either
        runner = process_stamp.alive(*process_stamp.read_stamp((run_dir / "pid").read_text()))
    except (OSError, ValueError):
        runner = None
    if service or runner:
        return True
    if service is None and runner is None:
        try:
            return time.time() - run_dir.stat().st_mtime < SETUP_GRACE_S
        except FileNotFoundError:
            # Gone since it was listed: its run ended (a run removes its dir last), and
            # what gc listed of it meanwhile (its netns) went with it, not by gc's hand.
            return True
        except OSError:
            pass
    return False
