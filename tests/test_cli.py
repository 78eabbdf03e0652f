"""The `hsml` command line as a user runs it: real subprocesses, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HSML = [str(Path(sys.executable).parent / "hsml")]  # the console script, as users run it
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*HSML, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    "Sample data written by the command itself."
    out = tmp_path_factory.mktemp("cli-sample")
    r = run("data", "generate", "--out", str(out), "--companies", "2000", "--seed", "3")
    assert r.returncode == 0, r.stderr
    return out


def test_help_lists_commands_and_examples():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ["data", "features", "train", "registry", "serve", "score"]:
        assert cmd in r.stdout
    subs = [["data", "generate"], ["data", "check"], ["features", "build"], ["train"], ["registry"]]
    subs += [["registry", c] for c in ("list", "show", "promote", "history", "publish")] + [
        ["serve"],
        ["score"],
    ]
    for sub in subs:
        r = run(*sub, "--help")
        assert r.returncode == 0 and "Example" in r.stdout, (sub, r.stdout)


def test_data_check_json_accounts_for_every_row(sample):
    r = run("data", "check", str(sample), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report) >= {"customers", "noncustomers", "usage"}
    assert (report["usage_period_days"], report["usage_anchor_weekday"]) == (7, "Monday")
    for table, t in ((k, report[k]) for k in ("customers", "noncustomers", "usage")):
        assert t["rows_in"] == t["rows_clean"] + t["rows_quarantined"], table
        for issue in t["issues"]:
            assert set(issue) == {"table", "column", "rule", "count"} and issue["count"] > 0
    rules = {i["rule"] for k in ("customers", "noncustomers", "usage") for i in report[k]["issues"]}
    assert {"duplicate_id", "rank_sentinel", "nonpositive_mrr", "industry_folded"} <= rules


def test_data_check_human_report(sample):
    r = run("data", "check", str(sample))
    assert r.returncode == 0 and "quarantined" in r.stdout


def test_unusable_input_is_one_clear_message(tmp_path):
    r = run("data", "check", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "nowhere" in r.stderr


def test_bad_date_is_one_clear_message(tmp_path):
    r = run("data", "generate", "--out", str(tmp_path), "--start", "yesterday")
    assert r.returncode == 2 and "--start" in r.stderr and "Traceback" not in r.stderr
