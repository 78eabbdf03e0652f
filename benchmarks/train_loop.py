"""Wall time of the papermill training run (experiments/train.ipynb via `hsml.runs.train_main`) on sample data
the size of the real extract (~5k companies, ~25k usage rows, 13 as-of dates), split into stages:
kernel start, imports, data, features, fit, evaluation, attribute check, bundle, tracking, finalize (from the run's
timings.json).

Floor, measured in the same run: papermill running a one-cell notebook (`x = 1`) in a fresh Python process, with the
same kernel and kernel arguments: interpreter start, importing papermill, kernel start and shutdown, writing the
notebook. It is measured before and after the training run; `floor_s` is the smaller. The goal is on
`over_floor_s` = `wall_s - floor_s`: what the training notebook costs beyond running any notebook at all.

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
import resource
import subprocess
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
    pipe = fit_model(
        make_model(p["model"], num, cat, seed=p["seed"], **p["model_params"]),
        train,
        horizon_days=p["horizon_days"],
    )
    t["fit"] = time.perf_counter() - s
    s = time.perf_counter()
    evaluate_model(pipe, train, test, capacities=p["capacities"], seed=p["seed"], n_boot=p["n_boot"])
    with tempfile.TemporaryDirectory() as d:
        save_plots(report_plots(pipe, train, test, capacities=p["capacities"], seed=p["seed"]), d)
    t["evaluation"] = time.perf_counter() - s
    return {k: round(v, 3) for k, v in t.items()}


FLOOR = """
import sys, papermill as pm
from hsml.runs import QUIET_KERNEL
pm.execute_notebook(sys.argv[1], sys.argv[2], kernel_name="python3", progress_bar=False, extra_arguments=QUIET_KERNEL)
"""


def cpu() -> float:
    "CPU seconds of this process and of its waited-for descendants (kernel, W&B processes): load does not inflate it."
    return sum(
        r.ru_utime + r.ru_stime
        for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def floor(tmp: Path) -> float:
    "Seconds for papermill to run a one-cell notebook in a fresh process (the cost of any notebook at all)."
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    src, out = tmp / "floor.ipynb", tmp / "floor_out.ipynb"
    nbformat.write(nb, src)
    s = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", FLOOR, str(src), str(out)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the floor notebook failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - s


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

        c = cpu()
        floors = [floor(tmp)]
        floor_cpu = cpu() - c
        load_before = os.getloadavg()
        c, s = cpu(), time.perf_counter()
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
        wall, wall_cpu = time.perf_counter() - s, cpu() - c
        load_after = os.getloadavg()
        floors.append(floor(tmp))
        timings = json.loads((run / "timings.json").read_text())
        import yaml

        p = yaml.safe_load((run / "config.yaml").read_text())
        ref = reference(data, p)

    stages = [k for k in timings if k != "papermill_total"]  # in the order the run met them
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
        "floor_s": round(min(floors), 3),
        "over_floor_s": round(wall - min(floors), 3),
        "floor_runs_s": [round(f, 3) for f in floors],
        "cpu_s": round(wall_cpu, 3),  # CPU seconds of the training run, every process of it
        "floor_cpu_s": round(floor_cpu, 3),
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
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        # PYTHONDONTWRITEBYTECODE=1 (no __pycache__): every process compiles each module it imports, every time
        "writes_bytecode": not sys.dont_write_bytecode,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
