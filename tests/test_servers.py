"""The handler behind real servers: Apache CGI (.htaccess), nginx + uWSGI, gunicorn.

Each deployment is built from the files in deploy/ (and the repository's .htaccess),
started on 127.0.0.1 on a free port with its own config in a temporary folder, fed the
callbacks SMSC sends, and stopped at the end. A deployment whose server binary is not
installed is skipped; `.ci/servers.sh` installs them all for CI.
"""

import contextlib
import http.client
import importlib.util
import os
import random
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import pytest
from servers_util import (
    DEPLOY,
    REPO,
    SECRET,
    SYSTEM_PATH,
    Server,
    copy_app,
    free_port,
    give_to_web_user,
    md5_hex,
    post_form,
    read_jsonl,
    read_unit,
    render,
    request,
    shared_tmpdir,
    unit_environment,
    web_user,
    write_config,
)

#: an answer slower than this (seconds) fails: mod_cgid stalls ~5 s on unread bodies
MAX_SECONDS = 3.0
#: Debian's Apache modules
APACHE_MODULES = Path("/usr/lib/apache2/modules")


def which(name):
    """Find a server binary, also in the sbin folders a non-root PATH lacks."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def require(name):
    """Return the path of binary name, or skip the deployment that needs it."""
    path = which(name)
    if path is None:
        pytest.skip("%s is not installed (as root: bash .ci/servers.sh installs it)" % name)
    return path


class Deployment:
    """A running deployment: where to send callbacks and where events land."""

    def __init__(self, name, port, path, data_dir, servers):
        self.name = name
        self.port = port
        self.path = path
        self.data_dir = Path(data_dir)
        self.servers = servers
        self.timings = []
        self.extra = {}

    def logs(self):
        return "\n".join(s.tail() for s in self.servers)

    def check_time(self, label, answer):
        self.timings.append((label, answer.seconds))
        assert answer.seconds < MAX_SECONDS, "%s took %.2f s through %s\n%s" % (
            label,
            answer.seconds,
            self.name,
            self.logs(),
        )
        return answer

    def post(self, label, params, query=None, charset="windows-1251"):
        with self.explained(label):
            answer = post_form(self.port, self.path, params, query, charset)
        return self.check_time(label, answer)

    def send(self, label, method, path=None, body=None, headers=None):
        with self.explained(label):
            answer = request(self.port, method, path or self.path, body, headers)
        return self.check_time(label, answer)

    @contextlib.contextmanager
    def explained(self, label):
        """Turn a broken answer into a failure that shows the servers' logs."""
        start = time.monotonic()
        try:
            yield
        except (OSError, http.client.HTTPException) as exc:
            pytest.fail(
                "%s through %s: %r after %.2f s\n%s" % (label, self.name, exc, time.monotonic() - start, self.logs())
            )

    def events(self, kind):
        return read_jsonl(self.data_dir / ("%s.jsonl" % kind))


############################################################################
# Building the deployments
############################################################################


def apache_conf(mpm, port, base, vhost, bare):
    """Return a minimal httpd.conf around the deploy/ vhost, as Debian's would be."""
    cgi = "cgid" if mpm == "event" else "cgi"
    modules = ["mpm_" + mpm, "authz_core", "mime", "dir", "alias", cgi]
    user = web_user()
    lines = [
        "ServerRoot /etc/apache2",
        "ServerName 127.0.0.1",
        "Listen 127.0.0.1:%d" % port,
        "PidFile %s/run/apache2.pid" % base,
        "DefaultRuntimeDir %s/run" % base,
        "Mutex file:%s/run default" % base,
        "ErrorLog %s/logs/error.log" % base,
        "LogLevel warn",
        'LogFormat "%h \\"%r\\" %>s %b %Dus" timed',
        "CustomLog %s/logs/access.log timed" % base,
        "TypesConfig /etc/mime.types",
        "AccessFileName .htaccess",
    ]
    lines += ["LoadModule %s_module %s/mod_%s.so" % (m, APACHE_MODULES, m) for m in modules]
    if user is not None:
        lines += ["User %s" % user.pw_name, "Group %s" % user.pw_name]
    lines += [
        "<Directory />",
        "    Options None",
        "    AllowOverride None",
        "    Require all denied",
        "</Directory>",
        "<IfModule mod_cgid.c>",
        "    ScriptSock %s/run/cgid.sock" % base,
        "</IfModule>",
        # a folder with no .htaccess of its own, to try the one the handler writes
        "Alias /bare %s" % bare,
        "<Directory %s>" % bare,
        "    AllowOverride All",
        "    Require all granted",
        "</Directory>",
        "Include %s" % vhost,
    ]
    return "\n".join(lines) + "\n"


