"""How the command-line modules end on an error: one line ``error: ...`` on stderr, never a traceback.

A usage error (a value that cannot be meant: ``--min-lr`` above ``--lr``, an unknown device)
exits with status 2, as argparse's own errors do; a runtime error (a missing file, a damaged
checkpoint, a diverged run) exits with status 1. Values are checked up front, before any data is
loaded; ``errors_handled`` turns what the checks and the libraries raise into that one line.

Public API: ``UsageError``, ``errors_handled``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

PREFIX = "error: "


def _prefixed(message: str) -> str:
    return message if message.startswith(PREFIX) else PREFIX + message


class UsageError(SystemExit):
    """A command-line value that cannot be meant. A SystemExit whose message is ``error: ...``, so a
    caller that does not handle it still ends with that one line (exit status 1, Python's rule for a
    SystemExit with a message); inside ``errors_handled`` the status is 2."""

    def __init__(self, message: str) -> None:
        super().__init__(_prefixed(message))


@contextlib.contextmanager
def errors_handled(*runtime: type[BaseException]) -> Iterator[None]:
    """Around a command's ``main``: a UsageError prints its line and exits 2; an exception of a
    ``runtime`` type, and a SystemExit with a message, end as ``error: <message>`` with status 1.
    The SystemExit raised keeps the message as its ``str``, so in-process callers can read it."""
    try:
        yield
    except UsageError as err:
        print(err, file=sys.stderr)
        err.code = 2  # printed above: an int status prints nothing more
        raise
    except SystemExit as err:
        if isinstance(err.code, str) and not err.code.startswith(PREFIX):
            raise SystemExit(PREFIX + err.code) from None
        raise
    except runtime as err:
        raise SystemExit(_prefixed(str(err))) from None
