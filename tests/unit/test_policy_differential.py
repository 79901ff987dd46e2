"""decide() against docs/rules.md, differentially.

`Reference` below is a second, deliberately naive implementation of the semantics
that docs/rules.md ("Semantics", "Private ranges", "Expiry", "Presets, include and
extends") and docs/approvals.md (the check order with `ask`) describe, written from
the docs and not from decide.py: every rule is scanned, every range is a literal
from the docs. A seeded generator writes small rule files (a parent profile, a
child that `extends` it, a preset both may include), loads them with the real
loader and asks both implementations the same questions: connections (name, address,
port, whether the gateway's DNS gave that address), requests (method, path) and DNS
questions. Any disagreement is printed with the rule file, the facts and both answers.

Where the docs leave a choice open (which of several matching allow rules a decision
names; which of port/method/path a fallback blames when several rules fail
differently) the reference accepts any documented answer: it returns the set of
acceptable answers, not one.
"""

from __future__ import annotations

import calendar
import datetime
import ipaddress
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sandgate.proxy.policy import (
    ConnectFacts,
    NameFacts,
    RequestFacts,
    decide,
    load_policy,
)

# --- the universe the generator draws from ---------------------------------------

NAMES = ["example.test", "a.example.test", "b.a.example.test", "other.test", "x.other.test"]
DOMAIN_TARGETS = [
    "example.test",
    "*.example.test",
    "a.example.test",
    "*.a.example.test",
    "other.test",
    "*.other.test",
]

# docs/rules.md "Private ranges" and "Cloud-internal addresses": the range each
# address lies in (the network an opening CIDR must lie wholly inside), or None for
# a public address. Neighbours just outside each range are public.
ADDRESSES: dict[str, str | None] = {
    "203.0.113.7": None,
    "203.0.113.200": None,
    "8.8.8.8": None,
    "93.184.216.34": None,
    "172.15.255.255": None,
    "172.32.0.1": None,
    "100.63.255.255": None,
    "100.128.0.1": None,
    "169.253.255.255": None,
    "2606:4700::1111": None,
    "10.1.2.3": "10.0.0.0/8",
    "10.20.1.1": "10.0.0.0/8",
    "172.16.0.1": "172.16.0.0/12",
    "172.31.255.254": "172.16.0.0/12",
    "192.168.1.1": "192.168.0.0/16",
    "127.0.0.1": "127.0.0.0/8",
    "169.254.169.254": "169.254.0.0/16",
    "169.254.170.2": "169.254.0.0/16",
    "100.64.0.1": "100.64.0.0/10",
    "100.100.100.200": "100.64.0.0/10",
    "224.0.0.1": "224.0.0.0/4",
    "0.0.0.0": "0.0.0.0/8",
    "168.63.129.16": "168.63.129.16/32",
    "161.26.0.10": "161.26.0.0/16",
    "::1": "::1/128",
    "fe80::1": "fe80::/10",
    "fd00:ec2::254": "fc00::/7",
    "::": "::/128",
    "::ffff:10.1.2.3": "10.0.0.0/8",
    "::ffff:169.254.169.254": "169.254.0.0/16",
    "::ffff:8.8.8.8": None,
    "64:ff9b::a9fe:a9fe": "embedded",  # NAT64 of 169.254.169.254: never opened here
    "2002:a9fe:a9fe::": "embedded",  # 6to4 of 169.254.169.254
}
NETWORK_TARGETS = [
    "203.0.113.0/24",
    "203.0.113.0/28",
    "203.0.113.7",
    "8.8.8.0/24",
    "10.0.0.0/8",
    "10.20.0.0/16",
    "169.254.169.254",
    "0.0.0.0/0",
    "::/0",
    "2606:4700::/32",
    "172.16.0.0/12",
    "172.0.0.0/8",
    "100.64.0.0/10",
    "168.63.129.16",
    "::ffff:10.0.0.0/104",
]
PORTS = [80, 443, 22, 8080, 1, 65535]
RULE_PORTS = [None, None, None, [443], [22, 443], [8080], [80], [1, 65535]]
RULE_METHODS = [None, None, None, ["GET", "HEAD"], ["POST"]]
RULE_PATHS = [None, None, None, ["/repos/**"], ["/a/*"], ["/**/git-receive-pack"], ["/admin/**"]]
METHODS = ["GET", "HEAD", "POST", "PUT"]
REQUEST_PATHS = [
    "/",
    "/repos",
    "/repos/",
    "/repos/x",
    "/repos/x/y",
    "/Repos/x",
    "/a",
    "/a/b",
    "/a/b/c",
    "/git-receive-pack",
    "/x/git-receive-pack",
    "/o/r.git/git-receive-pack",
    "/admin",
    "/ADMIN/x",
    "/Admin",
    "/adminx",
]
# An instant rules may expire at, and clocks around it. Loads happen before all.
EXPIRY = calendar.timegm((2030, 1, 1, 0, 0, 0))
LOAD_NOW = float(EXPIRY - 400 * 86400)
DAY_END = datetime.datetime(2030, 1, 2).timestamp()  # `expires: 2030-01-01`, local time
CLOCKS = [None, EXPIRY - 1.0, float(EXPIRY), EXPIRY + 1.0, DAY_END - 1.0, DAY_END]
EXPIRES = [None] * 6 + ["2030-01-01T00:00:00Z", "2030-01-01"]