def build_apache(stack, mpm):
    """Apache 2.4 + mod_cgid (event MPM) or mod_cgi (prefork), the folder as docroot."""
    apache = require("apache2")
    if not (APACHE_MODULES / ("mod_mpm_%s.so" % mpm)).exists():
        pytest.skip("Debian's Apache modules are not in %s" % APACHE_MODULES)
    base = shared_tmpdir("smsc-apache")
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    for sub in ("run", "logs", "bare"):
        (base / sub).mkdir()
        (base / sub).chmod(0o755)
    www = copy_app(base / "www")
    shutil.copy2(REPO / ".htaccess", www / ".htaccess")
    (www / ".htaccess").chmod(0o644)
    write_config(www / "config.ini", "data")
    # a stray file of the user's, which must not be served either
    (www / "notes.txt").write_text("private notes\n", encoding="utf-8")
    (www / "notes.txt").chmod(0o644)
    # on a shared host the files belong to the account the CGI runs as
    give_to_web_user(www)
    port = free_port()
    vhost = render(
        DEPLOY / "apache-vhost.conf",
        {"<VirtualHost *:80>": "<VirtualHost 127.0.0.1:%d>" % port, "/var/www/smsc_handler": str(www)},
        base / "vhost.conf",
    )
    conf = base / "httpd.conf"
    conf.write_text(apache_conf(mpm, port, base, vhost, base / "bare"), encoding="utf-8")
    # Apache's own clean environment (/etc/apache2/envvars): `env python3` in handler.cgi
    # must find Debian's interpreter, not root's pyenv shims (www-data can't reach them)
    server = Server(
        "apache2 (%s)" % mpm,
        [apache, "-f", conf, "-DFOREGROUND"],
        base / "logs" / "stdout.log",
        env={"PATH": SYSTEM_PATH, "LANG": "C"},
        cwd="/",
    )
    server.logs += [base / "logs" / "error.log", base / "logs" / "access.log"]
    stack.callback(server.stop)
    server.wait_port(port)
    dep = Deployment("apache-" + ("cgid" if mpm == "event" else "cgi"), port, "/handler.cgi", www / "data", [server])
    dep.extra.update(www=www, bare=base / "bare")
    return dep


def unit_command(unit_file, replacements, dest):
    """Render a systemd unit from deploy/ and return its ExecStart argv, env and user."""
    unit = read_unit(render(unit_file, replacements, dest))
    user = web_user() if unit.get("User") else None
    return shlex.split(unit["ExecStart"]), unit_environment(unit), user


def start_uwsgi(stack, base):
    """uWSGI (Debian's, python3 plugin) as smsc-handler-uwsgi.service runs it."""
    uwsgi = require("uwsgi")
    if not list(Path("/usr/lib/uwsgi/plugins").glob("python3*_plugin.so")):
        pytest.skip("uwsgi-plugin-python3 is not installed (as root: bash .ci/servers.sh installs it)")
    app = copy_app(base / "app")
    etc = base / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    run = base / "run"
    data = base / "data"
    for folder in (run, data):  # RuntimeDirectory= and StateDirectory=, owned by User=
        folder.mkdir()
        give_to_web_user(folder)
    write_config(etc / "config.ini", str(data))
    paths = {"/opt/smsc_handler": str(app), "/etc/smsc_handler": str(etc), "/run/smsc_handler": str(run)}
    render(DEPLOY / "uwsgi.ini", paths, etc / "uwsgi.ini")
    argv, env, user = unit_command(
        DEPLOY / "smsc-handler-uwsgi.service",
        {"/usr/bin/uwsgi": uwsgi, "/etc/smsc_handler": str(etc)},
        base / "uwsgi.service",
    )
    env.update(PATH=SYSTEM_PATH, LANG="C.UTF-8")
    server = Server("uwsgi", argv, base / "uwsgi.log", env=env, cwd="/", user=user)
    stack.callback(server.stop)
    return server, run / "uwsgi.sock", data


