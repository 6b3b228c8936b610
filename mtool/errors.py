"""mtool's error types and exit codes: the one error contract every command keeps.

Library code raises a subclass of `MtoolError` whose message is one line naming the file,
tensor, option or config field at fault; the CLI prints it as `error: ...` and exits 2.
Anything else that escapes is an internal error (also exit 2, traceback only with --debug).
A failed verification is not an error: it is a verdict, exit 1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_ERROR = 2
EXIT_SIGINT = 130  # 128 + SIGINT, as shells report it
EXIT_SIGTERM = 143  # 128 + SIGTERM


class MtoolError(Exception):
    """A user-facing failure: printed as one line, exit status 2.

    The message must say what is wrong and where (file, tensor, option or config field).
    """


class InputError(MtoolError):
    """A source, config, tokenizer or data file that cannot be used as it is."""


class UsageError(MtoolError):
    """An option or a combination of options that makes no sense."""


class OutputError(MtoolError):
    """The output cannot be written: exists, overlaps a source, locked, disk full, read-only."""


class VerifySetupError(MtoolError):
    """verify cannot judge the candidate (not a failed verdict): bad reference, too little text."""


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException like KeyboardInterrupt, so that no `except Exception`
    swallows it and every `finally` (staging cleanup, lock release) still runs."""
