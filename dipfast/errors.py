"""The errors a user's input can cause: one line naming the problem and the fix.

InputError is a ValueError, so callers that expect ValueError keep working; the command
prints its message alone, never a traceback.
"""

import torch


class InputError(ValueError):
    """Bad input to restore() or the command: the message says what is wrong and what to do."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type."""


class DeviceMemoryError(InputError, torch.OutOfMemoryError):
    """The fit ran out of the device's memory after the estimate let it start: the message names the estimate and the
    options. Still a torch.OutOfMemoryError, for callers that catch that."""


class NumericalError(RuntimeError):
    """The fit went non-finite (NaN or inf loss): stopped, with the iteration and the settings to change."""


class GraphCaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph: `cause` is the first error raised inside the capture."""

    def __init__(self, cause: BaseException):
        self.cause = cause
        super().__init__(
            f"capturing the fit's step in a CUDA graph failed: {self.reason}; backend='reference' runs without one"
        )

    @property
    def reason(self) -> str:
        """The cause's first line (CUDA's messages go on with advice about CUDA_LAUNCH_BLOCKING)."""
        text = str(self.cause).strip()
        return text.splitlines()[0] if text else type(self.cause).__name__
