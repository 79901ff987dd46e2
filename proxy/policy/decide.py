"""decide(policy, facts) -> Decision: the whole policy, as one pure function.

Check order for a destination (connection or request), first answer wins:
 1. a deny rule that matches (name or address, port, and for requests method
    and path) -> DENY rule_deny. Deny wins over any allow, in any order.
 2. a private/loopback/link-local/CGNAT/multicast/unspecified address -> DENY
    private_address, unless an allow rule that applies has a CIDR inside that range.
 3. allow (or ask) rules for the name, or a fallback that asks or audits, where the
    gateway never resolved the name to the address, and no IP allow rule applies to
    the address -> DENY spoofed_destination.
 4. an allow rule that matches -> ALLOW rule_allow (`inspect` set when any rule
    for this destination needs HTTP methods or paths to be checked).
 5. an ask rule that matches -> ASK rule_ask: a human decides (proxy/approvals/).
    An allow written in advance needs no asking; a deny is never asked about. What
    an ask (or a fallback that asks or audits) lets through is inspected where a
    rule still depends on the request (`inspect`): no approval lifts a deny.
 6. the profile's fallback (deny, ask or audit) answers; the reason says how
    near a rule came (port_not_allowed, method_not_allowed, path_not_allowed)
    or no_rule.
At connection time (no method yet) rules with methods/paths cannot deny or ask, and
may allow only with inspection (an ask rule with methods/paths too: its requests
are asked); the request decision then applies them, to the
request's canonical path (names.parse_path) and upper-cased method.

A DNS question (NameFacts) is allowed when some allow rule names the name on a
port no plain deny rule takes away. Anything unexpected -> DENY internal_error.

Time is a fact: a rule whose `expires` instant is at or before `facts.now` is not
there (allow or deny). Until the profile's first expiry that costs one comparison.

A Decision's detail says why, not where: the destination is in the facts (and in
every event), so one Decision per outcome (allowed by rule R, no rule, a link-local
address, ...) is built once per profile and shared. That keeps a decision well
under a microsecond; only rare outcomes (spoofing, errors) are built per call.
"""

from __future__ import annotations

import logging

from .builtin import builtin_rule, deny
from .index import CompiledPolicy, CompiledProfile
from .model import ConnectFacts, Decision, Facts, NameFacts, RequestFacts, Rule
from .names import PathReadings, path_readings, special_range_of
from .reasons import Reason, Verdict

PRIVATE_ADDRESS_RULE = builtin_rule("private-address")
# A path rule applies, and the path has more readings than names.MOST_READING_CHARS holds.
_TOO_MANY_READINGS = deny(
    "ambiguous-path",
    detail="a path a server may read in too many ways (escapes, a '/' "
    "escaped, scripts, views, numbers, cuts together)",
)
SPOOFED_DESTINATION_RULE = builtin_rule("spoofed-destination")
UNKNOWN_PROFILE_RULE = builtin_rule("unknown-profile")
INTERNAL_ERROR_RULE = builtin_rule("internal-error")

log = logging.getLogger("sandgate.policy")

ALLOW, DENY, ASK = Verdict.ALLOW, Verdict.DENY, Verdict.ASK
_NO_RULES: tuple[Rule, ...] = ()


def decide(policy: CompiledPolicy, facts: Facts) -> Decision:
    profile = policy.profiles.get(facts.profile)
    if profile is None:
        return Decision(
            DENY,
            Reason.UNKNOWN_PROFILE,
            UNKNOWN_PROFILE_RULE,
            detail=f"profile {facts.profile!r} is not defined in {', '.join(policy.files)}",
        )
    try:
        if isinstance(facts, NameFacts):
            return _decide_name(profile, facts.name, facts.now)
        return _decide_destination(profile, facts)
    except Exception as e:  # noqa: BLE001 - fail closed, and say so
        log.exception("policy decision failed for %r", facts)
        return Decision(
            DENY, Reason.INTERNAL_ERROR, INTERNAL_ERROR_RULE, detail=f"{type(e).__name__}: {e}"
        )


