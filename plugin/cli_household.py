"""``homesplit household``: manage the household CA and device bundles.

The household folder defaults to ``$HOMESPLIT_HOUSEHOLD_DIR`` if that is set,
else ``$XDG_CONFIG_HOME/homesplit/household`` (``~/.config/homesplit/household``
when ``XDG_CONFIG_HOME`` is unset). Bundles default to ``bundles/DEVICE`` inside
that folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from homesplit.pki import DEFAULT_CA_DAYS, DEFAULT_DEVICE_DAYS, CertificateStatus, Household

__all__ = ["default_household_dir", "register"]


def default_household_dir() -> Path:
    """Return the household folder used when ``--dir`` is not given."""
    explicit = os.environ.get("HOMESPLIT_HOUSEHOLD_DIR")
    if explicit:
        return Path(explicit).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "homesplit" / "household"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``household`` command and its actions to `subparsers`."""
    parser = subparsers.add_parser(
        "household",
        help="create the household CA, enroll, list and revoke devices",
        description=(
            "Manage the household certificate authority. Every device of a household gets a bundle "
            "(CA certificate, device certificate and key, revocation list) to copy onto it by hand or "
            "on removable media, never through the Flower server."
        ),
    )
    actions = parser.add_subparsers(dest="household_action", metavar="ACTION", required=True)
    dir_help = (
        "household folder (default: $HOMESPLIT_HOUSEHOLD_DIR, else "
        "$XDG_CONFIG_HOME/homesplit/household, else ~/.config/homesplit/household)"
    )

    init = actions.add_parser("init", help="create the household CA", description="Create the household CA; never overwrites one.")
    init.add_argument("name", metavar="NAME", help="household id written into every certificate (letters, digits, - or _)")
    init.add_argument("--dir", type=Path, default=None, help=dir_help)
    init.add_argument("--ca-days", type=int, default=DEFAULT_CA_DAYS, help=f"validity of the CA certificate in days (default: {DEFAULT_CA_DAYS})")
    init.set_defaults(handler=_init)

    enroll = actions.add_parser("enroll", help="issue a device certificate and write its bundle")
    enroll.add_argument("device", metavar="DEVICE", help="device name as the plan and node config use it")
    enroll.add_argument("--days", type=int, default=DEFAULT_DEVICE_DAYS, help=f"validity of the certificate in days (default: {DEFAULT_DEVICE_DAYS})")
    enroll.add_argument("--out", type=Path, default=None, help="bundle folder to write (default: bundles/DEVICE in the household folder)")
    enroll.add_argument("--dir", type=Path, default=None, help=dir_help)
    enroll.set_defaults(handler=_enroll)

    show = actions.add_parser("show", help="list the devices with their validity and status")
    show.add_argument("--dir", type=Path, default=None, help=dir_help)
    show.set_defaults(handler=_show)

    revoke = actions.add_parser("revoke", help="revoke every certificate of a device")
    revoke.add_argument("device", metavar="DEVICE", help="device name to revoke")
    revoke.add_argument("--dir", type=Path, default=None, help=dir_help)
    revoke.set_defaults(handler=_revoke)


def _directory(args: argparse.Namespace) -> Path:
    return args.dir if args.dir is not None else default_household_dir()


def _init(args: argparse.Namespace) -> int:
    household = Household.create(_directory(args), args.name, ca_days=args.ca_days)
    der = household.ca_cert.public_bytes(serialization.Encoding.DER)
    print(f"Created household CA {household.household_id!r} in {household.directory}")
    print(f"CA certificate SHA-256: {hashlib.sha256(der).hexdigest()}")
    print(f"Keep {household.directory / 'ca.key'} private; it can enroll devices into this household.")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    household = Household(_directory(args))
    record, bundle = household.enroll(args.device, days=args.days, out=args.out)
    print(f"Enrolled {record.device!r} in household {household.household_id!r}, serial {record.serial:x}")
    print(f"Valid from {record.not_before:%Y-%m-%d %H:%M} to {record.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"Bundle: {bundle}")
    print("Copy the bundle folder onto the device by hand or on removable media, never through the Flower server.")
    return 0


def _show(args: argparse.Namespace) -> int:
    household = Household(_directory(args))
    records = household.devices()
    print(f"Household {household.household_id!r} in {household.directory}")
    if not records:
        print("No devices enrolled.")
        return 0
    width = max(len("DEVICE"), *(len(r.device) for r in records))
    print(f"{'DEVICE':<{width}}  {'SERIAL':<12}  {'VALID FROM':<16}  {'VALID UNTIL':<16}  STATUS")
    for record in records:
        status = record.status.value
        if record.status is CertificateStatus.REVOKED and record.revoked_at is not None:
            status += f" {record.revoked_at:%Y-%m-%d}"
        # The first 12 hex digits of a random 159-bit serial identify it in practice.
        serial = f"{record.serial:x}"[:12]
        print(f"{record.device:<{width}}  {serial:<12}  {record.not_before:%Y-%m-%d %H:%M}  {record.not_after:%Y-%m-%d %H:%M}  {status}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    household = Household(_directory(args))
    records = household.revoke(args.device)
    for record in records:
        print(f"Revoked {record.device!r} certificate {record.serial:x}")
    print(f"Copy {household.crl_path} onto every device of the household as crl.pem in its bundle folder.")
    return 0
