"""systemd's notify protocol (sd_notify): READY, STATUS, STOPPING, WATCHDOG, over $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends datagrams to $NOTIFY_SOCKET; does nothing when systemd did not ask."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: str | None = None
        if address:
            # An abstract socket is given as "@name"; the kernel wants a leading NUL.
            self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_seconds: float | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6

    def send(self, **fields: str) -> None:
        if not self.address:
            return
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto(msg, self.address)
            except OSError:
                pass  # systemd gone or socket full: the service must go on regardless

    def ready(self, status: str) -> None:
        self.send(ready="1", status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def stopping(self, status: str = "stopping") -> None:
        self.send(stopping="1", status=status)

    def watchdog(self) -> None:
        self.send(watchdog="1")