def start_nginx(stack, base, site, replacements):
    """nginx with a deploy/ site in a private prefix (its own pid, logs, temp folders)."""
    nginx = require("nginx")
    prefix = base / "nginx"
    prefix.mkdir()
    for name in ("uwsgi_params",):
        shutil.copy2(Path("/etc/nginx") / name, prefix / name)
    port = free_port()
    replacements = dict(replacements)
    replacements["listen 80;"] = "listen 127.0.0.1:%d;" % port
    render(DEPLOY / site, replacements, prefix / "site.conf")
    user = web_user()
    temp = "\n".join(
        "    %s_temp_path %s/%s;" % (t, prefix, t) for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        ("user %s;\n" % user.pw_name if user else "")
        + "daemon off;\nworker_processes 1;\npid %s/nginx.pid;\n" % prefix
        + "error_log %s/error.log warn;\n" % prefix
        + "events { worker_connections 64; }\n"
        + "http {\n    access_log %s/access.log;\n%s\n    include %s/site.conf;\n}\n" % (prefix, temp, prefix),
        encoding="utf-8",
    )
    server = Server(
        "nginx",
        [nginx, "-p", prefix, "-c", conf, "-e", prefix / "error.log"],
        base / "nginx.log",
        env={"PATH": SYSTEM_PATH, "LANG": "C"},
        cwd="/",
    )
    server.logs += [prefix / "error.log"]
    stack.callback(server.stop)
    server.wait_port(port)
    return server, port


def wait_socket(server, path, timeout=20.0):
    """Wait for a unix socket to appear, failing early if the server died."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("%s made no socket %s:\n%s" % (server.name, path, server.tail()))
        time.sleep(0.1)


def build_nginx_uwsgi(stack):
    require("nginx")
    base = shared_tmpdir("smsc-uwsgi")
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    uwsgi, sock, data = start_uwsgi(stack, base)
    wait_socket(uwsgi, sock)
    nginx, port = start_nginx(stack, base, "nginx-site.conf", {"/run/smsc_handler/uwsgi.sock": str(sock)})
    return Deployment("nginx-uwsgi", port, "/", data, [nginx, uwsgi])


def start_gunicorn(stack, base):
    """gunicorn as smsc-handler-gunicorn.service runs it, with gunicorn.conf.py."""
    if importlib.util.find_spec("gunicorn") is None:
        pytest.skip("gunicorn is not installed for %s (python3 tests/bootstrap.py runs the suite "
                    "in a .venv that has it)" % sys.executable)
    app = copy_app(base / "app")
    etc = base / "etc"
    etc.mkdir()
    data = base / "data"
    data.mkdir()
    write_config(etc / "config.ini", str(data))
    port = free_port()
    render(
        DEPLOY / "gunicorn.conf.py",
        {"127.0.0.1:8000": "127.0.0.1:%d" % port, "/opt/smsc_handler": str(app), "/etc/smsc_handler": str(etc)},
        etc / "gunicorn.conf.py",
    )
    marker = "/opt/smsc_handler/venv/bin/gunicorn"
    argv, env, _user = unit_command(
        DEPLOY / "smsc-handler-gunicorn.service",
        {marker: marker, "/etc/smsc_handler": str(etc)},
        base / "gunicorn.service",
    )
    assert argv[0] == marker
    # the gunicorn the tests' interpreter has; it lives under root's pyenv, so it runs
    # as the current user here (User= is left to systemd)
    argv[:1] = [sys.executable, "-m", "gunicorn"]
    env.update(PATH=os.environ.get("PATH", SYSTEM_PATH), LANG="C.UTF-8")
    server = Server("gunicorn", argv, base / "gunicorn.log", env=env, cwd="/")
    stack.callback(server.stop)
    server.wait_port(port)
    return server, port, data


def build_gunicorn(stack):
    base = shared_tmpdir("smsc-gunicorn")
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    server, port, data = start_gunicorn(stack, base)
    return Deployment("gunicorn", port, "/", data, [server])


def build_nginx_gunicorn(stack):
    require("nginx")
    base = shared_tmpdir("smsc-nginx-gunicorn")
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    gunicorn, gport, data = start_gunicorn(stack, base)
    nginx, port = start_nginx(
        stack, base, "nginx-gunicorn.conf", {"http://127.0.0.1:8000": "http://127.0.0.1:%d" % gport}
    )
    return Deployment("nginx-gunicorn", port, "/", data, [nginx, gunicorn])


BUILDERS = {
    "apache-cgid": lambda stack: build_apache(stack, "event"),
    "apache-cgi": lambda stack: build_apache(stack, "prefork"),
    "nginx-uwsgi": build_nginx_uwsgi,
    "gunicorn": build_gunicorn,
    "nginx-gunicorn": build_nginx_gunicorn,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def deployment(request):
    """Start one deployment for the module's tests; stop every process it started."""
    with contextlib.ExitStack() as stack:
        dep = BUILDERS[request.param](stack)
        yield dep
        report_timings(request.config, dep)


