"""demo_network.setup for the test modules, with its slow half made once per run: the tokens,
the CA and the certificates (`make_pki`, of each kind: with or without the exchange box's third
unit and people) are made in a directory of their own the first time a module asks, and copied
into each module's network afterwards. SoftHSM tokens are plain files, so the copy is the same
tokens with the same keys and PINs, a CA directory the same database and log; each module then
has its own copies to change, and its nodes' configurations on ports free now (`configure`)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import Demo, configure, make_pki  # noqa: E402

_MADE: dict[tuple[Path, bool], tuple[Demo, str]] = {}


def setup(d: Demo, *, box: bool = False) -> dict[str, str]:
    """What demo_network.setup(d, box=box) makes; the same values back."""
    base = d.work.parent  # the run's temporary directory (one per xdist worker)
    if (base, box) not in _MADE:
        made = Demo(base / ("demo-pki-box" if box else "demo-pki"))
        made.work.mkdir()
        _MADE[base, box] = made, make_pki(made, box=box)
    made, office_serial = _MADE[base, box]
    shutil.copytree(made.work, d.work, dirs_exist_ok=True)
    conf = d.tok / "softhsm2.conf"
    conf.write_text(re.sub(r"(?m)^directories\.tokendir = .*$",
                           f"directories.tokendir = {d.tok / 'tokens'}", conf.read_text()))
    d.env["SOFTHSM2_CONF"] = str(conf)
    d.ca_port = made.ca_port  # the CA's certificates name its publication point's URL
    return configure(d, office_serial, box=box)
