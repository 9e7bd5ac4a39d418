"""Smoke test of bench/: every section runs once with tiny counts, so the benchmark can't rot.

Not a benchmark (``--quick --runs 1``: the numbers mean nothing). Each section must
finish, write its report and raw results, and every request it made must have been
answered 200 — a benchmark that silently measures error pages is worse than none —
and every event of the store section's write-contention run must be in the data files.
A part whose tools are missing here (wrk, uwsgi, nginx, gunicorn, php-cgi, flask) is
skipped with the reason; the in-process, state store and CGI parts need nothing but
Python and always run.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "run.py"

#: section -> what it needs: program names, or "module:NAME" for Python packages
NEEDS = {
    "inprocess": (),
    "store": (),
    "cgi": (),
    "php": ("php-cgi",),
    "gunicorn": ("wrk", "module:gunicorn"),
    "uwsgi": ("wrk", "uwsgi", "nginx"),
    "flask": ("wrk", "module:gunicorn", "module:flask"),
}

#: where Debian keeps nginx and friends (not always on a user's PATH)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_tools(section):
    """Return the tools a section needs that this machine lacks."""
    missing = []
    for need in NEEDS[section]:
        if need.startswith("module:"):
            if importlib.util.find_spec(need[7:]) is None:
                missing.append("the %s package (pip install %s)" % (need[7:], need[7:]))
        elif shutil.which(need) is None and shutil.which(need, path=SYSTEM_PATH) is None:
            missing.append(need)
    return missing


def run_section(section, tmp_path):
    """Run one bench section with tiny counts; return its raw results and the report."""
    report = tmp_path / "report.md"
    raw = tmp_path / "raw.json"
    done = subprocess.run(
        [sys.executable, str(RUN), section, "--quick", "--runs", "1", "--output", str(report),
         "--json", str(raw), "--workdir", str(tmp_path)],
        capture_output=True, timeout=600,
    )
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, "bench/run.py %s failed:\n%s" % (section, stderr[-3000:])
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# smsc_handler benchmark results")
    results = json.loads(raw.read_text(encoding="utf-8"))
    assert not results["errors"], results["errors"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("smsc-bench.")]
    assert not leftovers, "the work folder was not removed: %s" % leftovers
    return results, text


@pytest.mark.parametrize("section", ["inprocess", "store", "cgi", "php", "gunicorn", "uwsgi", "flask"])
def test_bench_section_runs_and_every_request_is_answered_200(section, tmp_path):
    missing = missing_tools(section)
    if missing:
        pytest.skip("bench section %r needs %s, not installed here (as root: bash .ci/servers.sh "
                    "and bash .ci/packages.sh install them)" % (section, ", ".join(missing)))
    results, text = run_section(section, tmp_path)
    if section in ("inprocess", "store"):
        # Measured under --inprocess-python, by default --python: Debian's interpreter when there is one
        # (run.py re-runs itself under it when pytest's python3 is another), and the report says so.
        expected = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else (
            shutil.which("python3", path=SYSTEM_PATH) or sys.executable)
        used = results[section]["executable"]
        assert os.path.realpath(used) == os.path.realpath(expected)
        assert results["inprocess_python"]["executable"] == used
        assert "in-process and store %s (`%s`)" % (results[section]["python"], used) in text
        assert "Python %s (`%s`)" % (results[section]["python"], used) in text
    if section == "inprocess":
        rows = results["inprocess"]["rows"]
        assert rows and all(row["rate"] > 0 for row in rows)
        assert [row["name"] for row in rows if row["errors"]] == []
    elif section == "store":
        rows = results["store"]["rows"]
        assert len(rows) >= 2
        assert [row["size"] for row in rows if row["errors"]] == []
        # Write contention: every event of every process was stored, one line each (every event is new).
        contention = results["store"]["contention"]
        assert "error" not in contention, contention.get("error")
        assert contention["processes"] >= 2
        expected = contention["processes"] * contention["events_per_process"]
        assert [row["fsync"] for row in contention["rows"]] == [False, True]
        for row in contention["rows"]:
            assert row["expected"] == expected
            assert row["errors"] == 0, (row["name"], row["first_error"])
            assert row["lines_runs"] == [expected], row["name"]
            assert row["ids_runs"] == [expected], row["name"]
            assert row["lost"] == 0
            assert row["rate"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert "### Write contention" in text
    elif section in ("cgi", "php"):
        variants = results["cgi"]["variants"]
        assert variants
        failed = {row["name"]: row["first_error"] for row in variants if row["errors"]}
        assert failed == {}
        if section == "php":
            assert results["cgi"]["php_concurrency"], "the PHP peer was not measured"
        else:
            assert results["cgi"]["importtime"]["configs"]
    else:
        servers = results["servers"]
        assert not servers["skipped"], servers["skipped"]
        rows = servers["rows"]
        assert rows
        assert {row["name"]: row["skip"] for row in rows if row.get("skip")} == {}
        bad = {row["name"]: (row["non2xx"], row["socket_errors"]) for row in rows
               if row["non2xx"] or row["rps"] is None}
        assert bad == {}
