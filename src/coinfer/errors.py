"""Exceptions raised by coinfer. Every one names the offending input."""

from __future__ import annotations

__all__ = [
    "CoinferError",
    "CodeError",
    "DecodeError",
    "ModelMismatchError",
    "CalibrationError",
    "BundleError",
    "ArchitectureError",
    "DataError",
    "OptionError",
    "SplitError",
    "UntrustedCodeError",
]


class CoinferError(ValueError):
    """Base class of every error coinfer raises on bad input."""


class CodeError(CoinferError):
    """Invalid code parameters or parity weights."""


class DecodeError(CoinferError):
    """Outputs that cannot be decoded (too many erasures, bad shapes)."""


class ModelMismatchError(CoinferError):
    """Models that cannot be encoded together (architecture, NaN, count)."""


class CalibrationError(CoinferError):
    """Calibration inputs of the wrong shape or type."""


class BundleError(CoinferError):
    """A bundle that is missing, corrupted, or does not match its manifest."""


class ArchitectureError(CoinferError):
    """An unknown or unbuildable architecture spec."""


class DataError(CoinferError):
    """A dataset file that is missing or malformed."""


class OptionError(CoinferError):
    """An encoder option outside its declared values or range."""


class SplitError(CoinferError):
    """A model that cannot be split into trunk and head at the requested point."""


class UntrustedCodeError(BundleError, ArchitectureError):
    """A bundle whose architecture is code (``package.module:factory``) loaded
    without the ``trust_code`` opt-in; raised before anything is imported."""
