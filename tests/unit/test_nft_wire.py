"""enforcer/nft_wire.py against the kernel, in a throwaway netns: a sandbox's table
sent as our own netlink messages is the table `nft -f` makes of
`nft.render_ruleset`'s text, rule by rule and expression by expression, and a batch
is one transaction."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = (
    pytest.mark.e2e
)  # root, `ip` and nftables: tests/conftest.py says when they are missing

SCRIPT = r"""
import json, re, subprocess, sys
from sandgate.enforcer import nft, nft_wire

def listing(table):
    # `nft -j`: what nft makes of the kernel's answer, names and handles aside
    text = json.dumps(nft._nft_json(["list", "table", "inet", table])).replace(table, "T")
    return re.sub(r'"handle": \d+', '"handle": 0', text)

def expressions(table):
    # each rule's expressions as the kernel holds them (`nft --debug=netlink`)
    out = subprocess.run(["nft", "--debug=netlink", "list", "table", "inet", table],
                         capture_output=True, text=True, check=True).stdout
    out = re.sub(r"__set\d+", "__set", out.replace(table, "T"))
    return re.sub(r"(?m)^(inet T \w+)( \d+)+$", r"\1", out)

def by_text(cfg, new):
    nft._run_nft(["-f", "-"], stdin=nft.render_ruleset(cfg, new=new))

configs = [
    dict(sandbox_ifaces="sgh-ab12", proxy_port=40000, dns_port=40001),
    dict(sandbox_ifaces="sgh-abcdefghijk", proxy_port=65535, dns_port=1, connection_rate=1,
         dns_rate=7),
    dict(sandbox_ifaces="sgh-*", proxy_port=3128, dns_port=53, connection_rate=5000,
         dns_rate=1000),
]
for n, fields in enumerate(configs):
    for new in (True, False):
        ours = nft.RulesetConfig(table=f"sandgate_w{n}{int(new)}", **fields)
        text = nft.RulesetConfig(table=f"sandgate_t{n}{int(new)}", **fields)
        by_text(text, new)
        nft.load_table(ours, new=new)
        assert listing(ours.table) == listing(text.table), (fields, new)
        assert expressions(ours.table) == expressions(text.table), (fields, new)
        assert "limit rate over" in expressions(ours.table)  # the comparison saw rules

# Replacing keeps nothing of the table before, also when its rates change.
old = nft.RulesetConfig(table="sandgate_r", sandbox_ifaces="sgh-r", proxy_port=1000, dns_port=1001)
nft.load_table(old, new=True)
new = nft.RulesetConfig(table="sandgate_r", sandbox_ifaces="sgh-r", proxy_port=2000, dns_port=2001,
                        connection_rate=9)
nft.load_table(new)
by_text(nft.RulesetConfig(table="sandgate_rt", sandbox_ifaces="sgh-r", proxy_port=2000,
                          dns_port=2001, connection_rate=9), False)
assert expressions("sandgate_r") == expressions("sandgate_rt")

# A table of that name exists: a new one is refused, and the one there is left as it was.
try:
    nft.load_table(nft.RulesetConfig(table="sandgate_r", sandbox_ifaces="sgh-x", proxy_port=7,
                                     dns_port=8), new=True)
    sys.exit("a new table replaced or merged into one that existed")
except nft.NftError as e:
    assert str(e) == "create table inet sandgate_r failed: File exists", e
assert expressions("sandgate_r") == expressions("sandgate_rt")

# One transaction: a batch whose last message the kernel refuses (a rule for a chain
# that does not exist) leaves nothing of it, neither a new table nor a replaced one.
bogus = nft_wire._message(nft_wire._NEWRULE, nft_wire._NLM_F_CREATE | nft_wire._NLM_F_APPEND,
                          nft_wire._str(1, "sandgate_r") + nft_wire._str(2, "nosuchchain"))
fresh = nft.RulesetConfig(table="sandgate_f", sandbox_ifaces="sgh-f", proxy_port=1, dns_port=2)
try:
    nft_wire.commit([*nft_wire.sandbox_table(fresh, nft.COUNTERS), bogus], 5)
    sys.exit("a refused batch was committed")
except nft_wire.WireError as e:
    assert e.errno == 2, e  # ENOENT: the chain
assert "sandgate_f" not in nft.list_tables()
replacing = [nft_wire.table_message("sandgate_r"), nft_wire.delete_table_message("sandgate_r"),
             *nft_wire.sandbox_table(old, nft.COUNTERS), bogus]
try:
    nft_wire.commit(replacing, 5)
    sys.exit("a refused batch was committed")
except nft_wire.WireError:
    pass
assert expressions("sandgate_r") == expressions("sandgate_rt"), "the refused batch changed it"

# The same socket goes on (the refused batches' other answers are not the next one's).
nft.load_table(fresh, new=True)
nft.delete_table("sandgate_r")
assert nft.list_tables("sandgate_f") == ["sandgate_f"] and "sandgate_r" not in nft.list_tables()
print("ok")
"""


def test_our_netlink_table_is_the_table_nft_makes_of_the_text() -> None:
    name = f"sgtwire{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        run = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", SCRIPT],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert run.returncode == 0 and run.stdout == "ok\n", run.stderr
