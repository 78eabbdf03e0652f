"""`benchmarks/scale.py` on a tiny size: the local build in parts, and the Ray side skipped with the reason when the
machine is too loaded (forced here with --max-load -1), so the line says what was and was not measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def test_loaded_machine_skips_ray_and_says_so(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, str(BENCH), "--sizes", "20K", "--in-parts", "--max-load", "-1",
                        "--data-root", str(tmp_path)], capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["in_parts"] is True and line["train_rows"] > 0 and line["local_peak_mib"] > 0
    assert "load average" in line["ray_skipped"] and "> -1" in line["ray_skipped"]
    assert "ray_s" not in line and "hashes_agree" not in line and "local_error" not in line
    assert len(list((tmp_path / "rows_20000" / "train_local" / "train.parquet").glob("*.parquet"))) >= 1
