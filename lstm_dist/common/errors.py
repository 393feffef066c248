"""One error type for mistakes a user can fix, and the one-line exit that entry points give them.

Anything raised as `UserError` ends a command with a single line on stderr (the cause and the fix)
and exit status 2, never a traceback. Bugs stay ordinary exceptions with their traceback.
With `LSTM_DIST_DEBUG=1` in the environment the traceback of the user error is printed too, before
its line (to see where in the code a message came from).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input (a path, a key, a value, a file) with a message saying the fix."""


class EveryRankError(UserError):
    """A user error that every rank raises together (rank 0 decided, or all ranks checked the same
    thing and shared what they found): one line from rank 0 says it, and no rank waits for another."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), at most `limit`
    characters: enough to say what went wrong inside a one-line message of our own."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def print_error(message: str, every_rank: bool = True) -> None:
    """The one line. A mistake every rank meets alike is said once, by rank 0; one that this rank met
    alone (`every_rank=False`) is said by this rank, which names itself when it is not rank 0."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if every_rank and rank != 0:
        return
    if os.environ.get("LSTM_DIST_DEBUG") == "1" and sys.exc_info()[1] is not None:
        traceback.print_exc(file=sys.stderr)  # the exception being handled, where the line comes from
    print(f"error: {f'rank {rank}: ' if rank and not every_rank else ''}{message}", file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    print_error(message)
    raise SystemExit(EXIT_USER_ERROR)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run an entry point's `main`, turning a `UserError` into one line and exit status 2."""
    try:
        code = main(argv)
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    raise SystemExit(code or 0)
