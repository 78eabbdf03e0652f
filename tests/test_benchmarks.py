"""The snapshot benchmark's value-for-value check, on a small size: hsml's training set against the plain pandas
implementation in benchmarks/pandas_reference.py (the `agree` field of benchmarks/snapshots.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "snapshots.py"


def load_bench():
    "benchmarks/snapshots.py as a module (benchmarks/ is not a package)."
    spec = importlib.util.spec_from_file_location("bench_snapshots", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    "One `--smoke` run (20k usage rows, 12 weekly as-of dates): its JSON line and its data directory."
    root = tmp_path_factory.mktemp("bench")
    r = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--data-root", str(root)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    return line, root / "rows_20000"


def test_hsml_agrees_with_the_pandas_reference(smoke):
    line, d = smoke
    assert line["agree"] is True
    assert line["train_rows"] > 1000 and line["usage_rows"] > 15_000  # the check means something
    h = pl.read_parquet(d / "hsml.parquet")
    assert h["label"].sum() > 0 and h["as_of"].n_unique() == 12
    # the output says what the pandas side is: a plain implementation, not a tuned engine
    assert "plain" in line["pandas_reference"]


def test_the_line_carries_the_panel_alone_beside_the_full_build(smoke):
    "hsml_panel_s times the references' work (panel + features, no audit or hash) and agrees with the full build."
    line, d = smoke
    assert line["agree_panel"] is True and line["agree_duckdb"] is True
    p, q, hp = line["pandas_s"], line["duckdb_s"], line["hsml_panel_s"]  # rounded to the ms: ratios to ~1%
    assert hp > 0 and line["ratio_panel"] == pytest.approx(p / hp, rel=0.02)
    assert line["ratio_duckdb_panel"] == pytest.approx(q / hp, rel=0.02)
    assert line["repeat"] == 1 and {"load_avg_start", "load_avg"} <= set(line)
    assert pl.read_parquet(d / "hsml_panel.parquet").equals(pl.read_parquet(d / "hsml.parquet"))


def h_nulls(d: Path) -> int:
    return pl.read_parquet(d / "hsml.parquet")["log_alexa_rank"].null_count()


@pytest.mark.parametrize(
    "change",
    ["value", "null", "row", "category"],
)
def test_agree_sees_a_single_difference(smoke, tmp_path, capsys, change):
    "agree() is the check: one changed value, nulls read as 0, one missing row or one relabelled category fail it."
    _, d = smoke
    bench = load_bench()
    p = pl.read_parquet(d / "pandas.parquet")
    i = p.height // 2
    if change == "value":
        p = p.with_columns(pl.when(pl.int_range(pl.len()) == i).then(pl.col("objects_used_84d") + 1)
                           .otherwise(pl.col("objects_used_84d")).alias("objects_used_84d"))  # fmt: skip
    elif change == "null":  # an unknown rank (null) read as 0
        p = p.with_columns(pl.col("log_alexa_rank").fill_null(0.0))
        assert h_nulls(d) > 0
    elif change == "row":
        p = p.filter(pl.int_range(pl.len()) != i)
    else:
        known = p.filter(pl.col("industry").is_not_null())["industry"][0]
        p = p.with_columns(pl.col("industry").cast(pl.String).replace(known, known + "x"))
    p.write_parquet(tmp_path / "pandas.parquet")
    assert bench.agree(d / "hsml.parquet", d / "pandas.parquet")  # unchanged, they agree
    assert not bench.agree(d / "hsml.parquet", tmp_path / "pandas.parquet")
    err = capsys.readouterr().err
    want = {
        "value": "objects_used_84d",
        "null": "log_alexa_rank",
        "row": "population",
        "category": "industry",
    }
    assert want[change] in err, err


def test_train_loop_smoke_prints_wall_floor_and_stages():
    "benchmarks/train_loop.py --smoke: one JSON line with wall_s, floor_s (papermill on a one-cell notebook), stages."
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_loop.py"), "--smoke", "--n-boot", "20"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["bench"] == "train_loop" and 0 < line["floor_s"] < line["wall_s"]
    assert line["over_floor_s"] == pytest.approx(line["wall_s"] - line["floor_s"], abs=0.002)
    for stage in ("kernel_start", "imports", "data", "features", "fit", "evaluation", "bundle", "finalize"):
        assert line[f"{stage}_s"] is not None, stage
    assert len(line["floor_runs_s"]) == 2 and len(line["loadavg_1m_before_after"]) == 2
