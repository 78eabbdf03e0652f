"""`--engine ray` gives the local results: the training set (content hash), the audit verdict, the scored list.

One local Ray with 2 CPUs is started for the module and shut down after it; the data is small (600 companies) so
the module stays short in `make test`.
"""

import datetime as dt
import sys

import numpy as np
import polars as pl
import pytest

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray2():
    "A local Ray with 2 CPUs for this module, shut down after it (or the cluster at $RAY_ADDRESS when it is set)."
    from hsml.scale import ray_session

    with ray_session(num_cpus=2) as ray:
        yield ray


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from hsml import synth
    from hsml.contracts import load_tables

    d = tmp_path_factory.mktemp("scale")
    synth.generate(d / "data", companies=600, seed=4)
    tables = load_tables(d / "data")
    last = tables.usage["WHEN_TIMESTAMP"].max().date()
    args = (tables, last - dt.timedelta(days=112), last - dt.timedelta(days=28), 14, 28)
    return {"dir": d, "tables": tables, "args": args}


def test_import_hsml_does_not_import_ray():
    import subprocess

    code = "import hsml, hsml.trainset, hsml.score, hsml.scale, sys; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_partitions_are_stable_and_cover_every_row(data, tmp_path):
    from hsml.scale import partition_of, write_partitions

    ids = pl.DataFrame({"id": [1, 2, 3, 6, 7]}).select(partition_of("id", 4))["id"].to_list()
    assert ids == [1, 2, 1, 0, 3]  # splitmix64: the same in every process and version
    part = write_partitions(data["tables"], tmp_path / "p", 5)
    assert (
        sum(part.part(p).usage.select(pl.len()).collect().item() for p in range(5))
        == data["tables"].usage.height
    )
    assert "_part=3" in part.part(3).usage.explain()  # the scan opens only its own partition


def test_training_set_hash_and_audit_match_local(data, ray2):
    from hsml.scale import build_training_set_ray
    from hsml.trainset import build_training_set

    local = build_training_set(*data["args"])
    stats = {}
    remote = build_training_set_ray(*data["args"], partitions=3, stats=stats)
    assert remote.content_hash == local.content_hash
    assert remote.audit == local.audit and remote.audit["ok"]
    assert remote.frame.equals(local.frame)
    assert stats["partitions"] == 3 and sum(stats["rows"]) == local.frame.height


def test_leak_fails_the_same_way_on_both_engines(data, ray2):
    "A notebook-defined feature (shipped to the workers) that reads usage after as_of: both audits refuse it alike."
    from hsml.features import FEATURE_SETS, FEATURES, feature, register_feature_set
    from hsml.leakage import LeakageError
    from hsml.scale import build_training_set_ray
    from hsml.trainset import build_training_set

    @feature(name="email_actions_all_time", kind="frame", description="all email actions, even after as_of")
    def leak(events, spine):
        tot = events.group_by("id").agg(pl.col("ACTIONS_EMAIL").sum().alias("email_actions_all_time"))
        return spine.join(tot, on="id", how="left")

    register_feature_set("leaky", ["actions_total_sum_28d", "email_actions_all_time"])
    try:
        errors = []
        for build in (build_training_set, build_training_set_ray):
            with pytest.raises(LeakageError) as e:
                build(*data["args"], feature_set="leaky")
            errors.append(str(e.value))
        assert "events_before_as_of" in errors[0]
        assert errors[0] == errors[1]
    finally:
        FEATURES.pop("email_actions_all_time", None)
        FEATURE_SETS.pop("leaky", None)


@pytest.fixture(scope="module")
def bundle(data, ray2):
    from hsml.bundle import load_bundle, save_bundle
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.trainset import build_training_set

    ts = build_training_set(*data["args"])
    f = ts.frame
    busy = f["actions_total_sum_84d"].fill_null(0).to_numpy()
    f = f.with_columns(label=pl.Series((busy > np.quantile(busy, 0.7)).astype(np.int8)))
    num, cat = columns_from_spec(ts.spec)
    pipe = fit_model(
        make_model("lgbm", num, cat, seed=0, n_estimators=20, min_child_samples=5), f, horizon_days=28
    )
    meta = {"name": "scale-test", "model": "lgbm", "feature_set": "default", "horizon_days": 28}
    path = save_bundle(data["dir"] / "model", pipe, ts.spec, {}, meta, train_frame=f)
    return path, load_bundle(path)


