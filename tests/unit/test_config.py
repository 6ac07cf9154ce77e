"""Tests for the daemon's configuration file (netjail.daemon.config)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from pathlib import Path

import pytest

from netjail.daemon import config as config_module
from netjail.daemon.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    Jail,
    Limits,
    Policy,
    Proxy,
    check_config,
    config_keys,
    find_problems,
    load_config,
    parse_config,
)
from netjail.errors import ConfigError
from netjail.protocol import BindMount

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "netjaild.toml.example"
CONFIG_DOC = ROOT / "docs" / "CONFIG.md"

FULL = """
socket = "/run/nj/nj.sock"
group = "ci"
state_dir = "/srv/netjail/"
log_format = "json"
allowed_uids = [1000, 1001]
allowed_groups = ["ci", "dev"]
log_backend = "kmsg"
firewall = "iptables"

[limits]
default_memory = "512M"
max_memory = "2G"
default_cpus = 1
max_cpus = 2.5
default_pids = 100
max_pids = 1000
default_timeout = "30s"
max_timeout = "5m"
kill_grace = "500ms"

[policy]
default_allow = ["pypi.org", "*.github.com:443"]
default_deny = ["gist.github.com"]
blocked_dns_answer = "REFUSED"
decision_timeout = "2m"

[hosts]
"PyPI.Internal.example." = "10.0.0.5"
"mirror.example" = "2001:db8::5"
"""


def parse(text: str) -> Config:
    """Parse TOML text as the daemon would."""
    return parse_config(tomllib.loads(text), "netjaild.toml")


def problems_of(text: str) -> list[str]:
    """Every problem find_problems reports for TOML text."""
    return find_problems(tomllib.loads(text))


def error_of(text: str) -> str:
    """The one-line ConfigError message parse_config raises for TOML text."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def write(path: Path, text: str, mode: int = 0o644) -> str:
    """Write a config file with the given mode and return its path."""
    path.write_text(text)
    path.chmod(mode)
    return str(path)


# --- defaults and a full file ------------------------------------------------------------------


def test_empty_document_gives_defaults() -> None:
    """An empty file is the same as no file: every key has its default."""
    config = parse("")
    assert config == Config()
    assert config.socket == "/run/netjail/netjail.sock"
    assert config.group == "netjail"
    assert config.state_dir == "/var/lib/netjail"
    assert config.log_format == "text"
    assert config.allowed_uids == ()
    assert config.allowed_groups == ()
    assert config.log_backend == "nflog"
    assert config.firewall == "nftables"
    assert config.limits == Limits(kill_grace=2.0)
    assert config.policy == Policy(blocked_dns_answer="NXDOMAIN")
    assert dict(config.hosts) == {}


def test_full_file_is_read_into_typed_values() -> None:
    """Every key of a complete file arrives parsed: sizes in bytes, durations in seconds."""
    config = parse(FULL)
    assert config.socket == "/run/nj/nj.sock"
    assert config.group == "ci"
    assert config.state_dir == "/srv/netjail"
    assert config.log_format == "json"
    assert config.allowed_uids == (1000, 1001)
    assert config.allowed_groups == ("ci", "dev")
    assert config.log_backend == "kmsg"
    assert config.firewall == "iptables"
    assert config.limits == Limits(
        default_memory=512 * 2**20,
        max_memory=2 * 2**30,
        default_cpus=1.0,
        max_cpus=2.5,
        default_pids=100,
        max_pids=1000,
        default_timeout=30.0,
        max_timeout=300.0,
        kill_grace=0.5,
    )
    assert config.policy == Policy(
        default_allow=("pypi.org", "*.github.com:443"),
        default_deny=("gist.github.com",),
        blocked_dns_answer="REFUSED",
        decision_timeout=120.0,
    )
    assert dict(config.hosts) == {
        "pypi.internal.example": ipaddress.ip_address("10.0.0.5"),
        "mirror.example": ipaddress.ip_address("2001:db8::5"),
    }


