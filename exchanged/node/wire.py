"""The control socket's messages, shared by the daemon's side (`node.control`) and the command
line's (`exchanged.client`): one JSON object per line each way, binary values as base64.
No trio here, so that a local command starts quickly."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from exchanged.errors import ExchangedError

MAX_LINE = 1024 * 1024  # a request's size limit; an answer may be 64 times this


class ControlError(ExchangedError):
    code = "control"


def encode_line(obj: dict[str, Any]) -> bytes:
    """One message: JSON on one line; bytes as base64, paths as text."""
    return json.dumps(obj, default=_json_default).encode() + b"\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(o)).decode()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)
