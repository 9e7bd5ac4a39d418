"""Smoke test of bench/: every section runs once with tiny counts, so the benchmark can't rot.

Not a benchmark (``--quick --runs 1``: the numbers mean nothing). Each section must
finish, write its report and raw results, and every request it made must have been
answered 200 — a benchmark that silently measures error pages is worse than none.
A part whose tools are missing here (wrk, uwsgi, nginx, gunicorn, php-cgi, flask) is
skipped with the reason; the in-process, state store and CGI parts need nothing but
Python and always run.
"""

import importlib.util
import json
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
    """Run one bench section with tiny counts; return its raw results."""
    report = tmp_path / "report.md"
    raw = tmp_path / "raw.json"
    done = subprocess.run(
        [sys.executable, str(RUN), section, "--quick", "--runs", "1", "--output", str(report),
         "--json", str(raw), "--workdir", str(tmp_path)],
        capture_output=True, timeout=600,
    )
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, "bench/run.py %s failed:\n%s" % (section, stderr[-3000:])
    assert report.read_text(encoding="utf-8").startswith("# smsc_handler benchmark results")
    results = json.loads(raw.read_text(encoding="utf-8"))
    assert not results["errors"], results["errors"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("smsc-bench.")]
    assert not leftovers, "the work folder was not removed: %s" % leftovers
    return results


@pytest.mark.parametrize("section", ["inprocess", "store", "cgi", "php", "gunicorn", "uwsgi", "flask"])
def test_bench_section_runs_and_every_request_is_answered_200(section, tmp_path):
    missing = missing_tools(section)
    if missing:
        pytest.skip("bench section %r needs %s, not installed here" % (section, ", ".join(missing)))
    results = run_section(section, tmp_path)
    if section == "inprocess":
        rows = results["inprocess"]["rows"]
        assert rows and all(row["rate"] > 0 for row in rows)
        assert [row["name"] for row in rows if row["errors"]] == []
    elif section == "store":
        rows = results["store"]["rows"]
        assert len(rows) >= 2
        assert [row["size"] for row in rows if row["errors"]] == []
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
