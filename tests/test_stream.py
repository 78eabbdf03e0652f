"""Streaming ingestion: usage read in chunks and id-range buckets through Parquet gives exactly the in-memory
result; a source that changes while it is read stops the load."""

from __future__ import annotations

import polars as pl
import pytest

from hsml import synth
from hsml.contracts import Policy, load_tables, validate_frames
from hsml.core import HsmlError, sha256_file
from hsml.sources import DEFAULT_FILES, TABLES, Catalog, CsvSource


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    "Generated data with usage dirt of every cross-row kind spread over the file."
    d = tmp_path_factory.mktemp("stream")
    synth.generate(d, companies=1500, seed=3)
    u = pl.read_csv(d / "usage_actions.csv", infer_schema=False)
    dirt = pl.concat(
        [
            u.slice(10, 5),  # duplicate keys
            u.slice(500, 3).with_columns(id=pl.lit("999999999")),  # unknown ids
            u.slice(900, 2).with_columns(ACTIONS_EMAIL=pl.lit("-3")),  # negative counts
            u.slice(1200, 2).with_columns(WHEN_TIMESTAMP=pl.lit("")),  # missing stamps
        ]
    )
    pl.concat([u.slice(0, 3000), dirt, u.slice(3000)]).write_csv(d / "usage_actions.csv")
    return d


def _same(a, b):
    assert a.report.to_dict() == b.report.to_dict()
    assert str(a.report) == str(b.report)
    for t in TABLES:
        assert getattr(a, t).lazy().collect().equals(getattr(b, t).lazy().collect()), t
        assert a.quarantine[t].equals(b.quarantine[t]), t
    assert a.fingerprints == b.fingerprints


def test_chunks_and_buckets_change_nothing(dirty):
    whole = load_tables(dirty, Policy(chunk_rows=10**9, companies_per_bucket=10**9))
    rep = whole.report
    assert rep.count("usage", "duplicate_key") == 5 and rep.count("usage", "unknown_id") == 3
    assert rep.count("usage", "negative_count") == 2 and rep.count("usage", "missing_value") == 2
    streamed = load_tables(dirty, Policy(chunk_rows=997, companies_per_bucket=100))
    _same(whole, streamed)
    assert isinstance(streamed.usage, pl.DataFrame)


def test_big_usage_is_a_lazy_parquet_scan(dirty):
    tb = load_tables(dirty, Policy(chunk_rows=5000, companies_per_bucket=300, usage_in_memory_rows=0))
    assert isinstance(tb.usage, pl.LazyFrame)
    _same(load_tables(dirty), tb)
    files = tb.usage.explain()  # the scan's files are removed with the tables
    del tb
    import gc

    gc.collect()
    assert "parquet" in files.lower()


def test_validate_frames_streams_the_same(dirty):
    raw = {t: pl.read_csv(dirty / f, infer_schema=False) for t, f in DEFAULT_FILES.items()}
    _same(validate_frames(raw), validate_frames(raw, policy=Policy(chunk_rows=777, companies_per_bucket=50)))


class RewrittenWhileRead(CsvSource):
    "A CSV whose writer appends a row just after hsml read it (a nightly export racing the scoring job)."

    def load(self) -> pl.LazyFrame:
        read = super().load().collect()
        with open(self.path, "a") as f:
            f.write(f"2020-01-06 00:00:00.000,1,1,1,1,1,1,1,1,{read['id'][0]}\n")
        return read.lazy()


def test_a_file_changed_while_read_stops_the_load(dirty, tmp_path):
    for f in DEFAULT_FILES.values():
        (tmp_path / f).write_bytes((dirty / f).read_bytes())
    ok = load_tables(tmp_path)
    assert ok.fingerprints["usage"] == sha256_file(tmp_path / "usage_actions.csv")
    before = ok.fingerprints["usage"]
    srcs = {t: CsvSource(tmp_path / f) for t, f in DEFAULT_FILES.items()}
    srcs["usage"] = RewrittenWhileRead(tmp_path / "usage_actions.csv")
    with pytest.raises(HsmlError) as e:
        load_tables(Catalog(srcs))
    after = sha256_file(tmp_path / "usage_actions.csv")
    msg = str(e.value)
    assert str(tmp_path / "usage_actions.csv") in msg and before in msg and after in msg, msg


def test_training_set_from_the_lazy_scan_has_the_same_hash(dirty):
    "Above `usage_in_memory_rows` the build reads the clean Parquet lazily: the same training set, hash for hash."
    import datetime as dt

    from hsml.trainset import build_training_set

    eager = load_tables(dirty)
    lazy = load_tables(dirty, Policy(chunk_rows=4000, companies_per_bucket=200, usage_in_memory_rows=0))
    assert isinstance(lazy.usage, pl.LazyFrame)
    end = dt.date.fromisoformat(eager.report.timing["latest_as_of"]) - dt.timedelta(days=56)
    args = (end - dt.timedelta(days=28 * 6), end, 28, 56)
    a, b = build_training_set(eager, *args), build_training_set(lazy, *args)
    assert a.frame.height > 0 and a.content_hash == b.content_hash
    assert a.audit == b.audit


def test_scoring_from_the_lazy_scan_gives_the_same_list(dirty, tmp_path):
    "`hsml score` on tables whose usage is a lazy Parquet scan: the same scored list."
    import datetime as dt

    from hsml.bundle import load_bundle, save_bundle
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.score import score_frame
    from hsml.trainset import build_training_set

    tb = load_tables(dirty)
    end = dt.date.fromisoformat(tb.report.timing["latest_as_of"]) - dt.timedelta(days=56)
    ts = build_training_set(tb, end - dt.timedelta(days=28 * 6), end, 28, 56)
    pipe = fit_model(make_model("lgbm", *columns_from_spec(ts.spec), seed=0), ts.frame, horizon_days=56)
    meta = {"name": "t", "model": "lgbm", "feature_set": "default", "horizon_days": 56}
    b = load_bundle(save_bundle(tmp_path / "bundle", pipe, ts.spec, {}, meta, train_frame=ts.frame))
    eager = score_frame(b, tb, "latest", progress=False)
    lazy = score_frame(b, load_tables(dirty, Policy(usage_in_memory_rows=0)), "latest", progress=False)
    assert eager.height > 0 and eager.equals(lazy)


def test_batch_benchmark_smoke(tmp_path):
    "benchmarks/batch.py on a few hundred prospects: the keys `benchmarks/serve.py` reads."
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_batch", Path(__file__).parents[1] / "benchmarks" / "batch.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run_batch_end_to_end(rows=400, work=tmp_path, train_companies=600)
    assert r["batch_end_to_end_rows_per_s"] > 0 and r["list_rows"] > 0
    assert {"read_contracts_s", "score_frame_s", "write_s", "load_avg"} <= set(r)
