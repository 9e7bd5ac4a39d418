#!/usr/bin/env python3
"""Benchmark smsc_handler: in-process, state store growth, CGI (+ PHP peer), servers (+ Flask peer).

    python3 bench/run.py                      # everything (about 10 minutes)
    python3 bench/run.py --quick              # tiny counts: checks that it all still runs
    python3 bench/run.py inprocess cgi        # pick sections
    python3 bench/run.py --output bench/RESULTS.md

Sections: inprocess, store, cgi, php, servers (uWSGI+nginx and gunicorn), peer (Flask
under gunicorn), relay (bench/relay.py: forward relaying to a local app); `uwsgi`,
`gunicorn` and `flask` pick one server part. Every number is the median of --runs
runs (default 5), and every ratio is taken run by run against
a baseline measured in the same round on the same machine. A section whose tools
are missing (wrk, uwsgi, nginx, gunicorn, php-cgi, flask) is skipped with the reason.
The report is Markdown on stdout, or in --output (text below the marker line of an
existing file is kept); --json writes the raw results.

Which Python each section measures: CGI runs under --python (default Debian's
/usr/bin/python3, what Apache finds; also the one uWSGI's python3 plugin embeds), and
the inprocess and store sections under --inprocess-python (default: --python). When
that is not the interpreter running this script, run.py re-runs itself under it for
those two sections (a child process sharing the temporary folder, its raw results
handed back in a JSON file). gunicorn and Flask run under the interpreter running
this script, where they are installed.

Nothing is left behind: servers are started on 127.0.0.1 and stopped at the end, and
all files live in a temporary folder (under /var/tmp: a disk, as on a host, since
tmpfs would make fsync free), removed unless --keep.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cgi_bench  # noqa: E402
import common  # noqa: E402
import inprocess  # noqa: E402
import relay  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402

SECTIONS = ("inprocess", "store", "cgi", "php", "servers", "peer", "relay")
SERVER_PARTS = {"servers": ("uwsgi", "gunicorn"), "peer": ("flask",), "uwsgi": ("uwsgi",),
                "gunicorn": ("gunicorn",), "flask": ("flask",)}


class Context:
    """What every section needs: where things are, how much to measure."""

    def __init__(self, args):
        self.python = args.python
        self.inprocess_python = args.inprocess_python or args.python
        self.app_dir = os.path.abspath(args.app_dir)
        if args.child_workdir:
            # A child run for the in-process sections: the parent's folder and candidate copy, which
            # the parent removes.
            self.workdir = args.child_workdir
            self.candidate = args.child_candidate
        else:
            module = candidate_module(args.candidate) if args.candidate else None
            self.workdir = common.make_workdir(args.workdir)
            self.candidate = candidate_dir(module, self.app_dir, self.workdir) if module else None
        self.quick = args.quick
        self.runs = args.runs if args.runs else (2 if args.quick else 5)
        self.duration = args.duration if args.duration else (1 if args.quick else 2)
        self.server_app = self.server_candidate = None

    def scale(self, normal, quick):
        """Return the count for this run: `normal`, or `quick` with --quick."""
        return quick if self.quick else normal


def candidate_module(path):
    """Return the candidate smsc_handler.py named by --candidate (a file or its folder)."""
    path = os.path.abspath(path)
    module = path if path.endswith(".py") else os.path.join(path, "smsc_handler.py")
    if not os.path.isfile(module):
        raise SystemExit("bench/run.py: --candidate: %s is not a file" % module)
    return module


def candidate_dir(module, app_dir, workdir):
    """Return a folder with the candidate smsc_handler.py and the app's other files beside it."""
    folder = os.path.join(workdir, "candidate")
    os.makedirs(folder)
    for name in common.APP_FILES:
        source = os.path.join(os.path.dirname(module), name)
        if name == "smsc_handler.py":
            source = module
        elif not os.path.isfile(source):
            source = os.path.join(app_dir, name)
        shutil.copy2(source, os.path.join(folder, name))
    return folder


