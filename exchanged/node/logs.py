"""The daemon's log lines: plain text, or JSON lines (`log_format = "json"`); under systemd each
line starts with its syslog priority (`<3>` ...), so `journalctl -p warning` filters them.

A JSON line holds time, level, logger, unit, message, and the fields a log call passes with
`extra=` among FIELDS (peer, doc_id, code, event), so `journalctl -o cat | jq 'select(.peer ==
"office")'` finds one peer's lines.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys

FIELDS = ("peer", "doc_id", "code", "event")
# logging level -> syslog priority (sd-daemon(3): "<N>" at the start of a line on stderr)
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}


class JsonFormatter(logging.Formatter):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z"), "level": record.levelname.lower(),
            "logger": record.name, "unit": self.unit, "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class Priority(logging.Formatter):
    """Another formatter's line with the syslog priority in front (for journald)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        level = PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{level}>" + self.inner.format(record).replace("\n", "\n ")


def under_journald() -> bool:
    """Is stderr connected to the journal ($JOURNAL_STREAM names its device and inode)?"""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(unit: str, log_format: str) -> None:
    journal = under_journald()
    inner: logging.Formatter
    if log_format == "json":
        inner = JsonFormatter(unit)
    elif journal:  # journald stamps the time itself
        inner = logging.Formatter("%(levelname)s %(message)s")
    else:
        inner = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler = logging.StreamHandler()
    handler.setFormatter(Priority(inner) if journal else inner)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
