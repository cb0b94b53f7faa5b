"""Errors a user can cause. The CLI turns them into one line on stderr and exit code 2."""


class UsageError(ValueError):
    """Bad input from a user: an unknown name, a missing key, conflicting flags, a plan that cannot fit."""
