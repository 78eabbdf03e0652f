"""Write the broken-input corpus: one directory per case, each a small valid extract with one defect.

Each case directory holds the three CSVs (or fewer, for a missing file) and `expect.txt`: fragments that
must all appear in the one-line `HsmlError` message (file name, column, line). Run from anywhere:

    python tests/broken/make_corpus.py

The files are committed; `tests/test_data.py` checks that the corpus matches this script.
"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).parent

CUSTOMERS = """CLOSEDATE,MRR,ALEXA_RANK,EMPLOYEE_RANGE,INDUSTRY,id
2019-09-18,178.70,747172,2 to 5,COMPUTER_SOFTWARE,101
2019-08-13,606.61,16000001,51 to 200,Technology - Software,102
2019-11-02,0.00,,,,103
"""
NONCUSTOMERS = """ALEXA_RANK,EMPLOYEE_RANGE,INDUSTRY,id
6642426,2 to 5,REAL_ESTATE,201
2278521,51 to 200,"",202
16000001,,retail,203
"""
USAGE = """WHEN_TIMESTAMP,ACTIONS_CRM_CONTACTS,ACTIONS_CRM_COMPANIES,ACTIONS_CRM_DEALS,ACTIONS_EMAIL,USERS_CRM_CONTACTS,USERS_CRM_COMPANIES,USERS_CRM_DEALS,USERS_EMAIL,id
2019-09-02 00:00:00.000,10,0,0,0,9,0,0,0,101
2019-09-09 00:00:00.000,4,0,0,12,4,0,0,6,101
2019-09-09 00:00:00.000,1,1,0,0,1,1,0,0,201
2019-09-16 00:00:00.000,3,0,2,5,2,0,1,2,202
2019-09-23 00:00:00.000,0,0,0,1,0,0,0,1,203
"""
FILES = {"customers": "customers.csv", "noncustomers": "noncustomers.csv", "usage": "usage_actions.csv"}
BASE = {"customers": CUSTOMERS, "noncustomers": NONCUSTOMERS, "usage": USAGE}


def replace_line(text: str, line: int, new: str) -> str:
    "Replace 1-based `line` of `text`."
    lines = text.splitlines(keepends=True)
    lines[line - 1] = new + "\n"
    return "".join(lines)


# case name -> (description, {table: new content (text or bytes), or None to leave the file out}, expected fragments)
CASES: dict[str, tuple[str, dict[str, str | bytes | None], list[str]]] = {
    "missing_file": (
        "usage_actions.csv is not there",
        {"usage": None},
        ["usage_actions.csv", "file not found"],
    ),
    "empty_file": ("customers.csv has 0 bytes", {"customers": ""}, ["customers.csv", "line 1", "empty file"]),
    "blank_lines_only": (
        "noncustomers.csv holds only blank lines",
        {"noncustomers": "\n\n  \n"},
        ["noncustomers.csv", "line 1", "empty file"],
    ),
    "header_only": (
        "customers.csv has a header and no rows",
        {"customers": CUSTOMERS.splitlines()[0] + "\n"},
        ["customers.csv", "line 2", "no data rows"],
    ),
    "missing_column": (
        "customers.csv has no MRR column",
        {
            "customers": "CLOSEDATE,ALEXA_RANK,EMPLOYEE_RANGE,INDUSTRY,id\n2019-09-18,747172,2 to 5,Retail,101\n"
        },
        ["customers.csv", "column MRR", "line 1", "missing from the header"],
    ),
    "renamed_column": (
        "usage header spells when_timestamp in lower case",
        {"usage": USAGE.replace("WHEN_TIMESTAMP", "when_timestamp", 1)},
        ["usage_actions.csv", "column WHEN_TIMESTAMP", "line 1"],
    ),
    "semicolon_delimiter": (
        "noncustomers.csv is ';'-separated",
        {"noncustomers": NONCUSTOMERS.replace(",", ";")},
        ["noncustomers.csv", "column 'ALEXA_RANK;EMPLOYEE_RANGE;INDUSTRY;id'", "line 1", "';'-separated"],
    ),
    "tab_delimiter": (
        "usage_actions.csv is tab-separated",
        {"usage": USAGE.replace(",", "\t")},
        ["usage_actions.csv", "column 'WHEN_TIMESTAMP", "line 1", "tab-separated"],
    ),
    "truncated_row": (
        "a usage row lost its last field",
        {"usage": replace_line(USAGE, 4, "2019-09-09 00:00:00.000,1,1,0,0,1,1,0,0")},
        ["usage_actions.csv", "column id", "line 4", "truncated"],
    ),
    "truncated_file": (
        "the usage file stops in the middle of its last row",
        {"usage": USAGE.rsplit("\n", 2)[0] + "\n2019-09-23 00:00:00.000,0,0"},
        ["usage_actions.csv", "column ACTIONS_CRM_DEALS", "line 6", "truncated"],
    ),
    "extra_field": (
        "an unquoted thousands separator splits MRR in two",
        {
            "customers": replace_line(
                CUSTOMERS, 3, "2019-08-13,1,606.61,16000001,51 to 200,Technology - Software,102"
            )
        },
        ["customers.csv", "column id", "line 3", "7 fields"],
    ),
    "bad_date": (
        "CLOSEDATE 2019-02-30 does not exist",
        {"customers": CUSTOMERS.replace("2019-11-02", "2019-02-30")},
        ["customers.csv", "column CLOSEDATE", "line 4", "'2019-02-30' is not a date"],
    ),
    "us_date_format": (
        "CLOSEDATE written month/day/year",
        {"customers": CUSTOMERS.replace("2019-08-13", "08/13/2019")},
        ["customers.csv", "column CLOSEDATE", "line 3", "'08/13/2019'"],
    ),
    "bad_timestamp": (
        "WHEN_TIMESTAMP holds free text",
        {"usage": USAGE.replace("2019-09-16 00:00:00.000", "last week")},
        ["usage_actions.csv", "column WHEN_TIMESTAMP", "line 5", "'last week' is not a timestamp"],
    ),
    "bad_count": (
        "a count with letters in it",
        {"usage": replace_line(USAGE, 3, "2019-09-09 00:00:00.000,4,0,0,12abc,4,0,0,6,101")},
        ["usage_actions.csv", "column ACTIONS_EMAIL", "line 3", "'12abc'"],
    ),
    "fractional_count": (
        "a distinct-user count of 2.5",
        {"usage": replace_line(USAGE, 5, "2019-09-16 00:00:00.000,3,0,2,5,2,0,1,2.5,202")},
        ["usage_actions.csv", "column USERS_EMAIL", "line 5", "'2.5' is not a whole number"],
    ),
    "bad_id": (
        "a prospect id with a prefix",
        {"noncustomers": NONCUSTOMERS.replace(",203", ",ID-203")},
        ["noncustomers.csv", "column id", "line 4", "'ID-203' is not an integer id"],
    ),
    "bad_usage_id": (
        "a usage id written n/a",
        {"usage": replace_line(USAGE, 2, "2019-09-02 00:00:00.000,10,0,0,0,9,0,0,0,n/a")},
        ["usage_actions.csv", "column id", "line 2", "'n/a'"],
    ),
    "shifted_columns": (
        "customers rows written in another column order than the header says",
        {"customers": CUSTOMERS.splitlines()[0] + "\n178.70,2019-09-18,747172,2 to 5,Retail,101\n"},
        ["customers.csv", "column CLOSEDATE", "line 2", "'178.70' is not a date"],
    ),
    "word_in_count": (
        "a usage count column entirely in words",
        {"usage": USAGE.replace(",0,0,0,1,203", ",zero,0,0,1,203")},
        ["usage_actions.csv", "column USERS_CRM_CONTACTS", "line 6", "'zero'"],
    ),
    "latin1_encoding": (
        "noncustomers.csv saved as Latin-1, not UTF-8",
        {"noncustomers": NONCUSTOMERS.replace("retail", "caf\u00e9s").encode("latin-1")},
        ["noncustomers.csv", "column INDUSTRY", "line 4", "not UTF-8"],
    ),
    "duplicate_header": (
        "customers.csv names id twice",
        {"customers": CUSTOMERS.replace("INDUSTRY,id", "id,id", 1)},
        ["customers.csv", "column id", "line 1", "more than once"],
    ),
}


def write_corpus(root: Path = HERE) -> list[str]:
    "Write every case under `root`; return the case names."
    for name, (desc, changes, expect) in CASES.items():
        d = root / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for table, fname in FILES.items():
            content = changes.get(table, BASE[table])
            if isinstance(content, bytes):
                (d / fname).write_bytes(content)
            elif content is not None:
                (d / fname).write_text(content)
        (d / "expect.txt").write_text(f"# {desc}\n" + "".join(f"{e}\n" for e in expect))
    return list(CASES)


if __name__ == "__main__":
    print("\n".join(write_corpus()))
