"""The command line's side of a node's control socket (the daemon's: `exchanged.node.control`)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from exchanged.errors import ExchangedError
from exchanged.node.wire import MAX_LINE, ControlError, encode_line

TIMEOUT = 600  # seconds: signing and storing a 2 GB package takes a while


def request(path: Path, cmd: str, **args: Any) -> dict[str, Any]:
    """Send one request to the daemon and return its answer; ExchangedError (with the
    daemon's code) on refusal."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(str(path))
            s.sendall(encode_line({"cmd": cmd, **args}))
            buf = b""
            while b"\n" not in buf:
                data = s.recv(65536)
                if not data:
                    raise ControlError("the daemon closed the connection without answering")
                buf += data
                if len(buf) > 64 * MAX_LINE:
                    raise ControlError("the daemon's answer is too large")
    except FileNotFoundError:
        raise ControlError(f"no daemon socket at {path}: is `exchanged serve` running with "
                           "this configuration?", code="no-daemon") from None
    except PermissionError:
        raise ControlError(f"no permission for {path}: run as the service's user",
                           code="no-daemon") from None
    except (ConnectionRefusedError, TimeoutError) as e:
        raise ControlError(f"the daemon at {path} does not answer: {e}",
                           code="no-daemon") from None
    answer = json.loads(buf.split(b"\n", 1)[0])
    if not answer.get("ok"):
        raise ExchangedError(answer.get("error", "refused"), code=answer.get("code"))
    return dict(answer)