def report_timings(config, dep):
    """Print how long answers took through this deployment (also for the CI log)."""
    if not dep.timings:
        return
    times = [t for _, t in dep.timings]
    slowest = max(dep.timings, key=lambda x: x[1])
    line = "timings %-15s %2d requests: median %.3f s, max %.3f s (%s)" % (
        dep.name,
        len(times),
        statistics.median(times),
        slowest[1],
        slowest[0],
    )
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_line(line)


@pytest.fixture(scope="module", params=["apache-cgid", "apache-cgi"])
def apache(request):
    """An Apache deployment of its own, for the document-root checks."""
    with contextlib.ExitStack() as stack:
        dep = BUILDERS[request.param](stack)
        yield dep
        report_timings(request.config, dep)


def unique_id():
    return str(random.randrange(10**8, 10**9))


def one(events, **match):
    """Return the single event whose fields equal match."""
    found = [e for e in events if all(e.get(k) == v for k, v in match.items())]
    assert len(found) == 1, "expected one event with %r, found %d" % (match, len(found))
    return found[0]


############################################################################
# Through every server
############################################################################

CYRILLIC = "Привет, мир! Код 1234"


def test_health_get_answers_200(deployment):
    answer = deployment.send("GET health", "GET")
    assert answer.status == 200, deployment.logs()
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.body.strip()


def test_status_callback_is_stored(deployment):
    sms_id = unique_id()
    answer = deployment.post("status", {"id": sms_id, "phone": "79991234567", "status": "1", "ts": "1700000000"})
    assert (answer.status, answer.body) == (200, b"OK"), deployment.logs()
    event = one(deployment.events("status"), id=sms_id)
    assert event["kind"] == "status"
    assert event["phone"] == "79991234567"
    assert event["status"] == 1
    assert event["ts"] == 1700000000
    assert event["signature"] is None


def test_incoming_in_default_charset_is_decoded(deployment):
    sms_id = unique_id()
    answer = deployment.post(
        "incoming cp1251",
        {
            "id": sms_id,
            "phone": "79990000001",
            "mes": CYRILLIC,
            "to": "79990000000",
            "sent": "1700000001",
            "time": "1700000002",
        },
        charset="windows-1251",
    )
    assert (answer.status, answer.body) == (200, b"OK"), deployment.logs()
    event = one(deployment.events("incoming"), id=sms_id)
    assert event["kind"] == "incoming"
    assert event["mes"] == CYRILLIC
    assert event["charset"] == "windows-1251"
    assert event["lossy"] is False


def test_incoming_in_utf8_named_in_query_is_decoded(deployment):
    sms_id = unique_id()
    answer = deployment.post(
        "incoming utf-8",
        {"id": sms_id, "phone": "79990000002", "mes": CYRILLIC, "to": "79990000000"},
        query={"charset": "utf-8"},
        charset="utf-8",
    )
    assert (answer.status, answer.body) == (200, b"OK"), deployment.logs()
    event = one(deployment.events("incoming"), id=sms_id)
    assert event["mes"] == CYRILLIC
    assert event["charset"] == "utf-8"
    assert event["lossy"] is False


def test_waitcall_is_stored(deployment):
    phone = "7999" + unique_id()[:7]
    answer = deployment.post("waitcall", {"waitcall": "1", "phone": phone, "ts": "1700000003"})
    assert (answer.status, answer.body) == (200, b"OK"), deployment.logs()
    event = one(deployment.events("waitcall"), phone=phone)
    assert event["kind"] == "waitcall"
    assert event["ts"] == 1700000003


def signed(kind, key):
    """Return (params, query) of a callback of kind signed with md5 as SMSC signs it."""
    phone = "7999" + key[:7]
    if kind == "status":
        params = {"id": key, "phone": phone, "status": "1", "ts": "1700000004"}
        params["md5"] = md5_hex(key, phone, "1", SECRET)
        return params, None, {"id": key}
    if kind == "incoming":
        params = {"id": key, "phone": phone, "mes": CYRILLIC, "to": "79990000000"}
        params["md5"] = md5_hex(phone, CYRILLIC, "79990000000", SECRET)
        return params, {"charset": "utf-8"}, {"id": key}
    params = {"waitcall": "1", "phone": phone, "ts": "1700000005"}
    params["md5"] = md5_hex(phone, "1700000005", SECRET)
    return params, None, {"phone": phone}