def test_config_is_immutable() -> None:
    """Config and its hosts table cannot be changed after loading."""
    config = parse(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.socket = "/tmp/x"  # type: ignore[misc]
    with pytest.raises(TypeError, match="does not support item assignment"):
        config.hosts["evil.example"] = ipaddress.ip_address("1.2.3.4")  # type: ignore[index]


def test_sizes_and_durations_accept_numbers() -> None:
    """A size may be a byte count and a duration a number of seconds."""
    limits = parse("[limits]\nmax_memory = 1048576\nmax_timeout = 90\nkill_grace = 0.5").limits
    assert limits.max_memory == 1048576
    assert limits.max_timeout == 90.0
    assert limits.kill_grace == 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024", 1024), ("4K", 4096), ("1.5G", 3 * 2**29), ("512MiB", 512 * 2**20), ("1t", 2**40)],
)
def test_size_units_are_powers_of_1024(text: str, expected: int) -> None:
    """Size suffixes K/M/G/T are binary multiples, case-insensitive, with an optional iB/B."""
    assert parse(f'[limits]\nmax_memory = "{text}"').limits.max_memory == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1.5h", 5400.0)]
)
def test_duration_units(text: str, expected: float) -> None:
    """Durations take ms, s, m and h suffixes."""
    assert parse(f'[limits]\nmax_timeout = "{text}"').limits.max_timeout == expected


def test_absent_default_limit_takes_the_maximum() -> None:
    """A job that asks for nothing is still capped when only max_* is set."""
    limits = parse('[limits]\nmax_memory = "1G"\nmax_pids = 50\nmax_timeout = "1m"').limits
    assert limits.default_memory == 2**30
    assert limits.default_pids == 50
    assert limits.default_timeout == 60.0
    assert limits.default_cpus is None


def test_default_equal_to_maximum_is_accepted() -> None:
    """default_* may equal max_*."""
    assert parse("[limits]\ndefault_cpus = 2\nmax_cpus = 2.0").limits.default_cpus == 2.0


# --- unknown keys ------------------------------------------------------------------------------


def test_job_and_connection_limits_are_read() -> None:
    """max_jobs and max_connections_per_uid are read as given; absent, max_jobs is None (sized
    to the fd limit at start) and the connection limit 64."""
    config = parse_config({"max_jobs": 500, "max_connections_per_uid": 8})
    assert (config.max_jobs, config.max_connections_per_uid) == (500, 8)
    assert (Config().max_jobs, Config().max_connections_per_uid) == (None, 64)


def test_unknown_top_level_key_is_named() -> None:
    """A typo at the top level stops start-up and names the key and file."""
    message = error_of('sockt = "/run/x.sock"')
    assert message.startswith("netjaild.toml: unknown key 'sockt'")
    assert "did you mean 'socket'?" in message


def test_unknown_nested_key_is_named_with_its_table() -> None:
    """A typo inside a table is named with its dotted path."""
    message = error_of('[limits]\nmax_memry = "2G"')
    assert message == (
        "netjaild.toml: unknown key 'limits.max_memry' (did you mean 'limits.max_memory'?)"
    )
    assert problems_of("[policy]\nallow = []") == [
        "unknown key 'policy.allow' (did you mean 'policy.default_allow'?)"
    ]


def test_unknown_table_is_rejected() -> None:
    """A whole unknown table is one unknown key."""
    assert problems_of("[limit]\nmax_pids = 3") == ["unknown key 'limit' (did you mean 'limits'?)"]


def test_known_table_given_as_value_is_rejected() -> None:
    """limits must be a table, not a string."""
    assert problems_of('limits = "none"') == [
        "limits: expected a table ([limits]), got a string 'none'"
    ]