def default_python():
    """Return the interpreter CGI runs under: Debian's /usr/bin/python3 when present."""
    for candidate in ("/usr/bin/python3", common.which("python3", path=common.SYSTEM_PATH), sys.executable):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def build_parser():
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="Benchmark smsc_handler against baselines measured in the same run.")
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help="any of %s, or uwsgi/gunicorn/flask (default: all)" % ", ".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny counts and 2 runs: a smoke test, not a result")
    parser.add_argument("--runs", type=int, default=0, help="runs per measurement (default 5; 2 with --quick)")
    parser.add_argument("--duration", type=int, default=0, help="seconds per wrk run (default 2; 1 with --quick)")
    parser.add_argument("--python", default=default_python(),
                        help="interpreter for CGI and for byte-compiling (default %(default)s)")
    parser.add_argument("--inprocess-python", metavar="PYTHON", default=None,
                        help="interpreter for the inprocess and store sections (default: --python); when it is not "
                             "the one running run.py, run.py re-runs itself under it for those sections")
    # Set only by run.py when it re-runs itself under --inprocess-python: write the raw results
    # here, in the parent's work folder (not removed by the child), with its candidate copy.
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("--child-workdir", help=argparse.SUPPRESS)
    parser.add_argument("--child-candidate", help=argparse.SUPPRESS)
    parser.add_argument("--app-dir", default=common.REPO,
                        help="folder holding smsc_handler.py, handler.cgi, wsgi.py (default: the repository)")
    parser.add_argument("--candidate", metavar="PATH",
                        help="a changed smsc_handler.py (or its folder): measured beside the current one in the "
                             "same rounds (in-process form cases, CGI targets, server handler rows)")
    parser.add_argument("--workdir", default=None, help="parent of the temporary folder (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data, logs, configs)")
    parser.add_argument("--output", help="write the Markdown report here instead of stdout")
    parser.add_argument("--json", dest="json_path", help="also write the raw results as JSON here")
    parser.add_argument("--from-json", metavar="PATH",
                        help="measure nothing: render the report again from a --json file")
    return parser


def resolve_python(value, parser, option):
    """Return the interpreter named by an option (a path, or a name looked up on PATH)."""
    found = value if os.sep in value else common.which(value)
    if not found or not (os.path.isfile(found) and os.access(found, os.X_OK)):
        parser.error("%s: %s is not an executable interpreter" % (option, value))
    return found


def same_interpreter(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def selected(args, parser):
    names = args.sections or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS and n not in SERVER_PARTS and n != "all"]
    if unknown:
        parser.error("unknown section %s; choose from %s, uwsgi, gunicorn, flask"
                     % (", ".join(unknown), ", ".join(SECTIONS)))
    if "all" in names:
        names = list(SECTIONS)
    return names


def git_describe(app_dir):
    try:
        rev = subprocess.run(["git", "-C", app_dir, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=10).stdout.decode().strip()
        dirty = subprocess.run(["git", "-C", app_dir, "status", "--porcelain", "--", "smsc_handler.py"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10).stdout.strip()
        return (rev + (" + uncommitted smsc_handler.py" if dirty else "")) if rev else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def header(args, ctx, started, finished, info, load_before, inproc=None):
    command = "python3 bench/run.py " + " ".join(sys.argv[1:])
    lines = [
        "# smsc_handler benchmark results",
        "",
        "Written by `bench/run.py` (issue 6). Numbers are medians of %d runs; every ratio is taken run by run "
        "against a baseline measured in the same round on the same machine, so it holds up better than the "
        "absolute numbers on a noisy machine." % ctx.runs,
        "",
        "- date: %s (UTC), %.0f s" % (time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), finished - started),
        "- command: `%s`%s" % (command.strip(), " (quick: not a result)" if ctx.quick else ""),
        "- machine: %s, %s cores, %s GB RAM, %s, %s" % (info.get("cpu"), info.get("cores"), info.get("memory_gb"),
                                                       info.get("os"), info.get("kernel")),
        "- load average before / after: %s / %s" % (load_before, common.machine_info().get("loadavg")),
        "- handler: `%s` (%s)" % (ctx.app_dir, git_describe(ctx.app_dir) or "not a git checkout"),
        "- candidate: `%s`" % args.candidate if args.candidate else "- candidate: none (`--candidate PATH` "
        "measures a changed smsc_handler.py beside the current one)",
        "- Python: %s; CGI %s (`%s`); gunicorn and Flask %s (`%s`, the interpreter running run.py); uWSGI: the "
        "one its python3 plugin embeds" % (
            "in-process and store %s (`%s`)" % (inproc["version"], inproc["executable"]) if inproc
            else "in-process and store not run", _version_of(ctx.python), ctx.python,
            info["python"], info["executable"]),
    ]
    return "\n".join(lines)


def _version_of(python):
    """Return an interpreter's version (3.11.2), or '?'."""
    if same_interpreter(python, sys.executable):
        return sys.version.split()[0]
    found = common.tool_version([python, "--version"], r"\d+\.\d+\.\d+\S*")
    return found or "?"


def write_report(args, results, head):
    """Render the report to --output (keeping the text below its marker) or stdout."""
    analysis = None
    if args.output and os.path.exists(args.output):
        with open(args.output, encoding="utf-8") as file:
            old = file.read()
        if report.KEEP_MARKER in old:
            analysis = old.split(report.KEEP_MARKER, 1)[1]
    text = report.render(results, head, analysis)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
        common.progress("wrote %s" % args.output)
    else:
        sys.stdout.write(text)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as file:
            results = json.load(file)
        write_report(args, results, results.get("header", "# smsc_handler benchmark results"))
        return 0
    names = selected(args, parser)
    args.python = resolve_python(args.python, parser, "--python")
    if args.inprocess_python:
        args.inprocess_python = resolve_python(args.inprocess_python, parser, "--inprocess-python")
    if args.child_json:
        return child_main(args, names)
    ctx = Context(args)
    started = time.time()
    info = common.machine_info()
    load_before = info.get("loadavg")
    results = {"machine": info, "errors": {}}

    def on_signal(signum, _frame):
        common.stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    common.progress("work folder %s; sections: %s" % (ctx.workdir, " ".join(names)))
    try:
        run_inprocess_sections(ctx, names, results)
        if "cgi" in names or "php" in names:
            _guard(results, "cgi", lambda: cgi_bench.run(ctx, with_cgi="cgi" in names, with_php="php" in names))
        parts = sorted({part for name in names for part in SERVER_PARTS.get(name, ())})
        if parts:
            _guard(results, "servers", lambda: servers.run(ctx, parts))
        if "relay" in names:  # bench/relay.py, under this interpreter
            _guard(results, "relay", lambda: relay.measure(ctx.app_dir, ctx.runs, ctx.scale(2000, 50),
                                                           os.path.join(ctx.workdir, "relay")))
    except KeyboardInterrupt:
        common.stop_all()
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        common.stop_all()
        if args.keep:
            common.progress("kept %s" % ctx.workdir)
        else:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
    finished = time.time()
    head = header(args, ctx, started, finished, info, load_before, results.get("inprocess_python"))
    results["header"] = head
    write_report(args, results, head)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=1, default=str)
    return 1 if results["errors"] else 0


