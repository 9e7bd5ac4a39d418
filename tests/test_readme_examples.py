"""The README's example events and hashes are what the code produces (STYLE 15)."""

import json
import re
from pathlib import Path

import pytest

import smsc_handler

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
EXAMPLES = [json.loads(line) for line in README.splitlines() if line.startswith('{"kind": ')]
SECRET = "Secret_42"


def test_the_readme_shows_one_example_per_kind():
    assert [event["kind"] for event in EXAMPLES] == ["status", "incoming", "waitcall"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[event["kind"] for event in EXAMPLES])
def test_readme_example_is_what_its_params_give(example):
    params = example["params"]
    body = "&".join("%s=%s" % (name, value) for name, value in params.items())
    request = smsc_handler.decode_request(body.encode("cp1251"), b"", "", "windows-1251")
    signature = smsc_handler.verify_signature(example["kind"], request, SECRET)
    event = smsc_handler.normalize(request, signature, example["remote_addr"],
                                   received=1795612345.678, zone="+03:00", body=body.encode("cp1251"))
    assert event == example


def test_readme_sign_example_prints_the_hash_shown():
    command, printed = re.search(r"\$ python3 smsc_handler.py (sign [^\n]+)\n(\w+)\n", README).groups()
    assert command == "sign --secret Secret_42 id=1 phone=79991234567 status=1"
    assert printed == smsc_handler.control_hash("md5", b"1:79991234567:1:" + SECRET.encode())


def test_ci_runs_the_readme_test_command():
    opening = README.split("---")[0]
    commands = re.findall(r"```sh\n(.+?)\n```", opening)
    assert commands[0] == "python3 smsc_handler.py serve"
    ci_script = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert commands[1] in ci_script.splitlines()
