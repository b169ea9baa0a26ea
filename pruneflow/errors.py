"""User-facing errors: one clear paragraph, no traceback."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's configuration or data, reported without a traceback."""


class UnusedSetting(UserError):
    """A setting the run would ignore (``key``: as the command line names it)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run's state was saved."""


class RunStopped(UserError):
    """SIGTERM or SIGINT: a checkpoint was saved and the run stopped; the same command resumes it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


SPARSITY_ALLOWED = "a number in [0, 1) — the fraction of prunable weights removed — or null for the method's default"


def invalid(key: str, value: object, allowed: str | Iterable[object], why: str = "") -> UserError:
    """Build the standard message: which key, what was given, what is allowed."""
    if not isinstance(allowed, str):
        allowed = ", ".join(str(a) for a in allowed)
    msg = f"Invalid value for '{key}': {value!r}. Allowed: {allowed}."
    if why:
        msg += f" {why}"
    return UserError(msg)


def check_bool(value: object, key: str) -> bool:
    """A true/false setting; anything else (``signed=ture``, ``"no"``) is an error, not truthy."""
    if not isinstance(value, bool):
        raise invalid(key, value, "true, false")
    return value


def load_error_text(error: BaseException) -> str:
    """The cause of a failed load in one line. torch's weights-only refusal starts with advice
    to load unsafely (``weights_only=False``), which is wrong for a damaged or foreign file:
    only its unpickler's own reason is kept."""
    text = str(error)
    if "Weights only load failed" in text:
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n\n")[0].strip() if "WeightsUnpickler error:" in text else ""
        return f"not a weights-only checkpoint{': ' + reason if reason else ''}"
    return text.splitlines()[0] if text else "damaged"
