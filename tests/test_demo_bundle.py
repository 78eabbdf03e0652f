"""The demo bundle comes from one generator path (hsml.synth through the registered `demo` feature set), so
`POST /predict/company` computes its features from a company's raw rows and scores it."""

import datetime as dt

import numpy as np
import polars as pl
from fastapi.testclient import TestClient

from hsml import synth
from hsml.bundle import demo_bundle as demo_bundle_reexported
from hsml.bundle import load_bundle
from hsml.contracts import load_tables
from hsml.features import FEATURE_SETS, FEATURES, compute_features
from hsml.serve import create_app
from hsml.testing import DEMO_SPEC, demo_bundle, demo_frame, register_demo_features


def test_demo_features_are_registered_features():
    names = register_demo_features()
    assert names == [s["name"] for s in DEMO_SPEC]
    assert FEATURE_SETS["demo"] == names and all(n in FEATURES for n in names)
    assert demo_bundle_reexported is demo_bundle  # hsml.bundle still answers for the moved fixtures
    fr = demo_frame(300, seed=1)
    assert fr.columns == [*names, "label"] and 0 < fr["label"].sum() < 300


def test_predict_company_scores_the_demo_bundle(tmp_path):
    b = load_bundle(demo_bundle(tmp_path / "model", "lgbm", n=800))
    assert b.info["feature_set"] == "demo" and b.fast
    paths = synth.generate(tmp_path / "data", companies=300, seed=5)
    tables = load_tables(tmp_path / "data")
    as_of = tables.usage["WHEN_TIMESTAMP"].max().date() - dt.timedelta(days=70)
    as_of -= dt.timedelta(days=as_of.weekday())  # a Monday: the usage anchor
    raw_n = pl.read_csv(paths["noncustomers"], infer_schema=False)
    raw_u = pl.read_csv(paths["usage"], infer_schema=False)
    active = raw_u.filter(pl.col("WHEN_TIMESTAMP") < str(as_of - dt.timedelta(days=7)))[
        "id"
    ].str.strip_chars()
    cid = int(sorted(set(active.to_list()) & set(raw_n["id"].str.strip_chars().to_list()))[0])
    crow = raw_n.filter(pl.col("id").str.strip_chars() == str(cid)).head(1).drop("id").to_dicts()[0]
    usage = raw_u.filter(pl.col("id").str.strip_chars() == str(cid)).drop("id").to_dicts()
    body = {"id": cid, "as_of": str(as_of), "company": crow, "usage": usage, "return_features": True}
    with TestClient(create_app(b, token="", log_path=tmp_path / "log.jsonl", flush_seconds=0.05)) as c:
        r = c.post("/predict/company", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    spine = pl.DataFrame({"id": [cid], "as_of": [as_of]}, schema={"id": pl.Int64, "as_of": pl.Date})
    feats = compute_features(tables.companies(), tables.usage, spine, feature_set="demo")
    assert got["features"] == feats.select(b.feature_names).to_dicts()[0]
    assert got["predictions"][0]["score"] is not None, got  # an active prospect: in the training population
    np.testing.assert_allclose(got["predictions"][0]["score"], b.predict(feats)[0], rtol=0, atol=1e-12)
