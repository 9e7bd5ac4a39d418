"""A stranger's line break never forges an output line (found while auditing the report's escaping).

`status ID` printed its lines escaped as one text and then turned every escaped "\\n"
back into a line break — including one inside a phone or id, which could write a fake
"delivered" history line under a real message.
"""

from cli_util import run_cli, status_event, write_config, write_events

FORGED = "  2026-01-01 00:00:00  1 delivered  (received 2026-01-01 00:00:00)"


def test_a_line_break_in_a_phone_stays_inside_its_line(tmp_path):
    config = write_config(tmp_path)
    write_events(tmp_path / "data" / "status.jsonl", [status_event("42", status=0, phone="7999\n" + FORGED)])
    done = run_cli("status", "42", "--config", config)
    assert done.returncode == 3, done.stderr  # pending
    lines = done.stdout.splitlines()
    assert len(lines) == 2, lines  # the headline and the one status received
    assert lines[0].startswith("42  7999\\n" + FORGED)  # shown, escaped, on the headline
    assert not any(line.startswith(FORGED) for line in lines)