# --- wrong types and bad values ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("socket = 3", "socket: expected a string, got an integer 3"),
        ('socket = "run/x.sock"', "socket: expected an absolute path, got 'run/x.sock'"),
        (f'socket = "/{"x" * 120}"', "socket: path is longer than the 107 bytes"),
        ('group = "bad group"', "group: invalid group name 'bad group'"),
        ("state_dir = []", "state_dir: expected a string, got an array"),
        ('log_format = "xml"', "log_format: expected one of 'text', 'json', got 'xml'"),
        ('log_backend = "LOG"', "log_backend: expected one of 'nflog', 'kmsg', got 'LOG'"),
        ('firewall = "pf"', "firewall: expected one of 'nftables', 'iptables', got 'pf'"),
        ("allowed_uids = 1000", "allowed_uids: expected an array, got an integer 1000"),
        ('allowed_uids = ["1000"]', "allowed_uids: item 0: expected an integer uid, got a string"),
        ("allowed_uids = [0, -1]", "allowed_uids: item 1: uid -1 is out of range"),
        ("allowed_uids = [4294967295]", "allowed_uids: item 0: uid 4294967295 is out of range"),
        ("allowed_uids = [true]", "allowed_uids: item 0: expected an integer uid, got a boolean"),
        ('allowed_groups = ["ok", "no:colon"]', "allowed_groups: item 1: invalid group name"),
        ("max_jobs = 0", "max_jobs: must be between 1 and 1000000, got 0"),
        ('max_jobs = "10"', "max_jobs: expected an integer, got a string"),
        ("max_connections_per_uid = 70000", "max_connections_per_uid: must be between 1 and"),
        ("max_connections_per_uid = true", "max_connections_per_uid: expected an integer, got"),
    ],
)
def test_bad_top_level_values_are_named(text: str, problem: str) -> None:
    """A wrong type or value at the top level is reported with its key."""
    (found,) = problems_of(text)
    assert found.startswith(problem)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('max_memory = "12Q"', "limits.max_memory: invalid size '12Q'"),
        ('max_memory = "-1G"', "limits.max_memory: invalid size '-1G'"),
        ('max_memory = "0"', "limits.max_memory: invalid size '0': "),
        ("max_memory = 0", "limits.max_memory: a size in bytes must be from 1 to"),
        ("max_memory = true", "limits.max_memory: expected a size such as"),
        ("max_memory = 1.5", "limits.max_memory: expected a size such as"),
        ('default_timeout = "5x"', "limits.default_timeout: invalid duration '5x'"),
        ('default_timeout = "5 minutes"', "limits.default_timeout: invalid duration"),
        ('max_timeout = "0s"', "limits.max_timeout: invalid duration '0s': "),
        ('max_timeout = "400d"', "limits.max_timeout: invalid duration '400d': "),
        ("kill_grace = 0", "limits.kill_grace: a duration in seconds must be more than 0"),
        ("kill_grace = -1", "limits.kill_grace: a duration in seconds must be more than 0"),
        ("kill_grace = inf", "limits.kill_grace: a duration in seconds must be more than 0"),
        ("kill_grace = nan", "limits.kill_grace: a duration in seconds must be more than 0"),
        ("kill_grace = []", "limits.kill_grace: expected a duration such as"),
        ("max_cpus = 0", "limits.max_cpus: a number of CPUs must be from 0.01 to 1024, got 0"),
        ("max_cpus = nan", "limits.max_cpus: a number of CPUs must be from 0.01 to 1024"),
        ("max_cpus = 2048", "limits.max_cpus: a number of CPUs must be from 0.01 to 1024"),
        ('max_cpus = "2"', "limits.max_cpus: expected a number of CPUs"),
        ("max_pids = 0", "limits.max_pids: must be between 1 and 4194304"),
        ("max_pids = 2.0", "limits.max_pids: expected an integer, got a float"),
        ("max_pids = 5000000", "limits.max_pids: must be between 1 and 4194304"),
    ],
)
def test_bad_limits_are_named(text: str, problem: str) -> None:
    """Bad sizes, durations, CPU counts and pids limits are reported with their dotted key."""
    (found,) = problems_of(f"[limits]\n{text}")
    assert found.startswith(problem)


def test_bad_size_error_message() -> None:
    """The start-up error for a bad size names file, key, value and the expected form."""
    assert error_of('[limits]\nmax_memory = "12Q"') == (
        "netjaild.toml: limits.max_memory: invalid size '12Q':"
        " use a number with an optional K, M, G or T suffix, e.g. 512M"
    )