INPROCESS_SECTIONS = ("inprocess", "store")


def _run_here(ctx, names, results):
    """Run the in-process sections in this interpreter."""
    if "inprocess" in names:
        _guard(results, "inprocess", lambda: inprocess.run(ctx))
    if "store" in names:
        _guard(results, "store", lambda: inprocess.run_store(ctx))
        contention = (results.get("store") or {}).get("contention") or {}
        if contention.get("error"):
            results["errors"]["store contention"] = contention["error"]
        lost = ["%s: %d %s" % (row["name"], abs(row["lost"]), "missing" if row["lost"] > 0 else "extra")
                for row in contention.get("rows", ()) if row["lost"]]
        if lost:  # a benchmark that silently loses events is worse than none
            results["errors"]["store contention"] = (
                "lines in the data files differ from the events store_event accepted (%s)" % ", ".join(lost))


def run_inprocess_sections(ctx, names, results):
    """Run the inprocess and store sections under --inprocess-python: here, or in a child run.py."""
    wanted = [name for name in INPROCESS_SECTIONS if name in names]
    if not wanted:
        return
    python = ctx.inprocess_python
    if same_interpreter(python, sys.executable):
        results["inprocess_python"] = {"executable": sys.executable, "version": sys.version.split()[0]}
        _run_here(ctx, wanted, results)
        return
    out = os.path.join(ctx.workdir, "inprocess-child.json")
    argv = [python, os.path.abspath(__file__)] + wanted + [
        "--runs", str(ctx.runs), "--app-dir", ctx.app_dir, "--python", ctx.python,
        "--child-json", out, "--child-workdir", ctx.workdir]
    if ctx.quick:
        argv.append("--quick")
    if ctx.candidate:
        argv += ["--child-candidate", ctx.candidate]
    common.progress("%s: running under %s (a child bench/run.py)" % (" and ".join(wanted), python))
    status = _run_child(argv)
    try:
        with open(out, encoding="utf-8") as file:
            child = json.load(file)
    except (OSError, ValueError) as exc:
        for name in wanted:
            results["errors"][name] = "bench/run.py under %s exited with status %s and no results (%s)" % (
                python, status, type(exc).__name__)
        return
    for name in wanted:
        if name in child:
            results[name] = child[name]
    results["errors"].update(child.get("errors", {}))
    results["inprocess_python"] = child.get("inprocess_python")


def _run_child(argv):
    """Run a child run.py to its end; its progress lines (stderr, and stdout too) reach our stderr."""
    sys.stderr.flush()
    try:
        stdout = sys.stderr.fileno()  # not the report's stdout
    except (AttributeError, ValueError):  # io.UnsupportedOperation is a ValueError
        stdout = None
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout)
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C reaches the child too; SIGTERM to us alone does not
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def child_main(args, names):
    """The child side of run_inprocess_sections: measure, write the raw results as JSON, leave the folder."""
    ctx = Context(args)
    results = {"errors": {},
               "inprocess_python": {"executable": sys.executable, "version": sys.version.split()[0]}}

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        _run_here(ctx, [name for name in INPROCESS_SECTIONS if name in names], results)
    except KeyboardInterrupt:
        return 130
    finally:
        common.stop_all()
    with open(args.child_json, "w", encoding="utf-8") as file:
        json.dump(results, file, default=str)
    return 1 if results["errors"] else 0


def _guard(results, name, func):
    """Run one section; a crash is reported (and makes the exit status 1) without losing the others."""
    import traceback
    try:
        results[name] = func()
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
        results["errors"][name] = "%s: %s" % (type(exc).__name__, exc)
        sys.stderr.write(traceback.format_exc())


if __name__ == "__main__":
    sys.exit(main())
