"""Mutual TLS 1.3 links between the devices of one household.

`TlsTransport` is `TcpTransport` with every connection wrapped in TLS. Both
sides verify, in this order:

1. The TLS handshake: TLS 1.3 only, and the peer presents a certificate that
   chains to the household CA, is within its validity period and is not listed
   in the household CRL. OpenSSL checks all of this.
2. The certificate's names: its household id (subject O) must be this device's
   household, and its device name (SAN and CN) must be the device that the plan
   expects at that stage. The dialing side checks this right after the
   handshake, before it sends anything. The listening side checks it against
   the peer's HELLO frame, because a listener learns which stage a connection
   is for only from that frame.

Downstream stages listen and upstream stages dial, as in `TcpTransport`. Each
link is two TLS connections, one per direction, so no OpenSSL connection is
ever read and written from two threads. Each connection is a
`homesplit.tls_stream.TlsStream`, which moves ciphertext in large socket
calls instead of one or two per 16 KiB record.

Hostname checking is off on purpose: devices are identified by name, not by
address, because home routers hand out addresses by DHCP. Step 2 replaces it.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl

from cryptography import x509

from homesplit.bundle import DeviceBundle, certificate_identity
from homesplit.errors import ConfigError, PeerRejectedError
from homesplit.link import LinkTimeouts, SocketLink
from homesplit.tls_stream import TlsStream
from homesplit.transport import PeerIdentity, TcpTransport
from homesplit.wire import FrameLimits

__all__ = ["TlsTransport", "client_context", "describe_tls_error", "server_context"]

logger = logging.getLogger(__name__)

# OpenSSL reason codes, mapped to what they mean for a household link.
_HANDSHAKE_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a certificate that this side did not send",
    "UNSUPPORTED_PROTOCOL": "the peer does not offer TLS 1.3",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not accept TLS 1.3",
    "NO_PROTOCOLS_AVAILABLE": "the peer does not offer TLS 1.3",
    "WRONG_VERSION_NUMBER": "the peer did not start a TLS handshake (a plaintext client?)",
    "HTTP_REQUEST": "the peer sent an HTTP request, not a TLS handshake",
    "PACKET_LENGTH_TOO_LONG": "the peer did not start a TLS handshake (a plaintext client?)",
    "RECORD_LAYER_FAILURE": "the peer did not start a TLS handshake (a plaintext client?)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this device's certificate (another household's CA?)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the peer reports that this device's certificate is revoked",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer reports that this device's certificate has expired",
}


# Certificate verification messages of OpenSSL, with what to do about them.
_VERIFY_HINTS = {
    "unable to get local issuer certificate": "the certificate was not issued by this household's CA",
    "certificate has expired": "enroll the device again to renew it",
    "certificate is not yet valid": "check the device's clock",
    "certificate revoked": "the household revoked this device",
    "unable to get certificate CRL": "copy the household's crl.pem into the device bundle",
    "CRL has expired": "copy a fresh crl.pem from the household folder into the device bundle",
}


def _base_context(protocol: ssl._SSLMethod, bundle: DeviceBundle) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        # Device names are checked against the plan after the handshake.
        context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED

    # CRL_CHECK_LEAF makes a missing or expired CRL a handshake failure, so a
    # device never silently skips revocation.
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT

    # Only the household CA is trusted; no system CA is ever loaded.
    context.load_verify_locations(cafile=str(bundle.ca))
    context.load_verify_locations(cafile=str(bundle.crl))
    context.load_cert_chain(certfile=str(bundle.cert), keyfile=str(bundle.key))
    return context


def server_context(bundle: DeviceBundle) -> ssl.SSLContext:
    """Build the listening side's context: TLS 1.3 only, client certificate required.

    Session tickets are off (``num_tickets = 0``): links are long-lived, and a
    resumed session would skip the certificate and CRL checks.
    """
    context = _base_context(ssl.PROTOCOL_TLS_SERVER, bundle)
    context.num_tickets = 0
    return context


def client_context(bundle: DeviceBundle) -> ssl.SSLContext:
    """Build the dialing side's context: TLS 1.3 only, server certificate required."""
    return _base_context(ssl.PROTOCOL_TLS_CLIENT, bundle)


