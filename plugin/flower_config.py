"""Key/value strings for Flower's `--node-config` and `--run-config` options.

Flower 1.42 parses both options with one regular expression,
``(\\S+?)=('[^']*'|"[^"]*"|\\S+)``, and reads each value as TOML
(`flwr.common.config.parse_config_args`). Two consequences shape this module:

- A string must be quoted, or it is not valid TOML (``listen=127.0.0.1:9100``
  fails). A single-quoted TOML literal string keeps backslashes as they are,
  and a double-quoted string is used only when the value contains ``'``.
- Text that the expression does not match is dropped without an error, so a
  value with a space and no quotes silently loses its tail. Formatting every
  value here avoids both traps.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from homesplit.errors import ConfigError

__all__ = ["ConfigValue", "format_config", "toml_string"]

ConfigValue = str | int | float | bool

# Bare TOML keys, optionally dotted: Flower flattens a dotted key `a.b` back to
# the string "a.b" after parsing.
_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

# TOML literal strings may contain tab but no other control character.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """Format a mapping as one Flower key/value string.

    Parameters
    ----------
    values : Mapping[str, str | int | float | bool]
        Keys made of letters, digits, ``_``, ``-`` and dots; values of the four
        types that Flower's records accept.

    Returns
    -------
    str
        Space-separated ``key=value`` pairs, e.g.
        ``household='a' device='phone' listen='127.0.0.1:9100' port=9100``.

    Raises
    ------
    ConfigError
        If a key is not a bare TOML key, a value has another type, or a string
        contains both ``'`` and ``"`` or a control character and ``"``.
    """
    pairs = []
    for key, value in values.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ConfigError(
                f"config key {key!r} is invalid: use letters, digits, '_', '-' and dots only, "
                "because Flower splits key=value pairs on whitespace and parses keys as TOML"
            )
        pairs.append(f"{key}={_format_value(key, value)}")
    return " ".join(pairs)


def toml_string(value: str) -> str:
    """Quote a string as a TOML basic string (JSON escapes are valid TOML)."""
    return json.dumps(value, ensure_ascii=False)


def _format_value(key: str, value: object) -> str:
    """Format one value as TOML that Flower's key/value expression keeps whole."""
    # bool first: it is a subclass of int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if "'" not in value and not _CONTROL.search(value):
            return f"'{value}'"
        if '"' not in value:
            return toml_string(value)
        raise ConfigError(
            f"config value {key}={value!r} cannot be passed to Flower: a string may contain "
            "either ' or \" but not both, because Flower's key/value parser ends a quoted "
            "value at the first matching quote; pass a path or name without one of them"
        )
    raise ConfigError(
        f"config value {key}={value!r} has type {type(value).__name__}; "
        "Flower accepts str, int, float and bool only"
    )
