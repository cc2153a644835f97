"""Where a token PIN comes from: a file, the environment or a prompt. Never argv, never a log."""

from __future__ import annotations

import getpass
import os
import stat
import sys
from dataclasses import dataclass

from exchanged.errors import ExchangedError


class PinError(ExchangedError):
    code = "no-pin"


@dataclass(frozen=True)
class PinSource:
    """How to obtain the PIN of one token.

    `role` names the token in messages ("CA", "operator"); `env` is the variable consulted.
    """

    role: str
    env: str
    file: str | None = None

    def read(self, uri_pin_source: str | None = None, *, uri_pin_value: bool = False) -> str:
        if uri_pin_value:
            raise PinError("pin-value in a pkcs11: URI is refused: a PIN on the command line is "
                           "visible to every user through ps; use --pin-file or "
                           f"{self.env} instead", code="pin-in-argv")
        path = self.file or _file_from_pin_source(uri_pin_source)
        if path:
            return _read_pin_file(path, self.role)
        value = os.environ.get(self.env)
        if value:
            return value
        if sys.stdin is not None and sys.stdin.isatty():
            pin = getpass.getpass(f"PIN for the {self.role} token: ")
            if pin:
                return pin
        raise PinError(f"no PIN for the {self.role} token: give a PIN file "
                       f"(--pin-file / pin-source) or set {self.env}")


def _file_from_pin_source(source: str | None) -> str | None:
    if not source:
        return None
    if source.startswith("file:"):
        source = source[len("file:"):]
        if source.startswith("//"):
            source = source[2:]
    return source


def _read_pin_file(path: str, role: str) -> str:
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            pin = f.readline().rstrip("\r\n")
    except OSError as e:
        raise PinError(f"cannot read the PIN file for the {role} token: {path}: "
                       f"{e.strerror}") from None
    if st.st_mode & 0o077:  # group or others: a PIN is its owner's alone
        raise PinError(f"the PIN file {path} is open to others than its owner (mode "
                       f"{stat.S_IMODE(st.st_mode):o}): chmod 600 {path}", code="pin-file-mode")
    if not pin:
        raise PinError(f"the PIN file {path} is empty")
    return pin