def describe_tls_error(exc: BaseException) -> str:
    """Return a one-line reason for a failed TLS handshake or read."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = _VERIFY_HINTS.get(exc.verify_message)
        suffix = f" ({hint})" if hint else ""
        return f"certificate verification failed: {exc.verify_message}{suffix}"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        if reason in _HANDSHAKE_REASONS:
            return f"TLS handshake failed: {_HANDSHAKE_REASONS[reason]} ({reason})"
        return f"TLS handshake failed: {reason or exc}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {exc}"


def _peer_address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class TlsTransport(TcpTransport):
    """Links secured with mutual TLS 1.3 and the household's certificates.

    Parameters
    ----------
    bundle : DeviceBundle or str or os.PathLike
        This device's bundle, or the folder that contains it.
    limits : FrameLimits, optional
        Header limits applied to every received frame.
    timeouts : LinkTimeouts, optional
        Connection, receive and liveness deadlines.

    Raises
    ------
    ConfigError
        If a bundle file is missing or its certificate names no device.

    Notes
    -----
    The CRL is read once, here. After a revocation, copy the new crl.pem onto
    every device; links created by a transport built afterwards enforce it.
    """

    def __init__(
        self,
        bundle: DeviceBundle | str | os.PathLike[str],
        *,
        limits: FrameLimits | None = None,
        timeouts: LinkTimeouts | None = None,
    ) -> None:
        super().__init__(limits=limits, timeouts=timeouts)
        self.bundle = bundle if isinstance(bundle, DeviceBundle) else DeviceBundle.from_dir(bundle)
        self.bundle.check_files()
        self.device, self.household = self.bundle.identity()
        try:
            self._server_context = server_context(self.bundle)
            self._client_context = client_context(self.bundle)
        except ssl.SSLError as exc:
            raise ConfigError(f"device bundle {str(self.bundle.cert.parent)!r} cannot be loaded: {exc}; enroll the device again") from exc

    @classmethod
    def from_bundle(
        cls,
        bundle: DeviceBundle | str | os.PathLike[str],
        *,
        limits: FrameLimits | None = None,
        timeouts: LinkTimeouts | None = None,
    ) -> TlsTransport:
        """Build a transport from a device bundle or its folder; the same as the constructor."""
        return cls(bundle, limits=limits, timeouts=timeouts)

    def dial(self, address: str, *, local: PeerIdentity, expect: PeerIdentity) -> SocketLink:
        """Connect to the downstream stage at `address`; see `TcpTransport.dial`."""
        self._check_plan(local, expect)
        return super().dial(address, local=local, expect=expect)

    def accept(self, listener: socket.socket, *, local: PeerIdentity, expect: PeerIdentity) -> SocketLink:
        """Accept the upstream stage on `listener`; see `TcpTransport.accept`."""
        self._check_plan(local, expect)
        return super().accept(listener, local=local, expect=expect)

    def _check_plan(self, local: PeerIdentity, expect: PeerIdentity) -> None:
        if local.device != self.device or local.household != self.household:
            raise ConfigError(
                f"the plan runs this device as {local.describe()}, but its bundle belongs to "
                f"{self.household}/{self.device}; pass the bundle of {local.device}"
            )
        if expect.household != self.household:
            raise ConfigError(
                f"the plan expects peer {expect.describe()} from another household than {self.household}; "
                "links never cross households"
            )

    def _client_socket(self, sock: socket.socket, expect: PeerIdentity) -> socket.socket:
        peer = _peer_address(sock)
        try:
            tls = TlsStream.handshake(sock, self._client_context, server_side=False)
        except (ssl.SSLError, OSError) as exc:
            raise PeerRejectedError(f"{expect.describe()} at {peer} rejected: {describe_tls_error(exc)}", peer=peer) from exc
        device, household = self._peer_identity(tls)
        if household != self.household or device != expect.device:
            tls.close()
            raise PeerRejectedError(
                f"{peer} presented a certificate for {household}/{device}, but the plan expects {expect.describe()}",
                peer=peer,
            )
        return tls

    def _server_socket(self, sock: socket.socket) -> socket.socket:
        peer = _peer_address(sock)
        try:
            tls = TlsStream.handshake(sock, self._server_context, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise PeerRejectedError(describe_tls_error(exc), peer=peer) from exc
        device, household = self._peer_identity(tls)
        if household != self.household or device is None:
            tls.close()
            raise PeerRejectedError(
                f"certificate names device {device!r} of household {household!r}, not a device of {self.household}",
                peer=peer,
            )
        return tls

    def _proven_device(self, sock: socket.socket) -> str | None:
        # None would make TcpTransport trust the HELLO claim, so never return it.
        peer = _peer_address(sock)
        if not isinstance(sock, TlsStream):
            raise PeerRejectedError("connection is not TLS", peer=peer)
        device = self._peer_identity(sock)[0]
        if device is None:
            raise PeerRejectedError("certificate names no single device", peer=peer)
        return device

    @staticmethod
    def _peer_identity(sock: TlsStream) -> tuple[str | None, str | None]:
        der = sock.getpeercert(binary_form=True)
        if der is None:
            return None, None
        return certificate_identity(x509.load_der_x509_certificate(der))
