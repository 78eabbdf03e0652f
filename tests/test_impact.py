"""`hsml impact …` as a user runs it (real subprocesses), and the estimators checked against reference computations."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import norm

HSML = [str(Path(sys.executable).parent / "hsml")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HSML, *args], capture_output=True, text=True, env=ENV, timeout=600)


def test_design_matches_a_hand_computation():
    r = run(
        "impact",
        "design",
        "--baseline-rate",
        "0.05",
        "--effect",
        "0.02",
        "--k",
        "300",
        "--holdout-share",
        "0.2",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    # Fleiss' unequal-arm formula by hand: r = 4 treated per held-out company
    p0, p1, k = 0.05, 0.07, 4
    pbar = (p0 + k * p1) / (1 + k)
    za, zb = norm.ppf(0.975), norm.ppf(0.8)
    nh = math.ceil(
        (za * math.sqrt(pbar * (1 - pbar) * (1 + 1 / k)) + zb * math.sqrt(p0 * (1 - p0) + p1 * (1 - p1) / k))
        ** 2
        / 0.02**2
    )
    assert d["companies_per_arm"] == {"treatment": 4 * nh, "holdout": nh}
    assert d["weeks"] == math.ceil(5 * nh / 300) and d["weeks"] <= 26 and d["warning"] is None
    assert r.stderr == ""


def test_design_warns_past_26_weeks_and_rejects_bad_input():
    r = run(
        "impact",
        "design",
        "--baseline-rate",
        "0.05",
        "--effect",
        "0.02",
        "--k",
        "100",
        "--holdout-share",
        "0.2",
    )
    assert r.returncode == 0 and "weeks needed at K=100 per week: 72" in r.stdout
    assert "warning: 72 weeks is more than 26" in r.stderr
    r = run(
        "impact",
        "design",
        "--baseline-rate",
        "0.05",
        "--effect",
        "0.02",
        "--k",
        "100",
        "--holdout-share",
        "0",
    )
    assert r.returncode == 2 and "holdout share" in r.stderr and "Traceback" not in r.stderr


def test_simulate_recovers_the_planted_lift_and_catches_the_planted_faults():
    r = run("impact", "simulate", "--runs", "200", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert list(s) == [
        "runs",
        "true_lift",
        "coverage",
        "mean_estimate",
        "aa_false_positive_rate",
        "srm_alarm_rate_clean",
        "srm_detected_dropped_holdout",
        "psi_detected_shifted_feature",
        "miscalibration_detected",
    ]
    assert s["runs"] == 200 and s["true_lift"] == 0.02
    assert 0.90 <= s["coverage"] <= 0.99 and abs(s["mean_estimate"] - 0.02) < 0.002
    assert 0.01 <= s["aa_false_positive_rate"] <= 0.10 and s["srm_alarm_rate_clean"] <= 0.02
    assert s["srm_detected_dropped_holdout"] >= 0.95
    assert s["psi_detected_shifted_feature"] >= 0.99 and s["miscalibration_detected"] >= 0.99


KEYS = ["srm", "matured", "sequential", "immature", "drift", "calibration"]


def _log_lines(data: Path) -> list[str]:
    "Eight weekly top-100 lists of the generated extract's companies, arms by the sticky hash."
    import datetime as dt

    import numpy as np
    import polars as pl

    from hsml.impact_design import assign_arm

    ids = pl.concat([pl.read_csv(data / f, columns=["id"]) for f in ("customers.csv", "noncustomers.csv")])[
        "id"
    ]
    ids = ids.unique().sort().to_list()
    rng = np.random.default_rng(0)
    out = []
    for w in range(8):
        day = dt.date(2020, 3, 2) + dt.timedelta(weeks=w)
        top = rng.choice(ids, 100, replace=False).tolist()
        for r, (i, a) in enumerate(zip(top, assign_arm("t", top, 0.2)), 1):
            rec = dict(
                request_id=f"w{w}", model="m", version=1, id=i, score=0.05, timestamp=f"{day}T06:00:00"
            )
            out.append(
                json.dumps(rec | dict(experiment="t", arm=a, rank=r, as_of=str(day), holdout_share=0.2))
                + "\n"
            )
    return out


def test_report_is_the_same_for_rotated_concatenated_retried_and_torn_logs(tmp_path):
    data = tmp_path / "data"
    assert run("data", "generate", "--out", str(data), "--companies", "1500", "--seed", "2").returncode == 0
    lines = _log_lines(data)
    w1, w2 = "".join(lines[::2]), "".join(lines[1::2])
    (tmp_path / "w1.jsonl").write_text(w1 + lines[0] + lines[4][:35])  # a retried line, then a torn write
    (tmp_path / "w2.jsonl").write_text(w2)
    half = len(lines[1::2]) // 2  # worker 2's log rotated in two
    (tmp_path / "w2.1.jsonl").write_text("".join(lines[1::2][:half]))
    (tmp_path / "w2.2.jsonl").write_text("".join(lines[1::2][half:]))
    (tmp_path / "all.jsonl").write_text((tmp_path / "w1.jsonl").read_text() + w2)

    def report(name: str, *logs: str) -> dict:
        args = [a for lg in logs for a in ("--log", str(tmp_path / lg))]
        r = run(
            "impact",
            "report",
            *args,
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path / name),
            "--horizon-days",
            "28",
        )
        assert r.returncode == 0, r.stderr
        assert "torn" in r.stderr and "Traceback" not in r.stderr
        rep = json.loads((tmp_path / name / "impact.json").read_text())
        assert list(rep)[:6] == KEYS
        assert rep["log"]["duplicates"] == 1 and rep["log"]["torn_lines"] == 1
        return {k: v for k, v in rep.items() if k != "log"}

    a = report("a", "w1.jsonl", "w2.jsonl")
    assert a == report("b", "w2.2.jsonl", "w1.jsonl", "w2.1.jsonl") == report("c", "all.jsonl")
    n = len({json.loads(x)["id"] for x in lines})  # each company once, from its first appearance
    assert a["srm"]["n_treatment"] + a["srm"]["n_holdout"] == n and not a["srm"]["alarm"]
    assert len(a["matured"]["by_week"]) == 8 and len(a["sequential"]["by_week"]) == 8
    assert "Waudby-Smith" in a["sequential"]["method"] and a["sequential"]["parameters"]["alpha"] == 0.05
    assert (tmp_path / "a" / "sequential.png").exists() and (tmp_path / "a" / "calibration.png").exists()
    assert len(a["calibration"]["bins"]) == 10 and a["calibration"]["arm"] == "holdout"


def test_report_errors_are_clear(tmp_path):
    r = run(
        "impact",
        "report",
        "--log",
        str(tmp_path / "nope.jsonl"),
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--horizon-days",
        "28",
    )
    assert r.returncode == 2 and "nope.jsonl does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run(
        "impact", "report", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--horizon-days", "28"
    )
    assert r.returncode == 2 and "no prediction log" in r.stderr and "Traceback" not in r.stderr
    r = run(
        "impact", "report", "--log-sink", "predictions", "--data-dir", str(tmp_path), "--out", str(tmp_path)
    )
    assert r.returncode == 2 and "needs --catalog" in r.stderr and "Traceback" not in r.stderr


def _bundle(tmp_path: Path, data: Path, start: str = "2019-09-02", end: str = "2020-01-27"):
    "A real bundle in tmp_path/bundle: minimal features, logistic regression, trained on [start, end]; its training set."
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from hsml.bundle import save_bundle
    from hsml.contracts import load_tables
    from hsml.trainset import build_training_set

    ts = build_training_set(load_tables(data), start, end, 7, 28, feature_set="minimal", audit=False)
    X = ts.frame.select(ts.feature_names).to_pandas()
    pipe = Pipeline(
        [("impute", SimpleImputer(keep_empty_features=True)), ("model", LogisticRegression(max_iter=500))]
    )
    pipe.fit(X, ts.frame["label"].to_numpy())
    meta = {"name": "m", "model": "logreg", "feature_set": "minimal", "horizon_days": 28}
    meta["deployed_model_train_window"] = {"as_of_from": start, "as_of_to": end}
    save_bundle(tmp_path / "bundle", pipe, ts.spec, {}, meta, train_frame=ts.frame)
    return ts


def test_report_drift_from_a_bundle_and_effect_on_reached(tmp_path):
    "A real bundle (minimal features, logistic regression) gives the horizon, the feature set and the score drift."
    import polars as pl

    data = tmp_path / "data"
    assert run("data", "generate", "--out", str(data), "--companies", "1500", "--seed", "2").returncode == 0
    ts = _bundle(tmp_path, data)
    ts.frame.write_parquet(tmp_path / "train.parquet")
    lines = _log_lines(data)
    (tmp_path / "log.jsonl").write_text("".join(lines))
    treated = [json.loads(x)["id"] for x in lines if json.loads(x)["arm"] == "treatment"]
    pl.DataFrame({"id": treated[::2], "reached": [1] * len(treated[::2])}).write_csv(tmp_path / "calls.csv")
    args = ["--log", str(tmp_path / "log.jsonl"), "--data-dir", str(data), "--out", str(tmp_path / "o")]
    args += ["--model", str(tmp_path / "bundle"), "--training-set", str(tmp_path / "train.parquet")]
    r = run("impact", "report", *args, "--calls", str(tmp_path / "calls.csv"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "o" / "impact.json").read_text())
    assert rep["outcomes"]["horizon_days"] == 28  # from the bundle
    assert set(rep["drift"]["features"]) == set(ts.feature_names) and "psi" in rep["drift"]["score"]
    assert rep["drift"]["week"] == "2020-04-20" and rep["drift"]["companies"] == 100
    reach = rep["matured"]["effect_on_reached"]["reach_difference"]
    assert 0.4 < reach < 0.6  # half the called companies were reached, no holdout company


def test_impact_notebook_writes_what_the_command_writes(tmp_path):
    "experiments/impact.ipynb under papermill: the same impact.json and plots as `hsml impact report`, SRM shown first."
    import papermill as pm

    data = tmp_path / "data"
    assert run("data", "generate", "--out", str(data), "--companies", "1500", "--seed", "2").returncode == 0
    lines = _log_lines(data)
    (tmp_path / "w1.jsonl").write_text("".join(lines[::2]))
    (tmp_path / "w2.jsonl").write_text("".join(lines[1::2]))
    logs = [str(tmp_path / "w1.jsonl"), str(tmp_path / "w2.jsonl")]
    args = ["--log", logs[0], "--log", logs[1], "--data-dir", str(data), "--horizon-days", "28", "--k", "80"]
    r = run("impact", "report", *args, "--out", str(tmp_path / "cli"))
    assert r.returncode == 0, r.stderr
    nb = Path(__file__).resolve().parents[1] / "experiments" / "impact.ipynb"
    params = dict(log=",".join(logs), data_dir=str(data), out=str(tmp_path / "nb"), horizon_days=28, k=80)
    pm.execute_notebook(
        str(nb), str(tmp_path / "run.ipynb"), parameters=params, progress_bar=False, kernel_name="python3"
    )
    cli, book = (json.loads((tmp_path / d / "impact.json").read_text()) for d in ("cli", "nb"))
    assert book == cli and list(book)[:6] == KEYS
    assert sorted(p.name for p in (tmp_path / "nb").iterdir()) == [
        "calibration.png",
        "impact.json",
        "sequential.png",
    ]
    # the first thing the notebook shows after reading the log is the SRM verdict
    cells = json.loads((tmp_path / "run.ipynb").read_text())["cells"]
    shown = [
        "".join(o.get("data", {}).get("text/markdown", ""))
        for c in cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "display_data"
    ]
    assert shown[0].startswith("### SRM OK: arm counts match the design")
    # neither or both log forms: a clear error before anything is read
    with pytest.raises(pm.PapermillExecutionError, match="not both"):
        pm.execute_notebook(
            str(nb),
            str(tmp_path / "bad.ipynb"),
            parameters=params | {"log_sink": "predictions"},
            progress_bar=False,
            kernel_name="python3",
        )


@pytest.mark.postgres
def test_report_from_a_postgres_log_table_equals_the_jsonl_report(tmp_path):
    "The log as a PostgreSQL table (columns = the JSON lines' keys) gives the report the JSONL files give."
    import polars as pl

    from hsml.sinks import PostgresSink
    from hsml.testing import local_postgres

    data = tmp_path / "data"
    assert run("data", "generate", "--out", str(data), "--companies", "1500", "--seed", "2").returncode == 0
    lines = _log_lines(data)
    lines = lines + lines[3:5]  # two retried requests: logged twice, counted once
    (tmp_path / "log.jsonl").write_text("".join(lines))
    frame = pl.DataFrame([json.loads(x) for x in lines])
    typed = frame.with_columns(pl.col("as_of").str.to_date(), pl.col("timestamp").str.to_datetime())
    common = ["--data-dir", str(data), "--horizon-days", "28"]

    def report(name: str, *args: str) -> dict:
        r = run("impact", "report", *args, *common, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        return json.loads((tmp_path / name / "impact.json").read_text())

    jsonl = report("jsonl", "--log", str(tmp_path / "log.jsonl"))
    with local_postgres() as url:
        PostgresSink(url, "predictions").write(frame)  # as the service writes it: the JSON keys as columns
        PostgresSink(url, "predictions_typed").write(typed)  # as_of a date, timestamp a timestamp
        (tmp_path / "catalog.yaml").write_text(
            "".join(f"{t}:\n  type: csv\n  path: {data / f}\n" for t, f in _TABLES.items())
            + f"outputs:\n  predictions: {{type: postgres, uri: '{url}', table: predictions}}\n"
            + f"  typed: {{type: postgres, uri: '{url}', table: predictions_typed}}\n"
        )
        cat = ["--catalog", str(tmp_path / "catalog.yaml")]
        pg = report("pg", "--log-sink", "predictions", *cat)
        pg_typed = report("pg_typed", "--log-sink", "typed", *cat)
        r = run("impact", "report", "--log-sink", "nope", *cat, *common, "--out", str(tmp_path / "x"))
        assert r.returncode == 2 and "no output named 'nope'" in r.stderr and "Traceback" not in r.stderr
    assert jsonl["log"]["duplicates"] == pg["log"]["duplicates"] == pg_typed["log"]["duplicates"] == 2
    assert pg["log"]["sink"].startswith("postgres table predictions")
    drop = lambda rep: {k: v for k, v in rep.items() if k != "log"}  # noqa: E731
    assert drop(pg) == drop(jsonl) == drop(pg_typed)
    assert jsonl["srm"]["n_treatment"] + jsonl["srm"]["n_holdout"] == len(
        {json.loads(x)["id"] for x in lines}
    )


_TABLES = {"customers": "customers.csv", "noncustomers": "noncustomers.csv", "usage": "usage_actions.csv"}


def test_backtest_replays_history_against_random_and_the_activity_heuristic(tmp_path):
    "hsml impact backtest on a real bundle: per-week policies, block-bootstrap totals, and it says it is not causal."
    data = tmp_path / "data"
    assert run("data", "generate", "--out", str(data), "--companies", "1500", "--seed", "2").returncode == 0
    _bundle(tmp_path, data, "2019-03-04", "2019-10-28")
    args = ["impact", "backtest", "--model", str(tmp_path / "bundle"), "--data-dir", str(data), "--k", "30"]
    r = run(*args, "--every-days", "7", "--n-boot", "400", "--json", "--out", str(tmp_path / "bt"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep == json.loads((tmp_path / "bt" / "backtest.json").read_text())
    assert (tmp_path / "bt" / "backtest.png").exists()
    assert rep["measures"].startswith("targeting accuracy, not causal impact")
    weeks = rep["by_week"]
    assert rep["weeks"] == [weeks[0]["week"], weeks[-1]["week"]] and rep["every_days"] == 7
    assert rep["block_length_weeks"] == 4 and rep["in_sample_weeks"] == sum(
        w["week"] <= "2019-10-28" for w in weeks
    )
    for w in weeks:  # a random K reaches K x the week's conversion rate, in expectation, exactly
        assert abs(w["conversions_random"] - w["k"] * w["conversions_in_population"] / w["population"]) < 1e-9
        assert w["conversions_model"] <= min(w["k"], w["conversions_in_population"]) + 1e-9
    a = rep["all_weeks"]
    assert a["weeks"] == len(weeks) and a["calls"] == sum(w["k"] for w in weeks)
    assert a["conversions"]["model"]["value"] == sum(w["conversions_model"] for w in weeks)
    diff = a["model_minus_activity_heuristic"]["conversions"]
    assert diff["ci_low"] <= diff["value"] <= diff["ci_high"]
    assert a["conversions"]["model"]["value"] > a["conversions"]["random"]["value"]  # a useful ranking
    assert rep["out_of_sample"]["weeks"] == len(weeks) - rep["in_sample_weeks"]
    text = run(*args, "--n-boot", "200")
    assert text.returncode == 0 and "not causal impact" in text.stdout and "out of sample" in text.stdout
    bad = run(*args, "--end", "2031-01-06")
    assert bad.returncode == 2 and "past the data's end" in bad.stderr and "Traceback" not in bad.stderr
