"""User-facing errors: the CLI prints their message, never a traceback."""


class UserError(ValueError):
    """A mistake in the user's input (config, file, model name); the message says what and where."""


class DataError(UserError):
    """Bad input data; the message names the file, the line or array index, and the field."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # short kind of problem, for skip counts


class TrainingStopped(UserError):
    """Training stopped before its end on purpose (a signal, a non-finite loss), after saving what it could; the
    message says where things are and how to go on, and `exit_code` is what the command exits with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class LorakitWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as one line)."""