def test_scored_list_matches_local(data, bundle):
    from hsml.scale import score_frame_ray
    from hsml.score import score_frame

    _, b = bundle
    local = score_frame(b, data["tables"], "latest")
    remote = score_frame_ray(b, data["tables"], "latest", partitions=3)
    assert local["unscored_reason"].null_count() > 100
    assert remote.equals(local), (remote.head(), local.head())


def test_cli_engine_ray(data, bundle, tmp_path):
    "`hsml features build --engine ray` and `hsml score --engine ray` write what the local engine writes."
    from typer.testing import CliRunner

    from hsml.cli import app
    from hsml.trainset import TrainingSet

    tables, a = data["tables"], data["args"]
    common = ["--data-dir", str(data["dir"] / "data"), "--as-of-start", str(a[1]), "--as-of-end", str(a[2]),
              "--every-days", "14", "--horizon-days", "28"]  # fmt: skip
    run = CliRunner().invoke
    r = run(app, ["features", "build", *common, "--out", str(tmp_path / "r" / "t.parquet"), "--engine", "ray",
                  "--partitions", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run(app, ["features", "build", *common, "--out", str(tmp_path / "l" / "t.parquet")])
    assert r.exit_code == 0, r.output
    assert (
        TrainingSet.load(tmp_path / "r" / "t.parquet").content_hash
        == TrainingSet.load(tmp_path / "l" / "t.parquet").content_hash
    )
    path, _ = bundle
    for engine in ("ray", "local"):
        r = run(app, ["score", "--model", str(path), "--data-dir", str(data["dir"] / "data"), "--out",
                      str(tmp_path / f"{engine}.parquet"), "--engine", engine])  # fmt: skip
        assert r.exit_code == 0, r.output
    assert pl.read_parquet(tmp_path / "ray.parquet").equals(pl.read_parquet(tmp_path / "local.parquet"))
    r = run(app, ["score", "--model", str(path), "--data-dir", str(data["dir"] / "data"), "--out",
                  str(tmp_path / "x.parquet"), "--engine", "spark"])  # fmt: skip
    assert r.exit_code == 2 and "unknown engine 'spark'" in r.output
    del tables


def test_duckdb_reference_agrees_with_hsml(tmp_path):
    "benchmarks/duckdb_reference.py (the SQL the speed goal is measured against) gives hsml's training set, value for value."
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("bench_snapshots_scale", root / "snapshots.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d = bench.prepare(20_000, tmp_path)
    bench.run_hsml(d, d / "hsml.parquet")
    bench.run_duckdb(d, d / "duckdb.parquet")
    h = pl.read_parquet(d / "hsml.parquet")
    assert h.height > 1000 and h["label"].sum() > 0 and h["days_since_last_activity"].null_count() < h.height
    assert bench.agree(d / "hsml.parquet", d / "duckdb.parquet")
    q = pl.read_parquet(d / "duckdb.parquet")  # the check sees a single changed value
    q = q.with_columns(pl.when(pl.int_range(pl.len()) == q.height // 2).then(pl.col("active_periods_84d") + 1)
                       .otherwise(pl.col("active_periods_84d")).alias("active_periods_84d"))  # fmt: skip
    q.write_parquet(d / "changed.parquet")
    assert not bench.agree(d / "hsml.parquet", d / "changed.parquet")


def test_a_task_error_is_one_clear_message(data, ray2):
    "An HsmlError raised inside a Ray task reaches the caller as itself (the CLI's exit 2), not a RayTaskError."
    from hsml.core import HsmlError
    from hsml.features import FEATURE_SETS, FEATURES, feature, register_feature_set
    from hsml.scale import build_training_set_ray

    @feature(name="refuses", kind="frame", description="a feature that refuses its input")
    def refuses(events, spine):
        raise HsmlError("refuses: the usage has no column ACTIONS_FAX")

    register_feature_set("refusing", ["actions_total_sum_28d", "refuses"])
    try:
        with pytest.raises(HsmlError, match="no column ACTIONS_FAX") as e:
            build_training_set_ray(*data["args"], feature_set="refusing", partitions=2)
        assert type(e.value) is HsmlError
    finally:
        FEATURES.pop("refuses", None)
        FEATURE_SETS.pop("refusing", None)
