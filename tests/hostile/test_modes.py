"""Class 8: the daemon's files are its own, and the systemd unit confines it.

Regressions: node.db was 0644 and blobs/ 0755 in the demo (an existing directory's modes were
not enforced); conf/exchanged.service scored 8.5 on `systemd-analyze security --offline`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from hostile.conftest import Net

ROOT = Path(__file__).resolve().parents[2]


def _serve(net: Net, cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exchanged", "serve", "--config", str(cfg)],
                          cwd=net.d.work, env=net.d.env, capture_output=True, text=True,
                          timeout=60)


def _config_copy(net: Net, where: Path, **replace: str) -> Path:
    """office's configuration with its own data directory and port (the running office is
    not disturbed: these daemons stop at their checks)."""
    text = net.cfg("office").read_text()
    text = text.replace(f'data_dir = "{net.d.work}/office/data"', f'data_dir = "{where}/data"')
    text = re.sub(r'listen = "127.0.0.1:\d+"', 'listen = "127.0.0.1:0"', text)
    for old, new in replace.items():
        text = text.replace(old, new)
    cfg = where / "exchanged.toml"
    cfg.write_text(text)
    return cfg


def test_a_group_or_world_writable_data_directory_is_refused(net: Net, tmp_path: Path) -> None:
    cfg = _config_copy(net, tmp_path)
    (tmp_path / "data").mkdir()
    for mode in (0o770, 0o707):
        (tmp_path / "data").chmod(mode)
        r = _serve(net, cfg)
        assert r.returncode != 0 and "writable by its group or by others" in r.stderr, r.stderr
        assert not (tmp_path / "data" / "node.db").exists()  # refused before anything


def test_a_pin_file_others_can_read_is_refused(net: Net, tmp_path: Path) -> None:
    pin = tmp_path / "office.pin"
    shutil.copyfile(net.d.pin("office-node"), pin)
    pin.chmod(0o640)
    cfg = _config_copy(net, tmp_path, **{net.d.pin("office-node"): str(pin)})
    r = _serve(net, cfg)
    assert r.returncode != 0 and "chmod 600" in r.stderr, r.stderr


def test_what_the_daemon_creates_is_its_own(healthy: Net) -> None:
    net = healthy
    data = net.d.work / "office" / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "node.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "blobs").stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "control.sock").stat().st_mode) == 0o600
    net.delivered(net.send("for the modes"))
    blobs = [p for p in (data / "blobs").rglob("*") if p.is_file()]
    assert blobs and all(stat.S_IMODE(p.stat().st_mode) == 0o400 for p in blobs)
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in data.rglob("*")
               if not p.is_symlink())


def test_readable_modes_of_an_existing_store_are_tightened(net: Net) -> None:
    data = net.d.work / "office" / "data"
    net.stop("office")
    data.chmod(0o755)
    (data / "node.db").chmod(0o644)
    (data / "blobs").chmod(0o755)
    # A blob shard made by someone else (a restore with cp; a test, under umask 022): it
    # failed the test above when that ran after one that made a shard (pytest-xdist's order)
    shard = data / "blobs" / "ab"
    shard.mkdir(exist_ok=True)
    shard.chmod(0o755)
    net.start("office")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "node.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "blobs").stat().st_mode) == 0o700
    assert stat.S_IMODE(shard.stat().st_mode) == 0o700


def test_the_systemd_unit_is_confined() -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                        str(ROOT / "conf" / "exchanged.service")], capture_output=True,
                       text=True, env={**os.environ, "SYSTEMD_COLORS": "0"})
    found = re.search(r"Overall exposure level for exchanged.service: ([0-9.]+)", r.stdout)
    assert found, r.stdout + r.stderr
    assert float(found.group(1)) <= 2.0, r.stdout
