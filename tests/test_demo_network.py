"""The README's demo network: two daemons on loopback, real TLS with SoftHSM keys on both sides,
a document sent, signed for and its receipts verified by openssl, then a revoked node refused."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_network_end_to_end(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "demo_network.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    out = p.stdout
    assert "demo: every step behaved as expected" in out
    assert out.count("CMS Verification successful") == 2  # delivery and signed-for receipts
    assert '"type":"delivery"' in out and '"type":"signed-for"' in out
    assert "state              signed-for" in out
    assert "signed receipt," in out  # shown by size, not as a wall of base64
    assert "is revoked (keyCompromise)" in out
    assert out.count("(exit 0)") == 2  # both daemons stopped cleanly on SIGTERM
    # Each daemon's log shows what happened, never a PIN.
    for unit in ("finance", "office"):
        log = (tmp_path / unit / "daemon.log").read_text()
        assert "listening on" in log
        for label in ("finance-node", "office-node"):
            pin = (tmp_path / "tokens" / f"{label}.pin").read_text().strip()
            assert pin not in log
