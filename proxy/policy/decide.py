"""decide(policy, facts) -> Decision: the whole policy, as one pure function.

Check order for a destination (connection or request), first answer wins:
 1. a deny rule that matches (name or address, port, and for requests method
    and path) -> DENY rule_deny. Deny wins over any allow, in any order.
 2. a private/loopback/link-local/CGNAT/multicast/unspecified address -> DENY
    private_address, unless an allow rule's CIDR lies inside that range.
 3. allow rules for the name whose address the gateway never resolved for that
    name, and no IP rule allows the address -> DENY spoofed_destination.
 4. an allow rule that matches -> ALLOW rule_allow (`inspect` set when any rule
    for this destination needs HTTP methods or paths to be checked).
 5. the profile's fallback (deny, ask or audit) answers; the reason says how
    near a rule came (port_not_allowed, method_not_allowed, path_not_allowed)
    or no_rule.
At connection time (no method yet) rules with methods/paths cannot deny, and may
allow only with inspection; the request decision then applies them.

A DNS question (NameFacts) is allowed when some allow rule names the name on a
port no plain deny rule takes away. Anything unexpected -> DENY internal_error.
"""

from __future__ import annotations

import logging

from .index import CompiledPolicy, CompiledProfile
from .model import ConnectFacts, Decision, Facts, NameFacts, RequestFacts, Rule, builtin_rule
from .names import parse_path, special_range
from .reasons import Reason, Verdict

PRIVATE_ADDRESS_RULE = builtin_rule("private-address")
SPOOFED_DESTINATION_RULE = builtin_rule("spoofed-destination")
UNKNOWN_PROFILE_RULE = builtin_rule("unknown-profile")
INTERNAL_ERROR_RULE = builtin_rule("internal-error")

log = logging.getLogger("sandgate.policy")

ALLOW, DENY = Verdict.ALLOW, Verdict.DENY


def decide(policy: CompiledPolicy, facts: Facts) -> Decision:
    profile = policy.profiles.get(facts.profile)
    if profile is None:
        return Decision(DENY, Reason.UNKNOWN_PROFILE, UNKNOWN_PROFILE_RULE,
                        detail=f"profile {facts.profile!r} is not defined in {', '.join(policy.files)}")
    try:
        if isinstance(facts, NameFacts):
            return _decide_name(profile, facts.name)
        return _decide_destination(profile, facts)
    except Exception as e:  # noqa: BLE001 - fail closed, and say so
        log.exception("policy decision failed for %r", facts)
        return Decision(DENY, Reason.INTERNAL_ERROR, INTERNAL_ERROR_RULE, detail=f"{type(e).__name__}: {e}")


def _decide_name(profile: CompiledProfile, name: str) -> Decision:
    rules = profile.rules_for_name(name)
    denied_ports: set[int] = set()
    for rule in rules:
        if rule.action is DENY and not rule.inspects:
            denied_ports |= rule.ports
    for rule in rules:
        if rule.action is ALLOW and rule.ports - denied_ports:
            return Decision(ALLOW, Reason.RULE_ALLOW, rule, detail=f"{name} is allowed by {rule.id}")
    for rule in rules:
        if rule.action is DENY and not rule.inspects:
            return Decision(DENY, Reason.RULE_DENY, rule, detail=f"{name} is denied by {rule.id}")
    return _fallback(profile, Reason.NO_RULE, f"no rule of profile {profile.name!r} names {name}")


