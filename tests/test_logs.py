"""Log lines: JSON when asked, and the syslog priority in front when stderr is the journal."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from exchanged.node import logs


def record(level: int, msg: str, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("exchanged", level, __file__, 1, msg, (), None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_json_lines_carry_the_unit_and_the_known_fields_only() -> None:
    line = logs.JsonFormatter("finance").format(
        record(logging.WARNING, "refused", peer="office", code="peer-revoked", secret="x"))
    data = json.loads(line)
    assert data["unit"] == "finance" and data["level"] == "warning"
    assert (data["message"], data["peer"], data["code"]) == ("refused", "office",
                                                             "peer-revoked")
    assert "secret" not in data and data["time"].endswith("Z")


def test_the_journal_gets_the_priority_and_one_entry_per_record() -> None:
    fmt = logs.Priority(logging.Formatter("%(message)s"))
    assert fmt.format(record(logging.ERROR, "disk full")) == "<3>disk full"
    assert fmt.format(record(logging.INFO, "up")) == "<6>up"
    assert fmt.format(record(logging.WARNING, "two\nlines")) == "<4>two\n lines"


def test_the_journal_is_recognised_by_its_stream_only() -> None:
    code = ("import sys, os; from exchanged.node import logs; "
            "print(logs.under_journald())")
    st = os.fstat(2)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.strip() == "False"  # stderr is a pipe here, not that stream
    env["JOURNAL_STREAM"] = "junk"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.strip() == "False"
    r = subprocess.run([sys.executable, "-c", "import os, sys; st = os.fstat(2); "
                        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'; "
                        "from exchanged.node import logs; print(logs.under_journald())"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "True"
