"""What a path rule matches (docs/rules.md "What a path rule matches"), with no I/O:
each request head goes through check_head (refused: ambiguous) and then decide (the
canonical path against anchored globs). The spellings are those of
tests/e2e/test_path_differential.py, which sends them to real servers; here each
gets its exact outcome, and the method-override check its named cases."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sandgate.proxy.policy import Decision, RequestFacts, decide, load_policy
from sandgate.proxy.policy.names import parse_path
from sandgate.proxy.policy.request_head import (
    RequestHead,
    check_head,
    path_problem,
    with_overrides,
)

RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: api.allowed.test
        methods: [GET, HEAD, POST]
        paths: ["/public/**"]
        id: public
      - deny: api.allowed.test
        paths: ["/public/secret", "/public/keys/", "/public/admin/**"]
        id: no-secret
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text(RULES)
    return load_policy([rules])


def outcome(policy, target: str, method: str = "GET", *fields: tuple[str, str]) -> str:
    """The reason the gateway gives `METHOD target` to api.allowed.test:443."""
    head = RequestHead(
        method.encode(),
        target.encode("utf-8"),
        ((b"host", b"api.allowed.test"), *((n.encode(), v.encode()) for n, v in fields)),
    )
    checked = check_head(head, 443)
    if isinstance(checked, Decision):
        return str(checked.reason)
    facts = RequestFacts(
        profile="default", port=443, method=checked.method, path=checked.path,
        name="api.allowed.test",
    )  # fmt: skip

    def decide_as(other):
        name = other.host.rpartition(":")[0] if ":" in other.host else other.host
        return decide(
            policy,
            dataclasses.replace(facts, method=other.method, path=other.path, name=name.lower()),
        )

    return str(with_overrides(decide(policy, facts), checked, decide_as).reason)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param("/public/ok", "rule_allow", id="control"),
        pytest.param("/public/ok?_method=GET", "rule_allow", id="control-own-method"),
        # percent-encoding: unreserved escapes are decoded before matching
        pytest.param("/public/%73ecret", "rule_deny", id="escaped-letter"),
        pytest.param("/public/%53ECRET", "rule_deny", id="escaped-upper"),
        # an escaped '/': one name (npm's `@scope%2fname`) or a segment break (nginx)
        pytest.param("/public%2Fsecret", "rule_deny", id="escaped-slash"),
        pytest.param("/public%2fsecret", "rule_deny", id="escaped-slash-lower"),
        pytest.param("/public/a%2Fb", "rule_allow", id="escaped-slash-allowed-both-ways"),
        pytest.param("/public%2Fok", "path_not_allowed", id="escaped-slash-allowed-one-way"),
        pytest.param("/public/ok%2F..%2Fsecret", "ambiguous_path", id="escaped-slash-dot-dot"),
        pytest.param("/public/%2Fsecret", "ambiguous_path", id="escaped-slash-empty"),
        pytest.param("/public/%2e%2e/private/key", "ambiguous_path", id="escaped-dots"),
        # An escape once decoded: a proxy that decodes before passing on (Apache's
        # mod_rewrite [P,NE]) has its server read /public/secret.
        pytest.param("/public/%2573ecret", "ambiguous_path", id="double-escape"),
        pytest.param("/public/%25%37%33ecret", "ambiguous_path", id="double-escape-spread"),
        pytest.param("/public/100%25", "rule_allow", id="escaped-percent"),
        pytest.param("/public/%c0%ae%c0%ae/private/key", "ambiguous_path", id="overlong"),
        # dot segments, slashes, backslashes, parameters
        pytest.param("/public/./secret", "ambiguous_path", id="dot"),
        pytest.param("/public/../private/key", "ambiguous_path", id="dot-dot"),
        pytest.param("/public/..", "ambiguous_path", id="dot-dot-last"),
        pytest.param("//public/secret", "ambiguous_path", id="leading-slashes"),
        pytest.param("/public//secret", "ambiguous_path", id="inner-slashes"),
        pytest.param("/public\\secret", "ambiguous_path", id="backslash"),
        pytest.param("/public/%5csecret", "ambiguous_path", id="escaped-backslash"),
        pytest.param("/public/secret;x", "ambiguous_path", id="params"),
        pytest.param("/public/..;/private/key", "ambiguous_path", id="params-dots"),
        # trailing characters: a deny holds with or without the trailing '/', and below
        pytest.param("/public/secret/", "rule_deny", id="trailing-slash"),
        pytest.param("/public/keys", "rule_deny", id="deny-glob-with-slash-without"),
        pytest.param("/public/keys/", "rule_deny", id="deny-glob-with-slash-with"),
        pytest.param("/public/admin", "rule_deny", id="deny-subtree-itself"),
        pytest.param("/public/admin/", "rule_deny", id="deny-subtree-slash"),
        pytest.param("/public/secrets", "rule_allow", id="deny-is-not-a-prefix"),
        # Apache, PHP and CGI servers run /public/secret with the path info /x
        pytest.param("/public/secret/x", "rule_deny", id="deny-holds-below"),
        pytest.param("/public/secret/x/y", "rule_deny", id="deny-holds-further-below"),
        pytest.param("/public/secret?", "rule_deny", id="empty-query"),
        pytest.param("/public/secret#", "ambiguous_path", id="fragment"),
        pytest.param("/public/secret%00", "ambiguous_path", id="escaped-nul"),
        # Spring MVC to 5.2 serves /p as /p.*, Rails as /p(.:format): a suffix is the same
        pytest.param("/public/secret.", "rule_deny", id="trailing-dot"),
        pytest.param("/public/secret.json", "rule_deny", id="format-suffix"),
        pytest.param("/public/secretx", "rule_allow", id="deny-is-no-prefix-of-a-name"),
        # absolute form, case, Unicode, asterisk
        pytest.param("http://api.allowed.test/public/secret", "rule_deny", id="absolute"),
        pytest.param("http://evil.test/public/ok", "host_mismatch", id="absolute-other"),
        pytest.param("/PUBLIC/SECRET", "rule_deny", id="upper-deny-wins"),
        pytest.param("/PUBLIC/ok", "path_not_allowed", id="upper-outside-allow"),
        pytest.param("/public/SECRET", "rule_deny", id="upper-inside-allow"),
        # Unicode case and compatibility forms, as Django's (?i) and Fastify read them
        pytest.param("/public/%C5%BFecret", "rule_deny", id="long-s-is-s"),
        pytest.param("/public/%EF%BD%93ecret", "rule_deny", id="fullwidth-s-is-s"),
        pytest.param("/public/%EF%BC%8Fsecret", "ambiguous_path", id="fullwidth-solidus"),
        pytest.param("/public/%E2%80%A5/secret", "ambiguous_path", id="two-dot-leader"),
        pytest.param("/public/s%C3%A9cret", "rule_allow", id="e-acute-stays-itself"),
        pytest.param("/public/sécret", "ambiguous_path", id="raw-non-ascii"),
        pytest.param("*", "ambiguous_path", id="asterisk"),
    ],
)
def test_each_spelling_of_a_denied_path(policy, target, expected):
    assert outcome(policy, target) == expected


@pytest.mark.parametrize(
    ("method", "target", "fields", "expected"),
    [
        pytest.param("POST", "/public/ok", [("X-HTTP-Method-Override", "DELETE")], "ambiguous_method", id="override"),
        pytest.param("GET", "/public/ok", [("x-http-method", "delete")], "ambiguous_method", id="x-http-method"),
        pytest.param("POST", "/public/ok", [("X-Method-Override", "PUT")], "ambiguous_method", id="x-method-override"),
        pytest.param("POST", "/public/ok", [("X-HTTP-Method-Override", " post ")], "rule_allow", id="names-itself"),
        pytest.param("POST", "/public/ok", [("X-HTTP-Method-Override", "POST"), ("X-HTTP-Method-Override", "DELETE")], "ambiguous_method", id="twice"),
        pytest.param("POST", "/public/ok?_method=DELETE", [], "ambiguous_method", id="query"),
        pytest.param("POST", "/public/ok?a=1&_method=delete", [], "ambiguous_method", id="query-lower"),
        pytest.param("POST", "/public/ok?a=1;_method=DELETE", [], "ambiguous_method", id="query-semicolon"),
        pytest.param("POST", "/public/ok?%5Fmethod=DELETE", [], "ambiguous_method", id="query-escaped-key"),
        pytest.param("POST", "/public/ok?_%6Dethod=DELETE", [], "ambiguous_method", id="query-escaped-letter"),
        pytest.param("POST", "/public/ok?_METHOD=DELETE", [], "ambiguous_method", id="query-upper-key"),
        pytest.param("POST", "/public/ok?_method=%44ELETE", [], "ambiguous_method", id="query-escaped-value"),
        pytest.param("POST", "/public/ok?_method=post", [], "rule_allow", id="query-names-itself"),
        pytest.param("POST", "/public/ok?_methods=DELETE&x_method=PUT", [], "rule_allow", id="other-keys"),
        # PHP's spellings: a query name's leading spaces dropped, ' ' and '.' read as
        # '_', `[]` an array of that name; a header's '_' and '.' read as '-'
        pytest.param("POST", "/public/ok?.method=DELETE", [], "ambiguous_method", id="php-query-dot"),
        pytest.param("POST", "/public/ok?%20.method=DELETE", [], "ambiguous_method", id="php-query-space"),
        pytest.param("POST", "/public/ok?+_method=DELETE", [], "ambiguous_method", id="php-query-plus"),
        pytest.param("POST", "/public/ok?_method[]=DELETE", [], "ambiguous_method", id="php-query-array"),
        pytest.param("POST", "/public/ok?_method%00x=DELETE", [], "ambiguous_method", id="php-query-nul"),
        pytest.param("POST", "/public/ok?[methods=DELETE&x.method=PUT", [], "rule_allow", id="php-other-keys"),
        # other frameworks' names (session 52)
        pytest.param("POST", "/public/ok?x-tunneled-method=DELETE", [], "ambiguous_method", id="plack-tunneled"),
        pytest.param("POST", "/public/ok?x%2Dtunneled-method=delete", [], "ambiguous_method", id="plack-tunneled-escaped"),
        pytest.param("POST", "/public/ok?X-HTTP-Method-Override=DELETE", [], "ambiguous_method", id="play-query"),
        pytest.param("POST", "/public/ok?_HttpMethod=DELETE", [], "ambiguous_method", id="salesforce"),
        pytest.param("POST", "/public/ok?method=DELETE", [], "ambiguous_method", id="restlet"),
        pytest.param("GET", "/public/ok?method=artist.getInfo", [], "rule_allow", id="an-api-call-named-method"),
        # Node's qs (Express 4's req.query) and Rack take a bracketed name as the name
        pytest.param("POST", "/public/ok?[_method]=DELETE", [], "ambiguous_method", id="qs-bracketed"),
        pytest.param("POST", "/public/ok?%5B_method%5D=DELETE", [], "ambiguous_method", id="qs-bracketed-escaped"),
        pytest.param("POST", "/public/ok?[_method]x=DELETE", [], "ambiguous_method", id="qs-bracketed-more"),
        pytest.param("POST", "/public/ok?a[_method]=DELETE", [], "rule_allow", id="qs-nested-other"),
        pytest.param("POST", "/public/ok", [("X_HTTP_METHOD_OVERRIDE", "DELETE")], "ambiguous_method", id="php-header-underscores"),
        pytest.param("POST", "/public/ok", [("X.HTTP.Method.Override", "DELETE")], "ambiguous_method", id="php-header-dots"),
        pytest.param("POST", "/public/ok", [("Content_Length", "5")], "rule_allow", id="php-other-header"),
        pytest.param("DELETE", "/public/ok", [], "method_not_allowed", id="plain-delete"),
        # an override naming a method the rules allow there too: the server may run either
        pytest.param("POST", "/public/ok", [("X-HTTP-Method-Override", "GET")], "rule_allow", id="allowed-too"),
        pytest.param("GET", "/public/ok?_method=head", [], "rule_allow", id="query-allowed-too"),
        pytest.param("POST", "/public/secret", [("X-HTTP-Method-Override", "GET")], "rule_deny", id="denied-anyway"),
        # not one method: Express's method-override runs the first of a list, JavaScript's
        # trim() drops Unicode spaces, toUpperCase() folds the Kelvin sign to K
        pytest.param("POST", "/public/ok", [("X-HTTP-Method-Override", "DELETE, POST")], "ambiguous_method", id="list"),
        pytest.param("POST", "/public/ok", [("X-HTTP-Method-Override", "GET,DELETE")], "ambiguous_method", id="list-allowed-first"),
        pytest.param("POST", "/public/ok", [("X-HTTP-Method-Override", "DELETE\xa0")], "ambiguous_method", id="nbsp"),
        pytest.param("POST", "/public/ok", [("X-HTTP-Method-Override", "GET DELETE")], "ambiguous_method", id="two-words"),
        pytest.param("POST", "/public/ok?_method=LOC%E2%84%AA", [], "ambiguous_method", id="query-kelvin"),
        pytest.param("POST", "/public/ok?_method=GET%2CDELETE", [], "ambiguous_method", id="query-list"),
    ],
)  # fmt: skip
def test_a_method_override_is_refused_where_its_method_is_not_allowed(
    policy, method, target, fields, expected
):
    assert outcome(policy, target, method, *fields) == expected


DENY_SOME_METHODS = """\
version: 1
profiles:
  default:
    rules:
      - allow: api.allowed.test
        id: any-method
      - deny: api.allowed.test
        methods: [DELETE]
        id: no-delete
