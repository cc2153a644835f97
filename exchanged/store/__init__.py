"""Persistent state: SQLite schemas and queries."""

import sys

# sqlite-utils imports numpy and pandas when they are installed, to map their types to columns;
# this project never hands it either. numpy alone is 12 MiB of resident memory in the daemon
# (measured: 64 -> 52 MiB after importing exchanged.node.service). sqlite-utils is imported
# here first, with the two hidden from it; other code of the process may still import them.
_hidden = [m for m in ("numpy", "pandas") if m not in sys.modules]
for _m in _hidden:
    sys.modules[_m] = None  # type: ignore[assignment]  # an import of it raises ImportError
try:
    import sqlite_utils  # noqa: F401
finally:
    for _m in _hidden:
        del sys.modules[_m]
