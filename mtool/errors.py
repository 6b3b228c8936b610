"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class MtoolError(Exception):
    """A user-facing failure: bad input, refused overwrite, failed check.

    The message is printed as one line, so it must say what is wrong and where
    (file, tensor or config field).
    """
