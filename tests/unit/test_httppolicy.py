"""Per-request rules: parsing, glob matching, decisions, targets, CLI expansion."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netjail.errors import RequestError
from netjail.httppolicy import (
    Answer,
    Deny,
    Relay,
    RequestPath,
    expand_header_value,
    expand_mock_file,
    intercepted_allow_rules,
    parse_host_header,
    parse_http_policy,
    parse_injection,
    parse_mock,
    parse_request_rule,
    parse_target,
)


def test_request_rule_parses_method_host_and_glob() -> None:
    """'POST api.x.com/v1/*': the method upper-cased, the host canonical, the glob anchored."""
    rule = parse_request_rule("post API.x.com/v1/*")
    assert (rule.method, rule.host.name, rule.host.wildcard) == ("POST", "api.x.com", False)
    assert rule.matches("POST", "api.x.com", "/v1/a/b")
    assert not rule.matches("POST", "api.x.com", "/v2/v1/a")
    assert not rule.matches("GET", "api.x.com", "/v1/a")


def test_star_method_and_bare_host_match_everything_of_the_host() -> None:
    """'* *.x.com' matches any method and path on any name under x.com, not x.com itself."""
    rule = parse_request_rule("* *.x.com")
    assert rule.matches("DELETE", "a.b.x.com", "/anything")
    assert not rule.matches("GET", "x.com", "/")


def test_glob_characters_other_than_star_are_literal() -> None:
    """'?', '[' and '.' in a glob match only themselves."""
    rule = parse_request_rule("GET a.com/v1.[x]?")
    assert rule.matches("GET", "a.com", "/v1.[x]?")
    assert not rule.matches("GET", "a.com", "/v1a[x]b")


@pytest.mark.parametrize(
    "text",
    [
        "GET",
        "GET /path",
        "G(T a.com/",
        "GET a.com:443/x",
        "GET 10.0.0.1/",
        "GET *",
        "* tcp://a.com",
    ],
)
def test_malformed_request_rules_are_refused(text: str) -> None:
    """A rule without a host, with ports, an address, or a bad method is a RequestError."""
    with pytest.raises(RequestError):
        parse_request_rule(text)


def test_mock_parses_status_and_body_and_guesses_json() -> None:
    """A JSON body is application/json; anything else text/plain."""
    mock = parse_mock('POST api.stripe.com/v1/customers=201:{"id":"cus_mock"}')
    assert (mock.status, mock.body, mock.content_type) == (
        201,
        b'{"id":"cus_mock"}',
        "application/json",
    )
    assert parse_mock("GET a.com/=200:hello").content_type == "text/plain; charset=utf-8"
    assert parse_mock("GET a.com/=204").body == b""


@pytest.mark.parametrize(
    "text", ["GET a.com/", "GET a.com/=99", "GET a.com/=101:x", "GET a.com/=abc"]
)
def test_mock_needs_a_status_from_200_to_599(text: str) -> None:
    """No '=STATUS', or a status outside 200-599, is refused."""
    with pytest.raises(RequestError):
        parse_mock(text)


def test_injection_refuses_framing_headers_and_never_shows_the_value() -> None:
    """Host/Content-Length cannot be injected; errors name the header, not the value."""
    assert parse_injection("a.com:X-Key=s3cret").header == "x-key"
    with pytest.raises(RequestError, match="Host cannot") as caught:
        parse_injection("a.com:Host=s3cret")
    assert "s3cret" not in str(caught.value)
    with pytest.raises(RequestError) as caught:
        parse_injection("a.com:X-Key=s3\r\ncret")
    assert "s3" not in str(caught.value)


def test_every_per_request_option_intercepts_its_name() -> None:
    """Mocks, request rules, redactions and injections each add their host to intercept."""
    policy = parse_http_policy(
        intercept=["i.com"],
        mocks=["GET m.com/=200"],
        deny_requests=["GET d.com/"],
        allow_requests=["GET a.com/"],
        redact=["r.com:@secrets"],
        inject_headers=["h.com:X=1"],
    )
    assert sorted(intercepted_allow_rules(policy)) == [
        "a.com",
        "d.com",
        "h.com",
        "i.com",
        "m.com",
        "r.com",
    ]
    assert policy.intercepts("M.com.")
    assert not policy.intercepts("x.com")


def test_deny_beats_mock_which_beats_the_allow_list() -> None:
    """Order of decision: deny-request, then mock, then allow-request's default deny."""
    policy = parse_http_policy(
        mocks=["GET a.com/m*=200:ok", "GET a.com/d=200:no"],
        deny_requests=["GET a.com/d"],
        allow_requests=["GET a.com/ok"],
    )
    assert policy.decide("GET", "a.com", "/d") == Deny("deny_request", "--deny-request GET a.com/d")
    assert isinstance(policy.decide("GET", "a.com", "/mx"), Answer)
    assert policy.decide("GET", "a.com", "/ok") == Relay()
    assert policy.decide("GET", "a.com", "/other") == Deny(
        "not_allowed_request", "no --allow-request matches"
    )
    # Another host, no allow-request for it: relayed.
    assert policy.decide("GET", "b.com", "/other") == Relay()


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/v1/%63ustomers?x=1", RequestPath("/v1/customers", query=True)),
        (b"*", RequestPath("*", query=False)),
        (b"/a..b/", RequestPath("/a..b/", query=False)),
        (b"/v1/../admin", "ambiguous_path"),
        (b"/v1/%2e%2e/admin", "ambiguous_path"),
        (b"/a%2Fb", "ambiguous_path"),
        (b"/a\\b", "ambiguous_path"),
        (b"/a%zz", "ambiguous_path"),
        (b"/a%00", "ambiguous_path"),
        (b"/.", "ambiguous_path"),
        (b"http://other/x", "not_origin_form"),
        (b"//other/x", "not_origin_form"),
        (b"other:443", "not_origin_form"),
    ],
)
def test_targets_are_decoded_or_refused_when_servers_may_read_them_two_ways(
    target: bytes, expected: RequestPath | str
) -> None:
    """Encoded slashes, dot segments and non-origin forms cannot slip past a path rule."""
    assert parse_target(target) == expected


