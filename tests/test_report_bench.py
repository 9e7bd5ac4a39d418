"""bench/report_bench.py still runs (issue 15): a tiny store, one round, every row printed."""

import subprocess
import sys

from cli_util import REPO


def test_report_bench_runs_and_prints_its_rows():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "report_bench.py"), "--events", "3000", "--runs", "1",
                           "--python", sys.executable], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("## Report (issue 15): `report` over 3,000 stored events")
    for row in ("| `--version` (baseline) |", "| `stats --json --by day` (index caught up) |",
                "| **`report`** (index caught up) |", "| `report`, first run"):
        assert row in out
    assert "target ≤ 1,000,000 ✔" in out
