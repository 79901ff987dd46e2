"""What every `sandgate` command shares: exit codes, the two kinds of error the
CLI prints as one line, and loading a rule file for a command."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sandgate.proxy.policy import DEFAULT_RULES
from sandgate.proxy.telemetry.flood import DEFAULT_BURST, DEFAULT_RATE, FloodLimits

if TYPE_CHECKING:
    from sandgate.proxy.policy import CompiledPolicy

EXIT_OK, EXIT_DENIED, EXIT_USAGE = 0, 1, 2
EXIT_SETUP = (
    125  # as enforcer/run.py: the sandbox or gateway could not be set up (as env(1), docker run)
)


def path_option(text: str) -> Path:
    """A path option's value (argparse `type`). A loop of symbolic links on the way
    is refused here, naming the option: every later step that resolves the path
    would fail on it. A path that does not exist yet (a log to make) is fine."""
    try:
        os.stat(text)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise argparse.ArgumentTypeError(f"{text}: a loop of symbolic links") from None
    return Path(text)


class UsageError(Exception):
    """Bad input from the person at the terminal: `sandgate: ...`, exit 2."""


class SetupError(Exception):
    """An expected failure of the machine, not of the input (not root, `nft`
    missing, a namespace that cannot be made): `sandgate: ...`, exit 125."""


@contextlib.contextmanager
def setup_errors() -> Iterator[None]:
    """Turn the enforcer's expected failures into a SetupError. Imported here, not
    at the top: the enforcer's modules load pyroute2 and the gateway."""
    from sandgate.enforcer.netns import SandboxNetError
    from sandgate.enforcer.nft import NftError
    from sandgate.enforcer.run import RunError

    try:
        yield
    except (RunError, SandboxNetError, NftError) as e:
        raise SetupError(str(e)) from None


def load_rules(path: str | Path, consequence: str, *, kept: bool = False) -> CompiledPolicy:
    """The policy in `path`, or a UsageError that lists the problems after
    `invalid rules, <consequence>`. `kept`: the policy an earlier start compiled from
    the same files, if it kept one (enforcer/policy_cache.py: `sandgate run`)."""
    from sandgate.proxy.policy import PolicyError

    if kept:
        from sandgate.enforcer.policy_cache import load
    else:
        from sandgate.proxy.policy import load_policy as load
    try:
        return load([Path(path)])
    except PolicyError as e:
        raise UsageError(f"invalid rules, {consequence}:\n{e}") from None


METRICS_DEFAULT = "127.0.0.1:9464"
ADMIN_DEFAULT = "127.0.0.1:9465"


def add_gateway_options(parser: argparse.ArgumentParser, *, audit_help: str) -> None:
    """The gateway's options, with the same names for an embedded gateway (`sandgate run`)
    and the service (`sandgate gateway`)."""
    parser.add_argument(
        "--rules",
        default=str(DEFAULT_RULES),
        metavar="FILE",
        help="rule file (default: the shipped default rules)",
    )
    parser.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        metavar="IP",
        help="resolver the DNS filter forwards to (default: the host's resolv.conf)",
    )
    parser.add_argument(
        "--extra-ca",
        type=path_option,
        action="append",
        default=[],
        metavar="PEM",
        help="also trust this CA (PEM) in the sandboxes and for upstreams, e.g. a corporate CA",
    )
    # Both listen options default to None, which means their default address: a
    # `sandgate run` treats an address it was given (the default's too) as a must.
    parser.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help=f"serve Prometheus /metrics here (default {METRICS_DEFAULT}; 'off' for none). "
        "A port in use stops the start, but for `sandgate run` on the default address "
        "(a warning there)",
    )
    parser.add_argument("--audit-log", type=path_option, metavar="FILE", help=audit_help)
    parser.add_argument(
        "--admin-listen",
        default=None,
        metavar="HOST:PORT",
        help=f"serve the approvals page and JSON API here (default {ADMIN_DEFAULT}, or for "
        "`sandgate run` any free port if that one is taken; 'off' for none); never reachable "
        "from a sandbox. The token is written root-only next to the gateway's state; its path "
        "is printed at start",
    )
    parser.add_argument(
        "--admin-keys",
        type=Path,
        default=None,
        metavar="FILE",
        help="named keys for the approvals page and API, besides the generated token "
        "(default $SANDGATE_STATE_DIR/admin-keys; managed with `sandgate approvals keys`)",
    )
    parser.add_argument(
        "--approval-webhook",
        action="append",
        default=[],
        metavar="URL",
        help="POST each new pending approval here (repeatable), signed with "
        "--approval-webhook-secret (X-Sandgate-Signature: sha256=HMAC)",
    )
    parser.add_argument(
        "--approval-webhook-format",
        choices=("json", "slack"),
        default="json",
        help='json (default): a JSON document; slack: a Slack-compatible {"text": ...}',
    )
    parser.add_argument(
        "--approval-webhook-secret",
        type=Path,
        metavar="FILE",
        help="the HMAC-SHA256 key for the webhook's signature (the file's content)",
    )
    parser.add_argument(
        "--audit-budget",
        type=parse_size,
        metavar="SIZE",
        help="most disk the audit log and its rotated files may take (e.g. 20G); when it is "
        "reached nothing is deleted: the log counts as unwritable (default: the disk's size)",
    )
    parser.add_argument(
        "--on-audit-failure",
        choices=("block", "continue"),
        default="block",
        help="while the audit log cannot be written: refuse new connections, requests and "
        "upstream DNS queries (block, the "
        "default: reason audit_unavailable) or let them through and keep their events in "
        "memory (continue)",
    )
    parser.add_argument(
        "--audit-rate",
        type=_positive_rate,
        default=DEFAULT_RATE,
        metavar="R",
        help="audit lines a second per task before a flood is aggregated into "
        f"'N similar events suppressed' records (default {DEFAULT_RATE:g}; the metrics "
        "and the summary still count every event)",
    )
    parser.add_argument(
        "--audit-burst",
        type=_positive_count,
        default=DEFAULT_BURST,
        metavar="B",
        help=f"audit lines a task may write at once before --audit-rate applies (default {DEFAULT_BURST})",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log the gateway's steps on stderr"
    )


