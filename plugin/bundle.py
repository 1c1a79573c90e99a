"""Device bundles and the private files of the household PKI.

A device bundle is the folder that one device needs to join its household's
data plane::

    ca.pem       the household CA certificate (trust anchor)
    device.pem   the device certificate, issued by the household CA
    device.key   the device's private key (mode 0600)
    crl.pem      the household's certificate revocation list

Every file is written to a temporary name and renamed into place, so a reader
never sees half a key. Every file has mode 0600: the key must stay private, and
the other files reveal which devices a household has.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from homesplit.errors import ConfigError

__all__ = [
    "BUNDLE_CA",
    "BUNDLE_CERT",
    "BUNDLE_KEY",
    "BUNDLE_CRL",
    "DeviceBundle",
    "certificate_identity",
    "write_private_file",
    "write_bundle_dir",
]

logger = logging.getLogger(__name__)

BUNDLE_CA = "ca.pem"
BUNDLE_CERT = "device.pem"
BUNDLE_KEY = "device.key"
BUNDLE_CRL = "crl.pem"

_PRIVATE_FILE_MODE = 0o600
_PRIVATE_DIR_MODE = 0o700


def certificate_identity(cert: x509.Certificate) -> tuple[str | None, str | None]:
    """Return the device name and household id that a device certificate names.

    The device name is taken from the subject alternative name (DNS name) and
    must agree with the common name. The household id is the subject's
    organization name.

    Returns
    -------
    tuple of (str or None, str or None)
        ``(device, household)``. An element is None when the certificate does
        not name it, or names it inconsistently.
    """
    common_names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    organizations = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []

    device = None
    if len(dns_names) == 1 and common_names == dns_names:
        device = str(dns_names[0])
    household = str(organizations[0]) if len(organizations) == 1 else None
    return device, household


def write_private_file(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write `data` to `path` atomically with mode 0600.

    Parameters
    ----------
    path : Path
        Destination file.
    data : bytes
        Content to write.
    exclusive : bool, default False
        If True, fail instead of replacing an existing file, also when another
        process creates `path` at the same moment.

    Raises
    ------
    FileExistsError
        If `exclusive` is True and `path` exists.
    """
    temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE_MODE)
    try:
        # The umask may have narrowed the mode further; fchmod makes it exact.
        os.fchmod(fd, _PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb", closefd=False) as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    finally:
        os.close(fd)
    try:
        if exclusive:
            # link() fails if the target exists, unlike rename().
            os.link(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    _fsync_dir(path.parent)


def write_bundle_dir(directory: Path, files: dict[str, bytes]) -> None:
    """Write a bundle folder atomically: a reader sees the old bundle or the new one.

    The files are written into a hidden sibling folder, which is then renamed
    to `directory`. An existing bundle at `directory` (a rotated device) is
    moved aside first and deleted after the new one is in place.
    """
    parent = directory.parent
    parent.mkdir(mode=_PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    staging = parent / f".{directory.name}.tmp-{token}"
    staging.mkdir(mode=_PRIVATE_DIR_MODE)
    try:
        os.chmod(staging, _PRIVATE_DIR_MODE)
        for name, data in files.items():
            write_private_file(staging / name, data, exclusive=True)
        old = None
        if directory.exists():
            old = parent / f".{directory.name}.old-{token}"
            os.rename(directory, old)
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class DeviceBundle:
    """Paths of the four files that a device needs for mutual TLS.

    Parameters
    ----------
    ca : Path
        Household CA certificate (PEM).
    cert : Path
        Device certificate (PEM).
    key : Path
        Device private key (PEM, unencrypted, mode 0600).
    crl : Path
        Household certificate revocation list (PEM).
    """

    ca: Path
    cert: Path
    key: Path
    crl: Path

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> DeviceBundle:
        """Return the bundle stored in `directory`.

        Raises
        ------
        ConfigError
            If a file of the bundle is missing.
        """
        root = Path(directory)
        bundle = cls(root / BUNDLE_CA, root / BUNDLE_CERT, root / BUNDLE_KEY, root / BUNDLE_CRL)
        bundle.check_files()
        return bundle

    def check_files(self) -> None:
        """Check that every file exists and warn if the key is readable by others.

        Raises
        ------
        ConfigError
            If a file is missing.
        """
        for label, path in (("CA certificate", self.ca), ("device certificate", self.cert), ("device key", self.key), ("CRL", self.crl)):
            if not path.is_file():
                raise ConfigError(
                    f"device bundle {label} {str(path)!r} not found; copy the bundle written by "
                    "'homesplit household enroll' onto this device"
                )
        mode = stat.S_IMODE(self.key.stat().st_mode)
        if mode & 0o077:
            logger.warning("Device key %s has mode %o; run 'chmod 600 %s' so that only its owner can read it", self.key, mode, self.key)

    def identity(self) -> tuple[str, str]:
        """Return ``(device, household)`` as the bundle's certificate names them.

        Raises
        ------
        ConfigError
            If the certificate does not name one device and one household.
        """
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        device, household = certificate_identity(cert)
        if device is None or household is None:
            raise ConfigError(
                f"certificate {str(self.cert)!r} does not name exactly one device (SAN and CN) and one household (O); "
                "issue it with 'homesplit household enroll'"
            )
        return device, household
