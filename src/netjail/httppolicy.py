"""Per-request rules for intercepted names: parse, validate, match (pure).

Grammar of the options (the CLI's, the library's and the protocol's are the same texts)::

    intercept      = ["*."] name
    request-rule   = method SP ["*."] name [path-glob]      ; --deny-request, --allow-request
    mock           = request-rule "=" status [":" body]     ; --mock
    redaction      = ["*."] name ":" (regex / "@secrets")   ; --redact
    injection      = ["*."] name ":" header "=" value       ; --inject-header
    method         = "*" / token                            ; "*": every method
    path-glob      = "/" *char                              ; "*" matches any run of characters

Decisions, each for a reason:

- **Every per-request option intercepts its name.** A rule on requests can only act where the
  proxy sees requests, so ``--mock``, ``--deny-request``, ``--allow-request``, ``--redact`` and
  ``--inject-header`` each imply ``--intercept NAME``; a rule that silently never applied would
  be a trap.
- **Order.** A deny-request rule wins; then a mock answers; then, when any allow-request rule
  names the host, a request that matches none of them is denied; anything else is relayed.
- **Paths are matched decoded and refused when ambiguous.** The glob is matched against the
  request's path without its query, percent-decoded. A path that servers may read two ways
  (an encoded ``/`` or ``\\``, a ``.`` or ``..`` segment, a NUL, a bad escape, anything but
  origin-form) is refused, so ``/v1/%63ustomers`` cannot slip past a rule on
  ``/v1/customers`` and ``/v1/../admin`` cannot slip past one on ``/admin``.
- **The CLI expands, the daemon never does.** ``:@FILE`` mock bodies and ``$VAR`` header values
  are expanded by the CLI (:func:`expand_mock_file`, :func:`expand_header_value`) before the
  request is sent; the library and the protocol carry the final text.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import unquote_to_bytes

from netjail.errors import RequestError
from netjail.policy import NameRule, canonical_name, parse_rule
from netjail.redaction import SECRETS, Redaction, parse_redaction

#: Most rules of each kind one job may have.
MAX_HTTP_RULES: Final = 256
#: Longest mock body, in bytes of UTF-8.
MAX_MOCK_BODY: Final = 256 << 10
#: Longest injected header value.
MAX_HEADER_VALUE: Final = 8192
#: Headers an injection may not set: they frame the message or name its host.
FORBIDDEN_HEADERS: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"}
)
_METHOD: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}", re.ASCII)
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}", re.ASCII)
_STATUS: Final = re.compile(r"[2-5][0-9][0-9]", re.ASCII)
_BAD_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# An encoded slash, backslash or NUL, a backslash, or a '%' that starts no escape.
_AMBIGUOUS: Final = re.compile(rb"(?i)%2f|%5c|%00|\\|%(?![0-9a-f]{2})")
_DOT_SEGMENT: Final = re.compile(rb"/\.\.?/")


def _quote(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def parse_host(text: str, what: str) -> NameRule:
    """``name`` or ``*.name`` as a NameRule on every port; RequestError naming ``what``."""
    rule = parse_rule(text, default_ports=None)
    if not isinstance(rule, NameRule) or rule.ports is not None or ":" in text:
        raise RequestError(f"invalid {what} {_quote(text)}: name a host, e.g. api.example.com")
    return rule


@dataclass(frozen=True, slots=True)
class RequestRule:
    """``METHOD NAME/PATHGLOB``: the requests a deny, allow or mock rule is about."""

    text: str
    #: Upper case; None: every method.
    method: str | None
    host: NameRule
    #: None: every path.
    path: re.Pattern[str] | None

    def matches(self, method: str, host: str, path: str) -> bool:
        """Whether a request (method, canonical host, decoded path) is one of this rule's."""
        if self.method is not None and method.upper() != self.method:
            return False
        if not self.host.matches(host):
            return False
        return self.path is None or self.path.fullmatch(path) is not None


def parse_request_rule(text: str, what: str = "request rule") -> RequestRule:
    """``METHOD NAME[/PATHGLOB]``; RequestError naming the rule when it is malformed."""
    method, _, target = text.strip().partition(" ")
    target = target.strip()
    if not target or not (method == "*" or _METHOD.fullmatch(method)):
        raise RequestError(
            f"invalid {what} {_quote(text)}: use 'METHOD NAME/PATHGLOB',"
            " e.g. 'POST api.example.com/v1/*' (METHOD may be *)"
        )
    host_text, slash, glob = target.partition("/")
    path = compile_glob("/" + glob) if slash and glob != "*" else None
    return RequestRule(
        text=text.strip(),
        method=None if method == "*" else method.upper(),
        host=parse_host(host_text, what),
        path=path,
    )


