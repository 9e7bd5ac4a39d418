"""Smoke test of bench/tracking.py: a tiny store, so the tracking benchmark can't rot.

Not a benchmark (a few thousand events, one run: the numbers mean nothing). It must
finish, index every event it wrote exactly once, and report each row of its table.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_tracking_bench_runs_small(tmp_path):
    raw = tmp_path / "raw.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "tracking.py"), "--events", "3000",
                           "--messages", "900", "--runs", "1", "--json", str(raw)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(raw.read_text())
    assert results["indexed"] == results["distinct"] < results["events"]  # SMSC's repeats indexed once
    assert results["messages"] == 900
    for row in ("first catch-up", "`status ID`", "`calls --phone P`", "`stats` over the whole store",
                "catch-up after 1,000 new events", "index on disk"):
        assert row in done.stdout
