"""User-facing errors: the CLI prints their message, never a traceback."""


class UserError(ValueError):
    """A mistake in the user's input (config, file, model name); the message says what and where."""