# --- the reference model (docs/rules.md) -------------------------------------------


@dataclass
class RefRule:
    id: str
    action: str  # allow | deny | ask
    domains: list[str]
    networks: list[str]
    ports: list[int] | None
    methods: list[str] | None
    paths: list[str] | None
    expires: str | None

    def yaml(self) -> str:
        targets = self.domains + self.networks
        lines = [f"      - {self.action}: [{', '.join(repr(t) for t in targets)}]"]
        lines.append(f"        id: {self.id}")
        for key in ("ports", "methods", "paths"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"        {key}: [{', '.join(repr(v) for v in value)}]")
        if self.expires:
            lines.append(f"        expires: {self.expires}")
        return "\n".join(lines)

    # -- matching, as the rule table and "Semantics" say --

    def live(self, now: float | None) -> bool:
        if self.expires is None or now is None:
            return True
        if "T" in self.expires:  # an instant: from then on it no longer matches
            return now < EXPIRY
        return now < DAY_END  # a date: the last day it applies, local time

    def names(self, name: str | None) -> bool:
        if name is None:
            return False
        for pattern in self.domains:
            if pattern.startswith("*."):
                if name.endswith("." + pattern[2:]):
                    return True
            elif name == pattern:
                return True
        return False

    def nets(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [as_v4(ipaddress.ip_network(n)) for n in self.networks]

    def covers_ip(self, ip: str | None) -> bool:
        if ip is None:
            return False
        address = as_v4(ipaddress.ip_address(ip))
        return any(address.version == n.version and address in n for n in self.nets())

    def covers_port(self, port: int) -> bool:
        return port in (self.ports if self.ports is not None else [80, 443])

    def covers_method(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def covers_path(self, path: str) -> bool:
        if self.paths is None:
            return True
        flags = re.IGNORECASE if self.action == "deny" else 0
        deny = self.action == "deny"
        return any(re.fullmatch(glob_regex(g, deny), path, flags) for g in self.paths)

    @property
    def inspects(self) -> bool:
        return self.methods is not None or self.paths is not None


def as_v4(value):
    """docs: an IPv4-mapped IPv6 address is its IPv4 address (also in a CIDR rule)."""
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        return value.ipv4_mapped
    if (
        isinstance(value, ipaddress.IPv6Network)
        and value.prefixlen >= 96
        and value.network_address.ipv4_mapped is not None
        and value.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96"))
    ):
        return ipaddress.IPv4Network(f"{value.network_address.ipv4_mapped}/{value.prefixlen - 96}")
    return value


def glob_regex(glob: str, deny: bool) -> str:
    """docs: `*` within one segment, `**` (a whole segment) crosses `/`; an allow's
    `/a/**` matches `/a/` and everything below, not `/a`; a deny glob matches what it
    names with or without a trailing `/`, and everything below it."""
    if deny and glob != "/":
        glob = glob.rstrip("/")
    segments = glob.split("/")[1:]
    out = ""
    for at, segment in enumerate(segments):
        if segment == "**":
            out += "/.*" if at == len(segments) - 1 and not deny else "(?:/.*)?"
        else:
            out += "/" + "[^/]*".join(re.escape(part) for part in segment.split("*"))
    return out + "(?:/.*)?" if deny and glob != "/" else out


@dataclass(frozen=True)
class Answer:
    verdict: str | frozenset[str]
    reasons: frozenset[str]
    rules: frozenset[str]
    inspect: frozenset[bool] = frozenset({False, True})


@dataclass
class Reference:
    profile: str
    rules: list[RefRule]
    fallback: str
    fallback_id: str

    def fallback_answer(
        self, reasons: set[str], inspect: frozenset[bool] = frozenset({False, True})
    ) -> Answer:
        return Answer(self.fallback, frozenset(reasons), frozenset({self.fallback_id}), inspect)

    def decide(
        self,
        *,
        port: int | None = None,
        ip: str | None = None,
        name: str | None = None,
        resolved: bool | None = None,
        method: str | None = None,
        path: str | None = None,
        now: float | None = None,
        dns: bool = False,
    ) -> Answer:
        rules = [r for r in self.rules if r.live(now)]
        if dns:
            return self.decide_name(rules, name)
        request = method is not None

        def targets(rule: RefRule) -> bool:
            return rule.names(name) or rule.covers_ip(ip)

        def applies(rule: RefRule) -> bool:
            if not (targets(rule) and rule.covers_port(port)):
                return False
            if request:
                return rule.covers_method(method) and rule.covers_path(path)
            # At connection time a rule with methods/paths may allow (with
            # inspection) but never deny.
            return not (rule.action == "deny" and rule.inspects)

        # 1. deny
        denies = {r.id for r in rules if r.action == "deny" and applies(r)}
        if denies:
            return Answer("deny", frozenset({"rule_deny"}), frozenset(denies))
        # An ask rule that checks methods or paths lets the connection through, with
        # inspection, for its requests to be asked (docs/approvals.md, a request ask).
        allows = [
            r
            for r in rules
            if applies(r)
            and (r.action == "allow" or (r.action == "ask" and not request and r.inspects))
        ]
        # 2. private address, unless an allow rule that applies opens it with a CIDR
        # inside its range ("a wider network does not open what it happens to contain").
        if ip is not None and ADDRESSES[ip] is not None:
            kind = ADDRESSES[ip]
            address = as_v4(ipaddress.ip_address(ip))
            opened = "/" in kind and any(
                net.version == address.version
                and net.subnet_of(as_v4(ipaddress.ip_network(kind)))
                and address in net
                for r in allows
                if r.action == "allow"
                for net in r.nets()
            )
            if not opened:
                return Answer(
                    "deny", frozenset({"private_address"}), frozenset({"builtin:private-address"})
                )
        asks = [r for r in rules if r.action == "ask" and applies(r) and r not in allows]
        # 3. spoofed: a name rule allows (or asks), or no rule does and the fallback
        # asks or audits (it answers for the name), DNS never gave this address, and
        # no IP rule allows it
        if resolved is False:
            by_name = [r for r in allows + asks if r.names(name) and not r.covers_ip(ip)]
            by_ip = [r for r in allows if r.covers_ip(ip) and r.action == "allow"]
            by_fallback = not allows and not asks and self.fallback != "deny"
            if (by_name and not by_ip) or by_fallback:
                return Answer(
                    "deny",
                    frozenset({"spoofed_destination"}),
                    frozenset({"builtin:spoofed-destination"}),
                )
        # 4. allow
        if request:
            inspect = frozenset({False, True})
        else:
            # inspect: yes when a rule that applies to the destination checks methods
            # or paths (an allow that needs it, or a deny only a request can show):
            # passing TLS through would skip that rule. So for what an ask or the
            # fallback lets through too: no approval lifts a deny.
            needs = any(r.inspects for r in rules if targets(r) and r.covers_port(port))
            inspect = frozenset({needs})
        if allows:
            return Answer(
                "allow", frozenset({"rule_allow"}), frozenset(r.id for r in allows), inspect
            )
        # 4b. ask (docs/approvals.md: deny > private/spoofed > allow > ask > fallback)
        if asks:
            return Answer("ask", frozenset({"rule_ask"}), frozenset(r.id for r in asks))
        # 5. the fallback: which check failed for the rules that named the destination
        named = [r for r in rules if r.action == "allow" and targets(r)]
        if not named:
            return self.fallback_answer({"no_rule"}, inspect)
        reasons = set()
        for r in named:
            if not r.covers_port(port):
                reasons.add("port_not_allowed")
            elif request and not r.covers_method(method):
                reasons.add("method_not_allowed")
            elif request and not r.covers_path(path):
                reasons.add("path_not_allowed")
        return self.fallback_answer(reasons or {"no_rule"}, inspect)

    def decide_name(self, rules: list[RefRule], name: str) -> Answer:
        """A DNS question: "the name must be one the profile may reach" (docs/rules.md
        "DNS questions"): some allow rule names it on a port that no plain deny rule
        (one without methods or paths) takes away; else an ask rule so; else a plain
        deny naming it denies; else the fallback."""
        naming = [r for r in rules if r.names(name)]
        denied: set[int] = set()
        for r in naming:
            if r.action == "deny" and not r.inspects:
                denied |= set(r.ports or [80, 443])

        def left(r: RefRule) -> bool:
            return bool(set(r.ports or [80, 443]) - denied)

        allows = {r.id for r in naming if r.action == "allow" and left(r)}
        if allows:
            return Answer("allow", frozenset({"rule_allow"}), frozenset(allows))
        asks = [r for r in naming if r.action == "ask" and left(r)]
        if asks:
            # docs/approvals.md: an ask about requests lets the name resolve; each
            # request is asked. Any other ask is answered from the placeholder pool.
            # Which one answers when both name it, the docs do not say.
            return Answer(
                frozenset("allow" if r.inspects else "ask" for r in asks),
                frozenset("rule_allow" if r.inspects else "rule_ask" for r in asks),
                frozenset(r.id for r in asks),
            )
        denies = {r.id for r in naming if r.action == "deny" and not r.inspects}
        if denies:
            return Answer("deny", frozenset({"rule_deny"}), frozenset(denies))
        return self.fallback_answer({"no_rule"})


# --- the generator ------------------------------------------------------------------


@dataclass
class Case:
    files: dict[str, str]
    references: dict[str, Reference]
    rules: list[RefRule] = field(default_factory=list)


def random_rule(rnd: random.Random, rule_id: str) -> RefRule:
    action = rnd.choice(["allow", "allow", "deny", "ask"])
    domains, networks = [], []
    for _ in range(rnd.choice([1, 1, 2])):
        if rnd.random() < 0.6:
            domains.append(rnd.choice(DOMAIN_TARGETS))
        else:
            networks.append(rnd.choice(NETWORK_TARGETS))
    return RefRule(
        id=rule_id,
        action=action,
        domains=sorted(set(domains)),
        networks=sorted(set(networks)),
        ports=rnd.choice(RULE_PORTS),
        methods=rnd.choice(RULE_METHODS),
        paths=rnd.choice(RULE_PATHS),
        expires=rnd.choice(EXPIRES),
    )


def random_case(rnd: random.Random, index: int) -> Case:
    counter = iter(range(1000))

    def rules(n: int) -> list[RefRule]:
        return [random_rule(rnd, f"r{index}-{next(counter)}") for _ in range(n)]

    preset = rules(rnd.randint(0, 2))
    base_rules = rules(rnd.randint(0, 3))
    child_rules = rules(rnd.randint(0, 3))
    base_fallback = rnd.choice([None, "deny", "ask", "audit"])
    child_fallback = rnd.choice([None, None, "deny", "ask", "audit"])
    where = rnd.choice(["base", "child", "both", "none"])

    def profile(name: str, fallback, own: list[RefRule], include: bool, extends=None) -> str:
        lines = [f"  {name}:"]
        if extends:
            lines.append(f"    extends: {extends}")
        if fallback:
            lines.append(f"    fallback: {fallback}")
        if include:
            lines.append("    include: [preset.yaml]")
        lines.append("    rules:" if own else "    rules: []")
        lines.extend(r.yaml() for r in own)
        return "\n".join(lines)

    base_inc = where in ("base", "both")
    child_inc = where in ("child", "both")
    main = "\n".join(
        [
            "version: 1",
            "profiles:",
            profile("base", base_fallback, base_rules, base_inc),
            profile("child", child_fallback, child_rules, child_inc, extends="base"),
        ]
    )
    preset_text = "version: 1\nrules:\n" + "\n".join(r.yaml() for r in preset) if preset else ""
    files = {
        "main.yaml": main + "\n",
        "preset.yaml": (preset_text or "version: 1\nrules: []") + "\n",
    }
    base_all = base_rules + (preset if base_inc else [])
    child_all = base_all + (preset if child_inc and not base_inc else []) + child_rules
    base_ref = Reference("base", base_all, base_fallback or "deny", "base:fallback")
    child_ref = Reference(
        "child",
        child_all,
        child_fallback or base_fallback or "deny",
        "child:fallback" if child_fallback else "base:fallback",
    )
    return Case(files, {"base": base_ref, "child": child_ref}, preset + base_rules + child_rules)


def random_question(rnd: random.Random) -> dict:
    kind = rnd.choice(["connect", "connect", "request", "request", "dns"])
    now = rnd.choice(CLOCKS)
    if kind == "dns":
        return {"dns": True, "name": rnd.choice(NAMES), "now": now}
    name = rnd.choice(NAMES + [None])
    ip = rnd.choice(list(ADDRESSES) + [None]) if name else rnd.choice(list(ADDRESSES))
    resolved = rnd.choice([None, True, False]) if (name and ip) else None
    question = {"port": rnd.choice(PORTS), "ip": ip, "name": name, "resolved": resolved, "now": now}
    if kind == "request":
        question["method"] = rnd.choice(METHODS)
        question["path"] = rnd.choice(REQUEST_PATHS)
    return question


def ask_gateway(policy, profile: str, q: dict):
    ip = ipaddress.ip_address(q["ip"]) if q.get("ip") else None
    if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # the adapters pass names.parse_ip's canonical form
    if q.get("dns"):
        return decide(policy, NameFacts(profile=profile, name=q["name"], now=q["now"]))
    common = dict(
        profile=profile,
        port=q["port"],
        ip=ip,
        name=q["name"],
        name_resolved_to_ip=q["resolved"],
        now=q["now"],
    )
    if "method" in q:
        return decide(policy, RequestFacts(method=q["method"], path=q["path"], **common))
    return decide(policy, ConnectFacts(**common))


def disagreement(expected: Answer | None, got) -> str | None:
    if expected is None:
        return None
    problems = []
    verdicts = expected.verdict
    if str(got.verdict) not in ({verdicts} if isinstance(verdicts, str) else verdicts):
        problems.append(f"verdict {got.verdict} (docs: {expected.verdict})")
    if str(got.reason) not in expected.reasons:
        problems.append(f"reason {got.reason} (docs: {sorted(expected.reasons)})")
    if got.rule_id not in expected.rules:
        problems.append(f"rule {got.rule_id} (docs: {sorted(expected.rules)})")
    if got.allowed and got.inspect not in expected.inspect:
        problems.append(f"inspect {got.inspect} (docs: {sorted(expected.inspect)})")
    return "; ".join(problems) or None


def run_differential(tmp_path: Path, seed: int, cases: int, questions: int) -> list[str]:
    rnd = random.Random(seed)
    found: list[str] = []
    for index in range(cases):
        case = random_case(rnd, index)
        folder = tmp_path / f"c{index}"
        folder.mkdir()
        for filename, text in case.files.items():
            (folder / filename).write_text(text)
        policy = load_policy(folder / "main.yaml", now=LOAD_NOW)
        for _ in range(questions):
            profile = rnd.choice(["base", "child"])
            q = random_question(rnd)
            expected = case.references[profile].decide(**q)
            got = ask_gateway(policy, profile, q)
            problem = disagreement(expected, got)
            if problem:
                found.append(
                    f"{problem}\n  profile {profile} {q}\n{case.files['main.yaml']}"
                    f"preset:\n{case.files['preset.yaml']}"
                )
    return found


@pytest.mark.parametrize("seed", [20261123, 1, 2])
def test_decide_agrees_with_the_documented_semantics(tmp_path, seed):
    found = run_differential(tmp_path, seed=seed, cases=300, questions=40)
    assert not found, f"{len(found)} disagreements; first:\n" + "\n".join(found[:3])


# --- what the generator found, kept as named cases ----------------------------------

FOUND = """\
version: 1
profiles:
  default:
    rules:
      - allow: github.test
        id: allow-name
      - ask: 8.8.8.0/24
        id: ask-range
      - ask: [asked.test, 9.9.9.0/24]
        id: ask-both
      - ask: 169.254.169.254
        id: ask-metadata-requests
        methods: [GET]
      - allow: 203.0.113.0/24
        id: allow-range
"""


@pytest.mark.parametrize(
    "ip, name, resolved, method, expected",
    [
        # An ask rule for an address used to vouch for an allowed name at an address
        # the gateway never resolved it to: SNI github.test to 8.8.8.8 passed unasked.
        pytest.param(
            "8.8.8.8",
            "github.test",
            False,
            None,
            ("deny", "spoofed_destination", "builtin:spoofed-destination"),
            id="ask-ip-rule-does-not-vouch-for-an-allowed-name",
        ),
        pytest.param(
            "8.8.8.8",
            "github.test",
            False,
            "GET",
            ("deny", "spoofed_destination", "builtin:spoofed-destination"),
            id="ask-ip-rule-does-not-vouch-for-an-allowed-name-request",
        ),
        pytest.param(
            "8.8.8.8",
            "github.test",
            True,
            None,
            ("allow", "rule_allow", "allow-name"),
            id="resolved-allowed-name-at-an-asked-address",
        ),
        pytest.param(
            "8.8.8.8",
            None,
            None,
            None,
            ("ask", "rule_ask", "ask-range"),
            id="asked-address-without-a-name-is-asked",
        ),
        pytest.param(
            "203.0.113.9",
            "github.test",
            False,
            None,
            ("allow", "rule_allow", "allow-range"),
            id="ip-allow-rule-vouches-for-any-name",
        ),
        pytest.param(
            "9.9.9.9",
            "asked.test",
            False,
            None,
            ("ask", "rule_ask", "ask-both"),
            id="ask-rule-naming-the-address-itself-asks",
        ),
        # An ask about requests to a private address let the connection through
        # (allow, inspect) although every request on it was then denied.
        pytest.param(
            "169.254.169.254",
            None,
            None,
            None,
            ("deny", "private_address", "builtin:private-address"),
            id="request-ask-does-not-open-a-private-address",
        ),
        pytest.param(
            "169.254.169.254",
            None,
            None,
            "GET",
            ("deny", "private_address", "builtin:private-address"),
            id="request-ask-does-not-open-a-private-address-request",
        ),
    ],
)
def test_found_cases(tmp_path, ip, name, resolved, method, expected):
    path = tmp_path / "found.yaml"
    path.write_text(FOUND)
    policy = load_policy(path)
    q = {"port": 443, "ip": ip, "name": name, "resolved": resolved, "now": None}
    if method:
        q.update(method=method, path="/latest")
    got = ask_gateway(policy, "default", q)
    assert (str(got.verdict), str(got.reason), got.rule_id) == expected


# --- one name, every layer: rules file, DNS question, SNI, Host, `sandgate check`, AskKey


# Each spelling, and the one canonical name every layer must read it as (None: no
# layer may read it as a name). A DNS question carries labels as bytes, so the
# Unicode spellings reach the DNS layer as raw UTF-8 and must be refused there.
SPELLINGS = [
    ("github.test", "github.test"),
    ("GitHub.TEST", "github.test"),
    ("github.test.", "github.test"),
    ("Bücher.example.com", "xn--bcher-kva.example.com"),
    ("xn--bcher-kva.example.com", "xn--bcher-kva.example.com"),
    ("XN--BCHER-KVA.example.com", "xn--bcher-kva.example.com"),
    ("ＧＩＴＨＵＢ.test", "github.test"),
    ("github\u3002test", "github.test"),
    ("github\uff0etest", "github.test"),
    ("github\uff61test", "github.test"),
    ("gіthub.test", "xn--gthub-n2e.test"),  # Cyrillic і: another name
    # IDNA 2003 and 2008 read these as two different names: refused in Unicode form,
    # accepted as the punycode clients that keep them send.
    ("faß.example.com", None),
    ("ςa.example.com", None),
    ("a\u200db.example.com", None),
    ("xn--fa-hia.example.com", "xn--fa-hia.example.com"),
    ("fass.example.com", "fass.example.com"),
    ("evil\\.com.github.test", None),
    ("github..test", None),
    (".github.test", None),
    ("a" * 64 + ".test", None),
    (".".join(["a" * 63] * 4) + ".test", None),  # 261 characters
    ("github%2etest", None),
    ("github.test%00", None),
    ("github .test", None),
    ("xn--ab.test", None),
    ("example.123", None),
    ("example.0x1f", None),
]
IP_SPELLINGS = [
    ("127.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("10.1", "10.0.0.1"),
    ("::ffff:127.0.0.1", "127.0.0.1"),
    ("[::ffff:169.254.169.254]", "169.254.169.254"),
    ("[::1]", "::1"),
    ("fe80::1%eth0", None),
    ("[fe80::1%25eth0]", None),
]
# Every canonical name allowed, so that the DNS layers forward what they read.
SPELLING_RULES = (
    "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: "
    + repr(sorted({c for _, c in SPELLINGS if c and not c.endswith(".example.com")}))
    + '\n      - allow: "*.example.com"\n'
)


def _wire_question(spelling: str) -> bytes:
    """A client's A query for `spelling`, its labels as raw UTF-8 bytes, with
    `\\.` inside a label as a dot in that label (what dnspython escapes so)."""
    import struct

    labels = [
        part.replace("\0", ".") for part in spelling.replace("\\.", "\0").rstrip(".").split(".")
    ]
    qname = b"".join(bytes([len(b)]) + b for b in (label.encode() for label in labels)) + b"\0"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def _layers(spelling: str, policy) -> dict[str, str | None]:
    """What each layer reads `spelling` as: a canonical name, `ip:ADDRESS`, or None."""
    from sandgate.enforcer.cli.check import parse_target
    from sandgate.enforcer.cli.common import UsageError
    from sandgate.proxy import gate
    from sandgate.proxy.approvals.pending import AskKey
    from sandgate.proxy.dns.query import check_query, quick_check
    from sandgate.proxy.policy.names import InvalidName, parse_domain, parse_domain_pattern

    read: dict[str, str | None] = {}
    try:
        read["rules"] = str(parse_domain_pattern(spelling))
    except InvalidName:
        read["rules"] = None

    def decide_name(profile, name):
        return decide(policy, NameFacts(profile, name))

    if len(spelling.encode()) < 250 and all(len(p.encode()) < 64 for p in spelling.split(".")):
        wire = _wire_question(spelling)
        full = check_query(wire, "default", decide_name)
        read["dns"] = full.name if full.action == "forward" else None
        quick = quick_check(wire, "default", decide_name)
        if quick is not None:
            read["dns-quick"] = quick.name if quick.forward else None
    try:
        read["sni"] = parse_domain(spelling) if spelling.isascii() else None
    except InvalidName:
        read["sni"] = None
    host = gate._read_host(spelling)
    read["host"] = f"ip:{host.ip}" if host.ip is not None else host.name
    try:
        facts = parse_target(spelling, None)
        read["check"] = f"ip:{facts.ip}" if facts.ip is not None else facts.name
    except UsageError:
        read["check"] = None
    try:
        key = AskKey.make(
            task_id="t", sandbox="s", profile="default", name=spelling, port=443, protocol="tls"
        )
        read["ask"] = (
            key.name if ":" not in key.name and not key.name[-1].isdigit() else f"ip:{key.name}"
        )
    except ValueError:
        read["ask"] = None
    return read


@pytest.mark.parametrize("spelling, canonical", SPELLINGS, ids=[repr(s)[:40] for s, _ in SPELLINGS])
def test_every_layer_reads_a_name_spelling_as_one_name(tmp_path, spelling, canonical):
    path = tmp_path / "p.yaml"
    path.write_text(SPELLING_RULES)
    policy = load_policy(path)
    read = _layers(spelling, policy)
    # DNS carries bytes (Unicode arrives as raw UTF-8) and an SNI is ASCII
    # (RFC 6066): both refuse a Unicode spelling that the text layers map.
    bytes_only = not spelling.isascii()
    for layer, name in read.items():
        expected = None if layer in ("dns", "dns-quick", "sni") and bytes_only else canonical
        assert name == expected, f"{layer} reads {spelling!r} as {name!r}, not {expected!r}"


@pytest.mark.parametrize("spelling, address", IP_SPELLINGS, ids=[s for s, _ in IP_SPELLINGS])
def test_every_layer_reads_an_address_spelling_as_one_address(tmp_path, spelling, address):
    from sandgate.enforcer.cli.check import parse_target
    from sandgate.enforcer.cli.common import UsageError
    from sandgate.proxy import gate
    from sandgate.proxy.policy.names import InvalidName, parse_domain

    # Never a domain, in any layer.
    with pytest.raises(InvalidName):
        parse_domain(spelling)
    host = gate._read_host(spelling)
    assert host.name is None
    assert (str(host.ip) if host.ip else None) == address
    try:
        facts = parse_target(spelling, None)
        assert facts.name is None and str(facts.ip) == address
    except UsageError:
        assert address is None