def test_policy_rules_are_checked_by_the_policy_parser() -> None:
    """Rules take the request grammar: ports, CIDRs with ports; texts are kept as written."""
    policy = parse(
        '[policy]\ndefault_allow = ["pypi.org", "*.github.com:443", "192.0.2.0/24:443"]\n'
        'default_deny = ["gist.github.com"]'
    ).policy
    assert policy.default_allow == ("pypi.org", "*.github.com:443", "192.0.2.0/24:443")
    assert policy.default_deny == ("gist.github.com",)


def test_too_many_rules_are_refused() -> None:
    """A rule list longer than a request may send is refused."""
    names = ", ".join(f'"h{i}.example"' for i in range(1025))
    (found,) = problems_of(f"[policy]\ndefault_deny = [{names}]")
    assert found.startswith("policy.default_deny: 1025 rules; at most 1024")


@pytest.mark.parametrize("resource", ["memory", "cpus", "pids", "timeout"])
def test_default_above_maximum_is_rejected(resource: str) -> None:
    """default_* more than max_* is an error for every resource."""
    values = {
        "memory": ('"4G"', '"2G"'),
        "cpus": ("3", "2"),
        "pids": ("300", "200"),
        "timeout": ('"2h"', '"1h"'),
    }
    default, maximum = values[resource]
    (found,) = problems_of(f"[limits]\ndefault_{resource} = {default}\nmax_{resource} = {maximum}")
    assert found.startswith(f"limits.default_{resource}: ")
    assert f"is more than limits.max_{resource}" in found


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('default_allow = "pypi.org"', "policy.default_allow: expected an array"),
        ('default_allow = ["pypi.org", ""]', "policy.default_allow: item 1: invalid rule '': "),
        ('default_allow = ["*"]', "policy.default_allow: item 0: invalid rule '*': "),
        ('default_allow = ["*.com"]', "policy.default_allow: item 0: invalid rule '*.com': "),
        ("default_allow = [443]", "policy.default_allow: item 0: expected a string"),
        ('default_deny = ["a b"]', "policy.default_deny: item 0: invalid rule 'a b'"),
        ('default_deny = ["a\\u0007"]', "policy.default_deny: item 0: invalid rule"),
        ('default_allow = ["a" ]\nx = 1', "unknown key 'policy.x'"),
        ('blocked_dns_answer = "nxdomain"', "policy.blocked_dns_answer: expected one of"),
        ('decision_timeout = "2h"', "policy.decision_timeout: at most 3600 seconds, got 7200"),
        ("decision_timeout = 0", "policy.decision_timeout: a duration in seconds must be more"),
    ],
)
def test_bad_policy_values_are_named(text: str, problem: str) -> None:
    """Policy rules must be arrays of printable strings; the DNS answer is one of two."""
    (found,) = problems_of(f"[policy]\n{text}")
    assert found.startswith(problem)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('"a.example" = "300.1.2.3"', "hosts.a.example: invalid IP address '300.1.2.3'"),
        ('"a.example" = "pypi.org"', "hosts.a.example: invalid IP address 'pypi.org'"),
        ('"a.example" = 167772165', "hosts.a.example: expected a string, got an integer"),
        ('"bad name!" = "10.0.0.1"', "hosts.bad name!: invalid host name 'bad name!'"),
        ('"-a.example" = "10.0.0.1"', "hosts.-a.example: invalid host name"),
        ('"10.0.0.1" = "10.0.0.1"', "hosts.10.0.0.1: invalid host name"),
        ('a.example = "10.0.0.1"', "hosts.a: expected an IP address string; quote host names"),
        (
            '"A.example" = "10.0.0.1"\n"a.example." = "10.0.0.2"',
            "hosts.a.example.: 'a.example' is listed twice",
        ),
    ],
)
def test_bad_hosts_are_named(text: str, problem: str) -> None:
    """Host entries need a valid name and an IP address string."""
    (found,) = problems_of(f"[hosts]\n{text}")
    assert found.startswith(problem)


