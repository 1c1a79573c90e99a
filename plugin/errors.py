"""Exception hierarchy of homesplit.

Every error that homesplit raises on purpose derives from `HomesplitError`, so
a caller can catch the whole family at one place. Each message names the value,
peer or layer involved and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "HomesplitError",
    "ConfigError",
    "PartitionError",
    "FrameError",
    "LinkError",
    "PeerClosedError",
    "PeerTimeoutError",
    "PeerAbortedError",
    "PeerRejectedError",
    "ScheduleError",
    "PlanError",
    "PrivacyError",
    "BudgetExhaustedError",
]


class HomesplitError(Exception):
    """Base class of every error that homesplit raises on purpose."""


class ConfigError(HomesplitError, ValueError):
    """A configuration value is invalid: a bad key, value or missing file."""


class PartitionError(HomesplitError, ValueError):
    """A model cannot be cut where it was asked to be cut."""


class FrameError(HomesplitError):
    """A frame on the wire is malformed or violates the configured limits."""


class LinkError(HomesplitError):
    """A link to a peer stage failed.

    Parameters
    ----------
    message : str
        What went wrong.
    peer : str
        The peer's device name or address, for the log and the caller.
    """

    def __init__(self, message: str, *, peer: str) -> None:
        super().__init__(message)
        self.peer = peer


class PeerClosedError(LinkError):
    """The peer closed the connection or its process died."""


class PeerTimeoutError(LinkError):
    """The peer sent nothing, not even a heartbeat, before the deadline."""


class PeerAbortedError(LinkError):
    """The peer stopped on an error of its own and reported it before closing."""


class PeerRejectedError(LinkError):
    """The peer failed authentication or announced the wrong identity."""


class ScheduleError(HomesplitError):
    """Two stages disagree about which step or micro-batch comes next."""


class PlanError(HomesplitError, ValueError):
    """No valid plan exists for the given model, devices and constraints."""


class PrivacyError(HomesplitError, ValueError):
    """A differential privacy setting is invalid or unsupported by the model."""


class BudgetExhaustedError(PrivacyError):
    """Training further would spend more privacy budget than the target allows."""


__all__.append("FederationError")


class FederationError(HomesplitError):
    """A component of a local Flower federation failed, or a run did not finish.

    Parameters
    ----------
    message : str
        What went wrong, with the component's last log lines.
    component : str
        The failing component, e.g. ``"flower-supernode for household-a/phone"``.
    """

    def __init__(self, message: str, *, component: str) -> None:
        super().__init__(message)
        self.component = component


__all__.append("TrainingError")


class TrainingError(HomesplitError):
    """A run finished, but no household trained in any round, so the model never changed.

    Parameters
    ----------
    message : str
        What happened, with each household's failure reasons.
    summary : dict
        The run summary that results.json stores, so a caller still has the
        figures and the paths of the files that were written.
    """

    def __init__(self, message: str, *, summary: dict) -> None:
        super().__init__(message)
        self.summary = summary
