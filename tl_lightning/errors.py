"""Exceptions raised by tl-lightning; each message names the bad value and the fix."""


class TLError(Exception):
    """Base class of tl-lightning's own errors."""


class UnsafeFileError(TLError, ValueError):
    """A weights or checkpoint file holds code-carrying pickle objects, or an archive escapes its folder."""


class WeightsUnavailableError(TLError, RuntimeError):
    """Pretrained weights could not be fetched or read (offline machine, wrong tag, bad file)."""


class DataError(TLError, ValueError):
    """A dataset is empty, unreadable or inconsistent with the model."""
