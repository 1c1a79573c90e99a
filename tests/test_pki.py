"""The household CA, device enrollment, revocation and the household CLI."""

from __future__ import annotations

import datetime
import logging
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from homesplit.bundle import DeviceBundle
from homesplit.cli import main
from homesplit.errors import ConfigError
from homesplit.pki import CertificateStatus, Household


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture
def household(tmp_path: Path) -> Household:
    return Household.create(tmp_path / "household", "smith")


def test_init_writes_private_files(household: Household) -> None:
    assert _mode(household.directory) == 0o700
    for name in ("ca.key", "ca.pem", "crl.pem", "household.json"):
        assert _mode(household.directory / name) == 0o600, name


def test_init_uses_p256_ca(household: Household) -> None:
    key = household.ca_cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert household.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_rejects_existing_ca(household: Household) -> None:
    key_before = (household.directory / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        Household.create(household.directory, "jones")
    assert (household.directory / "ca.key").read_bytes() == key_before


def test_open_reports_missing_ca(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="household init"):
        Household(tmp_path)


def test_enroll_names_device_and_household(household: Household) -> None:
    _, folder = household.enroll("phone")
    cert = x509.load_pem_x509_certificate((folder / "device.pem").read_bytes())

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["phone"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "phone"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "smith"
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert DeviceBundle.from_dir(folder).identity() == ("phone", "smith")


def test_enroll_chains_to_household_ca(household: Household) -> None:
    _, folder = household.enroll("phone")
    cert = x509.load_pem_x509_certificate((folder / "device.pem").read_bytes())
    cert.verify_directly_issued_by(household.ca_cert)


def test_enroll_default_validity_one_year(household: Household) -> None:
    record, _ = household.enroll("phone")
    lifetime = record.not_after - record.not_before
    # Certificates start an hour early to absorb clock skew between devices.
    assert lifetime == datetime.timedelta(days=365, hours=1)


def test_enroll_custom_validity_days(household: Household) -> None:
    record, _ = household.enroll("phone", days=30)
    assert record.not_after - record.not_before == datetime.timedelta(days=30, hours=1)


def test_enroll_writes_private_bundle(household: Household) -> None:
    _, folder = household.enroll("phone")
    assert _mode(folder) == 0o700
    assert sorted(path.name for path in folder.iterdir()) == ["ca.pem", "crl.pem", "device.key", "device.pem"]
    for path in folder.iterdir():
        assert _mode(path) == 0o600, path.name
    leftovers = [path.name for path in folder.parent.iterdir() if path.name.startswith(".")]
    assert leftovers == []


def test_enroll_again_rotates_key(household: Household) -> None:
    _, folder = household.enroll("phone")
    first_key = (folder / "device.key").read_bytes()
    household.enroll("phone")
    assert (folder / "device.key").read_bytes() != first_key
    assert [record.device for record in household.devices()] == ["phone", "phone"]


@pytest.mark.parametrize("name", ["", "../etc", "a b", "-lead", "x" * 64, "tv/box"])
def test_enroll_rejects_invalid_name(household: Household, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        household.enroll(name)


def test_enroll_rejects_zero_days(household: Household) -> None:
    with pytest.raises(ConfigError, match="days=0"):
        household.enroll("phone", days=0)


def test_revoke_lists_serial_in_crl(household: Household) -> None:
    record, _ = household.enroll("phone")
    household.revoke("phone")
    crl = x509.load_pem_x509_crl(household.crl_path.read_bytes())

    assert crl.get_revoked_certificate_by_serial_number(record.serial) is not None
    assert crl.is_signature_valid(household.ca_cert.public_key())
    assert crl.next_update_utc > _now() + datetime.timedelta(days=300)


def test_revoke_unknown_device_raises(household: Household) -> None:
    with pytest.raises(ConfigError, match="never enrolled"):
        household.revoke("phone")


def test_revoke_twice_raises(household: Household) -> None:
    household.enroll("phone")
    household.revoke("phone")
    with pytest.raises(ConfigError, match="already revoked"):
        household.revoke("phone")


def test_devices_report_each_status(household: Household) -> None:
    household.enroll("laptop")
    household.enroll("phone", days=1, now=_now() - datetime.timedelta(days=3))
    household.enroll("tv")
    household.revoke("tv")

    statuses = {record.device: record.status for record in household.devices()}
    assert statuses == {
        "laptop": CertificateStatus.VALID,
        "phone": CertificateStatus.EXPIRED,
        "tv": CertificateStatus.REVOKED,
    }


def test_cli_household_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    folder = str(tmp_path / "household")
    caplog.set_level(logging.DEBUG)

    assert main(["household", "init", "smith", "--dir", folder]) == 0
    assert main(["household", "enroll", "phone", "--days", "30", "--dir", folder]) == 0
    assert main(["household", "enroll", "tv", "--dir", folder]) == 0
    assert main(["household", "revoke", "tv", "--dir", folder]) == 0
    capsys.readouterr()
    assert main(["household", "show", "--dir", folder]) == 0
    shown = capsys.readouterr().out

    assert "phone" in shown
    assert "valid" in shown
    assert "revoked" in shown
    key = (tmp_path / "household" / "bundles" / "phone" / "device.key").read_text()
    assert "PRIVATE KEY" not in shown
    assert key.splitlines()[1] not in caplog.text


def test_cli_init_rejects_existing_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(tmp_path / "household")
    assert main(["household", "init", "smith", "--dir", folder]) == 0
    assert main(["household", "init", "smith", "--dir", folder]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_default_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMESPLIT_HOUSEHOLD_DIR", str(tmp_path / "from-env"))
    assert main(["household", "init", "smith"]) == 0
    assert (tmp_path / "from-env" / "ca.pem").is_file()
