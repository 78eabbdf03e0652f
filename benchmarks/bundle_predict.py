"""`Bundle` prediction speed on 1000-row batches beside the bare LightGBM booster, one thread, in process.

    .venv/bin/python benchmarks/bundle_predict.py            # the model of benchmarks/serve.py (sample data)
    .venv/bin/python benchmarks/bundle_predict.py --smoke    # tiny data, a few seconds

Prints one JSON line: `bundle_batch1000_rows_per_s` (`Bundle.predict_rows` on tuples, the HTTP service's
path), `bundle_frame_batch1000_rows_per_s` (`Bundle.predict` on a polars frame),
`bundle_records_batch1000_rows_per_s` (`Bundle.predict_records` on dicts), and beside them
`bare_booster_batch1000_rows_per_s`: `lightgbm.Booster.predict(Z, num_threads=1)` on the same rows, already
as the model's float64 matrix. `ratio` is bundle / bare. `profile_us_per_batch` splits one
`predict_rows` batch into its parts: splitting the rows into arrays, the pipeline's transforms, the booster,
and the calibration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import polars as pl

from hsml import synth
from hsml.bundle import load_bundle, save_bundle
from hsml.contracts import load_tables
from hsml.models import columns_from_spec, fit_model, make_model
from hsml.trainset import build_training_set


def train_bundle(work: Path, companies: int) -> tuple[Path, pl.DataFrame]:
    "Sample data -> training set -> default lgbm pipeline -> bundle (as benchmarks/serve.py and train.ipynb do)."
    synth.generate(work / "data", companies=companies, seed=0)
    tables = load_tables(work / "data")
    end = tables.usage["WHEN_TIMESTAMP"].max().date() - dt.timedelta(days=56)
    ts = build_training_set(tables, end - dt.timedelta(days=28 * 12), end, 28, 56)
    frame = ts.frame
    if int(frame["label"].sum()) < 5:  # tiny smoke data: make sure the model can be fitted
        frame = frame.with_columns(label=pl.Series(np.random.default_rng(0).integers(0, 2, frame.height)))
    num, cat = columns_from_spec(ts.spec)
    pipe = fit_model(make_model("lgbm", num, cat, seed=0), frame, horizon_days=56)
    meta = {"name": "bench-lgbm", "model": "lgbm", "feature_set": "default", "horizon_days": 56}
    return save_bundle(work / "model", pipe, ts.spec, {}, meta, train_frame=frame), frame


def rate(fn, reps: int, rows: int = 1000) -> float:
    "Rows per second of fn() (best of three rounds of `reps` calls, after a warm-up)."
    fn()
    best = min(_timed(fn, reps) for _ in range(3))
    return rows * reps / best


def _timed(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t


def us(fn, reps: int) -> float:
    "Microseconds per call of fn()."
    fn()
    return round(min(_timed(fn, reps) for _ in range(3)) / reps * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--companies", type=int, default=5200)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    companies, reps = (600, 5) if a.smoke else (a.companies, a.reps)
    with tempfile.TemporaryDirectory() as d:
        path, frame = train_bundle(Path(d), companies)
        b = load_bundle(path).set_threads(1)
        assert b.fast, b.fast_problem
        c = b.compiled
        X = frame.select(b.feature_names)
        idx = [(i * 997) % X.height for i in range(1000)]
        batch = X[idx]
        rows = [tuple(r) for r in batch.iter_rows()]
        records = batch.to_dicts()
        Xn, cs = b.split_rows(rows)
        Z = c.transform(Xn, cs)
        booster = c.booster
        same = np.array_equal(b.predict_rows(rows), b.predict(batch)) and np.array_equal(
            b.predict_rows(rows), b.predict_records(records)
        )
        bare = rate(lambda: booster.predict(Z, num_threads=1), reps)
        fast = rate(lambda: b.predict_rows(rows), reps)
        out = {
            "bench": "bundle_predict",
            "rows": 1000,
            "trees": booster.num_trees(),
            "features": len(b.feature_names),
            "bundle_batch1000_rows_per_s": round(fast),
            "bundle_frame_batch1000_rows_per_s": round(rate(lambda: b.predict(batch), reps)),
            "bundle_records_batch1000_rows_per_s": round(rate(lambda: b.predict_records(records), reps)),
            "bare_booster_batch1000_rows_per_s": round(bare),
            "ratio": round(fast / bare, 3),
            "profile_us_per_batch": {
                "split_rows": us(lambda: b.split_rows(rows), reps),
                "split_frame": us(lambda: b.split_frame(batch), reps),
                "split_records": us(lambda: b.split_records(records), reps),
                "transform": us(lambda: c.transform(Xn, cs), reps),
                "raw_booster": us(lambda: c.raw_fn(Z), reps),
                "score_with_calibration": us(lambda: c.score_fn(Z), reps),
            },
            "paths_agree": bool(same),
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
