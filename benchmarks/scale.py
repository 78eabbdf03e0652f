"""Benchmark: the training set built locally vs as Ray tasks over id-hash partitions, on this machine's CPUs.

For each size (usage rows) it reuses the generated data of `benchmarks/snapshots.py` (cached under --data-root),
then builds the same training set (12 weekly as-of dates, 56-day horizon, the `default` feature set, leakage audit
included) twice, each in its own subprocess so that peak memory is per run:

- local: `hsml.trainset.build_training_set` over a lazy Parquet scan of the usage (one process);
- ray: `hsml.scale.build_training_set_ray` on a local Ray with --cpus CPUs (or the cluster at $RAY_ADDRESS), one
  task per partition; the driver writes the partitioned Parquet, concatenates the slices and runs the audit.

One JSON line per size:

    {"usage_rows": ..., "companies": ..., "train_rows": ..., "partitions": ..., "cpus": ..., "in_parts": ...,
     "local_s": ..., "ray_s": ..., "ray_start_s": ..., "local_peak_mib": ..., "ray_driver_peak_mib": ...,
     "ray_worker_peak_mib": ..., "hashes_agree": true|false, "load_avg": ..., "load_avg_before_ray": ...}

At 50M usage rows (--big) the training set (about ten million rows, 3.4 GB as one frame) is built in parts, one
Parquet file per as-of date: `build_training_set_parts` locally, `build_training_set_ray_parts` on Ray (tasks
write their slices, the driver never holds the whole frame); --in-parts does the same at every size
(`"in_parts"` says which). A local Ray does not start its raylet on this two-core machine when the 1-minute load
average is above --max-load (8): the Ray side is then not started, and the line says so in `"ray_skipped"` beside
the local figures. A Ray run that fails is reported in `"ray_error"`.

`ray_s` is the build's wall time on a running Ray (partitioned write included); starting the local Ray is
`ray_start_s`, apart. `ray_worker_peak_mib` is the largest peak resident memory of any worker process. The
machine is shared: the 1-minute load average is printed beside the times.

With --ingest it measures instead the streaming ingestion and the local build from the raw CSVs, each command in
its own process. `*_peak_mib` is the kernel's peak resident memory of that process (`ru_maxrss`, exact);
`*_sampled_peak_mib` is psutil's sample every 0.1 s (it can miss short spikes), and the process is killed when the
sample is above --limit-mib so a run that would not fit cannot take the shared machine's memory:

    {"usage_rows": ..., "csv_bytes": ..., "data_check_s": ..., "data_check_peak_mib": ...,
     "features_build_s": ..., "features_build_peak_mib": ..., "train_rows": ..., "as_of_dates": ...,
     "limit_mib": ..., "goal_peak_mib": 4096, "load_avg": [1, 5, 15 min]}

`hsml features build` runs with --parts (one file per as-of date, a date at a time).

Usage: python benchmarks/scale.py [--sizes 5M] [--big] [--partitions 4] [--cpus 2] [--in-parts] [--data-root DIR]
       python benchmarks/scale.py --ingest [--sizes 5M] [--big] [--every-days 7] [--limit-mib 6000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def snapshots_bench():
    "benchmarks/snapshots.py as a module: its data preparation and as-of grid are reused."
    spec = importlib.util.spec_from_file_location("bench_snapshots", HERE / "snapshots.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tables(d: Path):
    import polars as pl

    class T:
        usage = pl.scan_parquet(d / "usage.parquet")
        fingerprints: dict = {}

        def companies(self):
            return pl.read_parquet(d / "companies.parquet")

    return T()


def run(which: str, d: Path, partitions: int, cpus: int, parts: bool) -> dict:
    b = snapshots_bench()
    args = (tables(d), b.AS_OF_START, b.AS_OF_END, b.EVERY, b.HORIZON)
    out = (d / f"train_{which}" / "train.parquet",) if parts else ()  # the parts builds write as they go
    if which == "local":
        from hsml.trainset import build_training_set, build_training_set_parts

        t0 = time.perf_counter()
        ts = (build_training_set_parts if parts else build_training_set)(*args, *out)
        res = {"seconds": time.perf_counter() - t0}
    else:
        from hsml.scale import build_training_set_ray, build_training_set_ray_parts, ray_session

        t0 = time.perf_counter()
        with ray_session(num_cpus=cpus):
            started = time.perf_counter()
            stats: dict = {}
            build = build_training_set_ray_parts if parts else build_training_set_ray
            ts = build(*args, *out, partitions=partitions, stats=stats)
            res = {"seconds": time.perf_counter() - started, "start_s": started - t0, **stats}
    res.update(hash=ts.content_hash, train_rows=ts.rows,
               peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    return res


def spawn(which: str, d: Path, partitions: int, cpus: int, parts: bool) -> dict:
    "One build in its own process (peak memory is per run); a failed run gives {'error': the end of its stderr}."
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, __file__, "--child", which, "--dir", str(d), "--partitions", str(partitions),
           "--cpus", str(cpus), *(["--in-parts"] if parts else [])]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-600:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def watched(cmd: list[str], limit_mib: float) -> dict:
    """Run `cmd`; its wall seconds, peak resident MiB, exit code and output.

    `peak_mib` is the kernel's own peak resident memory of the process (`ru_maxrss` from `wait4`): exact, where a
    sample every 0.1 s misses short spikes. The sampled peak (the process and its children) is kept as
    `sampled_peak_mib`, and it is what kills the command above `limit_mib`."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})  # fmt: skip
    ps, peak, killed = psutil.Process(proc.pid), 0.0, False
    while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
        try:
            rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]) / 2**20
        except psutil.Error:
            rss = 0.0
        peak = max(peak, rss)
        if rss > limit_mib:
            proc.kill()
            killed = True
        time.sleep(0.1)
    _, status, usage = waited
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    return {"seconds": time.perf_counter() - t0, "peak_mib": usage.ru_maxrss / 1024, "sampled_peak_mib": peak,
            "code": proc.returncode, "killed": killed, "stdout": out, "stderr": err}  # fmt: skip


