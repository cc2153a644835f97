"""The one exception type users see: a one-line message saying what went wrong and what to do."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class ExchangedError(Exception):
    """An error the command line reports as one line on stderr, with a non-zero exit.

    `code` is a short stable word scripts and tests can match on (e.g. "wrong-pin").
    """

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        # Always one line: a multi-line message would break the CLI's contract.
        return " ".join(super().__str__().split())


def reported(command: Callable[[], int],
             on_refusal: Callable[[ExchangedError], None] | None = None) -> int:
    """Run a command of the `exchanged` command line: its exit code, or 1 with its error as
    one line on stderr ("exchanged: error: ..."), 130 when interrupted. An unexpected error is
    one line too; EXCHANGED_DEBUG=1 shows its traceback. `on_refusal` sees an ExchangedError
    first (the CA's commands record refusals in their audit log)."""
    try:
        return command()
    except ExchangedError as e:
        if on_refusal is not None:
            on_refusal(e)
        print(f"exchanged: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("exchanged: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # the contract is one line; EXCHANGED_DEBUG=1 shows the traceback
        if os.environ.get("EXCHANGED_DEBUG"):
            raise
        print(f"exchanged: internal error: {type(e).__name__}: {' '.join(str(e).split())} "
              "(EXCHANGED_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
