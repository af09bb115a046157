"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps
its traceback. Messages say what to do next, not only what went wrong.
"""


class UserError(Exception):
    """Bad input: an unknown model, a malformed file, a value out of range."""

    exit_code = 2
