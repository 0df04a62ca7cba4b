"""Errors a user can cause and fix: one sentence naming the thing and the remedy, no traceback."""


class UserError(Exception):
    """A problem with the user's input, files or environment; its message says what to do."""
