"""The delivery report (SPEC §14, issue 15): the `report` verb, its numbers, its safety.

Every page here comes from `python3 smsc_handler.py report` run as a subprocess over a
store written by the real handler (tests/report_util.py); it is read back with the
standard library's html.parser, as a browser would read its elements.
"""

import base64
import hashlib
import os
import stat
import time

import pytest
from cli_util import assert_one_line_error, run_cli, status_event, write_config, write_events
from report_util import HOSTILE, LONG_SMS, demo_store, parse_page, report_page, stats_json

import smsc_handler

#: every element the report may contain; anything else was injected
ELEMENTS = {
    "html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "p", "dl", "div", "dt", "dd",
    "section", "svg", "g", "rect", "line", "polyline", "circle", "text", "ul", "li", "i", "table", "thead",
    "tbody", "tr", "th", "td", "details", "summary",
}
#: every attribute the report may use
ATTRIBUTES = {
    "lang", "charset", "http-equiv", "content", "name", "class", "data-key", "data-value", "data-label",
    "viewbox", "role", "aria-label", "preserveaspectratio", "x", "y", "x1", "x2", "y1", "y2", "width", "height",
    "fill", "stroke", "stroke-width", "points", "cx", "cy", "r", "text-anchor", "open",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The demo store: two weeks of history plus hostile callbacks through a real server."""
    return demo_store(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page(store):
    return report_page(store)


@pytest.fixture(scope="module")
def tree(page):
    return parse_page(page)


def numbers(text: str) -> float:
    """Read a number as the page shows it: 1,234 · 88.4% · 853.50."""
    return float(text.replace(",", "").rstrip("%"))


# --------------------------------------------------------------------------- the verb

def test_report_writes_report_html_in_the_current_folder(store, tmp_path):
    done = run_cli("report", "--config", store, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")
    written = tmp_path / "report.html"
    assert written.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600  # file_mode, whatever the umask
    assert os.listdir(tmp_path) == ["report.html"]  # no temporary file left behind


def test_report_replaces_an_old_page_whole_by_rename(store, tmp_path):
    target = tmp_path / "out.html"
    target.write_text("old page", encoding="utf-8")
    before = target.stat().st_ino
    reader = open(target, encoding="utf-8")  # a web server serving the old page meanwhile
    done = run_cli("report", "-o", target, "--config", store)
    assert done.returncode == 0, done.stderr
    assert reader.read() == "old page"  # it kept the whole old page: the new one was renamed over it
    reader.close()
    assert target.stat().st_ino != before
    assert target.read_text(encoding="utf-8").rstrip().endswith("</html>")
    assert sorted(os.listdir(tmp_path)) == ["out.html"]


def test_report_dash_writes_the_page_to_stdout(store, page):
    assert page.startswith("<!DOCTYPE html>\n<html lang=\"en\">")
    assert page.endswith("</html>\n")


def test_report_of_an_empty_store_says_so(tmp_path):
    config = write_config(tmp_path)
    root, _ = parse_page(report_page(config))
    assert {dd.attrs["data-key"]: dd.text for dd in root.find("dd")} == {
        "messages": "0", "delivered": "0", "failed": "0", "pending": "0", "delivery_rate": "–",
        "total_cost": "0.00", "incoming": "0", "waitcall": "0"}
    shown = root.text
    for words in ("No failed messages.", "No message is stuck.", "No incoming SMS.", "No calls."):
        assert words in shown


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_report_bad_time_is_a_usage_error_naming_the_option(store, option):
    done = run_cli("report", "-o", "-", "--config", store, option, "yesterday")
    assert done.returncode == 2
    assert_one_line_error(done.stderr)
    assert option in done.stderr and done.stdout == ""


def test_report_until_before_since_is_a_usage_error(store):
    done = run_cli("report", "-o", "-", "--config", store, "--since", "2d", "--until", "3d")
    assert done.returncode == 2
    assert_one_line_error(done.stderr)


def test_report_into_a_missing_folder_is_a_one_line_error(store, tmp_path):
    done = run_cli("report", "-o", tmp_path / "no" / "such" / "report.html", "--config", store)
    assert done.returncode == 1
    assert_one_line_error(done.stderr)
    assert "report.html" in done.stderr


def test_report_is_listed_in_the_help():
    done = run_cli("-h")
    assert "report" in done.stdout
    assert run_cli("report", "-h").returncode == 0


# --------------------------------------------------------------------------- what it shows

def headline(root) -> dict:
    return {dd.attrs["data-key"]: dd.text for dd in root.find("dd")}


def test_title_range_and_generation_time_are_on_top(tree):
    root, _ = tree
    assert root.find("title")[0].text == "SMSC delivery report"
    assert root.find("h1")[0].text == "SMSC delivery report"
    meta = root.find("p", class_="meta")[0].text
    assert meta.startswith("From the first stored event to %s" % time.strftime("%Y-%m-%d", time.gmtime()))
    assert "generated" in meta


def test_headline_numbers_equal_stats_json(store, tree):
    root, _ = tree
    stats = stats_json(store)
    shown = headline(root)
    assert numbers(shown["messages"]) == stats["messages"]
    assert numbers(shown["delivered"]) == stats["delivered"]
    assert numbers(shown["pending"]) == stats["pending"]
    assert numbers(shown["failed"]) == stats["failed"]
    assert shown["delivery_rate"] == "%.1f%%" % (stats["delivery_rate"] * 100)
    assert numbers(shown["total_cost"]) == stats["total_cost"]
    assert numbers(shown["incoming"]) == stats["by_kind"]["incoming"]
    assert numbers(shown["waitcall"]) == stats["by_kind"]["waitcall"]


def chart(root, label):
    [svg] = [svg for svg in root.find("svg") if svg.attrs.get("aria-label") == label]
    return svg


def test_status_and_error_bars_hold_the_counts_of_stats_json(store, tree):
    root, _ = tree
    stats = stats_json(store)
    for label, counts in (("Status callbacks by status", stats["by_status"]),
                          ("Status callbacks by error", stats["by_error"])):
        bars = {g.find("text")[0].text: int(g.find("rect")[0].attrs["data-value"])
                for g in chart(root, label).find("g")}
        assert bars == counts  # SMSC's names, e.g. "20 impossible to deliver"


def test_bar_lengths_are_proportional_to_the_counts(tree):
    root, _ = tree
    bars = [(int(rect.attrs["data-value"]), float(rect.attrs["width"]))
            for rect in chart(root, "Status callbacks by status").find("rect")]
    largest = max(bars)
    for value, width in bars:
        assert width == pytest.approx(largest[1] * value / largest[0], abs=0.01)
    stacks = [(int(rect.attrs["data-value"]), float(rect.attrs["height"]))
              for rect in chart(root, "Events per day by kind").find("rect")]
    per_unit = stacks[0][1] / stacks[0][0]
    assert all(height == pytest.approx(value * per_unit, abs=0.01) for value, height in stacks)


def day_rows(root) -> list:
    [details] = root.find("details")
    return [[td.text for td in tr.find("td")] for body in details.find("tbody") for tr in body.find("tr")]


def test_per_day_numbers_add_up_to_the_headline_and_stats(store, tree):
    root, _ = tree
    stats = stats_json(store)
    rows = day_rows(root)
    assert len(rows) == 15  # 14 days of history and today
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)
    assert sum(numbers(r[1]) for r in rows) == stats["by_kind"]["status"]
    assert sum(numbers(r[2]) for r in rows) == stats["by_kind"]["incoming"]
    assert sum(numbers(r[3]) for r in rows) == stats["by_kind"]["waitcall"]
    assert sum(numbers(r[4]) for r in rows) == stats["delivered"]
    assert sum(numbers(r[5]) for r in rows) == stats["failed"]
    assert round(sum(numbers(r[7]) for r in rows), 2) == stats["total_cost"]
    stacked = sum(int(rect.attrs["data-value"]) for rect in chart(root, "Events per day by kind").find("rect"))
    assert stacked == stats["events"]


def shown_days(root) -> list:
    """The per-day rows as the page shows them."""
    return [{"day": r[0], "events": {"status": numbers(r[1]), "incoming": numbers(r[2]), "waitcall": numbers(r[3])},
             "delivered": numbers(r[4]), "failed": numbers(r[5]),
             "delivery_rate": r[6], "cost": numbers(r[7])} for r in day_rows(root)]


def stats_days(stats) -> list:
    """The rows of stats --by day, rounded as the page shows them."""
    return [{"day": d["day"], "events": {k: d["events"].get(k, 0) for k in ("status", "incoming", "waitcall")},
             "delivered": d["delivered"], "failed": d["failed"],
             "delivery_rate": "–" if d["delivery_rate"] is None else "%.1f%%" % (d["delivery_rate"] * 100),
             "cost": round(d["cost"], 2)} for d in stats["by_day"]]


def as_moment(text, now) -> str:
    """A relative --since/--until turned into the ISO time it means now (both commands see one moment)."""
    if text.startswith("-") or text[:4].isdigit():
        return text
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(smsc_handler.parse_since(text, now)))


@pytest.mark.parametrize("window", [(), ("--since", "3d"), ("--since", "5d", "--until", "2d"),
                                    ("--until", "2020-01-01"), ("--since", "36h", "--until", "90m")],
                         ids=["everything", "since", "since-until", "before-any", "part-days"])
def test_every_number_equals_stats_json_by_day_for_the_same_range(store, window):
    now = time.time()
    window = tuple(as_moment(text, now) for text in window)
    stats = stats_json(store, "--by", "day", *window)
    root, _ = parse_page(report_page(store, *window))
    assert shown_days(root) == stats_days(stats)
    shown = headline(root)
    keys = ("messages", "delivered", "failed", "pending", "total_cost")
    assert [numbers(shown[k]) for k in keys] == [stats[k] for k in keys]
    assert (numbers(shown["incoming"]), numbers(shown["waitcall"])) == (
        stats["by_kind"].get("incoming", 0), stats["by_kind"].get("waitcall", 0))
    assert shown["delivery_rate"] == ("–" if stats["delivery_rate"] is None
                                      else "%.1f%%" % (stats["delivery_rate"] * 100))
    outcomes = {k: stats[k] for k in ("delivered", "failed", "pending")} if stats["messages"] else {}
    for label, counts in (("Status callbacks by status", stats["by_status"]),
                          ("Status callbacks by error", stats["by_error"]), ("Messages by outcome", outcomes)):
        bars = {g.find("text")[0].text: int(g.find("rect")[0].attrs["data-value"])
                for svg in root.find("svg") if svg.attrs.get("aria-label") == label for g in svg.find("g")}
        assert bars == counts


def test_latest_failures_show_time_id_phone_status_and_error_name(tree):
    root, _ = tree
    section = [s for s in root.find("section") if s.find("h2")[0].text == "Latest failures"][0]
    first = [td.text for td in section.find("tr")[1].find("td")]
    assert first[3] == "20 impossible to deliver"
    assert first[4] == "255 rejected by operator"
    assert len(section.find("tr")) == 1 + smsc_handler.REPORT_ROWS
    more = section.find("p", class_="more")[0].text
    assert more.startswith("… and ") and more.endswith(" more, not shown.")


def test_stuck_lists_pending_messages_older_than_an_hour_only(tmp_path):
    config = write_config(tmp_path)
    now = time.time()
    write_events(tmp_path / "data" / "status.jsonl", [
        status_event("old", status=0, phone="79990000001", received=now - 7200),
        status_event("fresh", status=0, phone="79990000002", received=now - 600),
        status_event("done", status=0, phone="79990000003", received=now - 7200),
        status_event("done", status=1, phone="79990000003", received=now - 7000),
    ])
    root, _ = parse_page(report_page(config))
    section = [s for s in root.find("section") if s.find("h2")[0].text.startswith("Stuck")][0]
    ids = [tr.find("td")[1].text for tr in section.find("tbody")[0].find("tr")]
    assert ids == ["old"]
    # until 90 minutes ago: "fresh" did not exist yet, and "old" was 30 minutes old
    root, _ = parse_page(report_page(config, "--until", "90m"))
    section = [s for s in root.find("section") if s.find("h2")[0].text.startswith("Stuck")][0]
    assert section.find("p", class_="none")[0].text == "No message is stuck."


def test_latest_incoming_and_calls_are_newest_first(tree):
    root, _ = tree
    for heading in ("Latest incoming SMS", "Latest calls"):
        section = [s for s in root.find("section") if s.find("h2")[0].text == heading][0]
        times = [tr.find("td")[0].text for tr in section.find("tbody")[0].find("tr")]
        assert times == sorted(times, reverse=True) and times


# --------------------------------------------------------------------------- safety

def test_only_the_reports_own_elements_and_attributes_exist(tree):
    _, tags = tree
    assert {tag for tag, _ in tags} <= ELEMENTS
    for tag, attrs in tags:
        for name, value in attrs:
            assert name in ATTRIBUTES, (tag, name, value)
            assert not name.startswith("on")
    assert "script" not in {tag for tag, _ in tags}


def test_every_hostile_text_is_shown_as_text(tree):
    root, _ = tree
    shown = root.text
    for text in HOSTILE:
        if text.isprintable():
            assert text[:smsc_handler.REPORT_WORD_CHARS] in shown, text
    # a long id, phone or menu choice is clipped shorter than an SMS
    assert "W" * smsc_handler.REPORT_WORD_CHARS + "… (400 characters)" in shown
    assert "W" * smsc_handler.REPORT_TEXT_CHARS + "… (400 characters)" in shown
    assert "W" * (smsc_handler.REPORT_TEXT_CHARS + 1) not in shown
    assert "\\u202egpj.exe" in shown  # the bidi override is shown, not obeyed
    assert "\u202e" not in shown


def test_no_raw_control_or_bidi_character_reaches_the_page(page):
    assert not any(ch in page for ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\x00\x1b")


def test_no_link_or_load_exists_for_a_javascript_url(tree):
    _, tags = tree
    for tag, attrs in tags:
        for name, value in attrs:
            assert name not in ("href", "src", "action", "formaction", "srcset", "xlink:href")
            assert "javascript:" not in (value or "").lower() or name == "data-label", (tag, name, value)


def test_no_inline_style_attribute_exists(tree):
    _, tags = tree
    assert [(tag, attrs) for tag, attrs in tags if any(name == "style" for name, _v in attrs)] == []


def test_a_10000_character_sms_is_shown_clipped(tree, page):
    root, _ = tree
    cells = [td.text for td in root.iter("td") if td.text.startswith(LONG_SMS[:50])]
    assert cells == [LONG_SMS[:smsc_handler.REPORT_TEXT_CHARS] + "… (10,000 characters)"]
    assert LONG_SMS[:smsc_handler.REPORT_TEXT_CHARS + 10] not in page


def test_the_page_forbids_every_external_load(tree):
    root, _ = tree
    [csp] = [m for m in root.find("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    rules = dict(rule.strip().partition(" ")[::2] for rule in csp.attrs["content"].split(";"))
    assert rules["default-src"] == "'none'"
    assert set(rules) <= {"default-src", "style-src", "img-src", "base-uri", "form-action"}
    [style] = root.find("style")
    digest = base64.b64encode(hashlib.sha256(style.text.encode("utf-8")).digest()).decode("ascii")
    assert rules["style-src"] == "'sha256-%s'" % digest  # the page's own sheet, nothing inline
    assert rules["img-src"] == "data:"
    assert root.find("meta")[0].attrs == {"charset": "utf-8"}  # before anything else is read


def test_the_page_stays_small_with_capped_tables(page):
    assert len(page.encode("utf-8")) < 200_000


# --------------------------------------------------------------------------- the builders

@pytest.mark.parametrize("text", HOSTILE)
def test_tag_escapes_attribute_values_and_children(text):
    built = smsc_handler._tag("td", text, data_label=text)
    root, tags = parse_page(built)
    assert tags == [("td", [("data-label", smsc_handler._printable(text))])]
    assert root.find("td")[0].text == smsc_handler._printable(text)


def test_markup_passes_through_and_everything_else_is_escaped():
    inner = smsc_handler._tag("b", "<i>")
    assert smsc_handler._tag("p", inner, "&") == "<p><b>&lt;i&gt;</b>&amp;</p>"
    assert smsc_handler._html(5) == "5" and smsc_handler._html(None) == ""


def test_render_report_is_pure(store):
    config = smsc_handler.load_config(str(store))
    data = smsc_handler.report_data(config, now=1_900_000_000)
    assert smsc_handler.render_report(data) == smsc_handler.render_report(data)


# --------------------------------------------------------------------------- long and sparse ranges

def test_quiet_days_are_drawn_as_zero_days(tmp_path):
    config = write_config(tmp_path)
    now = time.time()
    write_events(tmp_path / "data" / "status.jsonl", [
        status_event("a", status=1, received=now - 10 * 86400),
        status_event("b", status=1, received=now - 3 * 86400),
        status_event("c", status=20, received=now)])
    root, _ = parse_page(report_page(config))
    rows = day_rows(root)
    assert len(rows) in (10, 11, 12)  # every day from the first to the last, whatever the hour
    assert sum(numbers(r[1]) for r in rows) == 3
    assert sum(1 for r in rows if numbers(r[1])) == 3
    stats = stats_json(config, "--by", "day")
    assert [d for d in shown_days(root) if d["events"]["status"]] == stats_days(stats)
    slots = chart(root, "Events per day by kind")
    assert len(slots.find("rect")) == 3


def test_a_range_of_years_is_drawn_per_month_and_stays_small(tmp_path):
    config = write_config(tmp_path)
    now = time.time()
    events = [status_event("m%d" % day, status=1 if day % 3 else 20, received=now - day * 86400, cost="2.00")
              for day in range(0, 900, 20)]
    write_events(tmp_path / "data" / "status.jsonl", sorted(events, key=lambda e: e["received_at"]))
    page = report_page(config)
    assert len(page.encode("utf-8")) < 200_000
    root, _ = parse_page(page)
    assert not [svg for svg in root.find("svg") if svg.attrs["aria-label"] == "Events per day by kind"]
    bars = chart(root, "Events per month by kind").find("rect")
    assert 29 <= len(bars) <= 31 and sum(int(rect.attrs["data-value"]) for rect in bars) == len(events)
    stats = stats_json(config, "--by", "day")
    months = {}
    for day in stats["by_day"]:
        month = months.setdefault(day["day"][:7], [0, 0, 0, 0.0])
        for index, key in enumerate(("delivered", "failed")):
            month[index] += day[key]
        month[2] += day["events"]["status"]
        month[3] += day["cost"]
    shown = {r[0]: [numbers(r[4]), numbers(r[5]), numbers(r[1]), numbers(r[7])] for r in day_rows(root)}
    assert {k: v for k, v in shown.items() if v[2]} == {k: v[:3] + [round(v[3], 2)] for k, v in months.items()}


def test_a_nul_or_line_separator_in_a_stored_text_is_shown_escaped(tmp_path):
    config = write_config(tmp_path)
    event = status_event("s", status=20)
    event["phone"] = "7999\x00\u2028\x1b[31m"  # a line another program could leave
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "status.jsonl").write_bytes(smsc_handler.event_line(event))
    root, _ = parse_page(report_page(config))
    assert "7999\\x00\\u2028\\x1b[31m" in root.text