def test_host_names_are_canonical() -> None:
    """Host names are stored as the policy matcher writes them: lower case, punycode."""
    hosts = parse('[hosts]\n"Bücher.Example." = "192.0.2.7"').hosts
    assert dict(hosts) == {"xn--bcher-kva.example": ipaddress.ip_address("192.0.2.7")}


def test_every_problem_is_listed_and_error_counts_the_rest() -> None:
    """find_problems lists all problems; the start-up error shows the first and counts the rest."""
    text = 'log_format = "xml"\nbogus = 1\n[limits]\nmax_pids = 0'
    assert len(problems_of(text)) == 3
    message = error_of(text)
    assert message.startswith("netjaild.toml: log_format: ")
    assert "(and 2 more problem(s); 'netjaild --check-config netjaild.toml' lists them" in message
    assert "\n" not in message


# --- the file ----------------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    """load_config reads and parses the named file."""
    path = write(tmp_path / "netjaild.toml", FULL)
    assert load_config(path) == parse(FULL)


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    """A file named explicitly must exist."""
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_config(str(tmp_path / "nope.toml"))


def test_missing_default_file_means_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without a file at the default path, load_config returns the defaults."""
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    assert load_config(None) == Config()
    assert check_config(None) == []


def test_default_path_is_etc_netjail() -> None:
    """The default file is /etc/netjail/netjaild.toml."""
    assert DEFAULT_CONFIG_PATH == "/etc/netjail/netjaild.toml"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A TOML syntax error is a ConfigError naming the file and the position."""
    path = write(tmp_path / "bad.toml", "socket = \n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML: .*line 1"):
        load_config(path)


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'group = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(str(path))


