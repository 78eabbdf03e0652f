"""Issue 8: usage periods and the as-of weekday, censored labels, `known_at`, feature fingerprints, binary input.

Everything runs on real files and real subprocesses; the sample data comes from `hsml.synth` (Monday stamps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from hsml.contracts import EMPLOYEE_ENUM
from hsml.core import HsmlError
from hsml.features import (
    ACTION_COLUMNS,
    FEATURE_SETS,
    FEATURES,
    USAGE_COLUMNS,
    WINDOWS,
    check_feature_definitions,
    compute_features,
    feature,
    read_feature_spec,
)
from hsml.snapshots import build_snapshots, data_end, is_on_anchor, snap_to_anchor
from hsml.trainset import TrainingSet, build_training_set

HSML = [str(Path(sys.executable).parent / "hsml")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HSML, *args], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    "Generated sample data (Monday stamps, post-conversion usage) and its clean tables."
    from hsml.contracts import load_tables
    from hsml.synth import generate

    d = tmp_path_factory.mktemp("timing-sample")
    generate(d, companies=1500, seed=3)
    return d, load_tables(d)


# ---------------------------------------------------------------- a hand-made extract with a post-conversion jump
JUMP = 1_000_000  # actions in every week from the conversion week on: any trace of it in a feature is a leak


def jump_tables() -> SimpleNamespace:
    """Two companies with weekly Monday stamps 2024-01-01 .. 2024-03-25. Company 1 converts on Friday 2024-03-01;
    its week stamped Monday 2024-02-26 (covering the conversion) and every later week hold the jump.
    Company 2 never converts and logs 1 action a week."""
    mondays = [date(2024, 1, 1) + timedelta(weeks=k) for k in range(13)]
    rows = []
    for cid in (1, 2):
        for m in mondays:
            v = JUMP if cid == 1 and m >= date(2024, 2, 26) else 1
            rows.append({"id": cid, "WHEN_TIMESTAMP": datetime.combine(m, datetime.min.time()),
                         **{c: v for c in USAGE_COLUMNS}})  # fmt: skip
    usage = pl.DataFrame(rows).with_columns(pl.col("WHEN_TIMESTAMP").cast(pl.Datetime("ms")))
    companies = pl.DataFrame(
        {
            "id": [1, 2],
            "CLOSEDATE": [date(2024, 3, 1), None],
            "MRR": [100.0, None],
            "ALEXA_RANK": [10, 20],
            "EMPLOYEE_RANGE": pl.Series(["2 to 5", "1"], dtype=EMPLOYEE_ENUM),
            "INDUSTRY": ["Retail", "Retail"],
        }
    )
    return SimpleNamespace(
        usage=usage,
        customers=companies.filter(pl.col("CLOSEDATE").is_not_null()),
        companies=lambda: companies,
    )


def test_thursday_grid_sees_no_future_usage():
    t = jump_tables()
    thursdays = [date(2024, 1, 4) + timedelta(weeks=k) for k in range(9)]  # 2024-01-04 .. 2024-02-29
    assert thursdays[-1] == date(2024, 2, 29) and not is_on_anchor(thursdays[-1], "Monday")
    ts = build_training_set(t, thursdays[0], thursdays[-1], 7, 21, audit=False)
    frame = ts.frame
    # company 1 is in the population on 2024-02-29 (it converts the day after) and labelled 1
    last = frame.filter((pl.col("id") == 1) & (pl.col("as_of") == date(2024, 2, 29)))
    assert last["label"].to_list() == [1]
    # the week stamped 2024-02-26 runs to 2024-03-04: nothing of it is in any feature
    usage_feats = [n for n in ts.feature_names if FEATURES[n].known_at == "as_of"]
    for n in usage_feats:
        assert frame[n].cast(pl.Float64).abs().max() < JUMP / 10, n
    # every row equals its features recomputed from the rows whose week had ended (an independent cut)
    for a in thursdays:
        known = t.usage.filter(
            pl.col("WHEN_TIMESTAMP") + pl.duration(days=7) <= pl.lit(a).cast(pl.Datetime("ms"))
        )
        rows = frame.filter(pl.col("as_of") == a).select("id", "as_of")
        want = compute_features(t.companies(), known, rows, ts.feature_names)
        assert want.equals(frame.filter(pl.col("as_of") == a).select(want.columns)), a
    # on 2024-02-29: the 7-day window holds the week stamped 2024-02-19 (ended 2024-02-26), recency 3 days
    r = last.row(0, named=True)
    assert (
        r["actions_email_sum_7d"] == 1 and r["active_periods_28d"] == 4 and r["days_since_last_activity"] == 3
    )


def test_thursday_population_waits_for_the_first_week():
    t = jump_tables()
    panel = build_snapshots(t.companies(), t.usage, ["2024-01-04", "2024-01-08"], 21)
    assert (
        panel["as_of"].to_list() == [date(2024, 1, 8)] * 2
    )  # the first week (from 2024-01-01) ends 2024-01-08


def test_monday_grid_gives_the_window_sums_of_stamps_before_as_of(sample):
    "On Monday grids with Monday stamps, window w holds exactly the rows stamped in [as_of - w, as_of)."
    _, tables = sample
    mondays = [date(2019, 9, 2) + timedelta(weeks=5 * k) for k in range(6)]
    sums = [f"{c.lower()}_sum_{w}d" for w in WINDOWS for c in USAGE_COLUMNS]
    got = compute_features(
        tables.companies(), tables.usage, mondays, sums + [f"active_periods_{w}d" for w in WINDOWS]
    )
    u = tables.usage
    for a in mondays:
        cut = pl.lit(a).cast(pl.Datetime("ms"))
        for w in WINDOWS:
            win = u.filter(
                (pl.col("WHEN_TIMESTAMP") >= cut - pl.duration(days=w)) & (pl.col("WHEN_TIMESTAMP") < cut)
            )
            want = win.group_by("id").agg(
                *[pl.col(c).sum().alias(f"{c.lower()}_sum_{w}d") for c in USAGE_COLUMNS],
                pl.len().cast(pl.Int64).alias(f"active_periods_{w}d"),
            )
            cols = [f"{c.lower()}_sum_{w}d" for c in USAGE_COLUMNS] + [f"active_periods_{w}d"]
            mine = got.filter(pl.col("as_of") == a).select("id", *cols)
            joined = mine.join(want, on="id", how="left", suffix="_ref").fill_null(0)
            assert want.height > 50
            for c in cols:
                assert (joined[c] == joined[f"{c}_ref"]).all(), (a, c)


def test_inferred_period_and_anchor(sample):
    from hsml.contracts import infer_usage_period

    d, tables = sample
    assert infer_usage_period(tables.usage) == {"usage_period_days": 7, "usage_anchor_weekday": "Monday"}
    assert (tables.usage_period_days, tables.usage_anchor_weekday) == (7, "Monday")
    r = run("data", "check", str(d), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["usage_period_days"], rep["usage_anchor_weekday"], rep["usage_stamps_off_anchor"]) == (
        7,
        "Monday",
        0,
    )
    assert rep["last_usage_stamp"].startswith("2020-07-20") and rep["last_close_date"] and rep["data_end"]
    text = run("data", "check", str(d)).stdout
    assert "usage logged every 7 days, stamped on Mondays" in text and "last close date" in text


def test_off_anchor_stamps_are_counted(tmp_path, sample):
    from hsml.contracts import infer_usage_period, load_tables

    d, _ = sample
    for f in ("customers.csv", "noncustomers.csv"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    u = pl.read_csv(d / "usage_actions.csv", infer_schema=False)
    u = u.with_columns(  # three rows moved to the Thursday after their Monday
        pl.when(pl.int_range(pl.len()) < 3)
        .then(pl.col("WHEN_TIMESTAMP").str.replace(r"^(\d{4}-\d{2}-\d{2})", "X$1"))
        .otherwise(pl.col("WHEN_TIMESTAMP"))
    )
    shifted = [
        (datetime.fromisoformat(s[1:11]) + timedelta(days=3)).strftime("%Y-%m-%d") + s[11:]
        if s.startswith("X")
        else s
        for s in u["WHEN_TIMESTAMP"].to_list()
    ]
    u.with_columns(WHEN_TIMESTAMP=pl.Series(shifted)).write_csv(tmp_path / "usage_actions.csv")
    t = load_tables(tmp_path)
    assert infer_usage_period(t.usage) == {"usage_period_days": 7, "usage_anchor_weekday": "Monday"}
    assert t.report.to_dict()["usage_stamps_off_anchor"] == 3
    assert t.report.count("usage", "off_anchor_stamp") == 3


def test_snap_to_anchor_and_default_grid():
    from hsml import runs

    assert snap_to_anchor("2020-07-21", "Monday") == date(2020, 7, 20)  # the Tuesday 'latest' used to land on
    p = runs.resolve_dates(
        runs.validate_params({}), {"data_end": date(2020, 8, 13), "usage_anchor_weekday": "Monday"}
    )
    assert all(d.weekday() == 0 for d in runs.as_of_dates(p))


def test_data_end_reports_both_dates(sample):
    _, tables = sample
    e = data_end(tables)
    assert e["last_usage_stamp"] == datetime(2020, 7, 20) and e["last_close_date"] <= date(2020, 7, 20)
    assert e["data_end"] == date(2020, 7, 20) and e["latest_as_of"] == date(2020, 7, 20)
    # one outlying close date moves the end, and says so
    far = SimpleNamespace(
        usage=tables.usage,
        companies=lambda: tables.companies().with_columns(
            pl.when(pl.col("id") == tables.customers["id"][0]).then(date(2021, 12, 1)).otherwise(pl.col("CLOSEDATE"))
            .alias("CLOSEDATE")
        ),
    )  # fmt: skip
    e2 = data_end(far)
    assert e2["data_end"] == date(2021, 12, 1) and any(
        "last close date 2021-12-01" in w for w in e2["warnings"]
    )


# ---------------------------------------------------------------- item 4: censored labels
def test_censored_horizon_is_refused(sample):
    d, tables = sample
    with pytest.raises(HsmlError, match="the last valid as-of date is 2020-05-25"):
        build_training_set(
            tables, "2020-07-20", "2020-07-20", 7, 56
        )  # the example: 0 positives before
    ok = build_training_set(tables, "2020-05-25", "2020-05-25", 7, 56, audit=False)
    assert ok.frame["label"].sum() > 0
    r = run("features", "build", "--data-dir", str(d), "--as-of-start", "2020-07-20", "--as-of-end", "2020-07-20",
            "--every-days", "7", "--horizon-days", "56", "--out", str(d.parent / "censored.parquet"))  # fmt: skip
    assert (
        r.returncode == 2
        and "last valid as-of date is 2020-05-25" in r.stderr
        and "Traceback" not in r.stderr
    )


# ---------------------------------------------------------------- item 5: known_at
def test_known_at_in_the_spec(sample, tmp_path):
    _, tables = sample
    ts = build_training_set(tables, "2020-03-02", "2020-03-30", 28, 28, audit=False)
    ts.save(tmp_path / "t.parquet")
    doc = json.loads((tmp_path / "feature_spec.json").read_text())
    assert (doc["usage_period_days"], doc["usage_anchor_weekday"]) == (7, "Monday")
    snap = [e["name"] for e in doc["features"] if e["known_at"] == "snapshot"]
    assert snap == FEATURE_SETS["firmographics"]
    assert {e["known_at"] for e in doc["features"]} == {"as_of", "snapshot"}
    back = TrainingSet.load(tmp_path / "t.parquet")
    assert back.timing == {"usage_period_days": 7, "usage_anchor_weekday": "Monday"} and back.spec == ts.spec
    # an older plain-list feature_spec.json still reads (and its hash is checked as before)
    entries, timing = read_feature_spec(doc["features"])
    assert entries == doc["features"] and timing == {"usage_period_days": 7, "usage_anchor_weekday": "Monday"}


def test_known_at_declared_or_inferred():
    try:
        feature(name="tmp_rank_sq", description="squared rank")(lambda ctx: ctx.entity("ALEXA_RANK") ** 2)
        feature(name="tmp_email_7d", description="email actions, 7 days")(
            lambda ctx: ctx.sum("ACTIONS_EMAIL", 7)
        )
        feature(name="tmp_declared", description="declared", known_at="snapshot")(lambda ctx: ctx.count(7))
        assert FEATURES["tmp_rank_sq"].known_at == "snapshot"
        assert FEATURES["tmp_email_7d"].known_at == "as_of"
        assert FEATURES["tmp_declared"].known_at == "snapshot"
        with pytest.raises(HsmlError, match="known_at"):
            feature(name="tmp_bad", description="x", known_at="whenever")(lambda ctx: ctx.count(7))
    finally:
        for n in ("tmp_rank_sq", "tmp_email_7d", "tmp_declared", "tmp_bad"):
            FEATURES.pop(n, None)


# ---------------------------------------------------------------- item 8: definition fingerprints
def test_builtins_sharing_a_lambda_hash_differently_and_stably():
    hashes = {n: FEATURES[n].definition_hash for n in FEATURE_SETS["default"]}
    assert len(set(hashes.values())) == len(hashes)  # e.g. the 24 windowed sums share one lambda
    code = "from hsml.features import FEATURES; import json; print(json.dumps({n: f.definition_hash for n, f in FEATURES.items()}))"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, "PYTHONHASHSEED": "7"}
    )
    assert other.returncode == 0, other.stderr
    assert {n: h for n, h in json.loads(other.stdout).items() if n in hashes} == hashes


def test_changed_definition_is_refused():
    try:

        @feature(name="tmp_email_share", description="email share of actions over 28 days", window=28)
        def share(ctx):
            total = sum(ctx.sum(c, 28) for c in ACTION_COLUMNS)
            return ctx.sum("ACTIONS_EMAIL", 28) / total

        spec = [FEATURES["tmp_email_share"].spec("Float64")]
        check_feature_definitions(spec)  # unchanged: fine

        @feature(name="tmp_email_share", description="email share of actions over 28 days", window=28)
        def share2(ctx):  # same name, another definition (7 days in the numerator)
            total = sum(ctx.sum(c, 28) for c in ACTION_COLUMNS)
            return ctx.sum("ACTIONS_EMAIL", 7) / total

        with pytest.raises(HsmlError, match="changed: tmp_email_share"):
            check_feature_definitions(spec)
        del FEATURES["tmp_email_share"]
        with pytest.raises(HsmlError, match="not registered: tmp_email_share"):
            check_feature_definitions(spec)
    finally:
        FEATURES.pop("tmp_email_share", None)


# ---------------------------------------------------------------- item 11a: a binary file in place of a CSV
@pytest.mark.parametrize("content", [b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8, os.urandom(20000)])
def test_binary_file_is_one_clear_error(sample, tmp_path, content):
    d, _ = sample
    for f in ("customers.csv", "noncustomers.csv", "usage_actions.csv"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    (tmp_path / "usage_actions.csv").write_bytes(content)
    r = run("data", "check", str(tmp_path))
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert "usage_actions.csv: not a text file" in r.stderr and "Traceback" not in r.stderr


def test_audit_probe_catches_a_week_still_running(sample):
    "A free-form feature using the old `stamp < as_of` rule reads the running week on a Thursday grid: refused."
    from hsml.leakage import LeakageError

    _, tables = sample

    @feature(
        name="tmp_email_old_rule_7d", description="LEAKY: rows stamped in [as_of - 7, as_of)", kind="frame"
    )
    def _old(events, spine):
        cut = pl.col("as_of").cast(pl.Datetime("ms"))
        rows = spine.join(events.select("id", "WHEN_TIMESTAMP", "ACTIONS_EMAIL"), on="id", how="left").filter(
            (pl.col("WHEN_TIMESTAMP") < cut) & (pl.col("WHEN_TIMESTAMP") >= cut - pl.duration(days=7))
        )
        s = rows.group_by("id", "as_of").agg(pl.col("ACTIONS_EMAIL").sum().alias("tmp_email_old_rule_7d"))
        return spine.join(s, on=["id", "as_of"], how="left").with_columns(
            pl.col("tmp_email_old_rule_7d").fill_null(0)
        )

    names = ["actions_email_sum_28d", "tmp_email_old_rule_7d"]
    try:  # on Mondays the old rule reads whole weeks only: no alarm
        build_training_set(tables, "2019-09-02", "2020-03-30", 28, 56, feature_set=names)
        with pytest.raises(LeakageError, match="tmp_email_old_rule_7d"):
            build_training_set(tables, "2019-09-05", "2020-04-02", 28, 56, feature_set=names)
    finally:
        FEATURES.pop("tmp_email_old_rule_7d", None)


def test_training_set_with_an_old_list_spec_still_loads(sample, tmp_path):
    from hsml.trainset import content_hash, manifest_path

    _, tables = sample
    ts = build_training_set(tables, "2020-03-02", "2020-03-30", 28, 28, audit=False, feature_set="minimal")
    p = ts.save(tmp_path / "t.parquet")
    old = [{k: e[k] for k in ("name", "dtype", "description", "window")} for e in ts.spec]
    (tmp_path / "feature_spec.json").write_text(json.dumps(old))
    man = json.loads(manifest_path(p).read_text())
    man["content_hash"] = content_hash(ts.frame, old)  # as the code before timing hashed it
    manifest_path(p).write_text(json.dumps(man))
    back = TrainingSet.load(p)
    assert back.spec == old and back.timing == {"usage_period_days": 7, "usage_anchor_weekday": "Monday"}