def ingest(n: int, root: Path, every_days: int, limit_mib: float) -> dict:
    "`hsml data check` and `hsml features build` on the raw CSVs of `n` usage rows, each watched."
    from hsml import synth

    b = snapshots_bench()
    raw = root / f"rows_{n}" / "csv"
    if not (raw / "usage_actions.csv").exists():
        synth.generate(raw, companies=max(n // 50, 100), seed=0, usage_rows=n)
    exe = str(Path(sys.executable).parent / "hsml")
    chk = watched([exe, "data", "check", str(raw), "--json"], limit_mib)
    out = root / f"rows_{n}" / "train" / "train.parquet"
    build = watched([exe, "features", "build", "--data-dir", str(raw), "--as-of-start", b.AS_OF_START,
                     "--as-of-end", b.AS_OF_END, "--every-days", str(every_days), "--horizon-days", str(b.HORIZON),
                     "--out", str(out), "--parts"], limit_mib)  # fmt: skip
    rows = None
    if build["code"] == 0:
        import polars as pl

        rows = pl.scan_parquet(out).select(pl.len()).collect().item()
    rep = json.loads(chk["stdout"]) if chk["code"] in (0, 2) and chk["stdout"].strip() else {}
    line = {
        "usage_rows": rep.get("usage", {}).get("rows_in"),
        "csv_bytes": sum(f.stat().st_size for f in raw.glob("*.csv")),
        "data_check_s": round(chk["seconds"], 1),
        "data_check_peak_mib": round(chk["peak_mib"]),
        "data_check_sampled_peak_mib": round(chk["sampled_peak_mib"]),
        "data_check_exit": chk["code"],
        "features_build_s": round(build["seconds"], 1),
        "features_build_peak_mib": round(build["peak_mib"]),
        "features_build_sampled_peak_mib": round(build["sampled_peak_mib"]),
        "features_build_exit": build["code"],
        "train_rows": rows,
        "as_of_dates": len(range(0, (_days(b.AS_OF_END) - _days(b.AS_OF_START)) + 1, every_days)),
        "in_parts": True,
        "killed_above_limit": [k for k, r in (("data_check", chk), ("features_build", build)) if r["killed"]],
        "limit_mib": limit_mib,
        "goal_peak_mib": 4096,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    for k, r in (("data_check", chk), ("features_build", build)):
        if r["code"] != 0 and not r["killed"]:
            line[f"{k}_error"] = r["stderr"].strip()[-500:]
    return line


def _r(x: float | None, nd: int | None = None) -> float | None:
    "round(x, nd), None for a run that did not give x."
    return None if x is None else round(x, nd)


def _days(d: str) -> int:
    import datetime as dt

    return dt.date.fromisoformat(d).toordinal()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5M", help="usage-row counts, e.g. 1M,5M")
    ap.add_argument("--big", action="store_true", help="add 50M usage rows (generating them takes a while)")
    ap.add_argument("--partitions", type=int, help="partitions of the Ray build (default 4; 16 at 50M)")
    ap.add_argument("--in-parts", action="store_true", help="build in parts at every size (always at 50M)")
    ap.add_argument("--max-load", type=float, default=8.0, help="do not start a local Ray above this load")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--data-root", default="/tmp/hsml_bench", help="where generated data is cached")
    ap.add_argument(
        "--ingest", action="store_true", help="measure data check and features build from the CSVs"
    )
    ap.add_argument("--every-days", type=int, default=7, help="with --ingest: days between as-of dates")
    ap.add_argument(
        "--limit-mib", type=float, default=6000, help="with --ingest: kill a command above this RSS"
    )
    ap.add_argument("--child", choices=["local", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run(a.child, Path(a.dir), a.partitions, a.cpus, a.in_parts)))
        return
    b = snapshots_bench()
    sizes = sorted({b.parse_size(s) for s in a.sizes.split(",")} | ({50_000_000} if a.big else set()))
    root = Path(a.data_root)
    root.mkdir(parents=True, exist_ok=True)
    if a.ingest:
        for n in sizes:
            print(json.dumps(ingest(n, root, a.every_days, a.limit_mib)), flush=True)
        return
    for n in sizes:
        d = b.prepare(n, root)
        import polars as pl

        usage_rows = pl.scan_parquet(d / "usage.parquet").select(pl.len()).collect().item()
        companies = pl.scan_parquet(d / "companies.parquet").select(pl.len()).collect().item()
        parts, partitions = a.in_parts or n >= 20_000_000, a.partitions or (16 if n >= 20_000_000 else 4)
        loc = spawn("local", d, partitions, a.cpus, parts)
        line = {"usage_rows": usage_rows, "companies": companies, "train_rows": loc.get("train_rows"),
                "partitions": partitions, "cpus": a.cpus, "in_parts": parts, "local_s": _r(loc.get("seconds"), 2),
                "local_peak_mib": _r(loc.get("peak_mib")), **({"local_error": loc["error"]} if "error" in loc else {})}  # fmt: skip
        load = os.getloadavg()[0]
        if load > a.max_load and not os.environ.get("RAY_ADDRESS"):
            line["ray_skipped"] = (f"1-minute load average {load:.1f} > {a.max_load:g}: a local Ray does not start its "
                                   "raylet on this shared 2-core machine at that load; rerun when it is quieter "
                                   "(or set RAY_ADDRESS to a cluster)")  # fmt: skip
        else:
            ray = spawn("ray", d, partitions, a.cpus, parts)
            line.update(ray_s=_r(ray.get("seconds"), 2), ray_start_s=_r(ray.get("start_s"), 2),
                        ray_driver_peak_mib=_r(ray.get("peak_mib")),
                        ray_worker_peak_mib=max(ray.get("worker_peak_mib") or [None], key=lambda m: m or 0),
                        hashes_agree=("hash" in loc and loc.get("hash") == ray.get("hash")),
                        **({"ray_error": ray["error"]} if "error" in ray else {}))  # fmt: skip
        line.update(load_avg=round(os.getloadavg()[0], 2), load_avg_before_ray=round(load, 2))
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
