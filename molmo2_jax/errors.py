"""The base of every exception molmo2_jax raises on purpose."""


class Molmo2Error(ValueError):
    """An input the user can fix (a bad path, config, checkpoint, dataset or request), named in the message.

    The `molmo2-jax` command prints it in one line, without a traceback; any other exception is a bug and shows
    its traceback. It derives from ValueError, so `except ValueError` keeps catching it."""
