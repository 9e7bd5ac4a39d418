"""The quick write (issue 17): with dedupe on, a new id to a known file needs no transaction.

Writers leave up to INDEX_LAG bytes past a file's committed end unrecorded, search
them for their id (one pread and a find), and the writer whose line takes the tail
past INDEX_LAG records it in one transaction. Exactly once must hold all the same:
a writer killed at each step of the quick write, with and without that
transaction, leaves one line after SMSC's retry; a torn piece holding the id is no
stored line; a repeat found in another file's tail (across midnight) writes nothing.
"""

import errno
import json

import pytest
from proof_util import Site, form, status_callback
from test_crash import cgi_stopped_at, lines_with, store_stopped_at

import smsc_handler


def committed_end(site, path=None):
    """Return the store's committed end of the event file (None when it has no row)."""
    path = str(path or site.path())
    with site.state() as db:
        row = db.execute("SELECT committed_end FROM files WHERE path = ?", (path,)).fetchone()
    return None if row is None else row[0]


def recorded(site):
    with site.state() as db:
        return {row[0] for row in db.execute("SELECT event_id FROM seen")}


def fill_tail_to_just_below_the_lag(site, prefix):
    """Post callbacks until one more line (of the same size) would take the tail past INDEX_LAG."""
    n = 0
    while True:
        tail = site.path().stat().st_size - committed_end(site)
        line = len(site.lines()[-1])
        if tail + line >= smsc_handler.INDEX_LAG:
            return
        assert site.post(form(status_callback(id="%s-%d" % (prefix, n)))).status_int == 200
        n += 1


@pytest.fixture
def no_early_prune(monkeypatch):
    """About one write in a hundred prunes, and so records its tail early: not in these tests."""
    monkeypatch.setattr(smsc_handler, "_should_prune", lambda: False)


def test_new_ids_wait_in_the_tail_until_it_passes_the_lag_then_are_recorded_at_once(tmp_path, no_early_prune):
    site = Site(tmp_path)
    assert site.post(form(status_callback(id="first"))).status_int == 200  # announces the file
    start = committed_end(site)
    ids = []
    for n in range(60):
        assert site.post(form(status_callback(id="n-%d" % n))).status_int == 200
        ids.append(site.events()[-1]["event_id"])
        end, size = committed_end(site), site.path().stat().st_size
        assert 0 <= size - end < smsc_handler.INDEX_LAG  # the tail never passes the lag
        if end == size:  # this write recorded the tail: every id up to its own line
            assert set(ids) <= recorded(site)
    assert committed_end(site) > start  # it was recorded at least twice over 60 lines (~50 KB)
    assert not set(ids) <= recorded(site) or committed_end(site) == site.path().stat().st_size
    for n in (0, 30, 59):  # repeats, recorded or still in the tail: no second line
        assert site.post(form(status_callback(id="n-%d" % n))).status_int == 200
    assert len(site.lines()) == 61


QUICK_STEPS = ("appended", "committed", "synced")


@pytest.mark.parametrize("step", QUICK_STEPS)
def test_a_quick_writer_killed_at_any_step_leaves_one_line_after_the_retry(tmp_path, step):
    site = Site(tmp_path)  # the default config: dedupe on, fsync on
    assert site.post(form(status_callback(id="known"))).status_int == 200  # the file is known: the quick way
    body = form(status_callback(id="k-%s" % step))
    cgi_stopped_at(site, body, step)  # its line lies in the tail (unless the ~1% prune recorded it)
    assert site.cgi(body).status == 200
    assert len(lines_with(site.path(), "k-%s" % step)) == 1
    assert site.cgi(body).status == 200
    assert len(lines_with(site.path(), "k-%s" % step)) == 1


@pytest.mark.parametrize("step", ("appended", "committing", "committed", "synced"))
def test_a_quick_writer_killed_while_recording_the_tail_leaves_one_line(tmp_path, step):
    site = Site(tmp_path)
    assert site.post(form(status_callback(id="known"))).status_int == 200
    fill_tail_to_just_below_the_lag(site, "fill")
    body = form(status_callback(id="rec-%s" % step))
    cgi_stopped_at(site, body, step)  # this write takes the tail past INDEX_LAG: it records it
    if step in ("committed", "synced"):
        assert committed_end(site) == site.path().stat().st_size  # its transaction got in before the kill
    assert site.cgi(body).status == 200
    assert site.cgi(body).status == 200
    assert len(lines_with(site.path(), "rec-%s" % step)) == 1
    ids = [event["id"] for event in site.events()]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("mended", [False, True], ids=["last", "terminated by the next line"])
