"""Big batches scored by the booster's trees as machine code (`hsml.bundle_compile.TreeCode`, lleaves).

- the machine code gives LightGBM's bytes, not only close values, on a model with nulls and a category
  (unseen and negative codes included), and on copies with NaN, zeros and negatives sprinkled in;
- a real server (uvicorn on 127.0.0.1) answers a batch with the same bytes before and after it switches, logs
  the same lines, and says where it stands in `/model`; `HSML_TREE_CODE=0` keeps LightGBM.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from test_serve import Server

from hsml.bundle import demo_frame, load_bundle, save_bundle
from hsml.bundle_compile import TREE_CODE_MIN_ROWS, TreeCode, _probe, _tree_code
from hsml.models import fit_model, make_model
from hsml.testing import DEMO_INDUSTRY, DEMO_SPEC


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    "A LightGBM bundle with a nullable number and a category, 80 trees: enough to tell two tree walkers apart."
    tmp = tmp_path_factory.mktemp("tree_code")
    frame = demo_frame(3000, seed=5, categorical=True)
    num = [s["name"] for s in DEMO_SPEC]
    pipe = fit_model(make_model("lgbm", num, ["industry"], seed=0, n_estimators=80), frame, time=None)
    meta = {"name": "tree-code-demo", "model": "lgbm", "feature_set": "demo"}
    return save_bundle(tmp / "m", pipe, DEMO_SPEC + [DEMO_INDUSTRY], {}, meta, train_frame=frame)


def test_machine_code_gives_lightgbms_bytes(bundle_dir):
    b = load_bundle(bundle_dir)
    booster = b.compiled.booster
    feats = demo_frame(4000, seed=11, categorical=True).select(b.feature_names)
    Z = b.compiled.transform(*b.split_frame(feats))
    assert np.isnan(Z).any()  # the demo data has nulls
    cat = [j for j, n in enumerate(b.compiled.z_inputs or []) if n == "industry"]
    odd = Z[:50].copy()
    odd[:, cat] = np.array([-1.0, 99.0, 1e9, np.nan, 0.0] * 10)[:, None]  # unseen, negative, huge, null codes
    P = np.vstack([_probe(Z), odd])
    code = _tree_code(booster)
    assert code.num_trees() == booster.num_trees() == 80
    assert code.predict(P, n_jobs=1).tobytes() == booster.predict(P, num_threads=1).tobytes()
    assert code.predict(P, n_jobs=2).tobytes() == booster.predict(P, num_threads=2).tobytes()
    # and through the path that uses it: the first big batch asks LightGBM, later ones the machine code
    tc = TreeCode(booster)
    assert tc(Z) is None and tc.wait(60) == "on"
    assert tc(Z).tobytes() == booster.predict(Z).tobytes()


def answer(url: str, recs: list[dict]) -> tuple[str, str]:
    "(the predictions' JSON text, the request id) of one /predict."
    r = httpx.post(url + "/predict", json={"records": recs}, timeout=60)
    assert r.status_code == 200, r.text
    text = r.text
    return text[text.index('"predictions"') :], r.json()["request_id"]


def state(url: str) -> str:
    return httpx.get(url + "/model", timeout=10).json()["tree_code"]


def log_rows(path, rid: str) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k not in ("request_id", "timestamp")}
        for r in rows
        if r["request_id"] == rid
    ]


def test_server_answers_the_same_bytes_before_and_after_the_switch(bundle_dir, tmp_path):
    b = load_bundle(bundle_dir)
    feats = demo_frame(TREE_CODE_MIN_ROWS + 44, seed=12, categorical=True)
    recs = [r | {"id": i} for i, r in enumerate(feats.select(b.feature_names).to_dicts())]
    log = tmp_path / "predictions.jsonl"
    s = Server(str(bundle_dir), {"HSML_PREDICTION_LOG": str(log), "HSML_API_TOKEN": ""}, tmp_path)
    try:
        assert state(s.url) == "waiting"
        assert answer(s.url, recs[: TREE_CODE_MIN_ROWS - 1])  # a small batch starts nothing
        assert state(s.url) == "waiting"
        before, rid0 = answer(s.url, recs)  # the first big batch: LightGBM answers, the build starts
        deadline = time.monotonic() + 120
        while (st := state(s.url)) != "on" and time.monotonic() < deadline:
            assert st in ("compiling", "on"), st
            time.sleep(0.1)
        assert st == "on"
        after, rid1 = answer(s.url, recs)
        assert after == before
        scores = [p["score"] for p in json.loads("{" + after)["predictions"]]
        np.testing.assert_allclose(scores, b.predict_reference(feats), rtol=0, atol=1e-12)
        time.sleep(1.5)  # the log writer flushes every 0.5 s
        assert log_rows(log, rid0) == log_rows(log, rid1) and len(log_rows(log, rid1)) == len(recs)
    finally:
        s.stop()


def test_tree_code_can_be_switched_off(bundle_dir, tmp_path):
    recs = demo_frame(TREE_CODE_MIN_ROWS, seed=13, categorical=True).drop("label").to_dicts()
    env = {"HSML_PREDICTION_LOG": str(tmp_path / "p.jsonl"), "HSML_API_TOKEN": "", "HSML_TREE_CODE": "0"}
    s = Server(str(bundle_dir), env, tmp_path)
    try:
        b = load_bundle(bundle_dir)
        recs = [{k: r[k] for k in b.feature_names} for r in recs]
        assert answer(s.url, recs) and state(s.url) == "off"
    finally:
        s.stop()


def test_a_copy_of_a_compiled_pipeline_builds_its_own_machine_code(bundle_dir):
    import copy

    b = load_bundle(bundle_dir)
    b.compiled.tree_code = True
    Z = b.compiled.transform(*b.split_frame(demo_frame(TREE_CODE_MIN_ROWS, seed=3, categorical=True)))
    b.compiled.raw_fn(Z)
    assert b.compiled.raw_fn.code.wait(60) == "on"
    c = copy.deepcopy(b.compiled)  # what a Ray task or a second server gets: no machine code of another's
    assert c.tree_code and c.raw_fn.code is None
    assert c.raw_fn(Z).tobytes() == b.compiled.raw_fn(Z).tobytes()
