"""The package's error types; a leaf module that imports nothing from the package."""


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""
