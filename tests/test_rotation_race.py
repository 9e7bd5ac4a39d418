"""A rename (logrotate) between a writer's open and its lock: the line goes into the new file.

A reader that finished the rotated piece (its size unchanged under the same lock) must
still see the line. The rename is made at that very instant, with real files, by
wrapping the step that takes the lock; both write paths are checked: dedupe on (the
default config: the committed-end protocol) and dedupe off (append_line).
"""

import os

import pytest

import smsc_handler


def event(n):
    return {"kind": "status", "event_id": "e%d" % n, "received_at": "2026-01-01T00:00:00.000Z", "n": n}


@pytest.mark.parametrize("dedupe", ["yes", "no"])
def test_a_line_written_across_a_rename_reaches_the_reader_that_finished_the_old_file(
        tmp_path, monkeypatch, dedupe):
    config_path = tmp_path / "config.ini"
    config_path.write_text("[handler]\ndata_dir = data\n[dedupe]\nenabled = %s\n" % dedupe)
    config = smsc_handler.load_config(str(config_path))
    smsc_handler.store_event(config, event(1))
    path = smsc_handler.event_path(config, "status")
    positions = {}
    assert [e["event_id"] for _p, _e, e in smsc_handler.iter_stored(config, positions=positions)] == ["e1"]
    seen_during, rotated = [], []

    def rotate_now():
        if rotated:
            return
        rotated.append(True)
        os.rename(path, path + ".1")  # logrotate's rename, then `create`
        open(path, "ab").close()
        smsc_handler.append_line(path, smsc_handler.event_line(event(3)), True, 0o600)  # another writer
        seen_during.extend(e["event_id"] for _p, _e, e in smsc_handler.iter_stored(config, positions=positions))

    lock_current, open_append = smsc_handler._lock_current, smsc_handler._open_append

    def lock_after_a_rename(*args):
        rotate_now()  # dedupe on: the file was opened, its lock not yet taken
        return lock_current(*args)

    def open_append_then_rename(name, mode):
        fd = open_append(name, mode)
        if name == path:
            rotate_now()  # dedupe off: append_line opened the file, its lock not yet taken
        return fd

    monkeypatch.setattr(smsc_handler, "_lock_current", lock_after_a_rename)
    monkeypatch.setattr(smsc_handler, "_open_append", open_append_then_rename)
    smsc_handler.store_event(config, event(2))
    assert seen_during == ["e3"]  # the reader finished the rotated piece and moved on
    after = [e["event_id"] for _p, _e, e in smsc_handler.iter_stored(config, positions=positions)]
    assert after == ["e2"]  # the line went into the file now named status.jsonl
    with open(path + ".1", "rb") as old, open(path, "rb") as new:
        assert (old.read().count(b"\n"), new.read().count(b"\n")) == (1, 2)
