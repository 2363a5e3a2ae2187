"""The one exception type users catch: every message says what was wrong and how to fix it."""


class ActSteerError(ValueError):
    """Bad input or an unusable state, with a message meant for the user."""
