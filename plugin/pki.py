"""The household certificate authority: create it, enroll, list and revoke devices.

A household folder contains::

    household.json      the household id
    ca.pem, ca.key      the household CA certificate and private key (0600)
    crl.pem             the certificate revocation list, signed by the CA
    issued/SERIAL.pem   every device certificate the CA has issued
    bundles/DEVICE/     the latest bundle of each enrolled device

Keys are ECDSA on NIST P-256, which every OpenSSL build behind Python's ssl
module supports, Raspberry Pi OS included. Certificates name the device in the
subject alternative name (one DNS name) and in the common name, and the
household id in the subject's organization name.

NOTE: ca.key is stored unencrypted, so anyone who can read the household folder
can enroll devices. Keep the folder on the household's own machine or offline media.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from homesplit.bundle import BUNDLE_CA, BUNDLE_CERT, BUNDLE_CRL, BUNDLE_KEY, certificate_identity, write_bundle_dir, write_private_file
from homesplit.errors import ConfigError

__all__ = [
    "DEFAULT_CA_DAYS",
    "DEFAULT_DEVICE_DAYS",
    "DEFAULT_CRL_DAYS",
    "CertificateStatus",
    "DeviceRecord",
    "Household",
    "validate_name",
]

logger = logging.getLogger(__name__)

DEFAULT_CA_DAYS = 3650
DEFAULT_DEVICE_DAYS = 365
DEFAULT_CRL_DAYS = 365

# Devices without a real-time clock (a Raspberry Pi) can run minutes behind,
# so certificates start an hour before they are issued.
_CLOCK_SKEW = datetime.timedelta(hours=1)
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_SIGNATURE_HASH = hashes.SHA256()


class CertificateStatus(enum.Enum):
    """State of an issued device certificate at a given time."""

    VALID = "valid"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceRecord:
    """One certificate that the household CA issued to a device."""

    device: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    status: CertificateStatus
    revoked_at: datetime.datetime | None = None


def validate_name(value: str, what: str) -> str:
    """Return `value` if it is a valid household id or device name.

    Names are 1 to 63 ASCII letters, digits, ``-`` or ``_``, starting with a
    letter or digit, so that they fit a DNS label and a file name.

    Raises
    ------
    ConfigError
        If `value` is not such a name.
    """
    if not _NAME_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is invalid; use 1 to 63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return value


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class Household:
    """A household CA stored in a folder.

    Call `Household.create` once per household, and this constructor afterwards.

    Parameters
    ----------
    directory : str or os.PathLike
        The household folder.

    Raises
    ------
    ConfigError
        If the folder does not contain a household CA.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        for name in ("household.json", "ca.pem", "ca.key"):
            if not (self.directory / name).is_file():
                raise ConfigError(
                    f"no household CA in {str(self.directory)!r} ({name} not found); "
                    "run 'homesplit household init NAME' or pass the right --dir"
                )
        try:
            meta = json.loads((self.directory / "household.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(f"{str(self.directory / 'household.json')!r} is corrupt ({exc}); restore it from a backup") from exc
        household_id = meta.get("household") if isinstance(meta, dict) else None
        self.household_id: str = validate_name(str(household_id or ""), "household id in household.json")
        try:
            self.ca_cert = x509.load_pem_x509_certificate((self.directory / "ca.pem").read_bytes())
        except ValueError as exc:
            raise ConfigError(f"{str(self.directory / 'ca.pem')!r} is not a PEM certificate; restore it from a backup") from exc

    @classmethod
    def create(cls, directory: str | os.PathLike[str], household_id: str, *, ca_days: int = DEFAULT_CA_DAYS) -> Household:
        """Create a household CA in `directory` and return it.

        Parameters
        ----------
        directory : str or os.PathLike
            Folder to create the CA in; created with mode 0700 if missing.
        household_id : str
            Household id, written into every certificate (see `validate_name`).
        ca_days : int, default 3650
            Validity of the CA certificate in days.

        Raises
        ------
        ConfigError
            If a CA already exists in `directory`; it is never overwritten.
        """
        validate_name(household_id, "household id")
        _check_days(ca_days, "ca_days")
        root = Path(directory)
        existing = [name for name in ("ca.key", "ca.pem", "household.json") if (root / name).exists()]
        if existing:
            raise ConfigError(
                f"a household CA already exists in {str(root)!r} ({', '.join(existing)}); it is never overwritten. "
                "Use another --dir, or delete that folder yourself if you really mean to start a new household"
            )
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / "issued").mkdir(mode=0o700, exist_ok=True)

        key = _new_key()
        now = _utcnow()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, household_id),
                x509.NameAttribute(NameOID.COMMON_NAME, f"homesplit household CA {household_id}"),
            ]
        )
        public_key = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=ca_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
            .sign(key, _SIGNATURE_HASH)
        )

        # The key goes first and exclusively: if two `init` runs race, one fails here.
        try:
            write_private_file(root / "ca.key", _key_pem(key), exclusive=True)
        except FileExistsError:
            raise ConfigError(f"a household CA key appeared in {str(root)!r} while creating it; it was not overwritten") from None
        write_private_file(root / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), exclusive=True)
        write_private_file(root / "household.json", json.dumps({"household": household_id}).encode() + b"\n", exclusive=True)
        household = cls(root)
        household._write_crl(household._revoked_entries(), now=now)
        logger.info("Created household CA %s in %s", household_id, root)
        return household

    @property
    def crl_path(self) -> Path:
        """Path of the household's current CRL."""
        return self.directory / "crl.pem"

    def bundle_dir(self, device: str) -> Path:
        """Default folder of `device`'s bundle."""
        return self.directory / "bundles" / validate_name(device, "device name")

    def enroll(
        self,
        device: str,
        *,
        days: int = DEFAULT_DEVICE_DAYS,
        out: str | os.PathLike[str] | None = None,
        now: datetime.datetime | None = None,
    ) -> tuple[DeviceRecord, Path]:
        """Issue a key and certificate to `device` and write its bundle.

        Enrolling a device again issues a fresh key and certificate (rotation);
        the previous certificate stays valid until it expires or is revoked.

        Parameters
        ----------
        device : str
            Device name (see `validate_name`).
        days : int, default 365
            Validity of the certificate in days.
        out : str or os.PathLike, optional
            Bundle folder; defaults to ``bundles/DEVICE`` in the household folder.
        now : datetime, optional
            Issue time (UTC); defaults to the current time. Tests pass a past
            time to make expired certificates.

        Returns
        -------
        tuple of (DeviceRecord, Path)
            The new certificate and the bundle folder.
        """
        validate_name(device, "device name")
        _check_days(days, "days")
        issued_at = now or _utcnow()
        ca_key = self._load_ca_key()

        key = _new_key()
        public_key = key.public_key()
        not_before = issued_at - _CLOCK_SKEW
        try:
            not_after = issued_at + datetime.timedelta(days=days)
        except OverflowError:
            # Past year 9999: certainly beyond the CA's own expiry.
            not_after = datetime.datetime.max.replace(tzinfo=datetime.timezone.utc)
        if not_after > self.ca_cert.not_valid_after_utc:
            raise ConfigError(
                f"a {days}-day certificate for {device!r} would outlive the household CA, which expires "
                f"{self.ca_cert.not_valid_after_utc:%Y-%m-%d}; pass a smaller --days"
            )
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.household_id),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "homesplit device"),
                x509.NameAttribute(NameOID.COMMON_NAME, device),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(device)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_device_key_usage(), critical=True)
            # Every device is a TLS server towards its upstream neighbour and a
            # TLS client towards its downstream neighbour.
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, _SIGNATURE_HASH)
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        write_private_file(self.directory / "issued" / f"{cert.serial_number:x}.pem", cert_pem, exclusive=True)

        # Re-sign the CRL so that the bundle carries one that is fresh for as
        # long as the new certificate is valid.
        self._write_crl(self._revoked_entries(), now=_utcnow())
        bundle = Path(out) if out is not None else self.bundle_dir(device)
        write_bundle_dir(
            bundle,
            {
                BUNDLE_CA: self.ca_cert.public_bytes(serialization.Encoding.PEM),
                BUNDLE_CERT: cert_pem,
                BUNDLE_KEY: _key_pem(key),
                BUNDLE_CRL: self.crl_path.read_bytes(),
            },
        )
        logger.info("Enrolled device %s in household %s until %s; bundle in %s", device, self.household_id, f"{not_after:%Y-%m-%d}", bundle)
        record = DeviceRecord(device, cert.serial_number, not_before, not_after, _status(cert, None, issued_at))
        return record, bundle

    def revoke(self, device: str, *, now: datetime.datetime | None = None) -> list[DeviceRecord]:
        """Revoke every certificate issued to `device` and re-sign the CRL.

        Returns
        -------
        list of DeviceRecord
            The certificates newly revoked.

        Raises
        ------
        ConfigError
            If the household never enrolled `device`, or it is already revoked.
        """
        validate_name(device, "device name")
        revoked_at = now or _utcnow()
        entries = self._revoked_entries()
        issued = [cert for cert in self._issued() if certificate_identity(cert)[0] == device]
        if not issued:
            raise ConfigError(f"device {device!r} was never enrolled in household {self.household_id}; 'homesplit household show' lists the devices")
        fresh = [cert for cert in issued if cert.serial_number not in entries]
        if not fresh:
            raise ConfigError(f"device {device!r} is already revoked in household {self.household_id}")
        for cert in fresh:
            entries[cert.serial_number] = revoked_at
        self._write_crl(entries, now=_utcnow())
        logger.info("Revoked %d certificate(s) of device %s in household %s", len(fresh), device, self.household_id)
        return [_record(cert, entries, revoked_at) for cert in fresh]

    def devices(self, *, now: datetime.datetime | None = None) -> list[DeviceRecord]:
        """List every certificate the household issued, sorted by device and issue time."""
        at = now or _utcnow()
        entries = self._revoked_entries()
        records = [_record(cert, entries, at) for cert in self._issued()]
        return sorted(records, key=lambda r: (r.device, r.not_before, r.serial))

    def _issued(self) -> list[x509.Certificate]:
        folder = self.directory / "issued"
        if not folder.is_dir():
            return []
        certificates = []
        for path in sorted(folder.glob("*.pem")):
            try:
                certificates.append(x509.load_pem_x509_certificate(path.read_bytes()))
            except ValueError as exc:
                raise ConfigError(f"issued certificate {str(path)!r} is not a PEM certificate; restore it from a backup") from exc
        return certificates

    def _load_ca_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key((self.directory / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{str(self.directory / 'ca.key')!r} is not an EC private key; recreate the household CA")
        return key

    def _revoked_entries(self) -> dict[int, datetime.datetime]:
        """Serial numbers and revocation times listed in the current CRL."""
        if not self.crl_path.is_file():
            return {}
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return {entry.serial_number: entry.revocation_date_utc for entry in crl}

    def _write_crl(self, entries: dict[int, datetime.datetime], *, now: datetime.datetime) -> None:
        number = 1
        if self.crl_path.is_file():
            previous = x509.load_pem_x509_crl(self.crl_path.read_bytes())
            try:
                number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
            except x509.ExtensionNotFound:
                pass

        # OpenSSL rejects every peer once the CRL's next update has passed, so
        # the CRL must stay fresh at least as long as any issued certificate.
        next_update = now + datetime.timedelta(days=DEFAULT_CRL_DAYS)
        for cert in self._issued():
            next_update = max(next_update, cert.not_valid_after_utc)
        next_update = min(next_update, self.ca_cert.not_valid_after_utc)

        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca_cert.subject)
            .last_update(now - _CLOCK_SKEW)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_cert.public_key()), critical=False)
        )
        for serial, revoked_at in sorted(entries.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at).build()
            )
        crl = builder.sign(self._load_ca_key(), _SIGNATURE_HASH)
        write_private_file(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _device_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _check_days(days: int, name: str) -> None:
    if not isinstance(days, int) or days < 1:
        raise ConfigError(f"{name}={days!r} is invalid; pass a whole number of days, at least 1")


def _status(cert: x509.Certificate, revoked_at: datetime.datetime | None, at: datetime.datetime) -> CertificateStatus:
    if revoked_at is not None:
        return CertificateStatus.REVOKED
    if at < cert.not_valid_before_utc:
        return CertificateStatus.NOT_YET_VALID
    if at > cert.not_valid_after_utc:
        return CertificateStatus.EXPIRED
    return CertificateStatus.VALID


def _record(cert: x509.Certificate, entries: dict[int, datetime.datetime], at: datetime.datetime) -> DeviceRecord:
    device = certificate_identity(cert)[0] or "?"
    revoked_at = entries.get(cert.serial_number)
    return DeviceRecord(
        device,
        cert.serial_number,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
        _status(cert, revoked_at, at),
        revoked_at,
    )
