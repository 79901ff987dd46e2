"""A red team (session 50), the decisions behind
tests/e2e/test_reserved_escapes.py and test_decoding_proxies.py,
with no I/O: each head through check_head, then decide, as the gateway does."""

from __future__ import annotations

import pytest
from sandgate.proxy.policy import Decision, RequestFacts, decide, load_policy
from sandgate.proxy.policy.names import MOST_READING_CHARS, path_readings
from sandgate.proxy.policy.request_head import RequestHead, check_head

RULES = """\
version: 1
profiles:
  default:
    rules:
      - deny: allowed.test
        id: no-internal
        paths: ["/@internal/**", "/v1/secrets/*:access", "/$batch", "/admin/secret.txt"]
      - allow: allowed.test
        id: site
        methods: [GET]
        paths: ["/**"]
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text(RULES)
    return load_policy([rules])


def outcome(policy, target: str, method: str = "GET") -> str:
    head = RequestHead(method.encode(), target.encode(), ((b"host", b"allowed.test"),))
    checked = check_head(head, 443)
    if isinstance(checked, Decision):
        return str(checked.reason)
    facts = RequestFacts(
        profile="default", port=443, method=method, path=checked.path, name="allowed.test"
    )
    return str(decide(policy, facts).reason)


@pytest.mark.parametrize(
    "plain, escaped",
    [
        ("/@internal/pkg", "/%40internal/pkg"),  # nginx, Werkzeug, http.server decode %40
        ("/v1/secrets/db:access", "/v1/secrets/db%3Aaccess"),
        ("/v1/secrets/db:access", "/v1/secrets/db%3aaccess"),
        ("/$batch", "/%24batch"),
    ],
)
def test_an_escaped_reserved_character_is_denied_as_written(policy, plain, escaped):
    assert outcome(policy, plain) == "rule_deny"
    assert outcome(policy, escaped) != "rule_allow"


@pytest.mark.parametrize(
    "target",
    [
        "/admin/secret.txt%23",
        "/admin/secret.txt%23x",
        "/admin/secret.txt%3F",
        "/admin/secret.txt%3Fx=1",
    ],
)
def test_an_escaped_hash_or_question_mark_does_not_cut_past_a_deny(policy, target):
    """A proxy that decodes the path once and passes it on (nginx `proxy_pass
    http://app$uri`, Apache `RewriteRule ... [P,NE]`) makes these `/admin/secret.txt`."""
    assert outcome(policy, "/admin/secret.txt") == "rule_deny"
    assert outcome(policy, target) != "rule_allow"


def test_a_suffix_allow_takes_only_what_ends_so_after_a_decoding_proxy(tmp_path):
    """`/**/*.tar.gz` takes `/admin/secret.txt%23.tar.gz`, which nginx's `$uri`
    proxies as `/admin/secret.txt#.tar.gz` (the application serves the .txt)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
        '        methods: [GET]\n        paths: ["/**/*.tar.gz"]\n'
    )
    policy = load_policy([rules])
    assert outcome(policy, "/admin/secret.txt") == "path_not_allowed"
    assert outcome(policy, "/admin/secret.txt%23.tar.gz") != "rule_allow"


def test_a_deny_written_escaped_takes_the_raw_character_too(tmp_path):
    """The other direction: a deny of `/c%2B%2B/**` (canonical: `%2B` stays an
    escape) does not take `/c++/x`, which every decoding server reads alike."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n      - deny: allowed.test\n"
        '        paths: ["/c%2B%2B/**"]\n      - allow: allowed.test\n'
        '        methods: [GET]\n        paths: ["/**"]\n'
    )
    policy = load_policy([rules])
    assert outcome(policy, "/c%2B%2B/x") == "rule_deny"
    assert outcome(policy, "/c++/x") != "rule_allow"


def test_a_glob_written_escaped_reads_as_a_decoding_server_reads_it(tmp_path):
    """A deny written escaped takes the character plain too (a server that decodes
    before routing serves both alike); an allow written escaped still takes what it
    names as written (its decoded reading is not asked of an allow)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        '      - deny: allowed.test\n        paths: ["/c%2B%2B/secret"]\n'
        '      - allow: allowed.test\n        methods: [GET]\n        paths: ["/c%2B%2B/**"]\n'
    )
    policy = load_policy([rules])
    assert outcome(policy, "/c%2B%2B/x") == "rule_allow"
    assert outcome(policy, "/c%2b%2b/x") == "rule_allow"
    for denied in ("/c%2B%2B/secret", "/c++/secret", "/c%2B+/secret/x"):
        assert outcome(policy, denied) == "rule_deny", denied
    assert outcome(policy, "/c++/x") == "path_not_allowed"


