"""The one user-facing error type, turned into an exit code at the CLI edge."""


class UserError(Exception):
    """A problem the user can fix: bad input, missing files, unknown names. Exit code 2."""

    exit_code = 2


class CheckFailed(UserError):
    """A verification did not pass: the numbers disagree. Exit code 1."""

    exit_code = 1
