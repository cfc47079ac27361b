"""The errors a user's input can cause: one line naming the problem and the fix.

InputError is a ValueError, so callers that expect ValueError keep working; the command
prints its message alone, never a traceback.
"""


class InputError(ValueError):
    """Bad input to restore() or the command: the message says what is wrong and what to do."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type."""


class NumericalError(RuntimeError):
    """The fit went non-finite (NaN or inf loss): stopped, with the iteration and the settings to change."""
