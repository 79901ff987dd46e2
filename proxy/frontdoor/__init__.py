"""The front door: sandgate's own listener on the transparent port.

nftables redirects every TCP connection of a sandbox here. For each one:

1. `gate.on_connect` with the original destination (SO_ORIGINAL_DST);
2. peek at the first bytes (`MSG_PEEK`: nothing is consumed) until
   `gate.on_first_bytes` decides. A client that has sent nothing for `silence`
   seconds is asked about with `gate.on_silence` (server-speaks-first protocols
   on non-web ports); such a relay passes the server's bytes, and the client's
   only once the server has spoken: bytes the client sends first go to
   `gate.on_first_bytes` before any reaches the server. Nothing decidable within
   `first_bytes_timeout`, or a close, ends the connection undecided (`no_data`);
3. apply the outcome:
   - PASSTHROUGH: connect to the original destination and relay both directions
     (back-pressure each way, half-close passed on), counting bytes for the end
     event. The peeked bytes are still in the socket, so the upstream gets the
     stream from byte 0. mitmproxy never sees the connection. Until the handshake
     is past its plaintext phase a watch (`hello_watch`) sees both directions: a
     ClientHello the upstream could still read in plaintext (the second one after
     a TLS 1.3 HelloRetryRequest; one after a raw-TCP preamble such as
     PostgreSQL's SSLRequest or STARTTLS) is held whole and decided by the gate
     before it goes, or the connection is reset.
   - HTTP, INTERCEPT: the untouched socket goes to mitmproxy (`hand_off`), which
     adopts the gate's decision and decides each request.
   - REJECT: close (the gate emitted the denial).

The front door decides nothing itself: every decision and event is the gate's.
What it adds are the limits of a relay:
- an upstream that cannot be reached (refused, unreachable, no answer within
  `connect_timeout`): the client gets a reset, what it would have got from the
  server directly; the allow event stands, and `connection_end` (zero bytes) says
  "upstream connect failed: ..." in its detail;
- a relayed connection with no byte either way for `idle_timeout` (10 minutes,
  as mitmproxy's) is closed; its `connection_end` says so.

Why it looks the way it does: allowed pass-through is most connections, and the
cost per connection is the gateway's connection rate. mitmproxy's connection
handler, layers and hook dispatch cost about three times what this relay does; so
does asyncio's machinery per socket event (a transport per socket, a handle per
callback, an epoll_ctl for each reader added or removed). The front door keeps
its sockets in an epoll set, edge-triggered: each socket is added once and never
modified. In the gateway's processes the set is the asyncio loop's own (a loop made
by `poller.new_event_loop`: one epoll_wait per loop iteration); on any other loop
it is a set of its own, which the loop watches as one descriptor (`poller.Poller`).
One read buffer serves every relay; only bytes that a slow reader has not taken yet
are kept per connection.

Modules: `poller` (the edge-triggered epoll set), `relay` (moving the bytes of
allowed pass-through, with back-pressure, half-close and byte counts), `hello_watch`
(the plaintext phase of a pass-through, sans-io: which client bytes may go), `door`
(accept, peek, ask the gate, then relay, hand to mitmproxy, or close).
"""
