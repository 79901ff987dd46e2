"""sandgate's L3/L4 side: namespaces and veth (pyroute2), the nftables ruleset,
the task runner and the embedded gateway. May import `proxy`, never the reverse."""
