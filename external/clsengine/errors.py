"""Errors the user can fix. Scripts print their message in one line instead of a traceback."""


class UserError(Exception):
    """Bad input, configuration or environment; the message says what and where."""


class DataError(UserError):
    """A dataset cannot be used as given (missing root, empty classes, mismatched class lists...)."""


class CheckpointError(UserError):
    """A checkpoint or weights file cannot be loaded."""