@pytest.mark.parametrize(
    "target, expected",
    [
        ("/wiki/C%23", "rule_allow"),  # an honest escaped '#': allowed where its cut is
        ("/public/a%3Fb", "rule_allow"),
        ("/%3Fpublic/x", "path_not_allowed"),  # cut: `/`, which the allow does not take
    ],
)
def test_an_allow_takes_a_path_only_where_it_takes_its_cut_too(tmp_path, target, expected):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
        '        methods: [GET]\n        paths: ["/wiki/**", "/public/**"]\n'
    )
    assert outcome(load_policy([rules]), target) == expected


def test_a_rule_path_outside_ascii_is_refused_naming_its_escaped_spelling(tmp_path):
    """Requests carry non-ASCII escaped (raw, it is refused): a deny of `/café/**` as
    written matched nothing, and nginx served `/caf%C3%A9/menu` (a red team, session
    50). Refused at load, with the spelling that matches."""
    from sandgate.proxy.policy import PolicyError

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n      - deny: allowed.test\n"
        '        paths: ["/café/**"]\n',
        encoding="utf-8",
    )
    with pytest.raises(PolicyError) as refused:
        load_policy([rules])
    assert "write '/caf%C3%A9/**'" in str(refused.value)


@pytest.mark.parametrize(
    "target",
    [
        "/caf%C3%A9/menu",
        "/caf%c3%a9/menu",
        "/%E6%96%87%E6%A1%A3/secret",
        "/wiki/Sp%C3%A9cial:Export",
    ],
)
def test_a_deny_of_a_non_ascii_path_written_escaped_takes_it(tmp_path, target):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n      - deny: allowed.test\n"
        '        paths: ["/caf%C3%A9/**", "/%E6%96%87%E6%A1%A3/secret", "/wiki/Sp%C3%A9cial:*"]\n'
        '      - allow: allowed.test\n        methods: [GET]\n        paths: ["/**"]\n'
    )
    assert outcome(load_policy([rules]), target) == "rule_deny"


def test_a_path_override_is_decided_in_its_readings(tmp_path):
    """X-Original-URL naming `/%40internal/x` is decided as `/@internal/x` too."""
    from sandgate.proxy.policy.request_head import with_overrides

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n      - deny: allowed.test\n"
        '        paths: ["/@internal/**"]\n      - allow: allowed.test\n'
        '        methods: [GET]\n        paths: ["/**"]\n'
    )
    policy = load_policy([rules])
    head = RequestHead(
        b"GET", b"/public", ((b"host", b"allowed.test"), (b"x-original-url", b"/%40internal/x"))
    )
    checked = check_head(head, 443)

    def decide_as(h):
        facts = RequestFacts(
            profile="default", port=443, method=h.method, path=h.path, name="allowed.test"
        )
        return decide(policy, facts)

    assert not with_overrides(decide_as(checked), checked, decide_as).allowed