def audit_limits(args: argparse.Namespace) -> FloodLimits:
    """--audit-rate and --audit-burst as the audit rate limit's FloodLimits."""
    return FloodLimits(rate=args.audit_rate, burst=args.audit_burst)


def _positive_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _positive_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def gateway_settings(args: argparse.Namespace, log_prefix: str) -> tuple[str, int] | None:
    """Logging on stderr, the --extra-ca files checked, and --metrics-listen parsed
    (None: no /metrics). UsageError names the option."""
    import logging

    from sandgate.proxy.telemetry.metrics import parse_listen

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"{log_prefix}: %(levelname)s %(name)s: %(message)s",
    )
    for ca in args.extra_ca:
        if not ca.is_file():
            raise UsageError(f"--extra-ca {ca}: no such file")
    for upstream in args.dns_upstream:
        check_dns_upstream(upstream)
    text = METRICS_DEFAULT if args.metrics_listen is None else args.metrics_listen
    if text.lower() in ("off", "none", ""):
        return None
    try:
        return parse_listen(text)
    except ValueError as e:
        raise UsageError(f"--metrics-listen: {e}") from None


def read_extra_cas(paths: list[Path], writable: list[Path] = ()) -> list[str]:
    """The PEM text of each of `paths`, read once (what every sandbox's bundle is made
    of from then on), or UsageError unless each is a regular file of PEM certificates
    and nothing else: it is copied into every sandbox, so a private key in it would be
    handed to the task, and an empty or garbled one would trust nothing while the run
    looked configured. `writable`: where `sandgate run`'s task can write; a file found
    through there that lies elsewhere is not read (enforcer/sandbox/spec.read_for_task)."""
    return [_read_extra_ca(path, list(writable)) for path in paths]


def _read_extra_ca(path: Path, writable: list[Path]) -> str:
    from cryptography import x509
    from sandgate.enforcer.sandbox.spec import SandboxError, read_for_task

    try:
        data = read_for_task("--extra-ca", path, writable)
    except SandboxError as e:
        raise UsageError(str(e)) from None
    if b"PRIVATE KEY-----" in data:
        raise UsageError(
            f"--extra-ca {path}: holds a private key; pass the CA's certificate only "
            "(the file is copied into every sandbox)"
        )
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UsageError(
            f"--extra-ca {path}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)"
        ) from None
    return data.decode("ascii", errors="replace")


def check_dns_upstream(text: str) -> None:
    """UsageError unless `text` is an IP address: the DNS filter asks it on port 53, and
    a name or a garbled address would fail every query of every task."""
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"--dns-upstream {text!r}: not an IP address (e.g. 192.0.2.53)") from None


def admin_settings(args: argparse.Namespace):
    """--admin-listen and the --approval-webhook options, checked: an AdminOptions, or a
    UsageError naming the option."""
    from sandgate.enforcer.admin import AdminOptions
    from sandgate.proxy.telemetry.metrics import parse_listen

    listen = None
    text = ADMIN_DEFAULT if args.admin_listen is None else args.admin_listen
    if text.lower() not in ("off", "none", ""):
        try:
            listen = parse_listen(text)
        except ValueError as e:
            raise UsageError(f"--admin-listen: {e}") from None
    secret = b""
    if args.approval_webhook:
        from sandgate.proxy.approvals.webhook import check_url  # h11 with it: only if used

        for url in args.approval_webhook:
            try:
                check_url(url)
            except ValueError as e:
                raise UsageError(f"--approval-webhook: {e}") from None
        if args.approval_webhook_secret is None:
            raise UsageError(
                "--approval-webhook needs --approval-webhook-secret FILE (the HMAC key)"
            )
        from sandgate.proxy.policy.files import read_regular_file

        try:  # a FIFO in its place would hang the gateway's start
            secret = read_regular_file(args.approval_webhook_secret).strip()
        except OSError as e:
            raise UsageError(
                f"--approval-webhook-secret {args.approval_webhook_secret}: {e.strerror or e}"
            ) from None
        if len(secret) < 16:
            raise UsageError("--approval-webhook-secret: the key must be at least 16 bytes")
    elif args.approval_webhook_secret is not None:
        raise UsageError("--approval-webhook-secret: no --approval-webhook to sign for")
    options = AdminOptions(
        listen=listen,
        webhooks=list(args.approval_webhook),
        webhook_format=args.approval_webhook_format,
        webhook_secret=secret,
    )
    if args.admin_keys is not None:
        options.keys_file = args.admin_keys
    return options


def parse_size(text: str) -> int:
    """`20G`, `512M`, `64K` or a number of bytes -> bytes (argparse type)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].isalpha() else (text, "")
    try:
        size = int(float(number) * units.get(unit, 0 if unit else 1))
    except (ValueError, OverflowError):  # OverflowError: 1e999G, inf
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 20G, 512M or 4096, got {text!r}")
    return size
