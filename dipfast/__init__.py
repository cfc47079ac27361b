"""dipfast: a fast, faithful Deep Image Prior engine (Ulyanov, Vedaldi, Lempitsky, IJCV 2020)."""

from dipfast import backends, metrics, nets, operators, presets
from dipfast.api import Result, restore
from dipfast.batch import restore_many
from dipfast.errors import InputError

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "Result",
    "__version__",
    "backends",
    "metrics",
    "nets",
    "operators",
    "presets",
    "restore",
    "restore_many",
]
