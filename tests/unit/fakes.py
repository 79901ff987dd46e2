"""Stand-ins shared by unit tests."""

from proxy.telemetry.metrics import Metrics


def wired_metrics(firewall: dict[str, int] | None = None) -> Metrics:
    """A Metrics object with every watcher attached to fakes, so that it exports
    every series it can (for checking names against docs, dashboard and alerts)."""

    class Policy:
        hash, rule_count = "h", 1

    class Audit:
        written = lost = write_errors = queued = 0

    class Gateway:
        policy, registry = Policy(), []
        addon = type("Addon", (), {"connections": {}})()

    metrics = Metrics()
    metrics.watch_gateway(Gateway())
    metrics.watch_audit(Audit())
    metrics.watch_firewall(lambda: dict(firewall or {}))
    return metrics