def test_a_path_of_escaped_percents_is_decoded_once_not_once_an_escape(monkeypatch):
    """The `%2561` check decoded the whole path at every `%25`: a task's 15,000 of
    them held the gateway's loop two minutes. Once a path."""
    from sandgate.proxy.policy import request_head

    calls = []
    real = request_head.unquote
    monkeypatch.setattr(request_head, "unquote", lambda text: calls.append(1) or real(text))
    assert request_head.path_problem("/" + "%25" * 5000) is None
    assert request_head.path_problem("/" + "%25" * 5000 + "61") is not None
    assert len(calls) == 2


FOLDING_RULES = """\
version: 1
profiles:
  default:
    rules:
      - deny: allowed.test
        paths: ["/admin/**", "/public/keys", "/caf%C3%A9/**", "/%E2%84%AAelvin"]
      - allow: allowed.test
        methods: [GET]
        paths: ["/**"]
"""


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # read as ASCII by case: Python's re.IGNORECASE (Django), JavaScript's
        # toLowerCase (Fastify), Java's equalsIgnoreCase (a red team, session 51)
        pytest.param("/adm%C4%B1n/", "rule_deny", id="dotless-i"),
        pytest.param("/adm%C4%B0n/users", "rule_deny", id="dotted-capital-i"),
        pytest.param("/public/%E2%84%AAeys", "rule_deny", id="kelvin-sign"),
        pytest.param("/public/%E2%84%AAeys.json", "rule_deny", id="kelvin-sign-suffix"),
        # ... or by compatibility form (NFKC)
        pytest.param("/%EF%BD%81dmin/x", "rule_deny", id="fullwidth-a"),
        pytest.param("/public/%EF%BD%8Beys", "rule_deny", id="fullwidth-k"),
        # non-ASCII case both ways, the glob's and the path's
        pytest.param("/CAF%C3%89/menu", "rule_deny", id="upper-e-acute"),
        pytest.param("/kelvin", "rule_deny", id="glob-read-as-ascii-too"),
        # a character read as a path's structure is refused, not matched
        pytest.param("/public/%EF%BC%8F../admin", "ambiguous_path", id="fullwidth-solidus"),
        pytest.param("/public/%E2%80%A5/admin", "ambiguous_path", id="two-dot-leader"),
        pytest.param("/public/%EF%BC%85", "ambiguous_path", id="fullwidth-percent"),
        pytest.param("/public/keys%EF%B9%96x", "rule_deny", id="small-question-mark-cuts"),
        pytest.param("/public/%E2%80%A6", "rule_allow", id="ellipsis-is-a-name"),
        pytest.param("/public/.%EF%BC%8E/admin", "ambiguous_path", id="dots-make-a-dot-segment"),
        # digits: int() and Long.parseLong read every script's
        pytest.param("/adm%D9%A4n/", "rule_allow", id="digit-is-no-letter"),
        # what no server reads as ASCII passes
        pytest.param("/%D0%B0dmin/", "rule_allow", id="cyrillic-a"),
        pytest.param("/wiki/%C4%B0stanbul", "rule_allow", id="turkish-name"),
        pytest.param("/%E6%96%87%E6%A1%A3/admin", "rule_allow", id="cjk"),
    ],
)
def test_a_deny_reads_a_path_as_a_server_folding_case_reads_it(tmp_path, target, expected):
    rules = tmp_path / "rules.yaml"
    rules.write_text(FOLDING_RULES)
    assert outcome(load_policy([rules]), target) == expected


