"""Make docs/report.png: the report of a demo store, as Debian's headless Chromium shows it.

The store is written by the module itself: two weeks of history through normalize and
append_line with chosen received times, then today's callbacks sent over HTTP to a real
``smsc_handler.py serve`` (tests/report_util.py). The page is what ``report`` writes.

    python3 docs/screenshot.py [--keep FOLDER]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from cli_util import run_cli  # noqa: E402
from report_util import demo_store  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="build the store in this folder and keep it")
    parser.add_argument("--height", type=int, default=1750, help="CSS pixels of the page shown (default 1750)")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="smsc-screenshot-"))
    config = demo_store(folder, hostile=False)
    page = folder / "report.html"
    done = run_cli("report", "-o", page, "--config", config)
    if done.returncode:
        sys.exit(done.stderr)
    flags = ["--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             "--user-data-dir=%s" % (folder / "profile"), "--window-size=1280,%d" % args.height,
             "--screenshot=%s" % (HERE / "report.png")]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")
    subprocess.run(["/usr/bin/chromium", *flags, page.as_uri()], check=True, capture_output=True, timeout=120)
    print(HERE / "report.png")


if __name__ == "__main__":
    main()
