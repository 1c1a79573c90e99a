"""Per-household privacy settings of an experiment or a Flower run config, and what they mean for one round.

The experiment file and the run config name the settings with hyphens, like
their other keys::

    privacy:                      # every household; a household may override it
      mode: sample                # or household
      target-epsilon: 8           # a number > 0, or inf for clipping without noise
      target-delta: 1.0e-5
      noise-multiplier: auto      # sigma, or auto to calibrate it for target-epsilon
      max-grad-norm: 1.0          # C; with clipping: per_segment also a list, one bound per stage
      accountant: rdp             # or prv
      expected-batch-size: 32     # default: training.batch-size
      clipping: whole_model       # or per_segment (mode sample only)
      noise: local                # or central (mode household only)

The run config carries the settings of all households as one JSON string
(`encode_run_config`), a mapping of household id to settings in which the key
``"*"`` covers every household not named. `resolve_round` turns one
household's settings, its data set size and its plan's stage count into the
`PrivacyConfig` of a round and the number of DP steps that round takes. The
strategy and the data owner both call it with the same inputs, so both arrive
at the same sigma, q and clipping bounds.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from homesplit.errors import ConfigError, PrivacyError
from homesplit.json_limits import loads_limited
from homesplit.privacy.accounting import calibrate_noise_multiplier
from homesplit.privacy.config import ACCOUNTANTS, CLIPPINGS, MODES, NOISE_PLACEMENTS, PrivacyConfig

__all__ = [
    "SETTING_KEYS",
    "RoundPrivacy",
    "check_settings",
    "settings_for",
    "encode_run_config",
    "decode_run_config",
    "resolve_round",
    "stage_bounds",
    "check_central_noise",
]

SETTING_KEYS = (
    "mode",
    "target-epsilon",
    "target-delta",
    "noise-multiplier",
    "max-grad-norm",
    "accountant",
    "expected-batch-size",
    "clipping",
    "noise",
    "sample-rate",
)
_DEFAULTS: dict[str, Any] = {
    "mode": "sample",
    "target-epsilon": None,
    "target-delta": 1e-5,
    "noise-multiplier": "auto",
    "max-grad-norm": 1.0,
    "accountant": "rdp",
    "expected-batch-size": None,
    "clipping": "whole_model",
    "noise": "local",
    "sample-rate": None,
}
_CHOICES = {"mode": MODES, "accountant": ACCOUNTANTS, "clipping": CLIPPINGS, "noise": NOISE_PLACEMENTS}
ALL_HOUSEHOLDS = "*"


def _number(value: Any) -> float | None:
    """Return `value` as a float if it is a number or a string such as ``"inf"``; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_settings(raw: Any, *, where: str) -> dict[str, Any]:
    """Validate one household's privacy settings and return them with defaults filled in.

    Parameters
    ----------
    raw : mapping
        Keys of `SETTING_KEYS`.
    where : str
        Where the settings come from, e.g. ``"households[0].privacy"``; every
        error message starts with it.

    Raises
    ------
    ConfigError
        On an unknown key or an invalid value; the message names the key, the
        value and what is allowed.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}={raw!r} is invalid; allowed: a mapping with keys {list(SETTING_KEYS)}")
    unknown = sorted(set(raw) - set(SETTING_KEYS))
    if unknown:
        key = f"{where}.{unknown[0]}"
        raise ConfigError(f"unknown key {key!r}; allowed keys here are {list(SETTING_KEYS)}")
    settings = {**_DEFAULTS, **raw}

    for key, choices in _CHOICES.items():
        if settings[key] not in choices:
            raise ConfigError(f"{where}.{key}={settings[key]!r} is invalid; allowed: {', '.join(choices)}")

    epsilon = _number(settings["target-epsilon"])
    if epsilon is None or not epsilon > 0:
        raise ConfigError(
            f"{where}.target-epsilon={settings['target-epsilon']!r} is invalid; allowed: a number > 0, or inf "
            "for clipping without noise"
        )
    settings["target-epsilon"] = epsilon
    delta = _number(settings["target-delta"])
    if delta is None or not 0 < delta < 1:
        raise ConfigError(f"{where}.target-delta={settings['target-delta']!r} is invalid; allowed: a number in (0, 1)")
    settings["target-delta"] = delta

    sigma = settings["noise-multiplier"]
    if sigma != "auto":
        value = _number(sigma)
        if value is None or not (value >= 0 and math.isfinite(value)) or isinstance(sigma, str):
            raise ConfigError(
                f"{where}.noise-multiplier={sigma!r} is invalid; allowed: a finite number >= 0, or auto to calibrate "
                "it for target-epsilon"
            )
        settings["noise-multiplier"] = value
    if settings["clipping"] == "per_segment" and settings["mode"] != "sample":
        raise ConfigError(
            f"{where}.clipping='per_segment' is invalid in mode {settings['mode']}: there max-grad-norm bounds the "
            "household's whole round update; allowed: whole_model"
        )
    settings["max-grad-norm"] = _check_bound(settings["max-grad-norm"], clipping=settings["clipping"], where=where)
    for key in ("expected-batch-size", "sample-rate"):
        if settings[key] is None:
            continue
        value = _number(settings[key])
        upper = 1.0 if key == "sample-rate" else math.inf
        if value is None or not 0 < value <= upper or isinstance(settings[key], str):
            allowed = "a number in (0, 1]" if key == "sample-rate" else "a number > 0 (samples)"
            raise ConfigError(f"{where}.{key}={settings[key]!r} is invalid; allowed: {allowed}")
        settings[key] = value
    if settings["noise"] == "central" and settings["mode"] != "household":
        raise ConfigError(
            f"{where}.noise='central' is invalid in mode {settings['mode']}: DP-SGD adds its noise on the devices "
            "at every step; allowed: local, or central with mode household"
        )
    if settings["mode"] == "household" and settings["sample-rate"] is not None and settings["sample-rate"] < 1:
        # NOTE: subsampled accounting must count every round, drawn or not. A data owner receives messages
        # only in the rounds its household trains in, so it would count too few steps and understate epsilon.
        raise ConfigError(
            f"{where}.sample-rate={settings['sample-rate']!r} is not supported yet: a household's accountant "
            "counts only the rounds it trains in, so sampling households would understate epsilon; "
            "allowed: 1 (every household trains in every round)"
        )
    if settings["mode"] == "sample" and settings["sample-rate"] is not None:
        raise ConfigError(
            f"{where}.sample-rate={settings['sample-rate']!r} is invalid in mode sample: there q is "
            "expected-batch-size / the household's dataset size; allowed: only in mode household"
        )
    return settings


def _check_bound(value: Any, *, clipping: str, where: str) -> float | list[float]:
    """Return ``max-grad-norm`` as a float, or as a list of floats for per-segment clipping."""
    if isinstance(value, list) and clipping == "per_segment":
        bounds = [_number(bound) for bound in value]
        if value and all(b is not None and b > 0 and math.isfinite(b) for b in bounds):
            return bounds
        raise ConfigError(
            f"{where}.max-grad-norm={value!r} is invalid; allowed: a finite number > 0, or a non-empty list of them, "
            "one per pipeline stage"
        )
    bound = _number(value)
    if bound is None or not (bound > 0 and math.isfinite(bound)):
        allowed = "a finite number > 0"
        if isinstance(value, list):
            allowed += ", or a list of them with clipping: per_segment"
        raise ConfigError(f"{where}.max-grad-norm={value!r} is invalid; allowed: {allowed}")
    return bound


def stage_bounds(max_grad_norm: float | list[float], *, num_stages: int) -> list[float]:
    """Return the per-segment clipping bound of each of `num_stages` stages.

    One number C gives every stage ``C / sqrt(num_stages)``, so that the bound
    on a sample's whole-model gradient, ``sqrt(sum C_k^2)``, stays C. A list
    is taken as it is.

    Raises
    ------
    PrivacyError
        If a list does not have `num_stages` entries; the message names the
        list and the two ways to fix it.
    """
    if not isinstance(max_grad_norm, list):
        return [float(max_grad_norm) / math.sqrt(num_stages)] * num_stages
    if len(max_grad_norm) != num_stages:
        raise PrivacyError(
            f"max-grad-norm={max_grad_norm} has {len(max_grad_norm)} per-segment bounds, but the household's plan has "
            f"{num_stages} stages; give {num_stages} bounds, or one number C, which gives each stage "
            f"C / sqrt({num_stages})"
        )
    return [float(bound) for bound in max_grad_norm]


def check_central_noise(households: Mapping[str, Mapping[str, Any] | None], *, where: str) -> None:
    """Check that either every household or none has ``noise: central``.

    The server adds one noise draw to the sum of all households' updates, so
    it can only add it when every update in the sum is clipped. A household
    with local noise or without DP would need its own aggregation rule.

    Parameters
    ----------
    households : mapping
        Household id to validated settings, or None for a household without DP.
    where : str
        Where the settings come from; the error message starts with it.

    Raises
    ------
    ConfigError
        If some households have central noise and others do not.
    """
    central = sorted(h for h, s in households.items() if s is not None and s["noise"] == "central")
    others = sorted(h for h, s in households.items() if s is None or s["noise"] != "central")
    if central and others:
        raise ConfigError(
            f"{where}: households {central} have noise='central' but {others} do not; the server adds one noise draw "
            "to the sum of all clipped updates, so give every household mode household with noise central, or none"
        )


def settings_for(households: Mapping[str, Any], household: str) -> dict[str, Any] | None:
    """Return the settings of `household` from a decoded run config mapping, or None if it trains without DP."""
    if household in households:
        return households[household]
    return households.get(ALL_HOUSEHOLDS)


def encode_run_config(households: Mapping[str, Mapping[str, Any] | None]) -> str:
    """Return the run config value for per-household settings; households mapped to None train without DP."""
    chosen = {household: dict(settings) for household, settings in households.items() if settings is not None}
    return json.dumps(chosen, sort_keys=True) if chosen else ""


def decode_run_config(value: Any) -> dict[str, dict[str, Any]]:
    """Parse and validate the run config value ``privacy``; an empty string means no household uses DP.

    Raises
    ------
    ConfigError
        If the value is not a JSON mapping of household id to settings, nests
        deeper than `homesplit.json_limits.MAX_JSON_DEPTH` levels, or a
        household's settings are invalid.
    """
    text = str(value or "").strip()
    if not text:
        return {}
    try:
        raw = loads_limited(text)
    except ValueError as exc:
        raise ConfigError(f"run config privacy={text[:80]!r} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"run config privacy={text[:80]!r} is invalid; allowed: a JSON object of household id to settings")
    return {household: check_settings(settings, where=f"run config privacy[{household!r}]") for household, settings in raw.items()}


@dataclass(frozen=True)
class RoundPrivacy:
    """The DP settings of one household for one round.

    Attributes
    ----------
    config : PrivacyConfig
        Settings every stage of the household trains with.
    steps : int
        DP steps the round takes: every Poisson mini-batch in mode sample
        (empty ones too), 1 in mode household.
    """

    config: PrivacyConfig
    steps: int

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-friendly data that `from_dict` reads back."""
        return {"config": self.config.to_dict(), "steps": self.steps}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RoundPrivacy:
        """Rebuild from `to_dict` output.

        Raises
        ------
        PrivacyError
            If `raw` is not a mapping with a ``config`` mapping and an integer
            ``steps``, or if the settings in ``config`` are invalid.
        """
        config = raw.get("config") if isinstance(raw, Mapping) else None
        steps = raw.get("steps") if isinstance(raw, Mapping) else None
        if not isinstance(config, Mapping) or isinstance(steps, bool) or not isinstance(steps, int):
            raise PrivacyError(
                f"round privacy settings {reprlib.repr(raw)} are invalid; allowed: a mapping with a 'config' mapping "
                "and an integer 'steps', as RoundPrivacy.to_dict writes it"
            )
        return cls(PrivacyConfig.from_dict(dict(config)), steps)