def depends_on_request(policy: CompiledPolicy, facts: RequestFacts) -> bool:
    """Whether decide(policy, facts) may change with the request's method or path:
    some rule naming its destination (its name, its address) checks methods or
    paths, or the profile is unknown. False: every request with the same
    other facts (profile, port, address, name, whether the name resolved to it,
    WebSocket or not) gets the same Decision until `profile.first_expiry` (the gate
    reuses it for the next request on a keep-alive connection). Asked of the rules
    the lookups find, expired or not: a superset, so a False is never wrong."""
    profile = policy.profiles.get(facts.profile)
    if profile is None:
        return True
    ip, name = facts.ip, facts.name
    rules = profile.rules_for_name(name) if name is not None else _NO_RULES
    if ip is not None:
        rules = rules + profile.rules_for_address(int(ip), ip.version)
    return any(rule.inspects for rule in rules)


def _decide_name(profile: CompiledProfile, name: str, now: float | None) -> Decision:
    rules = profile.rules_for_name(name)
    if now is not None and now >= profile.first_expiry:
        rules = _live(rules, now)
    if not rules:
        return _shared(profile, Reason.NO_RULE, profile.fallback)
    denied_ports: set[int] = set()
    for rule in rules:
        if rule.action is DENY and not rule.inspects:
            denied_ports |= rule.ports
    for rule in rules:
        if rule.action is ALLOW and rule.ports - denied_ports:
            return _shared(profile, Reason.RULE_ALLOW, rule)
    for rule in rules:
        if rule.action is ASK and rule.ports - denied_ports:
            # An ask about requests (methods, paths) lets the name resolve: its
            # connections are allowed with inspection, and each request is asked.
            if rule.inspects:
                return _shared(profile, Reason.RULE_ALLOW, rule, inspect=True)
            return _shared(profile, Reason.RULE_ASK, rule)
    for rule in rules:
        if rule.action is DENY and not rule.inspects:
            return _shared(profile, Reason.RULE_DENY, rule)
    return _shared(profile, Reason.NO_RULE, profile.fallback)


