"""`--engine ray --parts`: the training set written in parts by Ray tasks is the local one, file for file.

The slices stay with the tasks (written to the work directory) and the driver cuts them by as-of date, so the
driver never holds the whole training set (issue 11 §2 at 50M). One local Ray with 2 CPUs, small data.
"""

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from hsml import synth
    from hsml.contracts import load_tables

    d = tmp_path_factory.mktemp("scale_parts")
    synth.generate(d / "data", companies=600, seed=4)
    tables = load_tables(d / "data")
    last = tables.usage["WHEN_TIMESTAMP"].max().date()
    return {
        "dir": d,
        "tables": tables,
        "args": (tables, last - dt.timedelta(days=112), last - dt.timedelta(days=28), 14, 28),
    }


def test_ray_parts_match_the_local_build(data, tmp_path):
    from hsml.scale import build_training_set_ray_parts, ray_session
    from hsml.trainset import TrainingSet, build_training_set, build_training_set_parts

    whole = build_training_set(*data["args"])
    local = build_training_set_parts(*data["args"], tmp_path / "l" / "t.parquet")
    stats: dict = {}
    with ray_session(num_cpus=2):
        ray = build_training_set_ray_parts(
            *data["args"], tmp_path / "r" / "t.parquet", partitions=3, stats=stats
        )
    assert ray.content_hash == local.content_hash == whole.content_hash
    assert ray.audit == local.audit == whole.audit and ray.audit["ok"]
    assert ray.parts == local.parts and stats["partitions"] == 3 and sum(stats["rows"]) == whole.frame.height
    for name in ray.parts:  # file for file
        assert pl.read_parquet(tmp_path / "r" / "t.parquet" / name).equals(
            pl.read_parquet(tmp_path / "l" / "t.parquet" / name)
        )
    assert TrainingSet.load(tmp_path / "r" / "t.parquet").content_hash == whole.content_hash
    assert ray.config["engine"] == {"name": "ray", "partitions": 3}


def test_cli_engine_ray_parts(data, tmp_path):
    from hsml.trainset import TrainingSet, build_training_set

    whole = build_training_set(*data["args"])
    _, start, end, every, horizon = data["args"]
    hsml = Path(sys.executable).parent / "hsml"
    r = subprocess.run([str(hsml), "features", "build", "--data-dir", str(data["dir"] / "data"), "--as-of-start",
                        str(start), "--as-of-end", str(end), "--every-days", str(every), "--horizon-days", str(horizon),
                        "--out", str(tmp_path / "t.parquet"), "--engine", "ray", "--partitions", "2", "--parts"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert whole.content_hash in r.stdout and (tmp_path / "t.parquet").is_dir()
    assert TrainingSet.load(tmp_path / "t.parquet").parts == [f"{d}.parquet" for d in whole.summary["as_of"]]