NUMBER_AND_SCRIPT_RULES = """\
version: 1
profiles:
  default:
    rules:
      - deny: allowed.test
        paths: ["/projects/42/**", "/admin/**", "/v1*2/x"]
      - allow: allowed.test
        methods: [GET]
        paths: ["/**"]
"""


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # every spelling of the number a server's parser reads as 42 (a red team, session 51)
        pytest.param("/projects/042", "rule_deny", id="leading-zero"),
        pytest.param("/projects/+42", "rule_deny", id="plus"),
        pytest.param("/projects/%2042", "rule_deny", id="space"),
        pytest.param("/projects/42-my-project", "rule_deny", id="rails-to-i"),
        pytest.param("/projects/%D9%A4%D9%A2", "rule_deny", id="arabic-indic"),
        pytest.param("/projects/%E0%A5%AA%E0%A5%A8/x", "rule_deny", id="devanagari"),
        pytest.param("/projects/4_2", "rule_deny", id="python-underscore"),
        pytest.param("/projects/0x2a", "rule_deny", id="hex"),
        pytest.param("/projects/%232A", "rule_deny", id="spring-hash-hex"),
        pytest.param("/projects/4%202", "rule_deny", id="spring-strips-blanks"),
        pytest.param("/projects/0b101010", "rule_deny", id="js-binary"),
        pytest.param("/projects/0o52", "rule_deny", id="js-octal"),
        pytest.param("/projects/%E2%80%A842", "rule_deny", id="unicode-blank"),
        pytest.param("/projects/42_", "rule_deny", id="to-i-stops"),
        # a decimal parser's (Number(), parseFloat(), PHP, MySQL, float()): session 52
        pytest.param("/projects/4.2e1", "rule_deny", id="exponent"),
        pytest.param("/projects/4.2E%2B1/x", "rule_deny", id="exponent-plus"),
        pytest.param("/projects/420e-1", "rule_deny", id="negative-exponent"),
        pytest.param("/projects/.42e2", "rule_deny", id="leading-point"),
        pytest.param(
            "/projects/0.0000000000000000000000000000000042e34", "rule_deny", id="tiny-mantissa"
        ),
        pytest.param("/projects/41.99999999999999999", "rule_deny", id="rounded-up"),
        pytest.param("/projects/%2B4.2e1abc", "rule_deny", id="parsefloat-prefix"),
        pytest.param("/projects/4_2.0e0", "rule_deny", id="float-underscore"),
        pytest.param("/projects/%EF%BB%BF42", "rule_deny", id="byte-order-mark"),
        pytest.param("/projects/%EF%BB%BF4.2e1", "rule_deny", id="byte-order-mark-exponent"),
        pytest.param("/projects/%EF%BC%94.2e1", "rule_deny", id="fullwidth-exponent"),
        pytest.param("/projects/4.25e1", "rule_deny", id="truncated-exponent"),
        pytest.param("/projects/420.5e-1/x", "rule_deny", id="truncated-negative-exponent"),
        pytest.param("/projects/4.2", "rule_allow", id="a-fraction"),
        pytest.param("/projects/4.2e2", "rule_allow", id="another-exponent"),
        # radix prefixes of strict parsers (Ruby's Integer(), Go's ParseInt(s, 0))
        pytest.param("/projects/052", "rule_deny", id="leading-zero-octal"),
        pytest.param("/projects/0_52", "rule_deny", id="octal-underscore"),
        pytest.param("/projects/0x2_a", "rule_deny", id="hex-underscore"),
        pytest.param("/projects/0x_2a", "rule_deny", id="hex-prefix-underscore"),
        # a radix form ends where a digit of its base does not follow (parseInt, intval)
        pytest.param("/projects/0x2ag", "rule_deny", id="hex-then-a-letter"),
        pytest.param("/projects/052z", "rule_deny", id="octal-then-a-letter"),
        pytest.param("/projects/0528", "rule_deny", id="octal-then-an-eight"),
        pytest.param("/projects/0b1010102", "rule_deny", id="binary-then-a-two"),
        pytest.param("/projects/0x2af", "rule_allow", id="hex-goes-on"),
        pytest.param("/projects/0x2a0", "rule_allow", id="hex-goes-on-with-a-digit"),
        pytest.param("/projects/0b1010101", "rule_allow", id="binary-goes-on"),
        pytest.param("/projects/0b10_1010", "rule_deny", id="binary-underscore"),
        pytest.param("/projects/0D42", "rule_deny", id="ruby-decimal-prefix"),
        pytest.param("/projects/0x%202a", "rule_deny", id="spring-hex-blank"),
        pytest.param("/projects/0%20x2a", "rule_deny", id="spring-hex-prefix-blank"),
        pytest.param("/projects/%23%202a", "rule_deny", id="spring-hash-blank"),
        pytest.param("/projects/053", "rule_allow", id="another-octal"),
        pytest.param("/projects/1e400", "rule_allow", id="out-of-range"),
        pytest.param("/projects/v4.2e1", "rule_allow", id="not-a-number"),
        pytest.param("/projects/421", "rule_allow", id="another-number"),
        pytest.param("/projects/0x2ab", "rule_allow", id="another-hex-number"),
        pytest.param("/projects/4", "rule_allow", id="a-prefix-of-it"),
        pytest.param("/v1x2/x", "rule_deny", id="digits-beside-a-star-are-text"),
        pytest.param("/v13/x", "rule_allow", id="digits-beside-a-star-are-text-too"),
        # a front controller routes by what follows its script
        pytest.param("/index.php/admin", "rule_deny", id="php-front-controller"),
        pytest.param("/web/app.php/admin/users", "rule_deny", id="symfony-app-php"),
        pytest.param("/cgi-bin/x.cgi/projects/42", "rule_deny", id="cgi-path-info"),
        pytest.param("/INDEX.PHP/admin", "rule_deny", id="script-case"),
        pytest.param("/index.php/public", "rule_allow", id="another-route"),
        pytest.param("/index.php", "rule_allow", id="the-script-itself"),
    ],
)
def test_a_deny_takes_other_spellings_of_its_numbers_and_routes(tmp_path, target, expected):
    rules = tmp_path / "rules.yaml"
    rules.write_text(NUMBER_AND_SCRIPT_RULES)
    assert outcome(load_policy([rules]), target) == expected


