"""The fast batch path gives the list the plain path gives: same rows, scores, ranks and reasons, bit for bit.

`score_frame` scores a large list with one `pred_leaf` pass (scores and tree-path reasons from the same leaves)
and reads each reason's value by casting only the rows that name it. Here the expected list is built the plain
way, written out in this file as it was before: `Bundle.predict` for the scores, the tree-path contributions
from a sparse product with int64 indices, and each reason's value picked by a `coalesce` over all features."""

import datetime as dt

import numpy as np
import polars as pl
import pytest


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    "A calibrated LightGBM bundle (numeric features and the industry category) and clean tables to score."
    from hsml import synth
    from hsml.bundle import load_bundle, save_bundle
    from hsml.contracts import load_tables
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.trainset import build_training_set

    d = tmp_path_factory.mktemp("score-equal")
    synth.generate(d / "data", companies=3000, seed=5)
    tables = load_tables(d / "data")
    last = tables.usage["WHEN_TIMESTAMP"].max().date()
    ts = build_training_set(tables, last - dt.timedelta(days=196), last - dt.timedelta(days=56), 28, 28)
    f = ts.frame
    busy = f["actions_total_sum_84d"].fill_null(0).to_numpy()
    f = f.with_columns(label=pl.Series((busy > np.quantile(busy, 0.7)).astype(np.int8)))
    model = make_model("lgbm", *columns_from_spec(ts.spec), seed=0, n_estimators=40, min_child_samples=5)
    pipe = fit_model(model, f, horizon_days=28)
    meta = {"name": "equal", "model": "lgbm", "feature_set": "default", "horizon_days": 28}
    b = load_bundle(save_bundle(d / "model", pipe, ts.spec, {}, meta, train_frame=f))
    return {"bundle": b, "tables": tables}


def _plain_path(booster, Z: np.ndarray) -> np.ndarray:
    "The tree-path contributions as computed before the one-pass path (int64 indices, one sparse product)."
    from scipy import sparse

    from hsml.bundle_explain import _path_tables

    G, offsets, _ = _path_tables(booster, Z.shape[1])
    leaves = np.asarray(booster.predict(Z, pred_leaf=True), dtype=np.int64).reshape(len(Z), -1)
    n, T = leaves.shape
    A = sparse.csr_matrix(
        (np.ones(n * T), (leaves + offsets).ravel(), np.arange(0, n * T + 1, T)), shape=(n, len(G))
    )
    return A @ G


def _plain_list(b, X: pl.DataFrame) -> pl.DataFrame:
    "id, score, rank, decile and the reason columns, the plain way."
    from hsml.score import rank_scores, top_reasons

    names, c = b.feature_names, b.compiled
    Z = c.transform(*b.split_frame(X))
    path, contrib = _plain_path(c.booster, Z), np.zeros((X.height, len(names)))
    for j, zn in enumerate(c.z_inputs):
        contrib[:, names.index(zn)] += path[:, j]
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


def test_one_pass_scores_are_bundle_predict(scored):
    "Without its spot check, the one-pass score equals `Bundle.predict` on every row (calibration included)."
    from hsml.bundle_explain import one_pass, score_and_path
    from hsml.score import _features, population_split

    b, tables = scored["bundle"], scored["tables"]
    day = tables.usage["WHEN_TIMESTAMP"].max().date()
    panel, _ = population_split(tables.companies(), tables.usage, day, 28, b.population, 7)
    X = _features(b, tables.companies(), tables.usage, panel, 7)
    assert one_pass(b) and X.height > 500
    s, C, how = score_and_path(b, X, check_rows=0)
    assert np.array_equal(s, b.predict(X))
    assert how.startswith("tree path")


def test_score_frame_equals_the_plain_list(scored):
    "The whole scored list, in chunks through the one-pass path, equals the plain list on every column."
    from hsml.score import score_frame

    b, tables = scored["bundle"], scored["tables"]
    got = score_frame(b, tables, "latest", chunk_size=700, reasons_method="path", progress=False)
    ranked = got.filter(pl.col("unscored_reason").is_null())
    assert ranked.height > 1400 and ranked["reasons_method"][0].startswith("tree path")
    X = ranked.select("id", "as_of").join(
        _plain_features(b, tables, ranked["as_of"][0]), on=["id", "as_of"], how="left", maintain_order="left"
    )
    want = _plain_list(b, X)
    cols = want.columns
    assert ranked.select(cols).equals(want)
    assert ranked["reason_1_value"].null_count() < ranked.height  # values were read, not all missing


def _plain_features(b, tables, day: dt.date) -> pl.DataFrame:
    from hsml.score import _features, population_split

    panel, _ = population_split(tables.companies(), tables.usage, day, 28, b.population, 7)
    return _features(b, tables.companies(), tables.usage, panel, 7)
