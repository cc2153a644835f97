"""tools/simulate through real daemons: a short province run with every fault holds every
invariant; a run with an invariant broken on purpose (documents acknowledged, not stored)
fails with lost > 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def simulate(tmp_path: Path, *args: str, timeout: float = 400) -> tuple[int, dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGED_")}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "simulate.py"), "--json",
                        "--workdir", str(tmp_path / "province"), *args], env=env,
                       capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert p.stdout.strip(), p.stderr[-4000:]
    return p.returncode, json.loads(p.stdout), p.stderr


def left_running(where: Path) -> list[str]:
    """Processes whose working directory or command line is under `where`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(where)) or str(where) in args:
            found.append(f"{proc.name}: {args}")
    return found


@pytest.mark.slow
def test_a_short_province_holds_every_invariant(tmp_path: Path) -> None:
    rc, res, err = simulate(tmp_path, "--units", "8", "--seconds", "20", "--drain", "30",
                            "--rate", "1.5", "--seed", "3", "--no-large", "--relay-after", "5")
    assert rc == 0, (res.get("failures"), res.get("problems"), err[-3000:])
    assert res["ok"] and not res["failures"]
    assert res["sent"] >= 15, res
    assert res["lost"] == 0 and res["duplicated"] == 0 and res["bad_evidence"] == 0
    # every document sent is accounted for: delivered once, refused, or queued with a reason
    assert res["delivered_once"] + res["refused"] + res["queued"] == res["sent"], res
    assert res["delivered_once"] >= res["sent"] // 2, res
    assert sum(res["queued_reasons"].values()) == res["queued"]
    assert sum(res["refused_reasons"].values()) == res["refused"]
    assert res["audit_chains_ok"] is True and res["audit_chains_verified"] == 8
    # the revoked node: every other node took the CRL listing it, within the bound
    assert res["revoked"] and len(res["revocation_refused_by"]) == 7
    assert res["revocation_refused_by_all_after_s"] is not None
    assert res["revocation_refused_by_all_after_s"] <= res["revocation_bound_s"]
    assert res["latency_p50_s"] is not None and res["latency_p99_s"] >= res["latency_p50_s"]
    kinds = {e["kind"] for e in res["faults"]}
    assert {"partition", "heal", "flap", "reset", "sigkill", "restarted", "revoked",
            "token-out", "token-in"} <= kinds, kinds
    assert "disk-full" in kinds or any("disk fault left out" in n for n in res["notes"])
    # the traffic met the faults, and came through: documents delivered after failed attempts
    assert res["delivered_after_failures"] >= 1, res
    # the relay: documents between two units whose direct link was cut went through their
    # common neighbour, and arrived with hop records and the sender's signature that verify
    assert res["relay_intended"] >= 3 and res["handed_to_relay"] >= 1, res
    assert res["relayed"] >= 1 and res["relayed"] == res["relayed_signatures_ok"], res
    png = Path(res["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing it started is left running, nothing mounted
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert not left_running(tmp_path)


@pytest.mark.slow
def test_a_broken_invariant_makes_it_fail(tmp_path: Path) -> None:
    """The daemons run through tools/sim_break.py: every other document arriving at a daemon
    is acknowledged with a good receipt and never stored. The simulator must see them lost
    and exit non-zero."""
    rc, res, err = simulate(tmp_path, "--units", "3", "--seconds", "10", "--drain", "15",
                            "--rate", "2.5", "--faults", "none", "--no-large",
                            "--break", "ack-without-store", timeout=200)
    assert rc == 1, err[-3000:]
    assert res["broken_on_purpose"] == "ack-without-store"
    assert res["lost"] > 0, res
    assert any("lost" in f for f in res["failures"])
    assert any("acknowledged, not in" in p for p in res["problems"])
    assert not left_running(tmp_path)
    # the rest of the judgement still works: what was stored is delivered once, chains hold
    assert res["delivered_once"] > 0 and res["duplicated"] == 0 and res["audit_chains_ok"]


class _SlowToStart:
    """A stand-in for the province in `simulate.kill`: a daemon takes 3 s to come up, and a
    kill that lands while it is coming up is recorded (the real one then finds it gone)."""

    def __init__(self) -> None:
        self.state = "up"
        self.killed_while_starting = 0
        self.ready_at = 0.0

    def kill(self, u: Any) -> None:
        if self.state == "starting":
            self.killed_while_starting += 1
        self.state = "down"

    def start_daemon(self, u: Any) -> None:
        import trio
        self.state, self.ready_at = "starting", trio.current_time() + 3

    def ready(self, u: Any) -> bool:
        import trio
        if self.state == "down":
            raise SystemExit(f"the {u.id} daemon exited")
        if trio.current_time() >= self.ready_at:
            self.state = "up"
        return self.state == "up"

    def note(self, *args: Any) -> None:
        pass


async def test_a_unit_killed_twice_is_killed_again_only_once_it_is_up(autojump_clock: Any) -> None:
    """CI failed on the short run: u06 was killed at 10.0 s, started again at 12.0 s and,
    not up yet on a loaded machine, killed again at 14.4 s; the first restart then found its
    daemon gone and the run stopped ('the u06 daemon exited')."""
    import trio
    sys.path.insert(0, str(ROOT / "tools"))
    import simulate as sim_tool

    sim = _SlowToStart()
    u = sim_tool.Unit("u06", 6, 1)
    async with trio.open_nursery() as n:
        n.start_soon(sim_tool.kill, sim, u, 2.0)
        await trio.sleep(2.5)  # the first restart is under way, its daemon not up for 3 s
        n.start_soon(sim_tool.kill, sim, u, 2.0)
    assert sim.killed_while_starting == 0
    assert sim.state == "up"
