"""The one error type a user sees: its message is the whole story, no traceback."""


class UserError(Exception):
    """Bad input or environment: printed as one line by the CLI and the TUI."""
