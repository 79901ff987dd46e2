"""sandgate's L7 side: the policy core, the mitmproxy addon, the DNS filter, telemetry.

Nothing in here imports `enforcer`; the pure policy core (`proxy.policy`) imports
neither mitmproxy nor does any I/O beyond reading rule files in its loader.
"""