def _decide_destination(profile: CompiledProfile, facts: ConnectFacts | RequestFacts) -> Decision:
    port, ip, name = facts.port, facts.ip, facts.name
    method = path = readings = None
    websocket = False
    if isinstance(facts, RequestFacts):
        # Match what the server will act on: `/repos/../user` is `/user`, `delete` is
        # DELETE to a lenient server. Either way a deny rule must still see it; and a
        # path a server may read otherwise (`%40`, `%23`) is decided in each reading.
        method, readings = facts.method.upper(), path_readings(facts.path)
        path = readings.canonical
        websocket = facts.websocket
    if ip is None:
        ip_rules, kind = _NO_RULES, None
    else:
        number, version = int(ip), ip.version
        ip_rules, kind = (
            profile.rules_for_address(number, version),
            special_range_of(number, version),
        )
    name_rules = profile.rules_for_name(name) if name is not None else _NO_RULES
    now = facts.now
    if now is not None and now >= profile.first_expiry:  # some rule has expired since the load
        ip_rules, name_rules = _live(ip_rules, now), _live(name_rules, now)
    if not name_rules and not ip_rules:  # the common miss, answered without the checks below
        if kind is not None:
            return _private(profile, kind)
        if facts.name_resolved_to_ip is False and profile.fallback.action is not DENY:
            return _spoofed_destination(name, ip)  # (3. below, for the fallback)
        # `rule.decision or _shared(...)`: the memo read inline on the hot paths (see _shared)
        return profile.fallback.decision or _shared(profile, Reason.NO_RULE, profile.fallback)

    # 1. deny wins. One pass (the hot path): a deny that applies answers at once;
    # the allows that apply are kept, address rules first.
    allows: list[Rule] = []
    asks: list[Rule] = []
    inspect = False  # some rule for this destination still depends on the request
    for rule in ip_rules + name_rules:
        if port not in rule.ports:
            continue
        if rule.inspects:
            if method is None:
                # Before the request such a rule may allow (with inspection), never deny.
                inspect = True
                if rule.action is DENY:
                    continue
            elif readings.too_many:
                return _TOO_MANY_READINGS
            elif not (
                rule.matches_request(method, path)
                if len(readings.denied) == 1
                else _matches_readings(rule, method, readings)
            ):
                continue
        if rule.action is DENY:
            return rule.decision or _shared(profile, Reason.RULE_DENY, rule)
        if websocket and not rule.websocket:
            continue  # a WebSocket upgrade needs a rule that says websocket: true
        if rule.action is ASK and (method is not None or not rule.inspects):
            asks.append(rule)
            continue
        allows.append(rule)

    # 2. private ranges, open only to an allow rule's CIDR inside them (an ask rule
    # for requests is in `allows` before the request, but opens nothing: its
    # requests could never be asked there)
    if kind is not None:
        for rule in allows:
            if rule.action is ALLOW and profile.opens_special(rule, ip):
                return _shared(profile, Reason.RULE_ALLOW, rule, inspect=inspect)
        return _private(profile, kind)

    # 3. name-based allows (and asks) need the address to be one the gateway resolved
    # for the name, unless an IP rule *allows* the address: one that only asks about
    # it must not let an allowed name through to it unasked. A fallback that asks or
    # audits answers for the name too (the approver is shown it, the audit log records
    # it), while the bytes would go to whatever address the task chose.
    if facts.name_resolved_to_ip is False and (
        _spoofed(allows + asks, ip_rules)
        or (not allows and not asks and profile.fallback.action is not DENY)
    ):
        return _spoofed_destination(name, ip)

    # 4. allow; the rule reported is one that allows without conditions, if any
    if allows:
        best = allows[0]
        if best.inspects:
            best = next((r for r in allows if not r.inspects), best)
        if not inspect:
            return best.decision or _shared(profile, Reason.RULE_ALLOW, best)
        return _shared(profile, Reason.RULE_ALLOW, best, inspect=True)

    # 5. ask a human. What a human lets through (an ask, or a fallback that asks or
    # audits) is inspected where a rule still depends on the request: a deny of some
    # methods or paths holds after any approval.
    if asks:
        if inspect:
            return _shared(profile, Reason.RULE_ASK, asks[0], inspect=True)
        return asks[0].decision or _shared(profile, Reason.RULE_ASK, asks[0])

    # 6. fallback, saying how near a rule came
    fallback = profile.fallback
    inspect = inspect and fallback.action is not DENY
    for rule in name_rules + ip_rules:
        if rule.action is not ALLOW:
            continue
        if port not in rule.ports:
            return _shared(profile, Reason.PORT_NOT_ALLOWED, fallback, inspect, near=rule)
        if method is not None and rule.methods is not None and method not in rule.methods:
            return _shared(profile, Reason.METHOD_NOT_ALLOWED, fallback, inspect, near=rule)
        if websocket and not rule.websocket and rule.matches_request(method, path):
            return _shared(profile, Reason.PROTOCOL_NOT_ALLOWED, fallback, inspect, near=rule)
        if method is not None:
            return _shared(profile, Reason.PATH_NOT_ALLOWED, fallback, inspect, near=rule)
    return _shared(profile, Reason.NO_RULE, fallback, inspect)


def _matches_readings(rule: Rule, method: str, readings: PathReadings) -> bool:
    """A rule's match of a path with several readings (names.path_readings): a deny
    takes it if it matches any, an allow or ask only if it matches each it must."""
    if rule.action is DENY:
        return any(rule.matches_request(method, path) for path in readings.denied)
    return all(rule.matches_request(method, path) for path in readings.allowed)


def _spoofed_destination(name: str | None, ip) -> Decision:
    return Decision(
        DENY,
        Reason.SPOOFED_DESTINATION,
        SPOOFED_DESTINATION_RULE,
        detail=f"{name} never resolved to {ip} through the gateway's DNS",
    )


