"""The shipped .htaccess in a subfolder of the document root: /smsc and /smsc/ both reach
the handler in the real Apache (issue 11, item 24).

SMSC is given `https://example.com/smsc?md5=…` as often as `…/smsc/?md5=…`; without the
slash Apache used to answer 403 (the folder's own name is not an allowed file), and
mod_dir's usual 301 would lose the POST body anyway. Apache 2.4 with mod_cgid and with
mod_cgi, mod_rewrite loaded as on shared hosts; and without mod_rewrite, where the folder
URL with its slash must still work and nothing private opens up.
"""

import contextlib
import shutil

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
    render,
    request,
    shared_tmpdir,
    write_config,
)
from test_servers import APACHE_MODULES, apache_conf, require, unique_id


def build(stack, mpm, rewrite):
    apache = require("apache2")
    if not (APACHE_MODULES / ("mod_mpm_%s.so" % mpm)).exists():
        pytest.skip("Debian's Apache modules are not in %s" % APACHE_MODULES)
    base = shared_tmpdir("smsc-folder")
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    for sub in ("run", "logs", "bare", "www"):
        (base / sub).mkdir()
        (base / sub).chmod(0o755)
    site = copy_app(base / "www" / "smsc")
    shutil.copy2(REPO / ".htaccess", site / ".htaccess")
    (site / ".htaccess").chmod(0o644)
    write_config(site / "config.ini", "data")
    give_to_web_user(site)
    port = free_port()
    vhost = render(DEPLOY / "apache-vhost.conf",
                   {"<VirtualHost *:80>": "<VirtualHost 127.0.0.1:%d>" % port,
                    "/var/www/smsc_handler": str(base / "www")}, base / "vhost.conf")
    conf = apache_conf(mpm, port, base, vhost, base / "bare")
    if rewrite:
        conf = "LoadModule rewrite_module %s/mod_rewrite.so\n" % APACHE_MODULES + conf
    (base / "httpd.conf").write_text(conf, encoding="utf-8")
    server = Server("apache2", [apache, "-f", base / "httpd.conf", "-DFOREGROUND"], base / "logs" / "stdout.log",
                    env={"PATH": SYSTEM_PATH, "LANG": "C"}, cwd="/")
    server.logs += [base / "logs" / "error.log"]
    stack.callback(server.stop)
    server.wait_port(port)
    return port, site / "data", server


@pytest.fixture(scope="module", params=[("event", True), ("prefork", True), ("event", False)],
                ids=["cgid+rewrite", "cgi+rewrite", "cgid-no-rewrite"])
def site(request):
    mpm, rewrite = request.param
    with contextlib.ExitStack() as stack:
        yield (rewrite,) + build(stack, mpm, rewrite)


def signed(message_id):
    params = {"id": message_id, "phone": "79991234567", "status": "1"}
    return params, {"md5": md5_hex(message_id, "79991234567", "1", SECRET)}


@pytest.mark.parametrize("path", ["/smsc", "/smsc/", "/smsc/handler.cgi"])
def test_a_signed_post_to_the_folder_url_is_stored_with_or_without_the_slash(site, path):
    rewrite, port, data, server = site
    if path == "/smsc" and not rewrite:
        pytest.skip("without mod_rewrite Apache can only redirect /smsc (tested below)")
    message_id = unique_id()
    params, query = signed(message_id)
    answer = post_form(port, path, params, query)
    assert (answer.status, answer.body) == (200, b"OK"), (answer, server.tail())
    assert [e["id"] for e in read_jsonl(data / "status.jsonl")].count(message_id) == 1


def test_the_bare_folder_url_gets_the_health_line(site):
    rewrite, port, _data, server = site
    answer = request(port, "GET", "/smsc")
    if rewrite:
        assert answer.status == 200 and b"smsc_handler" in answer.body, (answer, server.tail())
    else:
        assert answer.status == 301 and answer.headers["location"].endswith("/smsc/"), answer


@pytest.mark.parametrize("path", ["/smsc/config.ini", "/smsc/smsc_handler.py", "/smsc/.htaccess", "/smsc/data",
                                  "/smsc/data/", "/smsc/data/status.jsonl", "/smsc/data/state.sqlite3",
                                  "/smsc/data/.htaccess", "/smsc/wsgi.py"])
def test_nothing_private_opens_up(site, path):
    _rewrite, port, _data, server = site
    post_form(port, "/smsc/", *signed(unique_id()))  # the data files exist
    for method in ("GET", "POST"):
        answer = request(port, method, path, b"" if method == "POST" else None)
        assert answer.status in (403, 404), (method, path, answer, server.tail())
