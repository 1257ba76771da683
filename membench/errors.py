"""Errors membench raises on purpose."""


class ConfigError(ValueError):
    """Bad user input, caught before any expensive work.

    The message names the bad value and what is accepted; the CLI prints it
    without a traceback and exits with status 2.
    """
