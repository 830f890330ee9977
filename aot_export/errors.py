"""The two ways a command can refuse: bad input (exit 2) and a failed check (exit 1)."""


class InputError(ValueError):
    """Input that cannot be used. The message is one line that names the problem and the fix."""


class CheckFailed(RuntimeError):
    """An artifact was examined and found out of tolerance or incompatible; the report says where."""
