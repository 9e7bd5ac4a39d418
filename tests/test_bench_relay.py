"""Smoke test of bench/relay.py: it runs, every event is relayed over one connection, the report is written.

Not a benchmark (``--quick``: 50 events, one run; the numbers mean nothing).
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_relay_bench_runs_and_reports(tmp_path):
    report, raw = tmp_path / "RESULTS.md", tmp_path / "raw.json"
    report.write_text("# Results\n\nkept text\n")
    for _ in range(2):  # the second run replaces the section, keeping the rest
        done = subprocess.run([sys.executable, str(REPO / "bench" / "relay.py"), "--quick", "--output", str(report),
                               "--json", str(raw), "--workdir", str(tmp_path)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    result = json.loads(raw.read_text())
    assert result["received"] == 50 and result["connections"] == 1
    text = report.read_text()
    assert text.startswith("# Results\n\nkept text\n") and text.count("## Relay (issue 14)") == 1
