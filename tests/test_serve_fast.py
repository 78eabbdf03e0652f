"""What makes `/predict` cheap, checked on real apps and bundles (structure and equality, never wall-clock time).

- `/predict` is a `DirectRoute`: FastAPI resolves no dependency for it, yet the token is still checked first,
  the request id still echoed and the route still documented;
- a serving process freezes what it loaded (`gc.freeze`), so a full collection does not walk it mid-request;
- a single row goes through LightGBM's single-row fast predictor and gets the batch's scores exactly;
- a calibrated model (sigmoid, prior or none) is scored by the compiled Platt formula, isotonic through the
  classifier, all equal to the pipeline's `predict_proba`.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hsml.bundle import demo_frame, load_bundle, save_bundle
from hsml.models import fit_model, make_model
from hsml.serve import DirectRoute, create_app
from hsml.testing import DEMO_INDUSTRY, DEMO_SPEC


@pytest.fixture(scope="module")
def bundle(demo_lgbm_dir):
    "The demo LightGBM bundle (nine features, fast path), loaded: conftest's, shared with test_soak."
    return load_bundle(demo_lgbm_dir)


def test_predict_resolves_no_dependency_and_still_checks_the_token_first(bundle, tmp_path):
    app = create_app(bundle, token="s3cret", log_path=tmp_path / "log.jsonl")
    route = next(r for r in app.routes if getattr(r, "path", "") == "/predict")
    assert isinstance(route, DirectRoute) and route.dependant.dependencies == []
    recs = demo_frame(2, seed=1).select(bundle.feature_names).to_dicts()
    with TestClient(app) as c:
        assert c.post("/predict", json={"records": recs}).status_code == 401
        # the token before the body: a wrong token on a body that is not JSON is 401, not 415
        bad = {"authorization": "Bearer wrong", "content-type": "text/csv"}
        assert c.post("/predict", content=b"a,b", headers=bad).status_code == 401
        ok = {"authorization": "Bearer s3cret", "x-request-id": "req-7"}
        r = c.post("/predict", json={"records": recs}, headers=ok)
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-7"
        assert r.json()["request_id"] == "req-7" and len(r.json()["predictions"]) == 2
        assert (
            c.post("/predict", content=b"a,b", headers=ok | {"content-type": "text/csv"}).status_code == 415
        )
        assert "/predict" in c.get("/openapi.json").json()["paths"]


def test_serving_freezes_what_it_loaded(bundle, tmp_path):
    gc.unfreeze()
    with TestClient(create_app(bundle, token="", log_path=tmp_path / "log.jsonl")) as c:
        assert gc.get_freeze_count() > 10_000
        assert c.get("/ready").status_code == 200
    assert gc.get_freeze_count() == 0  # unfrozen at shutdown


def test_single_rows_take_the_fast_predictor_and_get_the_batch_scores(bundle):
    X = demo_frame(30, seed=4).select(bundle.feature_names)
    rows = [tuple(r) for r in X.iter_rows()]
    batch = bundle.predict_rows(rows)
    one = np.array([bundle.predict_rows([r])[0] for r in rows])
    assert bundle.compiled.raw_fn.one is not None  # LightGBM's single-row fast predictor was made and used
    np.testing.assert_array_equal(one, batch)
    np.testing.assert_allclose(batch, bundle.predict_reference(X), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("calibration", ["sigmoid", "prior", "none", "isotonic"])
def test_calibrated_models_compile_to_the_pipelines_scores(calibration, tmp_path):
    frame = demo_frame(1200, seed=2, categorical=True)
    num = [s["name"] for s in DEMO_SPEC]
    pipe = make_model("lgbm", num, ["industry"], seed=0, n_estimators=20, calibration=calibration)
    pipe = fit_model(pipe, frame, time=None)
    meta = {"name": "cal", "model": "lgbm", "feature_set": "demo"}
    b = load_bundle(
        save_bundle(tmp_path / "m", pipe, DEMO_SPEC + [DEMO_INDUSTRY], {}, meta, train_frame=frame)
    )
    assert b.fast, b.fast_problem
    platt = "_platt" in b.compiled.score_fn.__qualname__
    assert platt == (calibration != "isotonic")
    X = demo_frame(300, seed=5, categorical=True).select(b.feature_names)
    ref = b.predict_reference(X)
    np.testing.assert_allclose(b.predict(X), ref, rtol=1e-9, atol=1e-12)
    rows = [tuple(r) for r in X.head(5).iter_rows()]
    np.testing.assert_allclose([b.predict_rows([r])[0] for r in rows], ref[:5], rtol=1e-9, atol=1e-12)