def compile_glob(glob: str) -> re.Pattern[str]:
    """A path glob as a pattern: ``*`` matches any run of characters, ``/`` included."""
    return re.compile(".*".join(re.escape(part) for part in glob.split("*")), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Mock:
    """An answer given without contacting the upstream."""

    rule: RequestRule
    status: int
    body: bytes
    content_type: str


def parse_mock(text: str) -> Mock:
    """``METHOD NAME/PATHGLOB=STATUS[:BODY]``; JSON bodies get ``application/json``."""
    rule_text, equals, answer = text.partition("=")
    status_text, _, body_text = answer.partition(":")
    if not equals or not _STATUS.fullmatch(status_text):
        raise RequestError(
            f"invalid --mock {_quote(text)}: use 'METHOD NAME/PATHGLOB=STATUS[:BODY]',"
            " STATUS from 200 to 599, e.g. 'POST api.example.com/v1/x=201:{\"id\":1}'"
        )
    body = body_text.encode()
    if len(body) > MAX_MOCK_BODY:
        raise RequestError(f"invalid --mock {_quote(text)}: body over {MAX_MOCK_BODY} bytes")
    return Mock(
        rule=parse_request_rule(rule_text, "--mock"),
        status=int(status_text),
        body=body,
        content_type=_content_type(body_text),
    )


def _content_type(body: str) -> str:
    try:
        json.loads(body)
    except ValueError:
        return "text/plain; charset=utf-8"
    return "application/json"


def _parse_redact(text: str) -> Redaction:
    host_text, colon, source = text.partition(":")
    if not colon or not source:
        raise RequestError(
            f"invalid --redact {_quote(text)}: use NAME:REGEX or NAME:{SECRETS},"
            " e.g. api.example.com:@secrets"
        )
    return parse_redaction(parse_host(host_text, "--redact"), source, text)


@dataclass(frozen=True, slots=True)
class Injection:
    """A header set on every request to ``host`` that the proxy sends upstream."""

    host: NameRule
    #: Lower case.
    header: str
    value: str


def parse_injection(text: str) -> Injection:
    """``NAME:Header=VALUE``; RequestError without ever showing the value."""
    host_text, colon, rest = text.partition(":")
    header, equals, value = rest.partition("=")
    shown = _quote(f"{host_text}:{header}=…")
    if not colon or not equals or not _TOKEN.fullmatch(header):
        raise RequestError(f"invalid --inject-header {shown}: use 'NAME:Header=VALUE'")
    if header.lower() in FORBIDDEN_HEADERS:
        raise RequestError(f"invalid --inject-header {shown}: {header} cannot be injected")
    if len(value) > MAX_HEADER_VALUE or _BAD_VALUE.search(value):
        raise RequestError(
            f"invalid --inject-header {shown}: the value must be one line of at most"
            f" {MAX_HEADER_VALUE} characters"
        )
    return Injection(
        host=parse_host(host_text, "--inject-header"), header=header.lower(), value=value
    )


@dataclass(frozen=True, slots=True)
class Relay:
    """Send the request upstream; ``reason``: the client allowed it live (its event says so)."""

    reason: Literal["decided_allow"] | None = None


@dataclass(frozen=True, slots=True)
class Deny:
    """Answer 403; ``rule`` is the option that decided (for X-Netjail-Reason), or, for a
    live decision (``decided_deny``, ``decision_timeout``), why no rule allowed it and how
    it was decided."""

    reason: Literal["deny_request", "not_allowed_request", "decided_deny", "decision_timeout"]
    rule: str


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer with the mock."""

    mock: Mock


Decision = Relay | Deny | Answer


@dataclass(frozen=True, slots=True)
class HttpPolicy:
    """A job's interception and per-request rules."""

    intercept: tuple[NameRule, ...] = ()
    deny_requests: tuple[RequestRule, ...] = ()
    allow_requests: tuple[RequestRule, ...] = ()
    mocks: tuple[Mock, ...] = ()
    redactions: tuple[Redaction, ...] = ()
    injections: tuple[Injection, ...] = ()

    @property
    def active(self) -> bool:
        """Whether any name is intercepted at all."""
        return bool(self.intercept)

    def exact_intercepts(self) -> tuple[str, ...]:
        """The names intercepted by name, not by ``*.NAME``: the ones known before the job
        connects."""
        return tuple(rule.name for rule in self.intercept if not rule.wildcard)

    def intercepts(self, name: str) -> bool:
        """Whether the proxy terminates TLS (and reads requests) for ``name``."""
        canonical = canonical_name(name)
        return canonical is not None and any(rule.matches(canonical) for rule in self.intercept)

    def decide(self, method: str, host: str, path: str) -> Decision:
        """What to do with a request (canonical host, decoded path): deny, mock, or relay."""
        for rule in self.deny_requests:
            if rule.matches(method, host, path):
                return Deny("deny_request", f"--deny-request {rule.text}")
        for mock in self.mocks:
            if mock.rule.matches(method, host, path):
                return Answer(mock)
        listed = [rule for rule in self.allow_requests if rule.host.matches(host)]
        if listed and not any(rule.matches(method, host, path) for rule in listed):
            return Deny("not_allowed_request", "no --allow-request matches")
        return Relay()

    def relays_every_request(self, host: str) -> bool:
        """Whether every request to ``host`` with the right Host goes upstream: no deny,
        allow or mock rule names it."""
        rules = (*self.deny_requests, *self.allow_requests, *(m.rule for m in self.mocks))
        return not any(rule.host.matches(host) for rule in rules)

    def redactions_for(self, host: str) -> tuple[Redaction, ...]:
        return tuple(r for r in self.redactions if r.host.matches(host))

    def injections_for(self, host: str) -> tuple[Injection, ...]:
        return tuple(i for i in self.injections if i.host.matches(host))


def parse_http_policy(
    *,
    intercept: Sequence[str] = (),
    mocks: Sequence[str] = (),
    deny_requests: Sequence[str] = (),
    allow_requests: Sequence[str] = (),
    redact: Sequence[str] = (),
    inject_headers: Sequence[str] = (),
) -> HttpPolicy:
    """All the options of a job; RequestError names the first bad one."""
    for what, texts in (
        ("--intercept", intercept),
        ("--mock", mocks),
        ("--deny-request", deny_requests),
        ("--allow-request", allow_requests),
        ("--redact", redact),
        ("--inject-header", inject_headers),
    ):
        if len(texts) > MAX_HTTP_RULES:
            raise RequestError(f"too many {what} options ({len(texts)}; at most {MAX_HTTP_RULES})")
    denied = tuple(parse_request_rule(t, "--deny-request") for t in deny_requests)
    allowed = tuple(parse_request_rule(t, "--allow-request") for t in allow_requests)
    answers = tuple(parse_mock(t) for t in mocks)
    redactions = tuple(_parse_redact(t) for t in redact)
    injections = tuple(parse_injection(t) for t in inject_headers)
    names: dict[NameRule, None] = dict.fromkeys(parse_host(t, "--intercept") for t in intercept)
    for host in (
        *(r.host for r in (*denied, *allowed)),
        *(m.rule.host for m in answers),
        *(r.host for r in redactions),
        *(i.host for i in injections),
    ):
        names[host] = None
    return HttpPolicy(
        intercept=tuple(names),
        deny_requests=denied,
        allow_requests=allowed,
        mocks=answers,
        redactions=redactions,
        injections=injections,
    )


def intercepted_allow_rules(policy: HttpPolicy) -> list[str]:
    """The allow rules interception implies: each intercepted name, as ``--allow NAME``."""
    return [f"{'*.' if rule.wildcard else ''}{rule.name}" for rule in policy.intercept]


#: Why a request's target was refused before any rule was asked.
PathProblem = Literal["not_origin_form", "ambiguous_path"]


@dataclass(frozen=True, slots=True)
class RequestPath:
    """A request target's path, decoded (what rules match), and whether it had a query."""

    path: str
    query: bool


def parse_target(target: bytes) -> RequestPath | PathProblem:
    """The path rules are matched against, or why the target is refused (see the module)."""
    if target == b"*":
        return RequestPath("*", query=False)
    if not target.startswith(b"/") or target.startswith(b"//"):
        return "not_origin_form"
    raw, question, _ = target.partition(b"?")
    raw = raw.partition(b"#")[0]
    decoded = unquote_to_bytes(raw)
    if _AMBIGUOUS.search(raw) or b"\0" in decoded or _DOT_SEGMENT.search(decoded + b"/"):
        return "ambiguous_path"
    return RequestPath(decoded.decode("utf-8", "surrogateescape"), query=bool(question))


def parse_host_header(value: bytes, port: int) -> str | None:
    """The canonical name a Host header names, if its port (when given) is ``port``."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    name, colon, port_text = text.partition(":")
    if colon and (not port_text.isdigit() or int(port_text) != port):
        return None
    return canonical_name(name)


def expand_mock_file(text: str, read_file: Callable[[str], str]) -> str:
    """A ``--mock`` whose body is ``@FILE`` with the file's text in its place (the CLI's job)."""
    rule, equals, answer = text.partition("=")
    status, colon, body = answer.partition(":")
    if not equals or not colon or not body.startswith("@"):
        return text
    return f"{rule}={status}:{read_file(body[1:])}"


def expand_header_value(text: str, environ: Mapping[str, str]) -> str:
    """An ``--inject-header`` with ``$VAR``/``${VAR}`` taken from ``environ`` (``$$``: ``$``).

    RequestError names a variable that is not set, never a value.
    """
    host, colon, rest = text.partition(":")
    header, equals, value = rest.partition("=")
    if not colon or not equals:
        return text
    try:
        expanded = string.Template(value).substitute(environ)
    except KeyError as missing:
        raise RequestError(
            f"--inject-header {_quote(f'{host}:{header}')}: ${missing.args[0]} is not set"
        ) from None
    except ValueError:
        raise RequestError(
            f"--inject-header {_quote(f'{host}:{header}')}: a '$' not followed by a variable"
            " name (write $$ for a '$')"
        ) from None
    return f"{host}:{header}={expanded}"