"""


HEAD_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: api.allowed.test
        methods: [GET, POST]
        id: get-post
      - deny: api.allowed.test
        methods: [GET]
        paths: ["/admin/**"]
        id: no-admin-get
      - deny: api.allowed.test
        methods: [HEAD]
        paths: ["/probe"]
        id: no-probe-head
"""


def test_a_deny_of_get_takes_head(tmp_path):
    """Every framework a red team tried (session 51) runs the GET handler for a HEAD:
    a deny of GET is a deny of HEAD too. A deny of HEAD alone takes no GET, and an
    allow of GET takes no HEAD."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(HEAD_RULES)
    policy = load_policy([rules])
    assert outcome(policy, "/admin/x", "GET") == "rule_deny"
    assert outcome(policy, "/admin/x", "HEAD") == "rule_deny"
    assert outcome(policy, "/admin/x", "POST") == "rule_allow"
    assert outcome(policy, "/probe", "GET") == "rule_allow"
    assert outcome(policy, "/probe", "HEAD") == "rule_deny"
    assert outcome(policy, "/other", "HEAD") == "method_not_allowed"
    assert policy.profiles["default"].rules[1].methods == frozenset({"GET"})  # as written


@pytest.mark.parametrize("value", ["DELETE, POST", "DELETE,x", "DELETE\xa0", "delete\t,post"])
def test_an_override_that_is_not_one_method_is_refused_where_a_rule_denies_some(tmp_path, value):
    """A deny of some methods did not match `DELETE, POST` decided as one method;
    Express's method-override runs DELETE (the first of the list, trimmed)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(DENY_SOME_METHODS)
    policy = load_policy([rules])
    assert (
        outcome(policy, "/item/1", "POST", ("X-HTTP-Method-Override", value)) == "ambiguous_method"
    )
    assert outcome(policy, "/item/1", "POST", ("X-HTTP-Method-Override", "PUT")) == "rule_allow"
    assert outcome(policy, "/item/1", "DELETE") == "rule_deny"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param([("X-Original-URL", "/public/secret")], "ambiguous_path", id="original-url"),
        pytest.param([("X-Rewrite-URL", "/private/key?x=1")], "ambiguous_path", id="rewrite-url"),
        pytest.param([("X_Original_URL", "/private/key")], "ambiguous_path", id="cgi-spelling"),
        pytest.param([("X-Original-URL", "/public/../private/key")], "ambiguous_path", id="ambiguous-itself"),
        pytest.param([("X-Original-URL", "http://api.allowed.test/private/key")], "ambiguous_path", id="absolute"),
        pytest.param([("X-Original-URL", "/public/ok?a=1")], "rule_allow", id="names-itself"),
        pytest.param([("X-Original-URL", "/public/other")], "rule_allow", id="allowed-too"),
        pytest.param([("X-Forwarded-Host", "secret.test")], "host_mismatch", id="forwarded-host"),
        pytest.param([("X-Forwarded-Host", "api.allowed.test, secret.test")], "host_mismatch", id="forwarded-host-list"),
        pytest.param([("X-Host", "secret.test")], "host_mismatch", id="x-host"),
        pytest.param([("X-Original-Host", "secret.test")], "host_mismatch", id="x-original-host"),
        pytest.param([("X-Forwarded-Server", "secret.test")], "host_mismatch", id="x-forwarded-server"),
        pytest.param([("X-HTTP-Host-Override", "secret.test")], "host_mismatch", id="host-override"),
        pytest.param([("X_Forwarded_Host", "secret.test")], "host_mismatch", id="host-cgi-spelling"),
        pytest.param([("Forwarded", 'for=10.0.0.1;host="secret.test", proto=https')], "host_mismatch", id="forwarded"),
        pytest.param([("Forwarded", "for=10.0.0.1;proto=https")], "rule_allow", id="forwarded-without-host"),
        pytest.param([("X-Forwarded-Host", "api.allowed.test")], "rule_allow", id="host-names-itself"),
        # Goes on as sent: spelled otherwise than decided, a router may read another host.
        pytest.param([("X-Forwarded-Host", "API.allowed.test")], "host_mismatch", id="host-itself-spelled-otherwise"),
        # A default port written out: a router that matches the name reads another host.
        pytest.param([("X-Forwarded-Host", "api.allowed.test:443")], "host_mismatch", id="host-itself-with-default-port"),
        pytest.param([("X-Forwarded-Host", "")], "rule_allow", id="host-empty"),
        pytest.param([("X-Forwarded-Host", "api.allowed.test:9999")], "host_mismatch", id="host-other-port"),
        # WebDAV: the path a COPY or MOVE writes, an absolute URI (or a path)
        pytest.param([("Destination", "https://api.allowed.test/private/key")], "ambiguous_path", id="destination"),
        pytest.param([("Destination", "/public/secret")], "ambiguous_path", id="destination-path"),
        pytest.param([("Destination", "https://evil.test/public/ok")], "host_mismatch", id="destination-other-host"),
        pytest.param([("Destination", "https://API.allowed.test/public/copy")], "rule_allow", id="destination-allowed"),
        # where the application is mounted: the server routes by the rest of the path
        pytest.param([("SCRIPT_NAME", "/public/x")], "ambiguous_path", id="script-name"),
        pytest.param([("script-name", "c/")], "ambiguous_path", id="script-name-dashes"),
        pytest.param([("PATH_INFO", "/private/key")], "ambiguous_path", id="path-info"),
        pytest.param([("X-Script-Name", "/public")], "ambiguous_path", id="x-script-name"),
        pytest.param([("X_Forwarded_Prefix", "/public")], "ambiguous_path", id="forwarded-prefix"),
        pytest.param([("SCRIPT_NAME", "/")], "rule_allow", id="mounted-at-the-root"),
        pytest.param([("SCRIPT_NAME", "")], "rule_allow", id="mount-empty"),
    ],
)  # fmt: skip
def test_a_path_or_host_override_is_refused_where_what_it_names_is_not_allowed(
    policy, fields, expected
):
    """Servers that honour X-Original-URL or X-Forwarded-Host serve the path or host
    they name: the request is decided for it too."""
    assert outcome(policy, "/public/ok", "GET", *fields) == expected


# Paths the head check lets through: what parse_path decides on is itself canonical.
_PATH = st.lists(
    st.sampled_from(["a", "B", "%41", "%2d", "%7e", "%C3%A4", "x.y", "-", "~", "%25"]),
    min_size=1, max_size=6,
).map(lambda segments: "/" + "/".join(segments))  # fmt: skip


@given(path=_PATH, slash=st.booleans())
def test_the_canonical_form_is_canonical(path, slash):
    path += "/" if slash else ""
    assert path_problem(path) is None
    canonical = parse_path(path)
    assert parse_path(canonical) == canonical
    assert path_problem(canonical) is None
    assert canonical.endswith("/") == slash


@given(path=_PATH)
def test_a_deny_glob_names_its_path_and_everything_below(policy, path):
    deny = next(r for r in policy.profiles["default"].rules if r.id == "no-secret")
    assert deny.matches_request("GET", "/public/secret")
    assert deny.matches_request("GET", "/public/secret/")
    assert deny.matches_request("GET", "/public/ADMIN" + parse_path(path))
    assert deny.matches_request("GET", parse_path("/public/secret" + path))
    assert not deny.matches_request("GET", parse_path("/public/secrets" + path))
