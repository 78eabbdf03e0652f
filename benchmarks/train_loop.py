"""Wall time of the papermill training run (experiments/train.ipynb via `hsml.runs.train_main`) on sample data
the size of the real extract (~5k companies, ~25k usage rows, 13 as-of dates), split into stages:
kernel start, imports, data, features, fit, evaluation, bundle, tracking, finalize (from the run's timings.json).

Reference, measured in the same run: the same pipeline in-process (load tables, build the training set, fit,
evaluate with the same bootstrap), without kernel, notebook, run directory or tracking. The difference is the
cost of the notebook + run-directory + W&B machinery.

    python benchmarks/train_loop.py            # full size, tracking offline
    python benchmarks/train_loop.py --smoke    # tiny and quick (800 companies, tracking disabled)

Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def reference(data_dir: Path, p: dict) -> dict:
    "The same work in-process: data, features, fit, evaluation (no notebook, no tracking)."
    from hsml.contracts import load_tables
    from hsml.evaluate import evaluate_model, report_plots, save_plots, time_split
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.trainset import build_training_set

    t = {}
    s = time.perf_counter()
    tables = load_tables(data_dir)
    t["data"] = time.perf_counter() - s
    s = time.perf_counter()
    ts = build_training_set(
        tables, p["as_of_start"], p["as_of_end"], p["every_days"], p["horizon_days"], p["feature_set"]
    )
    t["features"] = time.perf_counter() - s
    s = time.perf_counter()
    train, test = time_split(ts.frame, p["test_from"], p["horizon_days"])
    num, cat = columns_from_spec(ts.spec)
    pipe = fit_model(make_model(p["model"], num, cat, seed=p["seed"], **p["model_params"]), train)
    t["fit"] = time.perf_counter() - s
    s = time.perf_counter()
    evaluate_model(pipe, train, test, capacities=p["capacities"], seed=p["seed"], n_boot=p["n_boot"])
    with tempfile.TemporaryDirectory() as d:
        save_plots(report_plots(pipe, train, test, capacities=p["capacities"], seed=p["seed"]), d)
    t["evaluation"] = time.perf_counter() - s
    return {k: round(v, 3) for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny data, tracking disabled")
    ap.add_argument("--companies", type=int, default=None)
    ap.add_argument("--model", default="lgbm")
    ap.add_argument("--tracking", default=None, help="offline (default) | disabled")
    ap.add_argument("--n-boot", type=int, default=200)
    a = ap.parse_args()
    companies = a.companies or (800 if a.smoke else 5200)
    tracking = a.tracking or ("disabled" if a.smoke else "offline")

    import polars as pl

    from hsml import synth
    from hsml.runs import as_of_dates, train_main

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        s = time.perf_counter()
        synth.generate(data, companies=companies, seed=0)
        gen_s = time.perf_counter() - s
        usage_rows = pl.scan_csv(data / "usage_actions.csv").select(pl.len()).collect().item()

        s = time.perf_counter()
        run = train_main(
            {
                "model": a.model,
                "data_dir": str(data),
                "run_dir": str(tmp / "runs"),
                "tracking": tracking,
                "n_boot": a.n_boot,
            },
            quiet=True,
        )
        wall = time.perf_counter() - s
        timings = json.loads((run / "timings.json").read_text())
        import yaml

        p = yaml.safe_load((run / "config.yaml").read_text())
        ref = reference(data, p)

    stages = [
        "kernel_start",
        "imports",
        "data",
        "features",
        "fit",
        "evaluation",
        "bundle",
        "tracking",
        "finalize",
    ]
    out = {
        "bench": "train_loop",
        "smoke": a.smoke,
        "model": a.model,
        "tracking": tracking,
        "companies": companies,
        "usage_rows": usage_rows,
        "as_of_dates": len(as_of_dates(p)),
        "n_boot": a.n_boot,
        "generate_data_s": round(gen_s, 3),
        "wall_s": round(wall, 3),
        **{f"{k}_s": timings.get(k) for k in stages},
        "papermill_total_s": timings.get("papermill_total"),
        # wrapper in the parent process: parameter validation (imports the model registry) + importing papermill
        "wrapper_overhead_s": round(wall - (timings.get("papermill_total") or 0), 3),
        # inside papermill but outside the timed stages: notebook I/O, cell round trips, kernel shutdown
        "papermill_overhead_s": round(
            (timings.get("papermill_total") or 0) - sum(timings.get(k) or 0 for k in stages), 3
        ),
        "reference_inprocess_s": round(sum(ref.values()), 3),
        "reference": ref,
        "overhead_vs_reference": round(wall / max(sum(ref.values()), 1e-9), 2),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