@pytest.mark.parametrize("kind", ["status", "incoming", "waitcall"])
def test_signed_callback_is_accepted(deployment, kind):
    params, query, match = signed(kind, unique_id())
    answer = deployment.post("signed " + kind, params, query=query, charset="utf-8" if query else "windows-1251")
    assert (answer.status, answer.body) == (200, b"OK"), deployment.logs()
    event = one(deployment.events(kind), **match)
    assert event["signature"] == {"alg": "md5", "valid": True, "key": 0}


def test_wrong_md5_is_refused(deployment):
    sms_id = unique_id()
    rejected = len(read_jsonl(deployment.data_dir / "rejected.jsonl"))
    answer = deployment.post(
        "wrong md5",
        {"id": sms_id, "phone": "79991234567", "status": "1", "md5": md5_hex(sms_id, "79991234567", "1", "wrong")},
    )
    assert answer.status == 403, deployment.logs()
    assert not [e for e in deployment.events("status") if e.get("id") == sms_id]
    assert len(read_jsonl(deployment.data_dir / "rejected.jsonl")) == rejected + 1


def test_other_method_is_405(deployment):
    answer = deployment.send(
        "PUT", "PUT", body=b"phone=79991234567", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert answer.status == 405, deployment.logs()
    assert answer.headers["allow"] == "GET, HEAD, POST"


def test_oversized_body_is_refused_quickly(deployment):
    body = b"phone=79991234567&mes=" + b"x" * 70000
    answer = deployment.send("413", "POST", body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status == 413, deployment.logs()


############################################################################
# Apache: the folder in the document root
############################################################################


def test_folder_url_reaches_the_handler(apache):
    folder = apache.send("GET /", "GET", "/")
    direct = apache.send("GET /handler.cgi", "GET", "/handler.cgi")
    assert folder.status == direct.status == 200, apache.logs()
    assert folder.body == direct.body


@pytest.mark.parametrize(
    "path",
    [
        "/config.ini",
        "/smsc_handler.py",
        "/wsgi.py",
        "/.htaccess",
        "/notes.txt",
        "/data/",
        "/data/status.jsonl",
        "/data/.htaccess",
        "/data/state.sqlite3",
        "/data/rejected.jsonl",
    ],
)
def test_private_files_are_not_served(apache, path):
    # make sure the data files exist, so a 404 can't hide a leak
    apache.post("status (setup)", {"id": unique_id(), "phone": "79991234567", "status": "1"})
    apache.post("wrong md5 (setup)", {"id": "1", "phone": "79991234567", "status": "1", "md5": "0" * 32})
    answer = apache.send("GET " + path, "GET", path)
    assert answer.status in (403, 404), (answer, apache.logs())
    assert SECRET.encode() not in answer.body
    assert b"79991234567" not in answer.body


def test_data_folder_htaccess_written_by_the_handler_denies_access(apache):
    apache.post("status (setup)", {"id": unique_id(), "phone": "79991234567", "status": "1"})
    written = apache.data_dir / ".htaccess"
    assert written.is_file(), "the handler wrote no %s" % written
    # the same folder under a parent with no .htaccess of ours: only data/.htaccess guards it
    bare = apache.extra["bare"]
    (bare / "data").mkdir(exist_ok=True)
    (bare / "data").chmod(0o755)
    shutil.copy2(written, bare / "data" / ".htaccess")
    shutil.copy2(apache.data_dir / "status.jsonl", bare / "data" / "status.jsonl")
    (bare / "open.txt").write_text("served\n", encoding="utf-8")
    for name in (".htaccess", "status.jsonl"):
        (bare / "data" / name).chmod(0o644)
    (bare / "open.txt").chmod(0o644)
    control = apache.send("GET /bare/open.txt", "GET", "/bare/open.txt")
    assert control.status == 200, apache.logs()
    answer = apache.send("GET /bare/data/status.jsonl", "GET", "/bare/data/status.jsonl")
    assert answer.status in (403, 404), (answer, written.read_text(), apache.logs())
