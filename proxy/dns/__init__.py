"""The DNS filter: decision point 1 (DESIGN.md, "Decision points").

Sandboxes resolve through this filter only (nftables redirects their port-53 UDP and
TCP here). For each query it asks the policy whether the sandbox's profile may
reach the name at all; only allowed questions of an allowed type are forwarded to
the upstream resolver, and the upstream answer is edited before it reaches the
sandbox: addresses in private ranges are removed (DNS rebinding), HTTPS records lose
their ECH config (the gateway must see the real SNI), and whatever the gateway
answered is remembered as a binding (sandbox, name -> IP) for the connection checks.

One module per layer, as dnspython itself splits them (`dns.message` vs
`dns.asyncquery`):

- `query`: `check_query`, pure: wire bytes in, what to do and a `Decision` out.
- `answer`: `filter_answer`, pure: the upstream's answer in, the edited response,
  a `Decision` and the bindings out.
- `wire`: the fast path's reading and writing of the common query and answer as
  bytes (`query.quick_check` and `answer.filter_simple_answer` use it, and hand
  anything unusual to `check_query` / `filter_answer`).
- `bindings`: `DnsBindings`, the state the connection checks read (O(1), bounded).
- `upstream`: `UdpUpstream`, a few shared sockets to a resolver (random ids,
  rotated source ports).
- `server`: `DnsFilter`, the asyncio server: UDP and TCP listeners, upstream
  queries, one `Event` per query.

The pure modules import no socket, asyncio or mitmproxy; this file imports nothing,
so importing one of them does not drag the server in.

Imports. At module level only dnspython's enums and address helpers (`dns.rcode`,
`dns.flags`, `dns.rdatatype`, `dns.ipv4`, ...). Its message machinery (`dns.message`,
`dns.name`, `dns.rdata`, `dns.rrset`, the SVCB classes; with `dns._features` that
runs importlib.metadata: ~20 ms, a tenth of an embedded `sandgate run`'s start) is
imported inside the functions of the slow path that use it, when the first query
off the fast path (`wire`) arrives; a task whose queries all take the fast path,
or that asks none, never loads it (tests/unit/test_lazy_imports.py).

Response codes, and why. Each comes with the Decision its event reports; all but
the policy's own are DENY with a `builtin:dns-*` rule (an upstream failure too: the
sandbox got no address):

==============================================  =========  ========================
query                                           rcode      reason
==============================================  =========  ========================
over 4 KiB, or records besides one OPT          FORMERR    DNS_MALFORMED
unparsable, id readable                         FORMERR    DNS_MALFORMED
unparsable, < 2 bytes; or a response (QR set)   (dropped)  DNS_MALFORMED
opcode other than QUERY (NOTIFY, UPDATE, ...)   NOTIMP     DNS_QTYPE_NOT_ALLOWED
not exactly one question                        FORMERR    DNS_MALFORMED
EDNS version > 0                                BADVERS    DNS_MALFORMED
class other than IN (CH, HS, ANY)               REFUSED    DNS_QTYPE_NOT_ALLOWED
type other than A, AAAA, CNAME, HTTPS           REFUSED    DNS_QTYPE_NOT_ALLOWED
name not a host name (IP literal, NUL, ...)     NXDOMAIN   INVALID_NAME
name the profile may not reach                  NXDOMAIN   the policy's (RULE_DENY ..)
source address of no sandbox                    REFUSED    UNKNOWN_SANDBOX
upstream timeout, SERVFAIL, REFUSED, garbage    SERVFAIL   DNS_UPSTREAM_FAILURE
over the sandbox's dns_qps (queries a second)   REFUSED    SANDBOX_LIMIT
... and past dns_qps REFUSED a second           (dropped)  SANDBOX_LIMIT
too many of the sandbox's queries in flight     SERVFAIL   SANDBOX_LIMIT
some addresses in the answer were private       NOERROR,   DNS_REBINDING
                                                the rest
every address in the answer was private         NOERROR,   DNS_REBINDING
                                                no data
a bug in the filter                             SERVFAIL   INTERNAL_ERROR
==============================================  =========  ========================

- NOTIMP vs REFUSED: NOTIMP says "this server does not implement that kind of
  request" (RFC 1035), true for every opcode but QUERY. REFUSED says "will not, for
  policy reasons", which is what a TXT/MX/ANY/AXFR or CHAOS-class query meets: the
  type is understood but not served. Neither claims anything about the name.
- A disallowed *type* is not NXDOMAIN: NXDOMAIN means the name has no records of
  any type (RFC 8020), so a caching stub could then fail the A lookup of an allowed
  name because its TXT lookup was refused.
- A disallowed *name* is NXDOMAIN, so that clients fail fast with "unknown host"
  rather than retrying (as they do on SERVFAIL and, with several servers, REFUSED).
- Rebinding: when every address was removed the answer is NOERROR with no data and
  no SOA, i.e. "no usable record of this type", not cached (RFC 2308 §5). NXDOMAIN
  would be a lie about the name and could hide the other address family (a name
  with a public A and a loopback AAAA must still resolve over IPv4).
- `Verdict.ASK` from the policy is answered like DENY: a DNS client gives up after
"""
