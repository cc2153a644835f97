"""The README's demo network: three daemons on loopback, real TLS with SoftHSM keys on all
sides, a document sent, signed for and its receipts verified by openssl, the exchange box's
workflow, then a revoked node refused."""

import re
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
    # delivery and signed-for receipts, and the forwarded package's original signature
    assert out.count("CMS Verification successful") >= 3
    assert '"type":"delivery"' in out and '"type":"signed-for"' in out
    assert "state              signed-for" in out
    assert "signed receipt," in out  # shown by size, not as a wall of base64
    assert "is revoked (keyCompromise)" in out
    # The revocation travelled by itself: fetched by finance from the publication point, then
    # handed by finance to district while the CA was down.
    assert "newly taken) from http://127.0.0.1:" in out
    assert "the CA's publication point is stopped" in out
    assert "from peer finance" in out
    for unit in ("finance", "district"):
        assert re.search(rf"\n  {unit}: .*is revoked \(keyCompromise\)", out), unit
    # The exchange box: numbered, two divisions signed for, forwarded and verified, returned,
    # reminded, archived.
    assert "registered as 收文〔" in out
    assert "signed for Finance Division" in out and "signed for Personnel Division" in out
    assert "verified finance's own signature" in out
    assert "returned by" in out and "the PDF is not the sealed copy" in out
    assert "the alert command ran: urgent-pending" in out
    assert "archive (an archive" not in out and "OK" in out
    assert "openssl verified" in out
    assert out.count("(exit 0)") == 3  # every daemon stopped cleanly on SIGTERM
    # Each daemon's log shows what happened, never a PIN.
    for unit in ("finance", "office", "district"):
        log = (tmp_path / unit / "daemon.log").read_text()
        assert "listening on" in log
        for label in ("finance-node", "office-node", "district-node", "receiver"):
            pin = (tmp_path / "tokens" / f"{label}.pin").read_text().strip()
            assert pin not in log
