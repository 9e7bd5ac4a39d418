"""The report in a real browser: Debian's headless Chromium driven by selenium (issue 15).

The page is the one `smsc_handler.py report` writes over a store written by the real
handler (tests/report_util.py), served by a local http.server that counts every request.
At a desktop (1280 px) and a phone (375 px) width the tests check that the charts are
drawn with bars proportional to the data, that nothing overflows horizontally, and that
the browser logs no console error and makes no request but the page itself.

Needs ``apt-get install chromium chromium-driver`` and ``pip install selenium``; selenium
is given Debian's driver path, so its own manager never tries a download. With
SMSC_REPORT_SCREENSHOT=path the desktop test also saves a screenshot there (docs/report.png).
"""

import http.server
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from cli_util import run_cli
from report_util import demo_store, stats_json

#: Debian's browser and its driver (chromium, chromium-driver)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium's driver manager reach the network
selenium = pytest.importorskip("selenium", reason="pip install selenium")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("needs Debian's browser: apt-get install chromium chromium-driver", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

#: (name, width, height) of the windows the page is looked at in
VIEWPORTS = [("desktop", 1280, 900), ("phone", 375, 740)]


class CountingServer:
    """A local http.server for one folder that records the path of every request."""

    def __init__(self, folder):
        self.paths = []
        paths = self.paths

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                paths.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The report written by the real verb into a served folder; yields (server, store config)."""
    store = demo_store(tmp_path_factory.mktemp("store"))
    www = tmp_path_factory.mktemp("www")
    done = run_cli("report", "-o", www / "report.html", "--config", store)
    assert done.returncode == 0, done.stderr
    server = CountingServer(www)
    yield server, store, www
    server.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with a fresh profile and no background traffic; quit at the end."""
    profile = tempfile.mkdtemp(prefix="smsc-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--user-data-dir=" + profile):
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


_VIEWS = iter(range(1, 1 << 30))


def look(browser, url, width, height) -> str:
    """Open url in a window of width × height CSS pixels (a phone's viewport when narrow); return the URL.

    Each view asks for a URL of its own (?view=N, which http.server ignores), so the
    browser's cache can't answer instead of the server.
    """
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    browser.get_log("browser")
    browser.get_log("performance")  # drop what earlier pages logged
    url = "%s?view=%d" % (url, next(_VIEWS))
    browser.get(url)
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.execute_script("return window.innerWidth") == width
    return url


def requested_urls(browser) -> list:
    """The URLs the page asked the network for, from Chromium's performance log."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def bars(browser, label):
    """(data value, drawn width, drawn height) of every bar of the chart with this label."""
    return browser.execute_script("""
        const svg = [...document.querySelectorAll('svg')].find(s => s.getAttribute('aria-label') === arguments[0]);
        return [...svg.querySelectorAll('rect')].map(r => {
            const box = r.getBoundingClientRect();
            return [Number(r.dataset.value), box.width, box.height];
        });""", label)


@pytest.mark.parametrize("name,width,height", VIEWPORTS)
def test_charts_are_drawn_with_bars_proportional_to_the_data(site, browser, name, width, height):
    server, store, _www = site
    look(browser, server.url + "report.html", width, height)
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('svg')].map(s => {const b = s.getBoundingClientRect();"
        " return [s.getAttribute('aria-label'), b.width, b.height];})")
    assert len(sizes) == 6, sizes
    for label, drawn_width, drawn_height in sizes:
        assert drawn_width > 100 and drawn_height > 50, (label, drawn_width, drawn_height)
    stats = stats_json(store)
    statuses = bars(browser, "Status callbacks by status")
    assert sorted(value for value, _w, _h in statuses) == sorted(stats["by_status"].values())
    largest = max(statuses)
    for value, drawn, _h in statuses:  # a bar is as long as its count, to a pixel
        assert drawn == pytest.approx(largest[1] * value / largest[0], abs=1.0)
    outcomes = bars(browser, "Messages by outcome")
    assert [value for value, _w, _h in outcomes] == [stats["delivered"], stats["failed"], stats["pending"]]
    for value, drawn, _h in outcomes:
        assert drawn == pytest.approx(outcomes[0][1] * value / outcomes[0][0], abs=1.0)
    stacked = bars(browser, "Events per day by kind")
    assert sum(value for value, _w, _h in stacked) == stats["events"]
    tallest = max(stacked)
    for value, _w, drawn in stacked:
        assert drawn == pytest.approx(tallest[2] * value / tallest[0], abs=1.0)
    if name == "desktop" and os.environ.get("SMSC_REPORT_SCREENSHOT"):
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": 2000, "deviceScaleFactor": 1, "mobile": False})
        Path(os.environ["SMSC_REPORT_SCREENSHOT"]).write_bytes(browser.get_screenshot_as_png())


@pytest.mark.parametrize("name,width,height", VIEWPORTS)
def test_nothing_overflows_horizontally(site, browser, name, width, height):
    server, _store, _www = site
    look(browser, server.url + "report.html", width, height)
    scroll_width = browser.execute_script("return document.documentElement.scrollWidth")
    assert scroll_width <= width
    # and no element sticks out on the right, not even inside a table's own scroll box:
    # a 400-letter word, a 10,000-character SMS and the longest id all wrap
    wide = browser.execute_script("""
        return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > arguments[0] + 0.5
            || e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== 'visible')
            .map(e => e.tagName + '.' + e.className + ' ' + e.getBoundingClientRect().right).slice(0, 5);""", width)
    assert wide == []


@pytest.mark.parametrize("name,width,height", VIEWPORTS)
def test_no_console_error_and_no_request_but_the_page(site, browser, name, width, height):
    server, _store, _www = site
    before = len(server.paths)
    url = look(browser, server.url + "report.html", width, height)
    browser.execute_script("document.querySelector('details').open = true")  # unfold, as a reader would
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    assert requested_urls(browser) == [url]
    assert server.paths[before:] == [url[len(server.url) - 1:]]


def test_the_pages_policy_blocks_a_load_that_slipped_in(site, browser):
    """Were an element to slip through, the page's own CSP refuses its load: nothing reaches the network."""
    server, _store, www = site
    page = (www / "report.html").read_text(encoding="utf-8")
    slipped = ('<img src="%sx.png"><link rel="stylesheet" href="%sx.css"><script src="%sx.js"></script>'
               '<script>document.title = "ran"</script><iframe src="%sx.html"></iframe>'
               '<div id="styled" style="width:5000px">wide</div><style>h1{display:none}</style>' % ((server.url,) * 4))
    (www / "slipped.html").write_text(page.replace("<main>", "<main>" + slipped, 1), encoding="utf-8")
    before = len(server.paths)
    url = look(browser, server.url + "slipped.html", 1280, 900)
    assert server.paths[before:] == [url[len(server.url) - 1:]]
    assert browser.title == "SMSC delivery report"  # the inline script did not run
    assert browser.execute_script("return document.getElementById('styled').getBoundingClientRect().width") < 1280
    assert browser.execute_script("return getComputedStyle(document.querySelector('h1')).display") == "block"
    refused = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert any("Content Security Policy" in message for message in refused), refused


def test_the_page_reads_the_same_with_javascript_off(site, browser):
    server, _store, _www = site
    browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        look(browser, server.url + "report.html", 1280, 900)
        text = browser.find_element("tag name", "body").text
    finally:
        browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})
    for words in ("Messages", "Delivery rate", "Latest failures", "Latest incoming SMS", "Latest calls"):
        assert words in text