def _decide_destination(profile: CompiledProfile, facts: ConnectFacts | RequestFacts) -> Decision:
    method = getattr(facts, "method", None)
    path = ""
    if method is not None:
        # Match what the server will act on: `/repos/../user` is `/user`, `delete` is
        # DELETE to a lenient server. Either way a deny rule must still see it.
        method, path = method.upper(), parse_path(facts.path)
    port, ip, name = facts.port, facts.ip, facts.name
    name_rules = profile.rules_for_name(name) if name else []
    ip_rules = profile.rules_for_ip(ip) if ip is not None else []
    target = _describe(facts)

    def applies(rule: Rule) -> bool:
        """Port matches and, once the request is known, method and path do too.
        Before it is known, a rule with methods/paths may allow (with inspection)
        but never deny."""
        if port not in rule.ports:
            return False
        if method is None:
            return rule.action is ALLOW or not rule.inspects
        return rule.matches_request(method, path)

    # 1. deny wins
    for rule in (*name_rules, *ip_rules):
        if rule.action is DENY and applies(rule):
            return Decision(DENY, Reason.RULE_DENY, rule, detail=f"{target} is denied by {rule.id}")

    # 2. private ranges, open only to a CIDR rule inside them
    kind = special_range(ip) if ip is not None else None
    if kind is not None:
        for rule in ip_rules:
            if rule.action is ALLOW and applies(rule) and profile.opens_special(rule, ip):
                return _allow([rule], name_rules + ip_rules, port, method, target)
        return Decision(DENY, Reason.PRIVATE_ADDRESS, PRIVATE_ADDRESS_RULE,
                        detail=f"{ip} is a {kind} address; only an allow rule with a CIDR inside that range can open it")

    # 3. name-based allows need the address to be one the gateway resolved for the name
    ip_allows = [r for r in ip_rules if r.action is ALLOW and applies(r)]
    name_allows = [r for r in name_rules if r.action is ALLOW and applies(r)]
    if name_allows and not ip_allows and facts.name_resolved_to_ip is False:
        return Decision(DENY, Reason.SPOOFED_DESTINATION, SPOOFED_DESTINATION_RULE,
                        detail=f"{name} never resolved to {ip} through the gateway's DNS")

    # 4. allow
    if ip_allows or name_allows:
        return _allow(ip_allows + name_allows, name_rules + ip_rules, port, method, target)

    # 5. fallback, saying how near a rule came
    for rule in (*name_rules, *ip_rules):
        if rule.action is not ALLOW:
            continue
        if port not in rule.ports:
            reason, why = Reason.PORT_NOT_ALLOWED, f"ports {sorted(rule.ports)}"
        elif method is not None and rule.methods is not None and method not in rule.methods:
            reason, why = Reason.METHOD_NOT_ALLOWED, f"methods {sorted(rule.methods)}"
        elif method is not None:
            reason, why = Reason.PATH_NOT_ALLOWED, f"paths {list(rule.paths or ())}"
        else:
            continue
        return _fallback(profile, reason, f"{target}: rule {_named(rule)} allows only {why}")
    return _fallback(profile, Reason.NO_RULE, f"no rule of profile {profile.name!r} allows {target}")


def _allow(allows: list[Rule], candidates: list[Rule], port: int, method: str | None, target: str) -> Decision:
    # Inspection is needed while some rule for this destination still depends on
    # the request; the rule reported is one that allows without conditions, if any.
    inspect = method is None and any(r.inspects and port in r.ports for r in candidates)
    best = next((r for r in allows if not r.inspects), allows[0])
    return Decision(ALLOW, Reason.RULE_ALLOW, best, inspect=inspect, detail=f"{target} is allowed by {best.id}")


def _fallback(profile: CompiledProfile, reason: Reason, detail: str) -> Decision:
    return Decision(profile.fallback.action, reason, profile.fallback, detail=detail)


def _named(rule: Rule) -> str:
    """A rule as a detail names it: its id, and where it was written if the id does
    not already say so (ids default to file:line)."""
    return rule.id if rule.id == rule.origin else f"{rule.id} ({rule.origin})"


def _describe(facts: ConnectFacts | RequestFacts) -> str:
    host = facts.name or (f"[{facts.ip}]" if facts.ip is not None and facts.ip.version == 6 else str(facts.ip))
    where = f"{host}:{facts.port}"
    method = getattr(facts, "method", None)
    return f"{method} {where}{facts.path}" if method else where