def test_a_torn_piece_holding_the_id_is_not_a_stored_line(tmp_path, mended):
    """A line cut short (never acknowledged) names the id; the callback is still stored."""
    site = Site(tmp_path)
    assert site.post(form(status_callback(id="known"))).status_int == 200
    body = form(status_callback(id="torn"))
    event = smsc_handler.normalize(smsc_handler.decode_request(body))
    piece = smsc_handler.event_line(event)[:-40]
    assert ('"event_id": "%s"' % event["event_id"]).encode() in piece
    with open(site.path(), "ab") as file:
        file.write(piece)
    if mended:  # another writer's line terminates the piece first: a whole line of bad JSON
        assert site.post(form(status_callback(id="next"))).status_int == 200
        assert site.path().read_bytes().count(piece + b"\n") == 1
    assert site.post(body).status_int == 200
    assert len(lines_with(site.path(), "torn")) == 1  # stored whole, after the piece's terminating newline
    assert site.post(body).status_int == 200
    assert len(lines_with(site.path(), "torn")) == 1


def test_a_repeat_after_midnight_is_found_in_yesterdays_tail(tmp_path, no_early_prune):
    site = Site(tmp_path, jsonl={"path": "{kind}-{date}.jsonl"})
    evening, late, morning = 1700006390.0, 1700006399.9, 1700006400.2  # 23:59:50, 23:59:59.9, 00:00:00.2

    def store(name, now):
        body = form(status_callback(id=name))
        request = smsc_handler.decode_request(body, b"", "application/x-www-form-urlencoded", "utf-8")
        smsc_handler.store_event(site.config, smsc_handler.normalize(request, None, "127.0.0.1",
                                                                     received=now, body=body), now)
    yesterday, today = site.data / "status-2023-11-14.jsonl", site.data / "status-2023-11-15.jsonl"
    store("evening", evening)  # announces yesterday's file
    store("morning", morning)  # announces today's (the full way: yesterday's tail is empty)
    store("late", late)  # a writer that took its time before midnight: the quick way, into yesterday's tail
    assert committed_end(site, yesterday) < yesterday.stat().st_size
    store("late", morning)  # SMSC's retry after midnight, to today's file
    assert len(lines_with(yesterday, "late")) == 1
    assert lines_with(today, "late") == []
    assert [json.loads(line)["id"] for line in today.read_bytes().splitlines()] == ["morning"]


def test_a_stopped_quick_writer_leaves_its_line_for_the_next_writer_to_find(tmp_path, no_early_prune):
    """In process: a store_event stopped after its append (a child SIGKILLed there), then the retry."""
    site = Site(tmp_path)
    assert site.post(form(status_callback(id="known"))).status_int == 200
    body = form(status_callback(id="stopped"))
    store_stopped_at(site, body, 1700000000.0, "appended")
    with smsc_handler.StateStore(site.config) as state:
        event = smsc_handler.normalize(smsc_handler.decode_request(body))
        assert state.is_seen(event["event_id"])  # remembered: in the tail, or a row if the child pruned
        in_tail = event["event_id"] not in recorded(site)
        assert state.record_tails() == (1 if in_tail else 0)
    assert event["event_id"] in recorded(site)
    assert site.post(body).status_int == 200
    assert len(lines_with(site.path(), "stopped")) == 1


def failing_sync(_fd):
    raise OSError(errno.EIO, "Input/output error")  # what a dying disk gives; no test can make a real one


def test_a_failed_sync_of_a_quick_write_cuts_its_line_back_and_the_retry_stores_it_once(tmp_path, monkeypatch):
    site = Site(tmp_path)
    assert site.post(form(status_callback(id="known"))).status_int == 200
    before = site.path().read_bytes()
    body = form(status_callback(id="unsynced"))
    working = smsc_handler._fdatasync
    monkeypatch.setattr(smsc_handler, "_fdatasync", failing_sync)
    answer = site.post(body, expect_errors=True)
    assert (answer.status_int, answer.headers["Retry-After"]) == (503, "240")
    assert site.path().read_bytes() == before  # cut back: nothing acknowledged, nothing left
    monkeypatch.setattr(smsc_handler, "_fdatasync", working)
    assert site.post(body).status_int == 200  # SMSC's retry
    assert len(lines_with(site.path(), "unsynced")) == 1


def test_a_failed_sync_with_a_line_behind_it_leaves_it_for_the_retry_to_find(tmp_path, monkeypatch):
    """Another writer appended behind our unsynced line: it can't be cut; the retry finds it in the tail."""
    site = Site(tmp_path)
    assert site.post(form(status_callback(id="known"))).status_int == 200
    body = form(status_callback(id="unsynced"))
    working, synced = smsc_handler._fdatasync, []

    def sync_while_another_writer_appends(fd):
        smsc_handler.append_line(str(site.path()), smsc_handler.event_line(
            smsc_handler.normalize(smsc_handler.decode_request(form(status_callback(id="behind"))))), fsync=False)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(smsc_handler, "_fdatasync", sync_while_another_writer_appends)
    assert site.post(body, expect_errors=True).status_int == 503
    monkeypatch.setattr(smsc_handler, "_fdatasync", lambda fd: (synced.append(fd), working(fd)))
    assert site.post(body).status_int == 200  # the retry: its line is there, synced now, not written again
    assert synced
    assert [json.loads(line)["id"] for line in site.lines()] == ["known", "unsynced", "behind"]
