"""The HTTP service, end to end: the real uvicorn server on 127.0.0.1, spoken to over HTTP with httpx.

A small model is trained on generated sample data with hsml's own feature path and model pipeline, published
to a registry in a temporary directory, promoted, and served from `NAME@production`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest

from hsml.bundle import load_bundle, save_bundle
from hsml.contracts import load_tables
from hsml.features import feature_spec_document
from hsml.models import columns_from_spec, fit_model, make_model
from hsml.registry import list_models as list_models_
from hsml.registry import load_model, promote, publish
from hsml.trainset import build_training_set

NAME = "conv-test"
USAGE_ROW = {
    "WHEN_TIMESTAMP": "2020-01-06 00:00:00.000",
    **{
        f"{k}_{o}": "1"
        for k in ("ACTIONS", "USERS")
        for o in ("CRM_CONTACTS", "CRM_COMPANIES", "CRM_DEALS", "EMAIL")
    },
}
TOKEN = "t0ken-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    "uvicorn running hsml.serve.serve in a subprocess on a free loopback port."

    def __init__(
        self, model: str, env: dict[str, str], tmp: Path, workers: int = 1, cli: list[str] | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = "import sys; from hsml.serve import serve; serve(sys.argv[1], port=int(sys.argv[2]), workers=int(sys.argv[3]))"
        args = [code, model, str(self.port), str(workers)]
        if cli is not None:  # `hsml serve` itself, with these extra options
            code = "import typer; from hsml.serve import serve_cmd; typer.run(serve_cmd)"
            args = [code, "--model", model, "--port", str(self.port), "--workers", str(workers), *cli]
        self.out = open(tmp / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", *args],
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )
        self.log = tmp / f"server-{self.port}.log"
        deadline = time.monotonic() + 240  # a busy machine: two workers took 70 s to start
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.out.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "Sample data, features at two as-of dates, a trained LightGBM bundle published and promoted."
    from hsml import synth

    tmp = tmp_path_factory.mktemp("serve")
    paths = synth.generate(tmp / "data", companies=400, seed=3)
    tables = load_tables(tmp / "data")
    last = tables.usage["WHEN_TIMESTAMP"].max().date()
    ts = build_training_set(
        tables,
        as_of_start=last - dt.timedelta(days=84),
        as_of_end=last - dt.timedelta(days=28),
        every_days=28,
        horizon_days=28,
    )
    # random labels: this model only has to exist, not to be good (few positives in 400 companies)
    rng = np.random.default_rng(0)
    frame = ts.frame.with_columns(label=pl.Series(rng.integers(0, 2, ts.frame.height)))
    num, cat = columns_from_spec(ts.spec)
    pipe = fit_model(make_model("lgbm", num, cat, seed=0, n_estimators=30, min_child_samples=5), frame)
    bdir = save_bundle(
        tmp / "run" / "model",
        pipe,
        feature_spec_document(ts.spec, ts.timing),
        {"test": {"roc_auc": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}}},
        {
            "name": NAME,
            "model": "lgbm",
            "run_id": "r-test",
            "data_fingerprints": tables.fingerprints,
            "training_set_hash": ts.content_hash,
            "feature_set": "default",
            "horizon_days": 28,
        },
        train_frame=frame,
    )
    reg = tmp / "registry"
    v = publish(tmp / "run", NAME, root=reg, tracking="disabled")
    promote(NAME, v, "production", root=reg, tracking="disabled")
    return {
        "tmp": tmp,
        "paths": paths,
        "tables": tables,
        "feats": ts.frame,
        "last": last,
        "registry": reg,
        "bundle": load_bundle(bdir),
        "version": v,
    }


@pytest.fixture(scope="module")
def server(world):
    log = world["tmp"] / "predictions.jsonl"
    s = Server(
        f"{NAME}@production",
        {"HSML_REGISTRY": str(world["registry"]), "HSML_PREDICTION_LOG": str(log), "HSML_API_TOKEN": ""},
        world["tmp"],
    )
    s.prediction_log = log
    yield s
    s.stop()


def records(world, n: int = 3, with_id: bool = False) -> list[dict]:
    b = world["bundle"]
    df = world["feats"].head(n)
    out = df.select(b.feature_names).to_dicts()
    if with_id:
        for r, i in zip(out, df["id"].to_list()):
            r["id"] = i
    return out


def test_predict_scores_match_in_process_model(world, server):
    recs = records(world, 5, with_id=True)
    r = httpx.post(server.url + "/predict", json={"records": recs})
    assert r.status_code == 200, r.text
    j = r.json()
    assert (j["model"], j["version"]) == (NAME, world["version"])
    assert len(j["request_id"]) == 32
    expected = world["bundle"].predict_reference(world["feats"].head(5))
    np.testing.assert_allclose([p["score"] for p in j["predictions"]], expected, rtol=0, atol=1e-12)
    assert [p["id"] for p in j["predictions"]] == world["feats"]["id"].head(5).to_list()
    assert all(set(p) == {"score", "id"} for p in j["predictions"]) and "experiment" not in j  # no experiment


def test_health_ready_model_openapi(world, server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["prediction_log"]["to"] == str(server.prediction_log)
    assert (
        set(h["prediction_log"]) == {"to", "written", "pending", "error"}
        and h["prediction_log"]["error"] is None
    )
    r = httpx.get(server.url + "/ready")
    assert r.status_code == 200 and r.json()["ready"] and r.json()["fast_path"]
    m = httpx.get(server.url + "/model").json()
    assert (m["name"], m["version"], m["alias"]) == (NAME, world["version"], "production")
    assert m["data_fingerprints"] == world["tables"].fingerprints
    assert m["input_schema"]["fields"][0]["name"] == world["bundle"].feature_names[0]
    assert m["metrics"]["test"]["roc_auc"]["value"] == 0.5
    spec = httpx.get(server.url + "/openapi.json").json()
    props = spec["components"]["schemas"]["Record"]["properties"]
    assert set(world["bundle"].feature_names) <= set(props)
    assert "/predict/company" in spec["paths"]


# ---------------------------------------------------------------------------------------------------------
# client mistakes: every one a 4xx with a message, never a 500


def _bad_cases(world) -> list[tuple[str, str, dict, int, str]]:
    "(name, path, request kwargs, expected status, expected text in the answer)."
    b = world["bundle"]
    good = records(world, 1)[0]
    fields = {f["name"]: f for f in b.input_schema["fields"]}
    count = next(n for n, f in fields.items() if f["type"] == "integer" and f.get("minimum") == 0)
    num = next(n for n, f in fields.items() if f["type"] == "number" and not f["nullable"])
    nullable_num = next((n for n, f in fields.items() if f["type"] == "number" and f["nullable"]), num)
    cat = next(n for n, f in fields.items() if f["type"] == "category")
    non_null = next(n for n, f in fields.items() if not f["nullable"])
    J = {"content-type": "application/json"}

    def rec(**kw):
        return {"records": [good | kw]}

    def raw(body: str, path: str = "/predict"):
        return (path, {"content": body.replace("GOOD", json.dumps(good)).encode(), "headers": J})

    def lit(token: str):  # a JSON-ish literal in place of a number
        body = json.dumps(good | {num: "__X__"}).replace('"__X__"', token)
        return raw(f'{{"records": [{body}]}}')

    missing = dict(good)
    missing.pop(num)
    company = {"id": 1, "company": {"ALEXA_RANK": "100", "EMPLOYEE_RANGE": "1", "INDUSTRY": ""}, "usage": []}
    cases = [
        ("malformed json", *raw('{"records": [GOOD'), 400, "malformed JSON"),
        ("trailing garbage", *raw('{"records": [GOOD]} x'), 400, "malformed JSON"),
        ("empty body", *raw(""), 400, "empty request body"),
        ("top-level array", *raw("[GOOD]"), 422, "JSON object"),
        ("top-level string", *raw('"hello"'), 422, "JSON object"),
        ("no records key", "/predict", {"json": {}}, 422, "records: Field required"),
        (
            "records not a list",
            "/predict",
            {"json": {"records": good}},
            422,
            "records: Input should be a valid array",
        ),
        ("records empty", "/predict", {"json": {"records": []}}, 422, "at least 1 item"),
        ("record not an object", "/predict", {"json": {"records": [1]}}, 422, "records.0"),
        (
            "missing feature",
            "/predict",
            {"json": {"records": [missing]}},
            422,
            f"records.0.{num}: Field required",
        ),
        (
            "unknown field",
            "/predict",
            {"json": rec(actions_totl_sum_28d=3)},
            422,
            "actions_totl_sum_28d: Extra inputs are not permitted",
        ),
        (
            "unknown top-level key",
            "/predict",
            {"json": {"records": [good], "debug": True}},
            422,
            "debug: Extra inputs",
        ),
        (
            "string for a number",
            "/predict",
            {"json": rec(**{num: "12.5"})},
            422,
            f"records.0.{num}: Input should be a valid number",
        ),
        ("bool for a number", "/predict", {"json": rec(**{num: True})}, 422, f"records.0.{num}"),
        ("object for a number", "/predict", {"json": rec(**{num: {"v": 1}})}, 422, f"records.0.{num}"),
        ("NaN", *lit("NaN"), 422, "finite number"),
        ("Infinity", *lit("Infinity"), 422, "finite number"),
        ("-Infinity", *lit("-Infinity"), 422, "finite number"),
        ("overflow 1e999", *lit("1e999"), 422, "finite number"),
        (
            "negative count",
            "/predict",
            {"json": rec(**{count: -1})},
            422,
            f"records.0.{count}: Input should be greater than or equal to 0",
        ),
        (
            "float for an integer",
            "/predict",
            {"json": rec(**{count: 2.5})},
            422,
            f"records.0.{count}: Input should be a valid integer",
        ),
        (
            "string for an integer",
            "/predict",
            {"json": rec(**{count: "3"})},
            422,
            f"records.0.{count}: Input should be a valid integer",
        ),
        (
            "null for a non-nullable feature",
            "/predict",
            {"json": rec(**{non_null: None})},
            422,
            f"records.0.{non_null}",
        ),
        (
            "number for a category",
            "/predict",
            {"json": rec(**{cat: 7})},
            422,
            f"records.0.{cat}: Input should be a valid string",
        ),
        ("bad id type", "/predict", {"json": rec(id=[1, 2])}, 422, "records.0.id"),
        (
            "second record bad",
            "/predict",
            {"json": {"records": [good, good | {nullable_num: "x"}]}},
            422,
            f"records.1.{nullable_num}",
        ),
        ("too many records", "/predict", {"json": {"records": [good] * 10_001}}, 413, "too many records"),
        (
            "body over the size limit",
            "/predict",
            {"content": b"{" + b" " * (64 << 20) + b"}", "headers": J},
            413,
            "over the limit",
        ),
        (
            "text/plain",
            "/predict",
            {"content": b"records", "headers": {"content-type": "text/plain"}},
            415,
            "application/json",
        ),
        ("company: missing company", "/predict/company", {"json": {"id": 1}}, 422, "company: Field required"),
        (
            "company: negative id",
            "/predict/company",
            {"json": company | {"id": -5}},
            422,
            "id: Input should be greater than or equal to 0",
        ),
        ("company: bad as_of", "/predict/company", {"json": company | {"as_of": "2024-13-01"}}, 422, "as_of"),
        (
            "company: unknown company field",
            "/predict/company",
            {"json": company | {"company": {"MRR": "10"}}},
            422,
            "unknown field(s) ['MRR']",
        ),
        (
            "company: unknown usage field",
            "/predict/company",
            {"json": company | {"usage": [{"CLICKS": 1}]}},
            422,
            "usage[0]: unknown field(s) ['CLICKS']",
        ),
        (
            "company: usage of another id",
            "/predict/company",
            {"json": company | {"usage": [{"id": 2}]}},
            422,
            "differs from id 1",
        ),
        (
            "company: unknown top-level key",
            "/predict/company",
            {"json": company | {"feature_set": "leaky"}},
            422,
            "feature_set: Extra inputs",
        ),
        (
            "company: malformed json",
            "/predict/company",
            {"content": b'{"id": 1,', "headers": J},
            400,
            "malformed JSON",
        ),
        (
            "company: NaN raw value",
            *raw('{"id": 1, "company": {"ALEXA_RANK": NaN}}', "/predict/company"),
            422,
            "NaN",
        ),
        (
            "company: unparseable usage timestamp",
            "/predict/company",
            {"json": company | {"usage": [USAGE_ROW | {"WHEN_TIMESTAMP": "yesterday"}]}},
            422,
            "usage[0].WHEN_TIMESTAMP: 'yesterday' is not a timestamp",
        ),
        ("GET on /predict", "/predict", {"method": "GET"}, 405, "Method Not Allowed"),
        ("unknown path", "/predicts", {"json": {}}, 404, "Not Found"),
    ]
    return cases


def test_bad_requests_are_4xx_with_messages(world, server):
    cases = _bad_cases(world)
    assert len(cases) >= 25
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name, path, kw, status, text in cases:
            kw = dict(kw)
            method = kw.pop("method", "POST")
            r = c.request(method, path, **kw)
            body = r.text
            if r.status_code != status or text not in body:
                failures.append(f"{name}: {r.status_code} {body[:300]}")
            assert 400 <= r.status_code < 500
            if r.status_code in (400, 413, 415, 422):
                assert r.json()["message"], name
    assert not failures, "\n".join(failures)
    # field-level detail: the location of every problem
    r = httpx.post(server.url + "/predict", json={"records": [records(world, 1)[0] | {"bogus": 1}]})
    assert {
        "loc": ["records", 0, "bogus"],
        "msg": "Extra inputs are not permitted",
        "type": "extra_forbidden",
        "input": 1,
    } in r.json()["detail"]
    assert httpx.get(server.url + "/ready").status_code == 200  # the server is fine after all that


# ---------------------------------------------------------------------------------------------------------
# one feature path: the company endpoint computes the same feature vectors as the training set


def _company_body(world, i: int, as_of) -> dict:
    "The raw rows of company `i` as the files hold them, as a /predict/company body."
    raw_n = pl.read_csv(world["paths"]["noncustomers"], infer_schema=False)
    raw_u = pl.read_csv(world["paths"]["usage"], infer_schema=False)
    crow = raw_n.filter(pl.col("id").str.strip_chars() == str(i)).head(1).drop("id").to_dicts()[0]
    usage = raw_u.filter(pl.col("id").str.strip_chars() == str(i)).drop("id").to_dicts()
    return {"id": i, "as_of": str(as_of), "company": crow, "usage": usage, "return_features": True}


def _same_features(got: dict, want: dict, names: list[str], i) -> None:
    assert list(got) == names
    for k in names:
        e, g = want[k], got[k]
        if e is None or (isinstance(e, float) and np.isnan(e)):
            assert g is None, (i, k, g)
        else:
            assert g == e, (i, k, g, e)


def test_training_serving_feature_parity(world, server):
    """Raw rows in, features out: identical to the training set's rows, for prospects at every as-of date of the
    training set; prospects outside the training population (no usage before as_of) come back without a score,
    with the reason, and with the features the training code computes for them."""
    from hsml.features import compute_features

    tables, ts_frame = world["tables"], world["feats"]
    b = world["bundle"]
    assert b.population == "active_unconverted"
    prospects = tables.noncustomers["id"].to_list()
    dates = sorted(ts_frame["as_of"].unique().to_list())
    assert len(dates) == 3
    rows = ts_frame.filter(pl.col("id").is_in(prospects) & (pl.col("active_periods_84d") > 0))
    pick = pl.concat([rows.filter(pl.col("as_of") == d).head(4) for d in dates])
    assert pick.height == 12 and pick["as_of"].n_unique() == 3
    for row in pick.iter_rows(named=True):
        i = row["id"]
        r = httpx.post(
            server.url + "/predict/company", json=_company_body(world, i, row["as_of"]), timeout=60
        )
        assert r.status_code == 200, r.text
        got = r.json()
        _same_features(got["features"], row, b.feature_names, i)
        train_row = ts_frame.filter((pl.col("id") == i) & (pl.col("as_of") == row["as_of"]))
        assert got["predictions"][0]["score"] == pytest.approx(b.predict_reference(train_row)[0], abs=1e-12)
        assert (
            got["id"] == i and got["as_of"] == str(row["as_of"]) and got["population"] == "active_unconverted"
        )
        assert got["as_of_off_anchor"] is False and got["warnings"] == []
    # outside the population at each date: never used the product, or its first usage week had not ended by as_of
    first = tables.usage.group_by("id").agg(pl.col("WHEN_TIMESTAMP").min().dt.date().alias("first"))
    pros = tables.noncustomers.select("id").join(first, on="id", how="left")
    outside = []
    for d in dates:
        never = pros.filter(pl.col("first").is_null()).head(1)
        later = pros.filter(pl.col("first") + dt.timedelta(days=7) > d).sort("first").head(1)
        assert never.height == 1 and later.height == 1, d
        outside += [(i, d) for i in (never["id"][0], later["id"][0])]
        assert not ts_frame.filter(
            (pl.col("as_of") == d) & pl.col("id").is_in([i for i, _ in outside[-2:]])
        ).height
    spine = pl.DataFrame(outside, schema={"id": pl.Int64, "as_of": pl.Date}, orient="row")
    want = compute_features(tables.companies(), tables.usage, spine, feature_set="default")
    for i, d in outside:
        r = httpx.post(server.url + "/predict/company", json=_company_body(world, i, d), timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["predictions"] == [
            {"score": None, "id": i, "unscored_reason": "outside_population: no usage before as_of"}
        ], got
        w = want.filter((pl.col("id") == i) & (pl.col("as_of") == d)).row(0, named=True)
        _same_features(got["features"], w, b.feature_names, i)


def test_company_as_of_off_the_anchor_is_scored_and_flagged(world, server):
    "A Thursday is scored with the weekly rule (only weeks ended by it count) and flagged; the default is a Monday."
    from hsml.features import compute_features

    tables, b = world["tables"], world["bundle"]
    assert b.training["usage_period_days"] == 7 and b.training["usage_anchor_weekday"] == "Monday"
    monday = max(world["feats"]["as_of"].to_list())
    thursday = monday + dt.timedelta(days=3)
    i = world["feats"].filter((pl.col("as_of") == monday) & (pl.col("active_periods_84d") > 0))["id"][0]
    r = httpx.post(server.url + "/predict/company", json=_company_body(world, i, thursday), timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["as_of"] == str(thursday) and got["as_of_off_anchor"] is True
    assert got["warnings"][0].startswith(f"as_of {thursday} is a Thursday, not a Monday (the usage anchor)")
    spine = pl.DataFrame({"id": [i], "as_of": [thursday]}, schema={"id": pl.Int64, "as_of": pl.Date})
    want = compute_features(tables.companies(), tables.usage, spine, "default", usage_period_days=7)
    _same_features(got["features"], want.row(0, named=True), b.feature_names, i)
    assert got["predictions"][0]["score"] == pytest.approx(b.predict_reference(want)[0], abs=1e-12)
    # no as_of: the latest Monday on or before today (UTC)
    body = _company_body(world, i, monday)
    del body["as_of"]
    got = httpx.post(server.url + "/predict/company", json=body, timeout=60).json()
    today = dt.datetime.now(dt.UTC).date()
    assert (
        got["as_of"] == str(today - dt.timedelta(days=today.weekday())) and got["as_of_off_anchor"] is False
    )


def test_scoring_and_serving_use_the_bundle_usage_period(world, tmp_path):
    "A model trained on 14-day usage periods is served and scored with 14-day periods, not the default 7."
    from hsml.features import compute_features
    from hsml.score import score_frame

    b, tables = world["bundle"], world["tables"]
    spec = feature_spec_document(b.feature_spec, {"usage_period_days": 14, "usage_anchor_weekday": "Monday"})
    meta = {k: v for k, v in b.info.items() if not k.startswith("usage_")}
    b14 = load_bundle(save_bundle(tmp_path / "m14", b.pipeline, spec, {}, meta, train_frame=world["feats"]))
    assert b14.training["usage_period_days"] == 14
    assert json.loads((b14.path / "feature_spec.json").read_text())["usage_period_days"] == 14
    monday = max(world["feats"]["as_of"].to_list())
    i = world["feats"].filter((pl.col("as_of") == monday) & (pl.col("active_periods_7d") > 0))["id"][0]
    spine = pl.DataFrame({"id": [i], "as_of": [monday]}, schema={"id": pl.Int64, "as_of": pl.Date})
    f14, f7 = (
        compute_features(tables.companies(), tables.usage, spine, "default", usage_period_days=n)
        for n in (14, 7)
    )
    assert f14.row(0) != f7.row(0)  # the period matters for this company
    srv = Server(
        str(b14.path), {"HSML_PREDICTION_LOG": str(tmp_path / "log.jsonl"), "HSML_API_TOKEN": ""}, tmp_path
    )
    try:
        got = httpx.post(
            srv.url + "/predict/company", json=_company_body(world, i, monday), timeout=60
        ).json()
    finally:
        srv.stop()
    _same_features(got["features"], f14.row(0, named=True), b.feature_names, i)
    scored = score_frame(b14, tables, monday, reasons=False).filter(pl.col("id") == i)
    assert scored["score"][0] == pytest.approx(b14.predict_reference(f14)[0], abs=1e-12)


def test_a_changed_feature_definition_refuses_to_score(world, tmp_path):
    "A feature re-registered under the same name with other code: scoring and serving refuse, naming it."
    from hsml.core import HsmlError
    from hsml.features import FEATURES, feature
    from hsml.score import score_frame
    from hsml.serve import create_app

    b = world["bundle"]
    assert all(e.get("definition_hash") for e in b.feature_spec)
    orig = FEATURES["actions_total_sum_28d"]
    try:
        feature("actions_total_sum_28d", "all actions, 28 days")(lambda ctx: ctx.sum("ACTIONS_EMAIL", 28))
        with pytest.raises(HsmlError, match="changed: actions_total_sum_28d"):
            score_frame(b, world["tables"], "latest")
        with pytest.raises(HsmlError, match="changed: actions_total_sum_28d"):
            create_app(b, log_path=tmp_path / "log.jsonl")
    finally:
        FEATURES["actions_total_sum_28d"] = orig
    b.check_features()  # the trained code again: accepted


def test_company_rows_failing_the_contracts_are_a_422_that_says_so(world, server):
    "The contracts' own message, behind the endpoint's: which field, which rule."
    body = _company_body(world, world["tables"].noncustomers["id"][0], world["last"])
    body["usage"] = [USAGE_ROW | {"WHEN_TIMESTAMP": "2020-02-30 00:00:00.000"}]
    r = httpx.post(server.url + "/predict/company", json=body, timeout=60)
    assert r.status_code == 422, r.text
    msg = r.json()["message"]
    assert msg.startswith("the company rows do not pass the data contracts: usage[0].WHEN_TIMESTAMP"), msg
    assert r.json()["detail"][0]["type"] == "contract"


# ---------------------------------------------------------------------------------------------------------
# the prediction log


def _read_log(path: Path, n: int, timeout: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if len(lines) >= n:
                return lines
        time.sleep(0.1)
    raise AssertionError(f"prediction log {path} has fewer than {n} lines")


def features_hash_by_hand(schema: dict, rec: dict) -> str:
    "The documented recipe, without hsml: float64 LE bytes of the non-category features, then 0x1f + category."
    fields = schema["fields"]
    nums = [
        np.nan if rec[f["name"]] is None else float(rec[f["name"]]) for f in fields if f["type"] != "category"
    ]
    h = hashlib.sha256(np.array(nums, dtype="<f8").tobytes())
    for f in fields:
        if f["type"] == "category":
            v = rec[f["name"]]
            h.update(b"\x1f" + (b"\x00" if v is None else v.encode()))
    return h.hexdigest()[:16]


def test_prediction_log(world, server):
    recs = records(world, 4, with_id=True)
    rid = "log-test-42"
    r = httpx.post(server.url + "/predict", json={"records": recs}, headers={"X-Request-ID": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    scores = [p["score"] for p in r.json()["predictions"]]
    lines = [x for x in _read_log(server.prediction_log, 1) if x["request_id"] == rid]
    deadline = time.monotonic() + 15
    while len(lines) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
        lines = [x for x in _read_log(server.prediction_log, 1) if x["request_id"] == rid]
    assert len(lines) == 4
    b = world["bundle"]
    for line, rec, s in zip(lines, recs, scores):
        assert set(line) == {
            "request_id",
            "model",
            "version",
            "digest",
            "endpoint",
            "id",
            "as_of",
            "score",
            "features_hash",
            "timestamp",
            "experiment",
            "arm",
            "rank",
            "holdout_share",
        }
        assert line["experiment"] is line["arm"] is line["holdout_share"] is None  # no experiment
        assert line["rank"] == 1 + sum(x > line["score"] for x in scores)
        assert (line["model"], line["version"], line["endpoint"]) == (NAME, world["version"], "predict")
        assert line["id"] == rec["id"] and line["score"] == s
        assert line["features_hash"] == features_hash_by_hand(b.input_schema, rec)
        assert line["digest"] == b.digest
        assert line["timestamp"].endswith("+00:00")
    # readable by another team without hsml
    df = pl.read_ndjson(server.prediction_log)
    assert {"request_id", "score", "features_hash"} <= set(df.columns)
    # a bad request logs nothing
    n = len(_read_log(server.prediction_log, 1))
    httpx.post(server.url + "/predict", json={"records": [recs[0] | {"x": 1}]})
    time.sleep(1.2)
    assert len(_read_log(server.prediction_log, 1)) == n


def test_experiment_arms_in_answers_and_log(world, tmp_path):
    """`hsml serve --experiment NAME --holdout-share S`: every answered company carries its sticky arm
    (hsml.impact_design.assign_arm), and the log holds experiment, arm, rank, as_of and holdout_share for each,
    as the impact report reads them; a company outside the population is logged without score, rank or arm."""
    from hsml.impact_design import assign_arm
    from hsml.impact_report import experiment_cohort, read_prediction_logs

    exp, share = "q3-outreach", 0.3
    log = tmp_path / "exp.jsonl"
    env = {"HSML_REGISTRY": str(world["registry"]), "HSML_PREDICTION_LOG": str(log), "HSML_API_TOKEN": ""}
    cli = ["--experiment", exp, "--holdout-share", str(share)]
    s = Server(f"{NAME}@production", env, tmp_path, cli=cli)
    try:
        # a weekly list scored in one batch: the arm of each id, the rank by score within the request
        recs = records(world, 40, with_id=True) + records(world, 1)
        r = httpx.post(s.url + "/predict", json={"records": recs}, headers={"x-request-id": "batch-1"})
        assert r.status_code == 200, r.text
        j = r.json()
        assert (j["experiment"], j["holdout_share"]) == (exp, share)
        ids = [x.get("id") for x in recs]
        arms = assign_arm(exp, ids[:40], share) + [None]
        assert [p["arm"] for p in j["predictions"]] == arms and {"treatment", "holdout"} <= set(arms)
        # companies from raw rows: one answer each, with its arm; the one outside the population has none
        feats, last = world["feats"], max(world["feats"]["as_of"].to_list())
        inside = feats.filter(
            (pl.col("as_of") == last)
            & pl.col("id").is_in(world["tables"].noncustomers["id"].implode())
            & (pl.col("active_periods_84d") > 0)
        )["id"].head(4)
        first = world["tables"].usage.group_by("id").agg(pl.col("WHEN_TIMESTAMP").min())
        never = world["tables"].noncustomers.join(first, on="id", how="anti")["id"][0]
        answers = {}
        for i in [*inside.to_list(), never]:
            body = _company_body(world, i, last)
            r = httpx.post(
                s.url + "/predict/company", json=body, headers={"x-request-id": f"c-{i}"}, timeout=60
            )
            assert r.status_code == 200, r.text
            answers[i] = r.json()
            assert (answers[i]["experiment"], answers[i]["holdout_share"]) == (exp, share)
        for i in inside:
            assert answers[i]["predictions"][0]["arm"] == assign_arm(exp, [i], share)[0]
        assert answers[never]["predictions"][0] | {"unscored_reason": "-"} == {
            "score": None,
            "id": never,
            "arm": None,
            "unscored_reason": "-",
        }
        lines = _read_log(log, 41 + 5)
    finally:
        s.stop()
    assert len(lines) == 46 and all(x["experiment"] == exp and x["holdout_share"] == share for x in lines)
    batch = [x for x in lines if x["request_id"] == "batch-1"]
    scores = np.array([p["score"] for p in j["predictions"]])
    want_rank = (-scores).argsort(kind="stable").argsort() + 1
    assert [x["rank"] for x in batch] == want_rank.tolist() and [x["arm"] for x in batch] == arms
    assert all(x["as_of"] is None for x in batch)  # /predict does not know the as-of date of its features
    comp = {x["id"]: x for x in lines if x["endpoint"] == "predict/company"}
    assert all(comp[i]["rank"] == 1 and comp[i]["as_of"] == str(last) for i in inside)
    assert comp[never]["score"] is comp[never]["rank"] is comp[never]["arm"] is None
    # the impact report's reader: the company answers form the experiment's cohort, arms as assigned
    df, info = read_prediction_logs(log)
    assert info["predictions"] == 46 and info["torn_lines"] == 0
    cohort, meta = experiment_cohort(df)
    assert meta == {"experiment": exp, "arm_conflicts": 0}
    assert sorted(cohort["id"].to_list()) == sorted(map(str, inside))
    assert cohort["arm"].to_list() == assign_arm(exp, cohort["id"].to_list(), share)


def test_serve_refuses_a_half_given_experiment(world, tmp_path):
    "--holdout-share without --experiment (or a share outside (0, 1)) is exit 2 with a message, no traceback."
    code = "import typer; from hsml.serve import serve_cmd; typer.run(serve_cmd)"
    base = [sys.executable, "-c", code, "--model", f"{NAME}@production", "--port", str(free_port())]
    env = {**os.environ, "HSML_REGISTRY": str(world["registry"]), "OMP_NUM_THREADS": "1"}
    for extra, msg in [
        (["--holdout-share", "0.2"], "needs both its name and its holdout share"),
        (["--experiment", "q3", "--holdout-share", "1.5"], "strictly between 0 and 1"),
        (["--log-sink", "predictions"], "give --catalog FILE too"),
    ]:
        p = subprocess.run([*base, *extra], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------------------------
# tokens, tampering


def test_failed_prediction_log_write_shows_in_ready(world, tmp_path):
    "A log the server cannot write (here a directory stands where the file should be) turns /ready into a 503 that says why."
    log = tmp_path / "predictions.jsonl"
    log.mkdir()
    s = Server(
        f"{NAME}@production",
        {"HSML_REGISTRY": str(world["registry"]), "HSML_PREDICTION_LOG": str(log), "HSML_API_TOKEN": ""},
        tmp_path,
    )
    try:
        assert httpx.get(s.url + "/ready").status_code == 200  # nothing to write yet
        r = httpx.post(s.url + "/predict", json={"records": records(world, 2)})
        assert r.status_code == 200, r.text  # the prediction is answered; the write fails in the background
        deadline, ready = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            ready = httpx.get(s.url + "/ready")
            if ready.status_code == 503:
                break
            time.sleep(0.1)
        assert ready.status_code == 503, ready.text
        body = ready.json()
        assert body["ready"] is False
        assert body["problem"].startswith("prediction log: IsADirectoryError"), body
        assert str(log) in body["problem"]
    finally:
        s.stop()


def test_token_auth(world, tmp_path):
    s = Server(
        f"{NAME}@{world['version']}",
        {
            "HSML_REGISTRY": str(world["registry"]),
            "HSML_PREDICTION_LOG": str(tmp_path / "p.jsonl"),
            "HSML_API_TOKEN": TOKEN,
        },
        tmp_path,
    )
    try:
        body = {"records": records(world, 1)}
        assert httpx.post(s.url + "/predict", json=body).status_code == 401
        r = httpx.post(s.url + "/predict", json=body, headers={"Authorization": "Bearer wrong"})
        assert (
            r.status_code == 401
            and r.headers["www-authenticate"] == "Bearer"
            and "token" in r.json()["message"]
        )
        assert httpx.post(s.url + "/predict", json=body, headers={"Authorization": TOKEN}).status_code == 401
        assert (
            httpx.post(
                s.url + "/predict", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
            ).status_code
            == 200
        )
        assert httpx.get(s.url + "/model").status_code == 401
        assert httpx.get(s.url + "/model", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_tampered_bundle_refused(world, tmp_path):
    reg = tmp_path / "registry"
    shutil.copytree(world["registry"], reg)
    model = reg / NAME / "versions" / str(world["version"]) / "model" / "model.joblib"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(Exception, match="tampered"):
        load_model(f"{NAME}@production", root=reg)
    code = "import sys; from hsml.serve import serve; serve(sys.argv[1], port=int(sys.argv[2]))"
    p = subprocess.run(
        [sys.executable, "-c", code, f"{NAME}@production", str(free_port())],
        env={**os.environ, "HSML_REGISTRY": str(reg), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "tampered" in p.stderr and "model.joblib" in p.stderr


def test_serve_cmd_exit_code_on_tamper(world, tmp_path):
    "The command-line entry prints the message and exits 2, without a traceback."
    reg = tmp_path / "registry"
    shutil.copytree(world["registry"], reg)
    (reg / NAME / "versions" / str(world["version"]) / "model" / "input_schema.json").write_text("{}")
    code = "import typer; from hsml.serve import serve_cmd; typer.run(serve_cmd)"
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--model",
            f"{NAME}@production",
            "--registry",
            str(reg),
            "--port",
            str(free_port()),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert "tampered" in p.stderr and "input_schema.json" in p.stderr and "Traceback" not in p.stderr


def test_two_workers_share_the_prediction_log(world, tmp_path):
    log = tmp_path / "shared.jsonl"
    env = {"HSML_REGISTRY": str(world["registry"]), "HSML_PREDICTION_LOG": str(log), "HSML_API_TOKEN": ""}
    s = Server(f"{NAME}@production", env, tmp_path, workers=2)
    try:
        recs = records(world, 50, with_id=True)
        expected = world["bundle"].predict_reference(world["feats"].head(50))
        with httpx.Client(base_url=s.url) as c:
            for k in range(20):
                r = c.post("/predict", json={"records": recs[k : k + 30]}, headers={"x-request-id": f"w-{k}"})
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(
                    [p["score"] for p in r.json()["predictions"]], expected[k : k + 30], atol=1e-12
                )
        lines = _read_log(log, 600)
        assert sorted({x["request_id"] for x in lines}) == sorted(f"w-{k}" for k in range(20))
        assert all(x["model"] == NAME for x in lines)
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------------------
# batch scoring: the command and the papermill notebook, from the registry


def _check_scores(df: pl.DataFrame, world) -> None:
    "The list ranks the training population only (active_unconverted), and lists the other prospects after it."
    from hsml.snapshots import data_end

    tables = world["tables"]
    as_of = data_end(tables)["latest_as_of"]
    assert (
        (df["as_of"] == as_of).all() and as_of.strftime("%A") == "Monday" and not df["as_of_off_anchor"].any()
    )
    comp = tables.companies()
    prospects = comp.filter(pl.col("CLOSEDATE").is_null() | (pl.col("CLOSEDATE") > as_of))
    first = tables.usage.group_by("id").agg(pl.col("WHEN_TIMESTAMP").min().dt.date().alias("first"))
    # the policy's rule: some usage week (7 days from its Monday stamp) ended by as_of
    active = prospects.join(first, on="id", how="inner").filter(
        pl.col("first") + dt.timedelta(days=7) <= as_of
    )
    assert df.height == prospects.height
    assert sorted(df["id"].to_list()) == sorted(prospects["id"].to_list())
    ranked = df.filter(pl.col("unscored_reason").is_null())
    assert sorted(ranked["id"].to_list()) == sorted(active["id"].to_list())  # nobody outside is ranked
    unscored = df.filter(pl.col("unscored_reason").is_not_null())
    assert unscored.height == prospects.height - active.height > 0
    assert df["unscored_reason"].is_null().to_list() == [True] * ranked.height + [False] * unscored.height
    assert (unscored["unscored_reason"] == "outside_population: no usage before as_of").all()
    assert unscored["score"].is_null().all() and unscored["rank"].is_null().all()
    assert ranked["rank"].to_list() == list(range(1, ranked.height + 1))
    assert ranked["score"].is_sorted(descending=True)
    assert set(ranked["decile"].unique().to_list()) == set(range(1, 11))
    assert (df["model"] == NAME).all() and (df["model_version"] == world["version"]).all()
    assert set(ranked["reason_1"].unique().to_list()) <= set(world["bundle"].feature_names)
    assert (ranked["reason_1_contribution"] >= ranked["reason_2_contribution"]).all()


def test_score_command(world, tmp_path):
    out = tmp_path / "scores.parquet"
    code = "import typer; from hsml.score import score_cmd; typer.run(score_cmd)"
    args = ["--model", f"{NAME}@production", "--data-dir", str(world["tmp"] / "data"), "--as-of", "latest"]
    env = {**os.environ, "HSML_REGISTRY": str(world["registry"]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-c", code, *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert f"with {NAME} v{world['version']}" in p.stdout
    _check_scores(pl.read_parquet(out), world)
    p = subprocess.run(
        [sys.executable, "-c", code, *args, "--out", str(tmp_path / "s.xlsx")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "unknown output format" in p.stderr


def test_score_notebook_with_papermill(world, tmp_path):
    import papermill as pm

    nb = Path(__file__).resolve().parents[1] / "experiments" / "score.ipynb"
    out = tmp_path / "scores.csv"
    pm.execute_notebook(
        str(nb),
        str(tmp_path / "score-run.ipynb"),
        parameters={
            "model": f"{NAME}@production",
            "registry": str(world["registry"]),
            "data_dir": str(world["tmp"] / "data"),
            "as_of": "latest",
            "out": str(out),
            "top_n": 5,
        },
        progress_bar=False,
        kernel_name="python3",
    )
    _check_scores(pl.read_csv(out), world)
    text = (tmp_path / "score-run.ipynb").read_text()
    assert "mean score by decile" in text and "reasons:" in text
    # a bad parameter stops in the first cells with a clear message
    with pytest.raises(pm.PapermillExecutionError, match="unknown output format"):
        pm.execute_notebook(
            str(nb),
            str(tmp_path / "bad.ipynb"),
            parameters={"out": "x.xlsx"},
            progress_bar=False,
            kernel_name="python3",
        )


# ---------------------------------------------------------------------------------------------------------
# the README walkthrough: train with register=True, promote, serve, query, score


def test_walkthrough_train_register_promote_serve_score(tmp_path):
    from hsml.runs import train_main

    reg = tmp_path / "registry"
    os.environ["HSML_REGISTRY"] = str(reg)
    try:
        run = train_main(
            {
                "model": "lgbm",
                "sample_companies": 1500,
                "n_boot": 20,
                "tracking": "disabled",
                "register": True,
                "run_dir": str(tmp_path / "runs"),
            },
            quiet=True,
        )
    finally:
        del os.environ["HSML_REGISTRY"]
    name = "conversion-lgbm"
    assert [m["name"] for m in list_models_(reg)] == [name]
    p = subprocess.run(
        [sys.executable, "-c", "from hsml.registry import registry_app; registry_app()", "promote", name, "1"]
        + ["--alias", "production", "--registry", str(reg), "--tracking", "disabled"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    env = {
        "HSML_REGISTRY": str(reg),
        "HSML_PREDICTION_LOG": str(tmp_path / "pred.jsonl"),
        "HSML_API_TOKEN": "",
    }
    s = Server(f"{name}@production", env, tmp_path)
    try:
        m = httpx.get(s.url + "/model").json()
        assert (m["name"], m["version"], m["alias"]) == (name, 1, "production")
        assert m["bundle"]["run_id"] == run.name
        ts = pl.read_parquet(run / "training_set.parquet")
        feats = [f["name"] for f in m["input_schema"]["fields"]]
        rec = ts.select(feats).head(2).to_dicts()
        r = httpx.post(s.url + "/predict", json={"records": rec})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        b = load_model(f"{name}@production", root=reg)
        np.testing.assert_allclose(
            [x["score"] for x in r.json()["predictions"]], b.predict_reference(ts.head(2)), atol=1e-12
        )
    finally:
        s.stop()
    data = next(run.parent.rglob("noncustomers.csv")).parent
    out = tmp_path / "scores.parquet"
    code = "import typer; from hsml.score import score_cmd; typer.run(score_cmd)"
    args = ["--model", f"{name}@production", "--data-dir", str(data), "--as-of", "latest", "--out", str(out)]
    p = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "HSML_REGISTRY": str(reg), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    df = pl.read_parquet(out)
    ranked = df.filter(pl.col("unscored_reason").is_null())
    assert ranked.height > 1000 and (df["model_version"] == 1).all() and ranked["reason_1"].null_count() == 0
    assert df.filter(pl.col("unscored_reason").is_not_null())["score"].is_null().all()


def test_company_usage_rows_left_out_by_the_contracts_are_warnings(world, server):
    "As in training, a usage row the contracts quarantine is left out; the answer says which and why."
    as_of = str(world["last"])
    good = {
        "id": 77,
        "as_of": as_of,
        "company": {"ALEXA_RANK": "1000", "EMPLOYEE_RANGE": "2 to 5", "INDUSTRY": ""},
    }
    base = httpx.post(
        server.url + "/predict/company", json=good | {"usage": [USAGE_ROW], "return_features": True}
    )
    assert base.status_code == 200 and base.json()["warnings"] == []
    bad_row = USAGE_ROW | {"WHEN_TIMESTAMP": "2020-01-13 00:00:00.000", "ACTIONS_EMAIL": "-4"}
    r = httpx.post(
        server.url + "/predict/company", json=good | {"usage": [USAGE_ROW, bad_row], "return_features": True}
    )
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == ["usage[1].ACTIONS_EMAIL: rejected by rule negative_count"]
    assert r.json()["features"] == base.json()["features"]
    assert r.json()["predictions"] == base.json()["predictions"]
