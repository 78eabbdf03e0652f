"""The fast batch path (issue 11: 1M prospects end to end at >= 100k rows/s) reads and scores exactly as before.

On dirty data (padded, separated, re-formatted and blank values, broken and duplicate rows, unknown ids, blank
lines, rows out of order) the clean tables, the quarantine (raw text, line number and rule), the report and the
fingerprints have the digests the code before the speed-up (a80a38f) gave, pinned below; usage kept in memory
and usage spooled to Parquet by bucket give the same tables; each file is hashed once; and the list scored in
pieces on several threads equals the list scored in one plain serial pass, column for column."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from hsml import synth
from hsml.contracts import Policy, load_tables
from hsml.sources import DEFAULT_FILES, TABLES, Catalog, CsvSource


def _dirty(d: Path) -> Path:
    "Generated data with every kind of dirt the contracts handle, in all three files."
    synth.generate(d, companies=2500, seed=11)
    read = lambda t: pl.read_csv(d / DEFAULT_FILES[t], infer_schema=False)  # noqa: E731
    u, n, c = read("usage"), read("noncustomers"), read("customers")
    r = pl.int_range(pl.len())
    odd = u.slice(4000, 6000).with_columns(  # values only the full parse reads, in rows of their own
        ACTIONS_CRM_CONTACTS=pl.when(r < 3)
        .then(pl.lit(" 1,200 "))
        .otherwise("ACTIONS_CRM_CONTACTS"),  # padded
        USERS_EMAIL=pl.when(r.is_between(3, 4)).then(pl.lit("2.0")).otherwise("USERS_EMAIL"),  # a float
        WHEN_TIMESTAMP=pl.when(r.is_between(5, 6))
        .then(pl.col("WHEN_TIMESTAMP").str.replace(" ", "T"))
        .when(r.is_between(7, 8))
        .then(pl.col("WHEN_TIMESTAMP").str.slice(0, 10))  # ISO 'T', a date alone
        .otherwise("WHEN_TIMESTAMP"),
    )
    u = pl.concat(
        [
            u.slice(0, 4000),
            u.slice(10, 4),  # duplicate keys
            u.slice(500, 3).with_columns(id=pl.lit("999999999")),  # unknown ids
            u.slice(900, 2).with_columns(ACTIONS_EMAIL=pl.lit("-3")),  # negative counts
            u.slice(1200, 2).with_columns(WHEN_TIMESTAMP=pl.lit("")),  # missing stamps
            u.slice(1300, 1).with_columns(id=pl.lit(" ")),  # a missing id
            odd.reverse(),  # and out of (id, time) order
            u.slice(10_000),
        ]
    )
    n = pl.concat(
        [
            n.slice(0, 100),
            n.slice(3, 2),  # duplicate prospects
            c.slice(0, 1).select(n.columns),  # a customer listed as a prospect
            n.slice(7, 1).with_columns(id=pl.lit("")),  # a missing id
            n.slice(100, 3).with_columns(ALEXA_RANK=pl.lit(" 1,234 ")),
            n.slice(103, 2).with_columns(ALEXA_RANK=pl.lit("n/a")),  # unparseable optional: set null
            n.slice(105),
        ]
    )
    c = pl.concat(
        [
            c.slice(0, 20),
            c.slice(20, 2).with_columns(MRR=pl.lit("1,200.50")),
            c.slice(22, 2).with_columns(pl.col("CLOSEDATE") + " 00:00:00"),  # a date as a timestamp
            c.slice(24),
        ]
    )
    for t, f in [("usage", u), ("noncustomers", n), ("customers", c)]:
        f.write_csv(d / DEFAULT_FILES[t])
    lines = (d / DEFAULT_FILES["usage"]).read_text().splitlines(keepends=True)
    (d / DEFAULT_FILES["usage"]).write_text("".join(lines[:50] + ["\n"] + lines[50:]))  # a blank line
    return d


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _digests(tb, d: Path) -> dict[str, str]:
    "A short digest of every output of `load_tables` from `d`: tables, quarantines, report (paths as DIR), fingerprints."
    out = {t: _sha(getattr(tb, t).lazy().collect().write_csv().encode()) for t in TABLES}
    out |= {f"quarantine_{t}": _sha(tb.quarantine[t].write_csv().encode()) for t in TABLES}
    out["report"] = _sha(
        json.dumps(tb.report.to_dict(), sort_keys=True, default=str).replace(str(d), "DIR").encode()
    )
    out["fingerprints"] = _sha(json.dumps(tb.fingerprints, sort_keys=True).encode())
    return out


# measured with the code before the speed-up (a80a38f) on `_dirty`
OLD_DIGESTS = {
    "customers": "a4604c9ac27c13f8", "noncustomers": "9b14f7b9453e00f1", "usage": "b535c281a2d0e8d6",
    "quarantine_customers": "e496df2f5fc6450e", "quarantine_noncustomers": "65c797b4431f99ff",
    "quarantine_usage": "0e26b5b00e0c6df1", "report": "b7d281040a6d82d3", "fingerprints": "953200baec79b856",
}  # fmt: skip


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> Path:
    return _dirty(tmp_path_factory.mktemp("batch-fast"))


def test_dirty_data_reads_as_before(dirty):
    "Every output of `load_tables` on dirty data has the digest the code before the speed-up gave."
    tb = load_tables(dirty)
    rep = tb.report
    for rule, n in [("duplicate_key", 4), ("unknown_id", 3), ("negative_count", 2), ("missing_id", 1)]:
        assert rep.count("usage", rule) == n, rule
    assert rep.count("usage", "missing_value") == 2 and tb.quarantine["usage"]["_line"].is_sorted()
    assert rep.count("noncustomers", "unparseable_value") == 2 and rep.count("usage", "off_anchor_stamp") == 0
    assert _digests(tb, dirty) == OLD_DIGESTS


def test_usage_in_memory_or_spooled_is_the_same(dirty):
    "Usage kept in memory (one bucket) and usage spooled by id bucket through Parquet: the same everything."
    mem = load_tables(dirty)
    assert isinstance(mem.usage, pl.DataFrame)
    spooled = [  # all spooled, the clean usage a lazy scan; typed rows spooled, the clean usage read back
        Policy(usage_in_memory_rows=0),
        Policy(typed_in_memory_rows=5000, chunk_rows=4000, companies_per_bucket=300),
    ]
    for policy in spooled:
        assert _digests(load_tables(dirty, policy), dirty) == _digests(mem, dirty), policy


def test_typed_rows_stay_in_memory_until_the_limit(tmp_path):
    "`_Typed` writes nothing while the rows fit; past the limit it spools them all, and hands back the same rows."
    from hsml.contracts import _Typed

    rng = np.random.default_rng(0)
    chunks = [pl.DataFrame({"id": rng.integers(0, 50, 40), "_b": rng.integers(0, 4, 40).astype(np.uint32)})
              for _ in range(5)]  # fmt: skip
    mem, spool = _Typed(tmp_path / "mem", 200), _Typed(tmp_path / "spool", 99)
    for i, c in enumerate(chunks):
        mem.add(c, i)
        spool.add(c, i)
    assert not (tmp_path / "mem").exists() and len(list((tmp_path / "spool").glob("b*"))) == 4
    whole = pl.concat(chunks)
    (one,) = list(mem.buckets())
    assert one.equals(whole.drop("_b"))
    by_bucket = pl.concat(list(spool.buckets()))
    want = pl.concat([whole.filter(pl.col("_b") == b).drop("_b") for b in range(4)])
    assert by_bucket.equals(want)


class CountedCsv(CsvSource):
    "A CSV source that counts how often it is hashed."

    hashed = 0

    def fingerprint(self) -> str:
        CountedCsv.hashed += 1
        return super().fingerprint()


def test_each_file_is_hashed_once(dirty):
    "The change-while-read check uses the file's stamp: each file is hashed once (it was hashed twice)."
    CountedCsv.hashed = 0
    tb = load_tables(Catalog({t: CountedCsv(dirty / f) for t, f in DEFAULT_FILES.items()}))
    assert CountedCsv.hashed == 3
    assert tb.fingerprints == load_tables(dirty).fingerprints


def _plain_list(b, X: pl.DataFrame) -> pl.DataFrame:
    "id, score, rank, decile and the reasons, in one serial pass: `Bundle.predict`, tree paths, a coalesce."
    from hsml.score import rank_scores, top_reasons

    names = b.feature_names
    contrib, _, _ = b.contributions(X, method="path")
    idx, val = top_reasons(contrib)
    scores = b.predict(X)
    rank, decile = rank_scores(X["id"].to_numpy(), scores)
    out = X.select("id", score=pl.Series(scores), rank=pl.Series(rank), decile=pl.Series(decile))
    for j in range(3):
        reason = pl.Series(names).gather(idx[:, j])
        value = pl.coalesce([pl.when(pl.lit(reason) == n).then(pl.col(n).cast(pl.String)) for n in names])
        out = out.with_columns(
            pl.lit(reason).alias(f"reason_{j + 1}"),
            X.select(value).to_series().alias(f"reason_{j + 1}_value"),
            pl.Series(f"reason_{j + 1}_contribution", val[:, j]),
        )
    return out.sort("rank")


def test_pieces_on_threads_score_as_one_serial_pass(dirty, tmp_path):
    "The list scored in pieces on 1 to 3 threads, features in id ranges, equals the plain serial list."
    from hsml.bundle import load_bundle, save_bundle
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.score import _features, population_split, score_frame, score_threads
    from hsml.trainset import build_training_set

    tb = load_tables(dirty)
    end = dt.date.fromisoformat(tb.report.timing["latest_as_of"]) - dt.timedelta(days=56)
    ts = build_training_set(tb, end - dt.timedelta(days=28 * 6), end, 28, 56)
    f = ts.frame
    busy = f["actions_total_sum_84d"].fill_null(0).to_numpy()
    f = f.with_columns(label=pl.Series((busy > np.quantile(busy, 0.7)).astype(np.int8)))
    model = make_model("lgbm", *columns_from_spec(ts.spec), seed=0, n_estimators=40, min_child_samples=5)
    meta = {"name": "fast", "model": "lgbm", "feature_set": "default", "horizon_days": 56}
    b = load_bundle(
        save_bundle(tmp_path / "b", fit_model(model, f, horizon_days=56), ts.spec, {}, meta, train_frame=f)
    )
    import hsml.score

    lists, rows = [], hsml.score.FEATURE_ROWS
    try:
        for ch, th, feature_rows in [(100_000, None, rows), (97, 3, 150), (10**6, 1, rows), (1, 2, 100)]:
            hsml.score.FEATURE_ROWS = feature_rows  # small: the features are computed in id ranges too
            lists.append(
                score_frame(b, tb, "latest", chunk_size=ch, reasons_method="path", progress=False, threads=th)
            )
    finally:
        hsml.score.FEATURE_ROWS = rows
    assert score_threads() >= 1
    ranked = lists[0].filter(pl.col("unscored_reason").is_null())
    assert ranked.height > 1000 and lists[0].height > ranked.height  # some prospects are listed unscored
    for other in lists[1:]:
        assert other.equals(lists[0])
    day = ranked["as_of"][0]
    panel, _ = population_split(tb.companies(), tb.usage, day, 56, b.population, 7)
    X = _features(b, tb.companies(), tb.usage, panel, 7, threads=1)  # one range
    want = _plain_list(b, X)
    assert ranked.select(want.columns).equals(want)


def test_batch_benchmark_states_its_threads(tmp_path):
    "benchmarks/batch.py says how many threads `hsml score` scored with (every core by default)."
    import importlib.util

    from hsml.score import score_threads

    spec = importlib.util.spec_from_file_location(
        "bench_batch_fast", Path(__file__).parents[1] / "benchmarks" / "batch.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run_batch_end_to_end(rows=300, work=tmp_path, train_companies=600)
    assert r["threads"] == score_threads() and r["list_rows"] > 0


def test_score_threads_follow_the_cpu_affinity():
    "With no number asked for, the cores this process may run on (taskset, a container's cpuset), not the machine's."
    import os
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    code = "import os; os.sched_setaffinity(0, {0}); from hsml.score import score_threads; print(score_threads(), score_threads(3))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["1", "3"]


def test_a_lazy_usage_scan_is_timed_in_buckets_exactly(dirty, tmp_path, monkeypatch):
    "A lazy usage scan is timed a bucket of companies at a time (bounded memory), with the whole table's counts."
    import hsml.contracts
    from hsml.contracts import _usage_timing

    usage = load_tables(dirty).usage
    usage.write_parquet(tmp_path / "usage.parquet")
    whole = _usage_timing(usage)
    monkeypatch.setattr(hsml.contracts, "TIMING_BUCKET_ROWS", 3000, raising=False)  # several buckets
    seen, counts = [], hsml.contracts._timing_counts

    def counted(u, *a, **kw):  # the rows each call reads
        seen.append(u.lazy().select(pl.len()).collect().item())
        return counts(u, *a, **kw)

    monkeypatch.setattr(hsml.contracts, "_timing_counts", counted)
    assert usage.height > 4 * 3000
    assert _usage_timing(pl.scan_parquet(tmp_path / "usage.parquet")) == whole
    assert len(seen) > 4 and max(seen) < 2 * 3000 and sum(seen) == usage.height
    assert whole["usage_stamps"] == usage.height and whole["usage_gaps"] > 0
