"""Errors a user can cause and fix: one sentence naming the thing and the remedy, no traceback."""


class UserError(Exception):
    """A problem with the user's input, files or environment; its message says what to do."""


class StorageUnavailable(UserError):
    """Storage could not be reached or answered with an error that may pass (network, endpoint, 5xx).

    Still one sentence for the user; a Prefect task retries it (flows/prefect_cache.py `retry_unless_user_error`),
    where a plain UserError fails at once."""
