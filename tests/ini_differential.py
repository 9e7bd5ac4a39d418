"""Generate config files and compare smsc_handler's plain reader with configparser on each.

Run as a script under any Python 3.8+ (no pytest needed), so that
tests/test_config_reader.py can hold the reader to the configparser of every
interpreter on the machine::

    python3 tests/ini_differential.py COUNT SEED FOLDER

prints one JSON object: how many files were generated, how many each side read,
and the first few differences (an empty list when the two agree).
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import smsc_handler  # noqa: E402

#: blanks configparser and str.strip() take as whitespace, and some they don't (\ufeff, \u200b)
SPACES = ["", " ", "  ", "\t", " \t ", "\x0c", "\x0b", "\xa0", "\u2003", "\u3000", "\x1c", "\x85", "\ufeff",
          "\u200b"]
VALUES = ["", "yes", "no", "YES", "data", "../smsc-data", "/var/lib/smsc", "a=b", "a:b", "+03:00", "UTC",
          "Europe/Moscow", "x # y", "x ; y", "#x", ";x", "[x]", "0600", "65536", "10", "0.5", "retry",
          "forward", "windows-1251", "koi8-r", "10.0.0.0/8, 192.0.2.1", "{kind}-{date}.jsonl",
          "/usr/bin/php notify.php", "'quoted value'", "\u041f\u0440\u0438\u0432\u0435\u0442", "caf\xe9",
          "tab\tinside", "x\x00y", "trailing\\", "%(interp)s", "\u2028", "a\u2029b", "=", ":", "==x", "::"]
COMMENTS = ["# a comment", "; a comment", "#", ";", "#[handler]", "; key = value", "rem no delimiter"]
NEWLINES = ["\n", "\r\n", "\r"]


def case_variants(key, rng):
    """Return key written in some case (configparser lowers it), sometimes with a Kelvin sign."""
    pick = rng.random()
    if pick < 0.6:
        return key
    if pick < 0.75:
        return key.upper()
    if pick < 0.85:
        return key.title()
    if pick < 0.9 and "k" in key:
        return key.replace("k", "\u212a", 1)  # lower() gives "k"
    return "".join(c.upper() if rng.random() < 0.5 else c for c in key)


def section_line(schema, rng, used):
    pick = rng.random()
    names = list(schema)
    if pick < 0.75:
        name = rng.choice(names)
        if name in used and rng.random() < 0.7:
            unused = [n for n in names if n not in used]
            name = rng.choice(unused) if unused else name
        used.add(name)
        return name, "[%s]" % name
    odd = rng.choice(["[DEFAULT]", "[%s]" % rng.choice(names).title(), "[ %s ]" % rng.choice(names),
                      "[%s] # note" % rng.choice(names), "[%s" % rng.choice(names), "[]",
                      "[%s]]" % rng.choice(names), "[[%s]" % rng.choice(names), "[unknown]",
                      "[%s]x" % rng.choice(names), "[\x00no default section]"])
    return None, odd


def option_line(schema, section, rng):
    pick = rng.random()
    if section is not None and pick < 0.8:
        key = rng.choice(list(schema[section]))
    elif pick < 0.9:
        key = rng.choice(list(rng.choice(list(schema.values()))))
    else:
        key = rng.choice(["unknown", "", "data dir", "k=v", " ", "[handler]"])
    key = case_variants(key, rng)
    delimiter = "=" if rng.random() < 0.8 else ":"
    value = rng.choice(VALUES)
    if rng.random() < 0.2:
        value = rng.choice(SPACES) + value + rng.choice(SPACES)
    return key + rng.choice(SPACES[:5] + [""] * 4) + delimiter + rng.choice(SPACES[:5] + [""] * 4) + value


def generate_plain(schema, rng) -> bytes:
    """Return a config file as people write them: each section and key once, comments, blanks."""
    lines = ["# written by hand"] if rng.random() < 0.5 else []
    for section in rng.sample(list(schema), rng.randint(0, len(schema))):
        lines.append("[%s]" % section)
        for key in rng.sample(list(schema[section]), rng.randint(0, len(schema[section]))):
            if rng.random() < 0.3:
                lines.append(rng.choice(SPACES[:3]) + rng.choice(COMMENTS[:4]))
            if rng.random() < 0.2:
                lines.append(rng.choice(SPACES[:8]))
            value = rng.choice(VALUES[:30])
            if rng.random() < 0.2:
                value = rng.choice(SPACES[:5]) + value + rng.choice(SPACES[:5])
            lines.append(case_variants(key, rng) + rng.choice(["=", " = ", " =", "= ", ": ", ":", "\t=\t"]) + value)
        lines.append("")
    data = rng.choice(NEWLINES).join(lines).encode("utf-8")
    return b"\xef\xbb\xbf" + data if rng.random() < 0.2 else data


def generate(schema, rng) -> bytes:
    """Return the bytes of one config file: mostly well formed, often not quite."""
    if rng.random() < 0.4:
        return generate_plain(schema, rng)
    lines = []
    used = set()
    section = None
    if rng.random() < 0.9:
        section, header = section_line(schema, rng, used)
        lines.append(header)
    for _ in range(rng.randint(0, 14)):
        pick = rng.random()
        if pick < 0.15:
            section, header = section_line(schema, rng, used)
            lines.append(header)
        elif pick < 0.7:
            lines.append(option_line(schema, section, rng))
        elif pick < 0.8:
            lines.append(rng.choice(SPACES[:6]) + rng.choice(COMMENTS))
        elif pick < 0.9:
            lines.append(rng.choice(SPACES[:8]))
        else:  # an indented line: a continuation of the key above, or an indented key or header
            lines.append(rng.choice(SPACES[1:5]) + rng.choice([rng.choice(VALUES) or "more", option_line(
                schema, section, rng), "[%s]" % rng.choice(list(schema))]))
    newline = rng.choice(NEWLINES)
    text = ""
    for line in lines:
        text += line + (newline if rng.random() < 0.9 else rng.choice(NEWLINES))
    if text and rng.random() < 0.3:
        text = text.rstrip("\r\n")  # no final newline
    data = text.encode("utf-8")
    pick = rng.random()
    if pick < 0.15:
        data = b"\xef\xbb\xbf" + data  # Notepad's BOM
    elif pick < 0.18:
        data = b"\xef\xbb\xbf\xef\xbb\xbf" + data  # two: the second is text
    elif pick < 0.21 and data:
        at = rng.randrange(len(data))
        data = data[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + data[at:]  # not UTF-8
    return data


def compare(count, seed, folder, schema=None):
    """Generate `count` files into `folder`; return the report (see the module docstring)."""
    schema = smsc_handler.CONFIG_SCHEMA if schema is None else schema
    rng = random.Random(seed)
    report = {"python": "%d.%d.%d" % sys.version_info[:3], "files": 0, "configparser_read": 0,
              "plain_read": 0, "differences": []}
    path = os.path.join(folder, "config.ini")
    for index in range(count):
        data = generate(schema, rng)
        with open(path, "wb") as file:
            file.write(data)
        try:
            reference = smsc_handler._parse_with_configparser(path)
        except smsc_handler.ConfigError as exc:
            reference = "ConfigError: " + exc.reason
        plain = smsc_handler._parse_plain_ini(data, schema)
        report["files"] += 1
        report["configparser_read"] += isinstance(reference, dict)
        report["plain_read"] += plain is not None
        if plain is not None and (not isinstance(reference, dict) or
                                  [(s, list(k.items())) for s, k in plain.items()] !=
                                  [(s, list(k.items())) for s, k in reference.items()]):
            if len(report["differences"]) < 5:
                report["differences"].append({"index": index, "file": data.decode("latin-1"),
                                              "configparser": reference, "plain": plain})
    return report


if __name__ == "__main__":
    print(json.dumps(compare(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]), ensure_ascii=True))
