"""Interception in the job spec: implied allow rules, trust variables, the config's defaults."""

from __future__ import annotations

import pytest

from netjail import protocol as p
from netjail.daemon.config import Config, Proxy
from netjail.daemon.config import Policy as PolicySettings
from netjail.daemon.spec import TRUST_ENV, job_spec
from netjail.errors import RequestError
from netjail.kernel.peer import PeerCred

ALICE = PeerCred(pid=2, uid=1000, gid=1001)


def spec_of(config: Config = Config(), **fields: object):  # type: ignore[no-untyped-def]  # noqa: B008
    return job_spec(p.RunRequest(argv=["/bin/true"], **fields), ALICE, config)  # type: ignore[arg-type]


def test_an_intercepted_name_is_allowed_as_allow_would_and_gets_the_trust_variables() -> None:
    """--intercept NAME allows NAME on 80 and 443 and sets every trust variable."""
    spec = spec_of(mocks=["GET api.example.com/=200"])
    assert spec.policy.allows("api.example.com", 443)
    assert not spec.policy.allows("api.example.com", 8443)
    assert spec.http.intercepts("api.example.com")
    assert {k: spec.env[k] for k in TRUST_ENV} == TRUST_ENV


def test_a_job_that_intercepts_nothing_gets_no_trust_variables() -> None:
    """No interception: no CA, no variables pointing at one."""
    assert not set(TRUST_ENV) & set(spec_of(allow=["pypi.org"]).env)


def test_the_requests_own_variable_wins() -> None:
    """A job that sets SSL_CERT_FILE itself keeps its value."""
    spec = spec_of(intercept=["a.example"], env={"SSL_CERT_FILE": "/mine.pem"})
    assert spec.env["SSL_CERT_FILE"] == "/mine.pem"


def test_the_config_defaults_join_the_jobs_and_the_operators_header_comes_last() -> None:
    """default_* lists are added; default_allow_requests only stands in for none."""
    config = Config(
        policy=PolicySettings(
            default_intercept=("op.example",),
            default_deny_requests=("DELETE op.example/*",),
            default_allow_requests=("GET op.example/ok",),
            default_inject_headers=("api.example:X-Key=operator",),
        ),
        proxy=Proxy(upstream_ca="/etc/ca.pem"),
    )
    spec = spec_of(config, inject_headers=["api.example:X-Key=job"], allow_requests=["GET a.b/x"])
    assert spec.http.intercepts("op.example")
    assert [r.text for r in spec.http.deny_requests] == ["DELETE op.example/*"]
    assert [r.text for r in spec.http.allow_requests] == ["GET a.b/x"]
    assert [i.value for i in spec.http.injections_for("api.example")] == ["job", "operator"]
    assert spec.upstream_ca == "/etc/ca.pem"


def test_add_host_is_refused_for_a_name_the_operator_injects_a_credential_for() -> None:
    """--add-host cannot point a name of default_inject_headers at an address of the client's."""
    config = Config(
        policy=PolicySettings(default_inject_headers=["vault.example.com:X-Token=operator"])
    )
    with pytest.raises(RequestError, match="injects headers for this name"):
        spec_of(config, add_hosts=["Vault.example.com:192.0.2.7"])
    assert spec_of(config, add_hosts=["other.example.com:192.0.2.7"]).job_hosts