OTHER_NAMES_RULES = """\
version: 1
profiles:
  default:
    rules:
      - deny: allowed.test
        paths: ["/git/org/secret.git/**", "/gems/secret-gem.json", "/admin_panel/**", "/admin/**"]
      - deny: allowed.test
        paths: ["/lodash.merge/**", "/packages/evil_pkg-*", "/@corp%2Fsecret/**", "/pkg/evil-pkg/**", "/dl/x.tar.gz", "/dl/backup.7z", "/dl/photo.jpg", "/github.com/evilcorp/**", "/golang.org/x/!bad!pkg/**", "/git/org/notes.json.git/**", "/v1.2/**", "/site/docs.old/secret.pdf", "/git/org/tools.git/raw/config.yaml"]
      - deny: allowed.test
        methods: [GET]
        paths: ["/public/report"]
      - allow: allowed.test
        paths: ["/**"]
"""


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        # a segment written with an extension takes its stem (session 52)
        pytest.param("GET", "/git/org/secret/info/refs", "rule_deny", id="git-without-dot-git"),
        pytest.param(
            "POST", "/git/org/Secret/git-upload-pack", "rule_deny", id="git-upload-pack-stem"
        ),
        pytest.param("GET", "/git/org/secret/.git/HEAD", "rule_deny", id="git-dir-below-the-stem"),
        pytest.param("GET", "/gems/secret-gem", "rule_deny", id="format-stem"),
        pytest.param("GET", "/gems/secret-gem.yaml", "rule_deny", id="another-format"),
        pytest.param("GET", "/gems/secret-gem.js", "rule_deny", id="any-format"),
        pytest.param("GET", "/dl/photo", "rule_deny", id="a-media-extension"),
        pytest.param("GET", "/dl/x", "rule_deny", id="every-extension"),
        pytest.param("GET", "/dl/backup", "rule_deny", id="an-extension-with-a-digit"),
        pytest.param("GET", "/v1.3/x", "rule_allow", id="a-version-is-no-extension"),
        # each segment by its stem or as written (MultiViews under a dotted directory)
        pytest.param("GET", "/site/docs.old/secret", "rule_deny", id="last-segment-stem"),
        pytest.param("GET", "/site/docs/secret.pdf", "rule_deny", id="middle-segment-stem"),
        pytest.param("GET", "/site/docs/secret", "rule_deny", id="every-segment-stem"),
        pytest.param("GET", "/site/docs.old/public", "rule_allow", id="beside-a-dotted-directory"),
        pytest.param(
            "GET", "/git/org/tools/raw/config", "rule_deny", id="repository-and-file-stem"
        ),
        pytest.param(
            "GET", "/git/org/tools.git/raw/config", "rule_deny", id="file-stem-in-repository"
        ),
        pytest.param(
            "GET", "/git/org/tools/raw/config.yaml.bak", "rule_deny", id="stem-and-suffix"
        ),
        pytest.param("GET", "/git/org/secrets/info/refs", "rule_allow", id="another-repository"),
        pytest.param("GET", "/gems/secret-gems", "rule_allow", id="another-gem"),
        pytest.param("GET", "/lodash", "rule_allow", id="a-name-with-a-dot-is-no-stem"),
        pytest.param(
            "GET",
            "/git/org/secret.js.git/info/refs",
            "rule_allow",
            id="a-stem-takes-no-other-suffix",
        ),
        pytest.param(
            "GET", "/git/org/Secret.GIT/info/refs", "rule_deny", id="a-stem-with-its-own-extension"
        ),
        pytest.param("GET", "/lodash.merge/-/x.tgz", "rule_deny", id="the-dotted-name"),
        pytest.param(
            "GET", "/packages/evil_pkg_extras-1.0.whl", "rule_allow", id="star-segment-as-written"
        ),
        pytest.param("GET", "/packages/evil_pkg-1.0.whl", "rule_deny", id="star-segment-itself"),
        # ASCII punctuation stands for any (CherryPy's `_`, PEP 503, crates.io)
        pytest.param("GET", "/admin-panel", "rule_deny", id="dash-for-underscore"),
        pytest.param("GET", "/admin~panel/x", "rule_deny", id="tilde"),
        pytest.param("GET", "/admin%7Bpanel", "rule_deny", id="escaped-brace"),
        pytest.param("GET", "/admin%25panel/x", "rule_deny", id="kept-escape-percent"),
        pytest.param("GET", "/admin%3Fpanel", "rule_deny", id="kept-escape-question-mark"),
        pytest.param("GET", "/admin%23panel", "rule_deny", id="kept-escape-hash"),
        pytest.param("GET", "/pkg/evil_pkg/", "rule_deny", id="underscore-for-dash"),
        pytest.param("GET", "/pkg/evil.pkg/1.0", "rule_deny", id="dot-for-dash"),
        pytest.param("GET", "/adminpanel", "rule_allow", id="no-punctuation"),
        pytest.param("GET", "/admin%C3%A9panel", "rule_allow", id="a-letter-is-not-punctuation"),
        # Go's module proxy: `!e` is `E` in a module path, and a deny ignores case
        pytest.param("GET", "/github.com/!evil!corp/x/@v/list", "rule_deny", id="go-module-case"),
        pytest.param(
            "GET", "/github.com/evilcorps/x/@v/list", "rule_allow", id="go-another-module"
        ),
        pytest.param(
            "GET", "/golang.org/x/badpkg/@v/list", "rule_deny", id="go-deny-written-escaped"
        ),
        # a repository's name with an extension of its own; its wiki and feeds
        pytest.param(
            "GET", "/git/org/notes.json/info/refs", "rule_deny", id="repository-name-with-a-dot"
        ),
        pytest.param(
            "GET", "/git/org/notes/info/refs", "rule_allow", id="repository-stem-of-its-name"
        ),
        pytest.param(
            "GET", "/git/org/secret.wiki.git/info/refs", "rule_deny", id="repository-wiki"
        ),
        pytest.param("GET", "/git/org/secret.atom", "rule_deny", id="repository-feed"),
        # Pyramid's view names
        pytest.param("GET", "/@@admin", "rule_deny", id="view-name"),
        pytest.param("GET", "/%40%40admin/x", "rule_deny", id="view-name-escaped"),
        pytest.param("GET", "/@@public", "rule_allow", id="another-view"),
        # an escaped '/' read both ways
        pytest.param("GET", "/@corp%2fsecret", "rule_deny", id="scoped-escaped"),
        pytest.param("GET", "/@corp/secret/-/secret-1.0.0.tgz", "rule_deny", id="scoped-tarball"),
        pytest.param("GET", "/admin%2Fx", "rule_deny", id="split-reading-denied"),
        pytest.param("GET", "/@corp%2Fpublic", "rule_allow", id="scoped-allowed"),
        pytest.param("GET", "/x%2F..%2Fadmin", "ambiguous_path", id="split-dot-dot"),
        # a deny of GET takes HEAD and OPTIONS
        pytest.param("HEAD", "/public/report", "rule_deny", id="head"),
        pytest.param("OPTIONS", "/public/report", "rule_deny", id="options"),
        pytest.param("TRACE", "/public/report", "rule_deny", id="trace"),
        pytest.param("PROPFIND", "/public/report", "rule_deny", id="propfind"),
        pytest.param("FETCH", "/public/report", "rule_deny", id="a-method-of-its-own"),
        pytest.param("POST", "/public/report", "rule_allow", id="post"),
        pytest.param("DELETE", "/public/report", "rule_allow", id="delete"),
    ],
)
def test_a_deny_takes_the_other_names_servers_give_a_handler(tmp_path, method, target, expected):
    rules = tmp_path / "rules.yaml"
    rules.write_text(OTHER_NAMES_RULES)
    assert outcome(load_policy([rules]), target, method) == expected


