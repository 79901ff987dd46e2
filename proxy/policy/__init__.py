"""The pure policy core: rule files in, decisions out. No mitmproxy, no sockets."""

from .decide import decide
from .index import CompiledPolicy, CompiledProfile
from .load import DEFAULT_RULES, PolicyError, Problem, load_policy
from .model import ConnectFacts, Decision, NameFacts, RequestFacts, Rule
from .names import InvalidName, parse_domain, parse_ip
from .reasons import Reason, Verdict

__all__ = [
    "DEFAULT_RULES",
    "CompiledPolicy",
    "CompiledProfile",
    "ConnectFacts",
    "Decision",
    "InvalidName",
    "NameFacts",
    "PolicyError",
    "Problem",
    "Reason",
    "RequestFacts",
    "Rule",
    "Verdict",
    "decide",
    "load_policy",
    "parse_domain",
    "parse_ip",
]
