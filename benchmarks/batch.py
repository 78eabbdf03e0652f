"""Benchmark: batch scoring of N prospects end to end, the path of `hsml score` (read, contracts, features, predict, write).

    .venv/bin/python benchmarks/batch.py                  # 1M prospects
    .venv/bin/python benchmarks/batch.py --rows 20000     # a quick run

It trains the default LightGBM bundle on sample data of the real extract's size (as `benchmarks/serve.py` does),
generates `rows` companies of sample data (not timed), then times the stages `hsml score DATA --out FILE.parquet`
runs, in order:

- `read_contracts_s`: `hsml.contracts.load_tables` (read the CSVs, apply the contracts, quarantine, report);
- `score_frame_s`: `hsml.score.score_frame` (population, as-of panel, features, predict, reasons, ranks);
- `write_s`: `hsml.score.write_scores` to Parquet.

One JSON line: `batch_end_to_end_rows_per_s` is the prospects on the list divided by the sum of the three, with
`threads` (the pieces `hsml score` scores at once by default: every core, `hsml.score.score_threads`), each
stage's wall and CPU seconds (`*_cpu_s`, all threads: on a shared machine the wall time grows with the load,
the CPU time much less), the peak resident memory and the load averages (1, 5, 15 minutes).
`run_batch_end_to_end` returns the same dict (`benchmarks/serve.py` imports it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

GOAL_ROWS_PER_S = 100_000


def _train_bundle(work: Path, companies: int = 5200) -> Path:
    "Sample data -> training set -> default lgbm pipeline -> bundle directory."
    import numpy as np
    import polars as pl

    from hsml import synth
    from hsml.bundle import save_bundle
    from hsml.contracts import load_tables
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.trainset import build_training_set

    synth.generate(work / "train_data", companies=companies, seed=0)
    tables = load_tables(work / "train_data")
    end = tables.usage["WHEN_TIMESTAMP"].max().date() - dt.timedelta(days=56)
    ts = build_training_set(tables, end - dt.timedelta(days=28 * 12), end, 28, 56)
    frame = ts.frame
    if int(frame["label"].sum()) < 5:  # tiny data: make sure the model can be fitted
        frame = frame.with_columns(label=pl.Series(np.random.default_rng(0).integers(0, 2, frame.height)))
    num, cat = columns_from_spec(ts.spec)
    pipe = fit_model(make_model("lgbm", num, cat, seed=0), frame, horizon_days=56)
    meta = {"name": "bench-lgbm", "model": "lgbm", "feature_set": "default", "horizon_days": 56,
            "data_fingerprints": tables.fingerprints}  # fmt: skip
    return save_bundle(work / "model", pipe, ts.spec, {}, meta, train_frame=frame)


def run_batch_end_to_end(
    rows: int = 1_000_000,  # prospects (generated companies) to score
    work: str | Path | None = None,  # scratch directory (default: a temporary one, removed after)
    bundle: str | Path | None = None,  # a bundle directory to score with (default: train one on sample data)
    train_companies: int = 5200,  # sample-data size of the trained bundle
) -> dict:
    "Score `rows` generated prospects as `hsml score` does; the stage times, `batch_end_to_end_rows_per_s`, load average."
    if work is None:
        with tempfile.TemporaryDirectory() as d:
            return run_batch_end_to_end(rows, d, bundle, train_companies)
    from hsml import synth
    from hsml.bundle import load_bundle
    from hsml.contracts import load_tables
    from hsml.score import score_frame, score_threads, write_scores

    work = Path(work)
    t = time.perf_counter()
    bdir = Path(bundle) if bundle else _train_bundle(work, train_companies)
    b = load_bundle(bdir)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    data = work / f"prospects_{rows}"
    if not (data / "usage_actions.csv").exists():
        synth.generate(data, companies=rows, seed=1)
    gen_s = time.perf_counter() - t
    stages, cpu = {}, {}

    def timed(name: str, fn, *args, **kw):
        t, c = time.perf_counter(), time.process_time()
        res = fn(*args, **kw)
        stages[f"{name}_s"], cpu[f"{name}_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        return res

    tables = timed("read_contracts", load_tables, data)
    out = timed("score_frame", score_frame, b, tables, "latest", progress=False)
    timed("write", write_scores, out, work / "scores.parquet")
    total = sum(stages.values())
    scored = int(out["score"].is_not_null().sum())
    return {
        "case": "batch_end_to_end",
        "prospects": rows,
        "list_rows": out.height,
        "scored_rows": scored,
        "usage_rows": tables.report.tables["usage"].rows_in,
        "batch_end_to_end_rows_per_s": round(out.height / total),
        "batch_end_to_end_s": round(total, 2),
        "threads": score_threads(),  # what `hsml score` uses by default, not a benchmark setting
        **{k: round(v, 2) for k, v in stages.items()},
        **{
            k: round(v, 2) for k, v in cpu.items()
        },  # CPU seconds of all threads: a loaded machine inflates wall
        "goal_rows_per_s": GOAL_ROWS_PER_S,
        "generate_s": round(gen_s, 1),
        "train_bundle_s": round(train_s, 1),
        "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="prospects to score")
    ap.add_argument("--work", default=None, help="scratch directory (kept; generated data is reused)")
    a = ap.parse_args()
    print(json.dumps(run_batch_end_to_end(a.rows, a.work)), flush=True)


if __name__ == "__main__":
    main()
