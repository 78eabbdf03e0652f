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


# ---------------------------------------------------------------------------------------------------------
# hsml score


@pytest.fixture(scope="module")
def industry_model(tmp_path_factory, score_data) -> dict:
    "Generated data and a bundle whose reasons include the industry (a category) beside numeric features."
    import datetime as dt

    import numpy as np
    import polars as pl

    from hsml.bundle import save_bundle
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.trainset import build_training_set

    d = tmp_path_factory.mktemp("cli-score")
    tables = score_data["tables"]
    last = tables.usage["WHEN_TIMESTAMP"].max().date()
    ts = build_training_set(tables, last - dt.timedelta(days=84), last - dt.timedelta(days=28), 28, 28)
    f = ts.frame
    top = f["industry"].drop_nulls().value_counts().sort("count", "industry", descending=True)["industry"][0]
    busy = f["actions_total_sum_84d"].fill_null(0).to_numpy()
    # converters: the busiest fifth, and most of one industry (so both kinds of reason rank high)
    in_top = (f["industry"] == top).fill_null(False).to_numpy() & (
        np.random.default_rng(0).random(f.height) < 0.7
    )
    f = f.with_columns(label=pl.Series(((busy > np.quantile(busy, 0.8)) | in_top).astype(np.int8)))
    num, cat = columns_from_spec(ts.spec)
    pipe = fit_model(make_model("lgbm", num, cat, seed=0, n_estimators=30, min_child_samples=5), f)
    meta = {"name": "cat-reasons", "model": "lgbm", "feature_set": "default", "horizon_days": 28}
    bundle = save_bundle(d / "model", pipe, ts.spec, {}, meta, train_frame=f)
    return {"data": score_data["data"], "bundle": bundle, "industry": str(top), "tables": tables}


def test_score_csv_with_a_category_among_the_reasons(industry_model, tmp_path):
    "reason_*_value mixes numbers and industry names: the CSV keeps it text, and the command does not crash."
    import polars as pl

    out = tmp_path / "scores.csv"
    m = industry_model
    r = run(
        "score",
        "--model",
        str(m["bundle"]),
        "--data-dir",
        str(m["data"]),
        "--as-of",
        "latest",
        "--out",
        str(out),
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "scored" in r.stdout and "listed without a score" in r.stdout, r.stdout
    df = pl.read_csv(out, infer_schema=False)
    ranked = df.filter(pl.col("unscored_reason").is_null())
    values = pl.concat([ranked[f"reason_{j}_value"] for j in (1, 2, 3)]).drop_nulls()
    reasons = pl.concat([ranked[f"reason_{j}"] for j in (1, 2, 3)])
    assert (reasons == "industry").sum() > 0 and m["industry"] in values.to_list()
    assert values.str.contains(r"^-?[0-9.]+$").sum() > 0  # numbers beside the names, in the same columns


def test_score_nobody_to_score_is_one_clear_message(industry_model, tmp_path):
    "At the first usage date nobody has usage before as_of: nobody is in the training population."
    first = industry_model["tables"].usage["WHEN_TIMESTAMP"].min().date()
    m = industry_model
    r = run("score", "--model", str(m["bundle"]), "--data-dir", str(m["data"]), "--as-of", str(first),
            "--out", str(tmp_path / "s.csv"))  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"nobody to score: no company is in the population 'active_unconverted' at {first}" in r.stderr
    assert "outside it (outside_population: no usage before as_of)" in r.stderr


def test_score_off_anchor_as_of_is_scored_and_flagged(industry_model, tmp_path):
    "A Thursday is accepted: the list says so in as_of_off_anchor, and the command warns, naming the anchor weekday."
    import datetime as dt

    import polars as pl

    from hsml.snapshots import data_end

    thursday = data_end(industry_model["tables"])["latest_as_of"] - dt.timedelta(days=4)
    out = tmp_path / "s.parquet"
    m = industry_model
    r = run("score", "--model", str(m["bundle"]), "--data-dir", str(m["data"]), "--as-of", str(thursday),
            "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"warning: as_of {thursday} is a Thursday, not a Monday (the usage anchor)" in r.stderr
    df = pl.read_parquet(out)
    assert (df["as_of"] == thursday).all() and df["as_of_off_anchor"].all()


def test_score_threads_option_gives_the_same_list(industry_model, tmp_path):
    "`hsml score --threads 1` and `--threads 2` write the same list; 0 threads and Ray with --threads are refused."
    import polars as pl

    m = industry_model
    base = ["score", "--model", str(m["bundle"]), "--data-dir", str(m["data"]), "--as-of", "latest"]
    for n in (1, 2):
        r = run(*base, "--threads", str(n), "--out", str(tmp_path / f"s{n}.parquet"))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert pl.read_parquet(tmp_path / "s1.parquet").equals(pl.read_parquet(tmp_path / "s2.parquet"))
    r = run(*base, "--threads", "0", "--out", str(tmp_path / "s0.parquet"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--threads" in r.stderr, r.stderr
    r = run(*base, "--threads", "2", "--engine", "ray", "--out", str(tmp_path / "sr.parquet"))
    assert r.returncode == 2 and "--threads is for --engine local" in r.stderr, r.stderr
