"""The one exception type for bad input anywhere in the suite.

Every check on user input (a missing file, a wrong format, an unknown name, a value out of
range) raises `UserInputError` with a message that says what was wrong and what was expected.
It subclasses `ValueError`, so callers that catch `ValueError` keep working, and the
`slimtune` command prints it as one line (no traceback) and exits with status 2.
"""


class UserInputError(ValueError):
    """Bad input: the message says what was given and what was expected."""