def _spoofed(applying: list[Rule], ip_rules: tuple[Rule, ...]) -> bool:
    """Whether a rule that applies does so by the name alone, and no IP allow rule
    applies: the name was not resolved to the address, so only an IP rule that
    allows may vouch for it."""
    by_name = by_ip_allow = False
    for rule in applying:
        if any(rule is r for r in ip_rules):
            by_ip_allow = by_ip_allow or rule.action is ALLOW
        else:
            by_name = True
    return by_name and not by_ip_allow


def _live(rules: tuple[Rule, ...], now: float) -> tuple[Rule, ...]:
    """`rules` without those expired at `now`."""
    return tuple(rule for rule in rules if rule.live_at(now))


def _private(profile: CompiledProfile, kind: str) -> Decision:
    key = ("private", kind)
    found = profile.decisions.get(key)
    if found is None:
        found = profile.decisions[key] = Decision(
            DENY,
            Reason.PRIVATE_ADDRESS,
            PRIVATE_ADDRESS_RULE,
            detail=f"a {kind} address: only an allow rule with a CIDR inside that range can open it",
        )
    return found


def _shared(
    profile: CompiledProfile,
    reason: Reason,
    rule: Rule,
    inspect: bool = False,
    near: Rule | None = None,
) -> Decision:
    """The one Decision for this outcome, built on first use and then shared. The
    verdict is the rule's action (an allow or deny rule, or the fallback); `near` is
    the rule a fallback decision came close to (port, method or path not allowed).
    An ask rule that allows a connection for its requests to be asked gives ALLOW.

    Kept on the rule when the outcome depends on the rule alone (the hot paths),
    where finding it touches no memory the decision has not just read; else on the
    profile. A rule has one such outcome: rule_allow or rule_deny by its action, or
    no_rule for a fallback."""
    if near is None:
        found = rule.inspected_decision if inspect else rule.decision
        if found is None:
            found = Decision(
                ALLOW if reason is Reason.RULE_ALLOW else rule.action,
                reason,
                rule,
                inspect=inspect,
                detail=_explain(reason, rule, inspect, None),
            )
            # A memo, not a change: every field that says what the rule is stays as loaded.
            object.__setattr__(rule, "inspected_decision" if inspect else "decision", found)
        return found
    key = (reason, id(rule), id(near), inspect)
    found = profile.decisions.get(key)
    if found is None:
        found = profile.decisions[key] = Decision(
            rule.action, reason, rule, inspect=inspect, detail=_explain(reason, rule, inspect, near)
        )
    return found


def _explain(reason: Reason, rule: Rule, inspect: bool, near: Rule | None) -> str:
    if reason is Reason.RULE_ALLOW:
        return f"allowed by {_named(rule)}" + (
            "; a rule checks HTTP methods or paths, so requests are inspected" if inspect else ""
        )
    if reason is Reason.RULE_DENY:
        return f"denied by {_named(rule)}"
    if reason is Reason.RULE_ASK:
        return f"{_named(rule)} asks a human to approve this destination" + (
            "; a rule checks HTTP methods or paths, so its requests are inspected"
            if inspect
            else ""
        )
    answer = f"the fallback ({rule.action}, {rule.id}) answers"
    if inspect:
        answer += "; a rule checks HTTP methods or paths, so requests are inspected"
    if near is None:
        if inspect:
            return f"no rule allows this destination; {answer}"
        return f"no rule names this destination; {answer}"
    if reason is Reason.PORT_NOT_ALLOWED:
        allowed = f"ports {', '.join(map(str, sorted(near.ports)))}"
    elif reason is Reason.METHOD_NOT_ALLOWED:
        allowed = f"methods {', '.join(sorted(near.methods or ()))}"
    elif reason is Reason.PROTOCOL_NOT_ALLOWED:
        allowed = "plain HTTP requests, no WebSocket upgrade (it has no websocket: true)"
    else:
        allowed = f"paths {', '.join(near.paths or ())}"
    return f"rule {_named(near)} allows only {allowed}; {answer}"


def _named(rule: Rule) -> str:
    """A rule as a detail names it: its id, and where it was written if the id does
    not already say so (ids default to file:line)."""
    return rule.id if rule.id == rule.origin else f"{rule.id} ({rule.origin})"
