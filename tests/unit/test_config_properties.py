"""Properties of the configuration reader (netjail.daemon.config) on generated documents, as
tomllib gives them: parse_config returns a Config or raises ConfigError only, find_problems
returns problem lines only, and the two agree; TOML text of any shape is read the same way."""

from __future__ import annotations

import datetime
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netjail.daemon.config import Config, config_keys, find_problems, parse_config
from netjail.errors import ConfigError

SOURCE = "/etc/netjail/netjaild.toml"
KEYS = config_keys()

#: Values as tomllib gives them (every TOML type), and values close to what each key wants.
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.datetimes(),
    st.dates(),
    st.times(),
)
PLAUSIBLE = st.sampled_from(
    [
        "1G",
        "256M",
        "2s",
        "1.5",
        "nflog",
        "kmsg",
        "nftables",
        "iptables",
        "text",
        "json",
        "NXDOMAIN",
        "REFUSED",
        "61184-65519",
        "65535-65536",
        "/run/netjail/netjail.sock",
        "relative/path",
        "/srv/data:/data",
        "api.example.test",
        "*.com",
        "192.0.2.10",
        "not an address",
        "",
        0,
        -1,
        4096,
        2.5,
        [],
        ["api.example.test", "*.example.test:443"],
        [1000, 1001],
        ["netjail"],
        [1, "two"],
    ]
)
VALUES = st.recursive(
    SCALARS | PLAUSIBLE,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


#: Unknown keys, printable (control characters in a key: see the xfail test at the end).
UNKNOWN_KEYS = st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=12)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, object]:
    """A decoded TOML document: known keys (dotted ones as tables), unknown keys, any values."""
    document: dict[str, object] = {}
    for key in draw(st.lists(st.sampled_from(KEYS) | UNKNOWN_KEYS, max_size=6)):
        table, dot, inner = key.partition(".")
        value = draw(VALUES)
        if not dot:
            document[table] = value if key != "hosts" else draw(hosts_tables())
            continue
        section = document.setdefault(table, {})
        if isinstance(section, dict):
            section[inner] = value
    return document


def hosts_tables() -> st.SearchStrategy[object]:
    names = st.sampled_from(["pypi.example.test", "API.example.test", "bad name", ""]) | st.text(
        max_size=12
    )
    return st.dictionaries(
        names, st.sampled_from(["192.0.2.10", "2001:db8::1", "x"]) | VALUES, max_size=3
    )


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_a_document_gives_a_config_or_a_config_error_and_find_problems_agrees(
    document: dict[str, object],
) -> None:
    """parse_config raises only ConfigError, which names the file and the first problem
    find_problems lists; when there is none it returns a Config."""
    problems = find_problems(document)
    assert all(isinstance(problem, str) and problem and "\n" not in problem for problem in problems)
    try:
        config = parse_config(document, SOURCE)
    except ConfigError as e:
        message = str(e)
    else:
        assert problems == []
        assert isinstance(config, Config)
        return
    assert problems
    # (A NetjailError is one line: its white space, control characters among it, is collapsed.)
    assert message.startswith(" ".join(f"{SOURCE}: {problems[0]}".split()))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | documents().map(repr))
def test_any_toml_text_reads_to_a_config_or_errors_that_name_the_problem(text: str) -> None:
    """Text that tomllib reads goes through the same checks; text it refuses never gets that
    far (the reader reports it as a ConfigError naming the file)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    try:
        parse_config(document, SOURCE)
    except ConfigError as e:
        message = str(e)
    else:
        assert find_problems(document) == []
        return
    assert message.startswith(f"{SOURCE}: ")


def test_every_documented_key_is_one_the_generator_uses() -> None:
    """The generator draws from config_keys(), so every key's reader is exercised."""
    assert "limits.max_memory" in KEYS
    assert "jail.job_uids" in KEYS
    assert "hosts" in KEYS


@pytest.mark.parametrize(
    "value",
    [datetime.datetime(2026, 1, 1), datetime.date(2026, 1, 1), datetime.time(1, 2), float("nan")],
)
def test_toml_only_types_are_problems_not_crashes(value: object) -> None:
    """A date, time or NaN where a size or a duration belongs is a problem line for that key."""
    problems = find_problems({"limits": {"max_memory": value, "kill_grace": value}})
    assert [problem.split(":")[0] for problem in problems] == [
        "limits.max_memory",
        "limits.kill_grace",
    ]


def test_a_key_with_a_newline_is_still_one_problem_line() -> None:
    """An unknown key holding control characters is reported on one line."""
    (problem,) = find_problems({"bad\nkey\x1b[31m": 1})
    assert "\n" not in problem
    assert "\x1b" not in problem