@given(st.binary(max_size=200))
def test_parse_target_never_raises_and_never_yields_a_dot_segment(target: bytes) -> None:
    """Hostile targets: a problem or a decoded path with no '.'/'..' segment, never an error."""
    result = parse_target(target)
    if isinstance(result, RequestPath) and result.path != "*":
        assert result.path.startswith("/")
        assert not {".", ".."} & set(result.path.split("/"))


def test_host_header_must_carry_the_connections_port_if_any() -> None:
    """'a.com:443' names a.com on port 443 only; other text is no name."""
    assert parse_host_header(b"A.com:443", 443) == "a.com"
    assert parse_host_header(b"a.com", 443) == "a.com"
    assert parse_host_header(b"a.com:8443", 443) is None
    assert parse_host_header(b"a.com:x", 443) is None
    assert parse_host_header(b"\xff", 443) is None


def test_cli_expansion_reads_mock_files_and_environment_variables() -> None:
    """:@FILE becomes the file's text; $VAR and ${VAR} come from the environment, $$ is $."""
    assert (
        expand_mock_file("GET a.com/=200:@/f", {"/f": "body"}.__getitem__) == "GET a.com/=200:body"
    )
    assert expand_mock_file("GET a.com/=200:x@y", str) == "GET a.com/=200:x@y"
    env = {"TOKEN": "t0k"}
    assert expand_header_value("a.com:Authorization=Bearer $TOKEN", env) == (
        "a.com:Authorization=Bearer t0k"
    )
    assert expand_header_value("a.com:X=${TOKEN}$$", env) == "a.com:X=t0k$"
    with pytest.raises(RequestError, match=r"\$MISSING is not set"):
        expand_header_value("a.com:X=$MISSING", env)


def test_only_names_without_request_rules_relay_every_request() -> None:
    """A name with a deny, allow or mock rule may keep a request from the upstream."""
    policy = parse_http_policy(
        intercept=["plain.com"],
        redact=["r.com:@secrets"],
        mocks=["GET m.com/=200"],
        allow_requests=["GET a.com/"],
    )
    assert policy.relays_every_request("plain.com")
    assert policy.relays_every_request("r.com")
    assert not policy.relays_every_request("m.com")
    assert not policy.relays_every_request("a.com")
