"""The one exception type users see: a one-line message saying what went wrong and what to do."""


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
