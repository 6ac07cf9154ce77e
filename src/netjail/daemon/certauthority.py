"""A job's own certificate authority, for the names the proxy intercepts.

Made per job when it intercepts anything, with ``cryptography``: an ECDSA P-256 key and a
self-signed CA certificate (``pathLenConstraint`` 0), valid from an hour ago for
:data:`VALIDITY`. Only the certificate leaves the daemon (in the job's trust bundle); the keys
live in the daemon's memory, and reach OpenSSL through a memfd that is closed as soon as it is
loaded, so they are never in a file anyone can open. Leaf certificates are made per name when
the job first connects to it, or ahead for the names it intercepts exactly (``make_leaf`` in a
thread, then ``keep_leaf``), and cached for the job's life, one SSLContext each.
"""

from __future__ import annotations

import datetime
import os
import ssl
from collections import OrderedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: How long the CA and its leaves are valid (the longest job timeout is 30 days).
VALIDITY = datetime.timedelta(days=31)
#: How far back their validity starts: clocks in a job's world may lag a little.
_BACKDATE = datetime.timedelta(hours=1)
#: The one protocol the proxy speaks to the job inside TLS.
ALPN = ("http/1.1",)
#: Leaf contexts kept per job, least recently used dropped first.
MAX_LEAVES = 256


class JobCA:
    """A CA for one job, and the server contexts of the leaves it signed."""

    def __init__(self, job_id: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        # One leaf key for every name of the job: a new key per name buys nothing here.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "netjail"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"netjail {job_id} interception CA"),
            ]
        )
        public = self._key.public_key()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - _BACKDATE)
            .not_valid_after(self._now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._leaves: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM: what the job's trust bundle holds."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def server_context(self, name: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for ``name`` (canonical), cached."""
        context = self._leaves.get(name)
        if context is None:
            context = self.make_leaf(name)
            self.keep_leaf(name, context)
        else:
            self._leaves.move_to_end(name)
        return context

    def make_leaf(self, name: str) -> ssl.SSLContext:
        """A new server context for ``name``, not cached. Safe in another thread: it reads
        only what the constructor made (about 1.5 ms, most of it OpenSSL loading the key)."""
        return _server_context(self._leaf_pem(name))

    def keep_leaf(self, name: str, context: ssl.SSLContext) -> None:
        """Cache ``context`` as ``name``'s, unless one is cached already (on the loop only)."""
        if name in self._leaves:
            return
        self._leaves[name] = context
        if len(self._leaves) > MAX_LEAVES:
            # A job intercepting *.NAME could otherwise grow the daemon by one per name.
            self._leaves.popitem(last=False)

    def _leaf_pem(self, name: str) -> bytes:
        public = self._leaf_key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self._cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - _BACKDATE)
            .not_valid_after(self._now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        key = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM) + key


def _server_context(chain_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(list(ALPN))
    # One TLS 1.3 session ticket, not OpenSSL's default two (each costs ~40 µs, between the
    # job's Finished and its first request), and not none: sent right after the handshake, it
    # ACKs the client's Finished at once. Without it, a client with Nagle on (most) holds its
    # request behind that Finished until the proxy's delayed ACK: 40 ms on every connection.
    context.num_tickets = 1
    # load_cert_chain takes only a path: a memfd's, never a file on any file system.
    fd = os.memfd_create("netjail-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


_upstream_contexts: dict[str | None, ssl.SSLContext] = {}


def upstream_context(cafile: str | None) -> ssl.SSLContext:
    """A client context that verifies upstreams fully: the host's trust store, or ``cafile``.

    Cached per path, since loading a trust store takes milliseconds; a changed file is read
    again only by a restart.
    """
    context = _upstream_contexts.get(cafile)
    if context is None:
        context = ssl.create_default_context(cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(list(ALPN))
        _upstream_contexts[cafile] = context
    return context
