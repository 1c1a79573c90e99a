"""Throwaway TLS certificates for a local Flower federation.

`LocalFederation` needs a CA that the SuperNodes and the `flwr` CLI trust and
a server certificate that the SuperLink presents on loopback. Both live only as
long as one federation: the CA signs exactly one certificate and its private
key is written nowhere, so nothing else can ever be signed with it.

Keys are ECDSA on the NIST P-256 curve with SHA-256 signatures, which every TLS
stack that Flower 1.42 uses (Python's ssl for the HTTP APIs, gRPC's BoringSSL)
accepts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ServerCertificates", "write_loopback_certificates"]

# Clock skew between certificate creation and its first use is zero on one
# machine, but a few minutes of margin keep a slightly adjusted clock harmless.
_NOT_BEFORE_MARGIN = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class ServerCertificates:
    """Paths of the PEM files that a TLS SuperLink and its clients need.

    Parameters
    ----------
    ca_certfile : Path
        Certificate of the throwaway CA, given to every client as its root.
    certfile : Path
        SuperLink server certificate, signed by the CA.
    keyfile : Path
        Private key of the server certificate, readable only by its owner.
    """

    ca_certfile: Path
    certfile: Path
    keyfile: Path


def write_loopback_certificates(
    directory: Path,
    *,
    valid_for: datetime.timedelta = datetime.timedelta(days=1),
) -> ServerCertificates:
    """Create a CA and a loopback server certificate in `directory`.

    The server certificate names ``localhost``, ``127.0.0.1`` and ``::1`` as
    subject alternative names, so clients may dial any of them.

    Parameters
    ----------
    directory : Path
        Existing folder that receives ``ca.pem``, ``server.pem`` and
        ``server.key``.
    valid_for : datetime.timedelta, default 1 day
        Validity period of both certificates.

    Returns
    -------
    ServerCertificates
        Paths of the files written.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - _NOT_BEFORE_MARGIN
    not_after = now + valid_for

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "homesplit local federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: the CA may sign leaf certificates but no other CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(alt_names, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = ServerCertificates(
        ca_certfile=directory / "ca.pem",
        certfile=directory / "server.pem",
        keyfile=directory / "server.key",
    )
    paths.ca_certfile.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.certfile.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create the key file with mode 0600 at once, so it is never readable by
    # others, not even between creation and a later chmod.
    descriptor = os.open(paths.keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as key_file:
        key_file.write(key_pem)
    return paths


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """Build the key usage of a CA (`cert_sign`) or of an ECDHE server leaf."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
