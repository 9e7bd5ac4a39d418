"""The report on a host without a shell, under the real Apache (README "The report").

A cron line of the hosting panel rewrites the report every few minutes. Written into the
data folder, or into any folder guarded the way the data folder is (the handler's own
deny-all .htaccess), Apache refuses to serve it; a folder behind a password serves it
only with the password. Apache here is Debian's, started on 127.0.0.1 with the project
folder as its document root, as tests/test_servers.py does; the report is written by the
account the CGI runs as (www-data when the tests run as root), as the cron job would.
"""

import base64
import contextlib
import os
import shutil
import subprocess
import sys

import pytest
from servers_util import (
    DEPLOY,
    REPO,
    SYSTEM_PATH,
    Server,
    copy_app,
    free_port,
    give_to_web_user,
    post_form,
    render,
    request,
    shared_tmpdir,
    web_user,
    write_config,
)
from test_servers import APACHE_MODULES, apache_conf, require

import smsc_handler

#: Apache modules a password-protected folder needs, beyond those test_servers loads
AUTH_MODULES = ("auth_basic", "authn_core", "authn_file", "authz_user")
#: the report viewer's login in the password test
LOGIN, PASSWORD = "owner", "report-Pass_42"


@pytest.fixture(scope="module")
def apache():
    """Apache 2.4 + mod_cgid, the project folder as document root; yields (port, www, bare, base)."""
    binary = require("apache2")
    if not (APACHE_MODULES / "mod_mpm_event.so").exists():
        pytest.skip("Debian's Apache modules are not in %s" % APACHE_MODULES)
    with contextlib.ExitStack() as stack:
        base = shared_tmpdir("smsc-report-apache")
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        for sub in ("run", "logs", "bare"):
            (base / sub).mkdir()
            (base / sub).chmod(0o755)
        www = copy_app(base / "www")
        shutil.copy2(REPO / ".htaccess", www / ".htaccess")
        (www / ".htaccess").chmod(0o644)
        write_config(www / "config.ini", "data")
        give_to_web_user(www)
        port = free_port()
        vhost = render(DEPLOY / "apache-vhost.conf",
                       {"<VirtualHost *:80>": "<VirtualHost 127.0.0.1:%d>" % port, "/var/www/smsc_handler": str(www)},
                       base / "vhost.conf")
        conf = apache_conf("event", port, base, vhost, base / "bare")
        conf += "".join("LoadModule %s_module %s/mod_%s.so\n" % (m, APACHE_MODULES, m) for m in AUTH_MODULES)
        (base / "httpd.conf").write_text(conf, encoding="utf-8")
        server = Server("apache2 (event)", [binary, "-f", base / "httpd.conf", "-DFOREGROUND"],
                        base / "logs" / "stdout.log", env={"PATH": SYSTEM_PATH, "LANG": "C"}, cwd="/")
        server.logs += [base / "logs" / "error.log", base / "logs" / "access.log"]
        stack.callback(server.stop)
        server.wait_port(port)
        failure = {"id": "77", "phone": "79991234567", "status": "20", "err": "1", "ts": "1"}
        answer = post_form(port, "/handler.cgi", failure)
        assert answer.status == 200, server.tail()
        yield port, www, base / "bare", server


def as_cron(*args):
    """Run the module as the account's cron job would: as the user the CGI runs as."""
    user = web_user()

    def demote():
        if user is not None:
            os.setgid(user.pw_gid)
            os.setgroups([user.pw_gid])
            os.setuid(user.pw_uid)

    done = subprocess.run(["/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable, *args],
                          capture_output=True, text=True, preexec_fn=demote, cwd="/", timeout=60,
                          env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/"})
    assert done.returncode == 0, done.stderr
    return done


def cron_report(www, target):
    """The README's cron line: the module beside its config.ini, the report to `target`."""
    return as_cron(str(www / "smsc_handler.py"), "report", "-o", str(target))


def served_copy(bare, name, source):
    """Put a copy of the report where nothing guards it: the control that Apache can read it."""
    folder = bare / name
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    shutil.copy2(source, folder / "report.html")
    (folder / "report.html").chmod(0o644)
    give_to_web_user(folder)
    return "/bare/%s/report.html" % name


def test_report_in_the_data_folder_is_refused(apache):
    port, www, bare, server = apache
    report = www / "data" / "report.html"
    cron_report(www, report)
    assert b"79991234567" in report.read_bytes()  # the failure sent through Apache is on the page
    control = request(port, "GET", served_copy(bare, "open", report))
    assert control.status == 200 and control.body == report.read_bytes(), server.tail()
    answer = request(port, "GET", "/data/report.html")
    assert answer.status == 403, (answer, server.tail())
    for path in ("/data/", "/data/report.html?x=1", "/data/./report.html", "/data/report%2Ehtml"):
        answer = request(port, "GET", path)
        assert answer.status in (403, 404), (path, answer, server.tail())  # no listing, no page
        assert b"79991234567" not in answer.body


def test_a_report_folder_guarded_like_the_data_folder_is_refused(apache):
    """Apart from the project folder (no .htaccess of ours above it), the data folder's guard alone holds."""
    port, www, bare, server = apache
    folder = bare / "reports"
    folder.mkdir()
    folder.chmod(0o755)
    (folder / ".htaccess").write_bytes((www / "data" / ".htaccess").read_bytes())
    (folder / ".htaccess").chmod(0o644)
    assert (folder / ".htaccess").read_text(encoding="ascii") == smsc_handler.DENY_ALL_HTACCESS
    give_to_web_user(folder)
    cron_report(www, folder / "report.html")
    control = request(port, "GET", served_copy(bare, "open2", folder / "report.html"))
    assert control.status == 200, server.tail()
    answer = request(port, "GET", "/bare/reports/report.html")
    assert answer.status == 403, (answer, server.tail())


def test_a_password_protected_report_folder_serves_it_only_with_the_password(apache):
    port, www, bare, server = apache
    htpasswd = shutil.which("htpasswd", path=SYSTEM_PATH)
    if htpasswd is None:
        pytest.skip("apt-get install apache2-utils (htpasswd)")
    folder = bare / "private"
    folder.mkdir()
    folder.chmod(0o755)
    passwords = bare.parent / "htpasswd"  # outside every served folder
    subprocess.run([htpasswd, "-B", "-b", "-c", str(passwords), LOGIN, PASSWORD], check=True, capture_output=True)
    passwords.chmod(0o644)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    guard = readme.split("<!-- report-password-htaccess -->\n```apache\n", 1)[1].split("```", 1)[0]
    (folder / ".htaccess").write_text(guard.replace("/home/USER/.htpasswd-smsc", str(passwords)), encoding="utf-8")
    (folder / ".htaccess").chmod(0o644)
    give_to_web_user(folder)
    cron_report(www, folder / "report.html")
    # the account's files are read by the web server as the account (mode 0600 is enough)
    assert oct(os.stat(folder / "report.html").st_mode & 0o777) == "0o600"

    def get(login=None, password=None):
        headers = {}
        if login is not None:
            token = base64.b64encode(("%s:%s" % (login, password)).encode()).decode("ascii")
            headers["Authorization"] = "Basic " + token
        return request(port, "GET", "/bare/private/report.html", headers=headers)

    assert get().status == 401
    assert get(LOGIN, "wrong").status == 401
    answer = get(LOGIN, PASSWORD)
    assert answer.status == 200, server.tail()
    assert answer.body == (folder / "report.html").read_bytes()
    assert answer.headers.get("content-type", "").startswith("text/html")
