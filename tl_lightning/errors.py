"""Exceptions raised by tl-lightning; each message names the bad value and the fix."""

import difflib


def did_you_mean(word: str, choices: list[str], n: int = 3, cutoff: float = 0.6) -> str:
    """``"did you mean 'a' or 'b'? "`` for the closest distinct ``choices``, else ``""``.

    The one suggestion helper behind every "unknown ..." message.

    Example:
        >>> did_you_mean("resnt50", ["resnet50", "resnet18", "vgg16"], n=1)
        "did you mean 'resnet50'? "
    """
    close = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=n, cutoff=cutoff)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


class TLError(Exception):
    """Base class of tl-lightning's own errors."""


class UnsafeFileError(TLError, ValueError):
    """A weights or checkpoint file holds code-carrying pickle objects, or an archive escapes its folder."""


class WeightsUnavailableError(TLError, RuntimeError):
    """Pretrained weights could not be fetched or read (offline machine, wrong tag, bad file)."""


class DataError(TLError, ValueError):
    """A dataset is empty, unreadable or inconsistent with the model."""