def resolve_round(
    settings: Mapping[str, Any], *, dataset_size: int, batch_size: int, local_epochs: int, num_rounds: int,
    num_stages: int | None = None,
) -> RoundPrivacy:  # fmt: skip
    """Turn one household's settings into the `PrivacyConfig` of a round and its step count.

    Mode sample: q = expected batch size / `dataset_size`, and a round takes
    ``local_epochs * ceil(dataset_size / expected batch size)`` Poisson
    mini-batches, so that each epoch visits every example once on average.
    Mode household: q is the ``sample-rate`` setting (default 1.0, every
    round) and a round is one step. With ``noise-multiplier: auto``, sigma is
    the smallest one for which `num_rounds` such rounds stay within
    ``target-epsilon`` (`calibrate_noise_multiplier`); ``target-epsilon: inf``
    gives sigma 0. With ``clipping: per_segment``, ``max-grad-norm`` becomes
    one bound per stage (`stage_bounds`).

    Parameters
    ----------
    settings : mapping
        Output of `check_settings`.
    dataset_size : int
        Training examples of the household's data owner.
    batch_size : int
        Default expected batch size (the experiment's ``training.batch-size``).
    local_epochs : int
        Passes over the data per round.
    num_rounds : int
        Rounds of the whole run, for calibration.
    num_stages : int, optional
        Stages of the household's plan; required with ``clipping: per_segment``.

    Raises
    ------
    PrivacyError
        If the data set is empty, no sigma reaches the target, or per-segment
        bounds do not match `num_stages`.
    """
    if dataset_size < 1:
        raise PrivacyError(f"the household has dataset_size={dataset_size}; DP needs at least one training example")
    if settings["mode"] == "sample":
        expected = float(settings["expected-batch-size"] or batch_size)
        expected = min(expected, float(dataset_size))
        sample_rate = expected / dataset_size
        steps = max(1, int(local_epochs)) * math.ceil(dataset_size / expected)
    else:
        expected = None
        sample_rate = float(settings["sample-rate"] or 1.0)
        steps = 1

    target = float(settings["target-epsilon"])
    delta = float(settings["target-delta"])
    sigma = settings["noise-multiplier"]
    if sigma == "auto":
        sigma = calibrate_noise_multiplier(
            target_epsilon=target, target_delta=delta, sample_rate=sample_rate, steps=steps * max(1, int(num_rounds)),
            accountant=settings["accountant"],
        )  # fmt: skip
    bound = settings["max-grad-norm"]
    if settings["clipping"] == "per_segment":
        if num_stages is None:
            raise PrivacyError("clipping='per_segment' needs the household plan's stage count to resolve its bounds")
        bound = stage_bounds(bound, num_stages=num_stages)
    else:
        bound = float(bound)
    config = PrivacyConfig(
        mode=settings["mode"],
        noise_multiplier=float(sigma),
        max_grad_norm=bound,
        sample_rate=sample_rate,
        expected_batch_size=expected,
        clipping=settings["clipping"],
        noise=settings["noise"],
        accountant=settings["accountant"],
        target_epsilon=target,
        target_delta=delta,
    )
    return RoundPrivacy(config, steps)
