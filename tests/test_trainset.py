"""End-to-end checks of point-in-time training sets against an independent plain-Python implementation.

The reference below shares no code with hsml: it reads the clean tables as Python rows and applies the rules of
issue 3 literally (population, labels, windowed sums, trends, breadth, intensity, recency, tenure, firmographics:
every feature of the `default` set), one company and one as-of date at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from hsml.trainset import TrainingSet, build_training_set

ACTIONS = ["ACTIONS_CRM_CONTACTS", "ACTIONS_CRM_COMPANIES", "ACTIONS_CRM_DEALS", "ACTIONS_EMAIL"]
USERS = ["USERS_CRM_CONTACTS", "USERS_CRM_COMPANIES", "USERS_CRM_DEALS", "USERS_EMAIL"]
START, END, EVERY, HORIZON = "2019-06-03", "2020-05-25", 21, 56


# ---------------------------------------------------------------- the independent reference (plain Python)
EMPLOYEE_LEVELS = ["1", "2 to 5", "6 to 10", "11 to 25", "26 to 50", "51 to 200", "201 to 1000", "1001 to 10000",
                   "10,001 or more"]  # fmt: skip  # DATA.md's buckets, smallest first
NO_RANK = 16_000_001  # the extract's "no rank known" sentinel
PERIOD = timedelta(days=7)  # a usage row stands for the week that starts at its stamp


def reference(companies: list[dict], usage: list[dict], as_of_dates: list[date], horizon: int) -> dict:
    "{(id, as_of): {label, conversion_mrr, every feature of the `default` set}}"
    by_id: dict[int, list[dict]] = defaultdict(list)
    for u in usage:
        by_id[u["id"]].append(u)
    out = {}
    for a in as_of_dates:
        cutoff = datetime(a.year, a.month, a.day)  # the start of the as-of day
        for c in companies:
            close = c["CLOSEDATE"]
            if close is not None and close <= a:  # converted on or before as_of: not in the population
                continue
            past = [u for u in by_id.get(c["id"], []) if u["WHEN_TIMESTAMP"] < cutoff]
            if not past:  # no usage strictly before as_of: not a portal yet
                continue
            label = int(close is not None and a < close <= a + timedelta(days=horizon))
            row = {"label": label, "conversion_mrr": c["MRR"] if label else None}
            rows = by_id[c["id"]]

            def window(newest: int, oldest: int, rows=rows, cutoff=cutoff) -> list[dict]:
                "Rows whose whole week ended in (as_of - oldest days, as_of - newest days]."
                lo, hi = cutoff - timedelta(days=oldest), cutoff - timedelta(days=newest)
                return [u for u in rows if lo < u["WHEN_TIMESTAMP"] + PERIOD <= hi]

            for w in (7, 28, 84):
                win = window(0, w)
                for col in ACTIONS + USERS:
                    row[f"{col.lower()}_sum_{w}d"] = sum(u[col] for u in win)
                row[f"actions_total_sum_{w}d"] = sum(u[col] for u in win for col in ACTIONS)
                row[f"active_periods_{w}d"] = len(win)
            recent, prev = window(0, 28), window(28, 56)
            for name, cols in [(col.lower(), [col]) for col in ACTIONS] + [("actions_total", ACTIONS)]:
                r, b = (sum(u[col] for u in part for col in cols) for part in (recent, prev))
                row[f"{name}_trend_28d"] = math.log1p(r) - math.log1p(b)
            for w in (28, 84):
                win = window(0, w)
                row[f"objects_used_{w}d"] = sum(any(u[col] > 0 for u in win) for col in ACTIONS)
                acts, users = (sum(u[col] for u in win for col in cols) for cols in (ACTIONS, USERS))
                row[f"actions_per_user_{w}d"] = acts / users if users else 0.0
            # recency and tenure count from the end of the weekly period (stamp + 7 days), issue 8 item 1
            row["days_since_last_activity"] = (a - max(u["WHEN_TIMESTAMP"] for u in past).date()).days - 7
            row["days_since_first_activity"] = (a - min(u["WHEN_TIMESTAMP"] for u in past).date()).days - 7
            size, rank = c["EMPLOYEE_RANGE"], c["ALEXA_RANK"]
            row["employee_range_order"] = EMPLOYEE_LEVELS.index(size) if size is not None else None
            row["employee_range_unknown"] = int(size is None)
            known = rank is not None and rank != NO_RANK
            row["log_alexa_rank"] = math.log(rank) if known else None
            row["alexa_rank_unknown"] = int(not known)
            row["industry"] = c["INDUSTRY"] or None
            out[(c["id"], a)] = row
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from hsml.contracts import load_tables
    from hsml.synth import generate

    d = tmp_path_factory.mktemp("sample")
    generate(d, companies=2500, seed=11)
    return d, load_tables(d)


@pytest.fixture(scope="module")
def built(sample):
    return build_training_set(sample[1], START, END, EVERY, HORIZON)


def test_matches_independent_reference(sample, built):
    _, tables = sample
    dates = [date.fromisoformat(START) + timedelta(days=k * EVERY) for k in range(100)]
    dates = [d for d in dates if d <= date.fromisoformat(END)]
    ref = reference(tables.companies().to_dicts(), tables.usage.to_dicts(), dates, HORIZON)
    got = {(r["id"], r["as_of"]): r for r in built.frame.to_dicts()}
    assert set(got) == set(ref), "population differs"
    assert sum(r["label"] for r in ref.values()) > 10  # the check means something
    assert set(built.feature_names) <= set(next(iter(ref.values()))), "a default feature has no reference"
    # and the firmographics vary: known and unknown sizes, ranks and industries all occur
    for col in ("employee_range_unknown", "alexa_rank_unknown"):
        assert {r[col] for r in ref.values()} == {0, 1}, col
    assert None in {r["industry"] for r in ref.values()} and len({r["industry"] for r in ref.values()}) > 5
    for k, want in ref.items():
        row = got[k]
        for col, v in want.items():
            if isinstance(v, float) and row[col] is not None:
                assert math.isclose(row[col], v, rel_tol=1e-9, abs_tol=1e-12), (k, col, row[col], v)
            else:
                assert row[col] == v, (k, col, row[col], v)


def test_artifact_roundtrip_and_determinism(sample, built, tmp_path):
    _, tables = sample
    again = build_training_set(tables, START, END, EVERY, HORIZON)
    assert again.content_hash == built.content_hash
    p = built.save(tmp_path / "t.parquet")
    spec = json.loads((tmp_path / "feature_spec.json").read_text())["features"]
    assert [s["name"] for s in spec] == built.feature_names
    assert set(spec[0]) == {"name", "dtype", "description", "window", "known_at", "definition_hash"}
    back = TrainingSet.load(p)
    assert back.content_hash == built.content_hash and back.frame.equals(built.frame)
    assert list(back.frame.columns[:4]) == ["id", "as_of", "label", "conversion_mrr"]
    man = json.loads((tmp_path / "t.manifest.json").read_text())
    assert man["content_hash"] == built.content_hash and man["audit"]["ok"]
    assert man["config"]["data_fingerprints"] == tables.fingerprints


def test_no_feature_is_a_leak(built):
    for name in built.feature_names:
        assert not ({"id", "mrr", "closedate", "label", "conversion"} & set(name.split("_"))), name
    assert built.audit["max_single_feature_auc"] < 0.95


def test_leaky_feature_on_sample_data_is_refused(sample):
    from hsml.features import FEATURES, feature
    from hsml.leakage import LeakageError

    _, tables = sample

    @feature(name="lifetime_email_actions", description="LEAKY: all usage, no cut-off", kind="frame")
    def _leak(events, spine):
        tot = events.group_by("id").agg(pl.col("ACTIONS_EMAIL").sum().alias("lifetime_email_actions"))
        return spine.join(tot, on="id", how="left").with_columns(
            pl.col("lifetime_email_actions").fill_null(0)
        )

    try:
        with pytest.raises(LeakageError, match=r"\[events_before_as_of\] lifetime_email_actions"):
            build_training_set(
                tables,
                START,
                END,
                EVERY,
                HORIZON,
                feature_set=["actions_email_sum_28d", "lifetime_email_actions"],
            )
    finally:
        del FEATURES["lifetime_email_actions"]


def _cli() -> list[str]:
    hsml = Path(sys.executable).parent / "hsml"
    try:
        from hsml.cli import app  # noqa: F401

        probe = subprocess.run([str(hsml), "features", "--help"], capture_output=True, text=True)
        if probe.returncode == 0 and "build" in probe.stdout:
            return [str(hsml), "features"]
    except ImportError:
        pass
    return [sys.executable, "-c", "from hsml.trainset import features_app; features_app()"]


def test_cli_build(sample, built, tmp_path):
    d, _ = sample
    out = tmp_path / "cli" / "train.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["build", "--data-dir", str(d), "--as-of-start", START, "--as-of-end", END, "--every-days", str(EVERY),
            "--horizon-days", str(HORIZON), "--out", str(out)]  # fmt: skip
    r = subprocess.run(_cli() + args, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for row in built.summary.iter_rows(named=True):
        assert f"{row['as_of']!s:<12}{row['population']:>12}{row['positives']:>11}" in r.stdout
    assert str(out) in r.stdout and built.content_hash in r.stdout
    assert TrainingSet.load(out).content_hash == built.content_hash
    bad = subprocess.run(_cli() + args[:-2] + ["--data-dir", str(tmp_path / "nope"), "--out", str(out)],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert bad.returncode != 0 and "does not exist" in (bad.stderr + bad.stdout)


@pytest.mark.skipif(shutil.which("true") is None, reason="posix")
def test_help_has_an_example():
    r = subprocess.run(_cli() + ["build", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Example" in r.stdout and "--horizon-days" in r.stdout
