"""The job's CA: leaves that verify for their name only, and a key that is never written."""

from __future__ import annotations

import contextlib
import ssl
import tempfile

import pytest

from netjail.daemon.certauthority import MAX_LEAVES, JobCA


def handshake(ca: JobCA, served: str, asked: str) -> str | None:
    """A TLS handshake in memory: a client trusting only the CA asks for ``asked``; the
    server presents the leaf for ``served``. Returns the ALPN chosen."""
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(ca.cert_pem)
        f.flush()
        client_context = ssl.create_default_context(cafile=f.name)
    client_context.set_alpn_protocols(["h2", "http/1.1"])
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_hostname=asked)
    server = ca.server_context(served).wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.do_handshake()
    return client.selected_alpn_protocol()


def test_a_leaf_verifies_against_the_job_ca_and_offers_http11_only() -> None:
    """A client trusting the CA accepts the leaf for its name; ALPN picks http/1.1 over h2."""
    ca = JobCA("j-test")
    assert handshake(ca, "api.example.com", "api.example.com") == "http/1.1"


def test_a_leaf_does_not_verify_for_another_name() -> None:
    """The leaf names exactly one host."""
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(JobCA("j-test"), "api.example.com", "other.example.com")


def test_leaves_are_cached_per_name_and_no_key_is_in_the_cert() -> None:
    """One context per name for the job's life; the PEM handed out holds no private key."""
    ca = JobCA("j-test")
    assert ca.server_context("a.example") is ca.server_context("a.example")
    assert b"PRIVATE KEY" not in ca.cert_pem


def test_a_job_cannot_grow_its_leaf_cache_without_bound() -> None:
    """A job intercepting *.NAME keeps at most MAX_LEAVES leaf contexts, least recent dropped."""
    ca = JobCA("j-test")
    first = ca.server_context("n0.api.example.com")
    for i in range(1, MAX_LEAVES + 44):
        ca.server_context(f"n{i}.api.example.com")
    assert len(ca._leaves) == MAX_LEAVES
    assert ca.server_context("n0.api.example.com") is not first
