"""Events, audit log, metrics: what the gateway tells the security team."""