def test_a_number_beside_two_wildcards_loads_and_decides(tmp_path):
    """RE2 has no lookahead: a number segment written with one made every request of
    a rule that also has two wildcards an internal error (a red team, session 51). The
    pattern is compiled at the load now, so that such a rule would fail there."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n      - deny: allowed.test\n"
        '        paths: ["/*/42/*", "/**/x/**/y/**"]\n      - allow: allowed.test\n'
        '        methods: [GET]\n        paths: ["/**"]\n'
    )
    policy = load_policy([rules])
    assert outcome(policy, "/a/042/b") == "rule_deny"
    assert outcome(policy, "/q/x/r/y/s") == "rule_deny"
    assert outcome(policy, "/a/43/b") == "rule_allow"


def test_a_path_of_many_script_names_has_a_few_readings():
    """A reading behind each script's name made a 64 KiB path of them quadratic (11 s
    of the loop): behind the first and the last only."""
    from sandgate.proxy.policy.names import path_readings

    readings = path_readings("/" + "a.php/" * 10_000 + "admin")
    assert len(readings.denied) <= 3
    assert "/admin" in readings.denied


def test_a_path_of_too_many_readings_is_refused_where_a_path_rule_applies(tmp_path):
    """Each kind of reading multiplies them; past MOST_READING_CHARS in all the path is
    not read further and a path rule refuses it (a red team, session 52: a 64 KiB path
    of every kind made 144 readings, 9 MB to match each deny against)."""
    many = "/a.php/b.php" + "/1." * 21320 + "/%40%C3%84%2Fq/@@c%3Fz"
    readings = path_readings(many)
    assert readings.too_many
    assert sum(map(len, readings.denied)) <= 2 * MOST_READING_CHARS  # the last stage's
    rules = tmp_path / "rules.yaml"
    rules.write_text(NUMBER_AND_SCRIPT_RULES)
    assert outcome(load_policy([rules]), many) == "ambiguous_path"
    # the same kinds in a path of 2 KiB: every reading made, and decided
    honest = "/a.php/b.php" + "/1." * 600 + "/%40%C3%84%2Fq/@@c%3Fz"
    assert not path_readings(honest).too_many
    assert outcome(load_policy([rules]), honest) == "rule_allow"