def test_directory_is_rejected(tmp_path: Path) -> None:
    """A directory where the file should be is a ConfigError."""
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path))
    assert str(caught.value) == f"{tmp_path}: cannot read: Is a directory"


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_file_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    """Whoever can write the file controls the daemon, so group/world-writable files are refused."""
    path = write(tmp_path / "netjaild.toml", "", mode)
    with pytest.raises(ConfigError, match=f"writable by group or others \\(mode {mode:04o}\\)"):
        load_config(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A file owned by neither root nor the daemon's user is refused."""
    path = write(tmp_path / "netjaild.toml", "")
    os.chown(path, 65534, -1)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        load_config(path)


def test_check_config_lists_every_problem_with_the_file(tmp_path: Path) -> None:
    """check_config returns one 'FILE: problem' line per problem, [] for a good file."""
    good = write(tmp_path / "good.toml", FULL)
    bad = write(tmp_path / "bad.toml", 'sockt = 1\n[limits]\nmax_memory = "12Q"\n')
    assert check_config(good) == []
    assert check_config(bad) == [
        f"{bad}: limits.max_memory: invalid size '12Q':"
        " use a number with an optional K, M, G or T suffix, e.g. 512M",
        f"{bad}: unknown key 'sockt' (did you mean 'socket'?)",
    ]
    assert check_config(str(tmp_path / "absent.toml")) == [
        f"{tmp_path / 'absent.toml'}: no such file"
    ]


# --- docs and example stay true to the code ----------------------------------------------------


def test_example_file_loads_as_shipped() -> None:
    """etc/netjaild.toml.example, as installed, is a valid config (all defaults)."""
    assert check_config(str(EXAMPLE)) == []
    assert load_config(str(EXAMPLE)) == Config()


def test_example_file_states_the_true_defaults() -> None:
    """Uncommenting every '#key = value' line of the example changes nothing: they are defaults."""
    lines = EXAMPLE.read_text().splitlines()
    uncommented = [line[1:] for line in lines if re.match(r"#[A-Za-z_\[]", line)]
    data = tomllib.loads("\n".join(uncommented))
    assert parse_config(data) == Config()
    assert data, "the example shows no default at all"


def test_example_file_mentions_every_key() -> None:
    """Every key of Config appears in the example file."""
    text = EXAMPLE.read_text()
    for key in config_keys():
        assert re.search(rf"\b{key.rsplit('.', 1)[-1]}\b", text), key
    for table in ("limits", "policy", "hosts"):
        assert f"#[{table}]" in text


def test_config_keys_match_the_dataclasses() -> None:
    """config_keys lists every field of Config, Limits, Policy, Jail and Proxy."""
    tables = ("limits", "policy", "jail", "proxy")
    expected = [f.name for f in dataclasses.fields(Config) if f.name not in tables]
    expected += [f"limits.{f.name}" for f in dataclasses.fields(Limits)]
    expected += [f"policy.{f.name}" for f in dataclasses.fields(Policy)]
    expected += [f"jail.{f.name}" for f in dataclasses.fields(Jail)]
    expected += [f"proxy.{f.name}" for f in dataclasses.fields(Proxy)]
    assert sorted(config_keys()) == sorted(expected)


def test_docs_document_exactly_the_keys_of_the_code() -> None:
    """docs/CONFIG.md has a table row for every key of Config and none for keys it lacks."""
    text = CONFIG_DOC.read_text()
    documented = re.findall(r"^\| `([a-z_.]+)` \|", text, re.MULTILINE)
    assert sorted(documented) == sorted(config_keys())


def test_docs_state_the_defaults_of_the_code() -> None:
    """The Default column of docs/CONFIG.md agrees with Config()."""
    text = CONFIG_DOC.read_text()
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \| [^|]+ \| ([^|]+) \|", text, re.MULTILINE))
    for key in config_keys():
        shown = rows[key].strip()
        if shown in ("absent", "empty"):
            # Then the code's default is no value at all: None, or an empty table.
            default = Config()
            for name in key.split("."):
                default = getattr(default, name)
            assert default == ({} if shown == "empty" else None), key
            continue
        value = tomllib.loads(f"v = {shown.strip('`')}")["v"]
        section, _, name = key.rpartition(".")
        document = {section: {name: value}} if section else {name: value}
        assert parse_config(document) == Config(), key


def test_jail_table_is_read_into_typed_values() -> None:
    """[jail]: the uid range, binds as BindMounts with their access, tmpfs sizes in bytes."""
    config = parse_config(
        {
            "jail": {
                "job_uids": "70000-70009",
                "binds": ["/srv/work"],
                "ro_binds": ["/srv/data:/data"],
                "tmp_size": "1G",
                "dev_shm_size": 1024,
            }
        }
    )
    assert (config.jail.job_uids.first, config.jail.job_uids.last) == (70000, 70009)
    assert config.jail.binds == (BindMount(source="/srv/work", target=None, access="rw"),)
    assert config.jail.ro_binds == (BindMount(source="/srv/data", target="/data", access="ro"),)
    assert (config.jail.tmp_size, config.jail.dev_shm_size) == (1 << 30, 1024)
    assert config.jail.run_size == Jail().run_size


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"job_uids": "5-1"}, "jail.job_uids: range '5-1' ends before it starts"),
        ({"job_uids": "0-10"}, "jail.job_uids: range '0-10' contains uid 0, which no job may use"),
        ({"binds": ["relative"]}, "jail.binds: item 0: invalid bind 'relative'"),
        ({"tmp_size": "12Q"}, "jail.tmp_size: invalid size '12Q'"),
    ],
)
def test_bad_jail_values_name_the_key(table: dict[str, object], problem: str) -> None:
    """Each bad [jail] value is reported with its dotted key."""
    problems = find_problems({"jail": table})
    assert len(problems) == 1
    assert problems[0].startswith(problem)


def test_shipped_pids_default_is_capped_by_a_lower_maximum() -> None:
    """With max_pids below the shipped default, a job that asks for nothing gets the max."""
    assert parse_config({"limits": {"max_pids": 64}}).limits.default_pids == 64
    assert parse_config({"limits": {"max_pids": 100000}}).limits.default_pids == 4096
    assert parse_config({}).limits.default_pids == 4096
