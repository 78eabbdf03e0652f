"""`POST /predict` with an Arrow IPC stream body, over real HTTP on 127.0.0.1 (uvicorn in a subprocess).

The same records sent as JSON and as Arrow get bit-equal scores and the same prediction-log lines (but for the
request id and the timestamp); every class of bad input gets the JSON path's status, and a 422 names the
column and its first offending row (`records.ROW.COLUMN`) as the JSON path does. The model has a closed
category (an Enum: unknown levels refused), a nullable number, a boolean and integers.
"""

from __future__ import annotations

import io
import json
import re
import time

import httpx
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from test_serve import Server

from hsml.bundle import demo_frame, save_bundle
from hsml.models import fit_model, make_model
from hsml.testing import DEMO_INDUSTRY, DEMO_SPEC

ARROW = "application/vnd.apache.arrow.stream"
TOKEN = "arrow-t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def ipc(df: pl.DataFrame) -> bytes:
    "A frame as an Arrow IPC stream, as a client's polars writes it."
    buf = io.BytesIO()
    df.write_ipc_stream(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    "A LightGBM bundle with a closed category, served with a token; its feature frame and its log file."
    tmp = tmp_path_factory.mktemp("arrow")
    frame = demo_frame(1200, seed=2, categorical=True)
    levels = sorted(frame["industry"].drop_nulls().unique().to_list())
    num = [s["name"] for s in DEMO_SPEC]
    pipe = fit_model(make_model("lgbm", num, ["industry"], seed=0, n_estimators=20), frame, time=None)
    spec = DEMO_SPEC + [DEMO_INDUSTRY | {"dtype": "Enum", "categories": levels}]
    meta = {"name": "arrow-demo", "model": "lgbm", "feature_set": "demo"}
    bdir = save_bundle(tmp / "m", pipe, spec, {}, meta, train_frame=frame)
    schema = json.loads((bdir / "input_schema.json").read_text())
    assert next(f for f in schema["fields"] if f["name"] == "industry")["unknown_categories"] == "reject"
    log = tmp / "predictions.jsonl"
    s = Server(str(bdir), {"HSML_PREDICTION_LOG": str(log), "HSML_API_TOKEN": TOKEN}, tmp)
    feats = demo_frame(400, seed=7, categorical=True).select([f["name"] for f in schema["fields"]])
    yield {"url": s.url, "log": log, "feats": feats, "schema": schema, "levels": levels}
    s.stop()


def post(url: str, body: bytes, kind: str, rid: str | None = None, **headers) -> httpx.Response:
    h = AUTH | {"content-type": kind} | ({"x-request-id": rid} if rid else {}) | headers
    return httpx.post(url + "/predict", content=body, headers=h, timeout=60)


def log_lines(path, rid: str, n: int, timeout: float = 15) -> list[str]:
    "The raw log lines of request `rid` once there are n of them, request id and timestamp blanked."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        lines = [x for x in text.splitlines() if f'"request_id":"{rid}"' in x]
        if len(lines) >= n:
            return [re.sub(r'"timestamp":"[^"]*"', "T", x.replace(rid, "RID")) for x in lines]
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} log lines of {rid}")


def test_arrow_gives_the_json_scores_and_log_lines(served):
    df = served["feats"].head(300).with_columns(id=pl.Series(range(1000, 1300)))
    df = df.with_columns(  # nulls where the schema allows them, and an id missing
        pl.when(pl.int_range(300) % 7 == 0)
        .then(None)
        .otherwise(pl.col("alexa_rank_log10"))
        .alias("alexa_rank_log10"),
        pl.when(pl.int_range(300) % 11 == 0).then(None).otherwise(pl.col("industry")).alias("industry"),
        pl.when(pl.int_range(300) == 5).then(None).otherwise(pl.col("id")).alias("id"),
    )
    recs = [{k: v for k, v in r.items() if k != "id" or v is not None} for r in df.to_dicts()]
    j = post(served["url"], json.dumps({"records": recs}).encode(), "application/json", "same-json")
    a = post(served["url"], ipc(df), ARROW, "same-arrow")
    assert j.status_code == a.status_code == 200, a.text
    assert a.headers["x-request-id"] == "same-arrow" and a.json()["request_id"] == "same-arrow"
    pj, pa_ = j.json()["predictions"], a.json()["predictions"]
    assert pa_ == pj  # the scores bit-equal (the same JSON floats), the ids echoed, None left out
    assert "id" not in pa_[5] and pa_[6]["id"] == 1006
    assert log_lines(served["log"], "same-arrow", 300) == log_lines(served["log"], "same-json", 300)
    # the same columns as pyarrow writes them (large strings, a dictionary-encoded category) and without `id`
    t = (
        df.drop("id")
        .to_arrow()
        .cast(
            pa.schema(
                [
                    (c, pa.dictionary(pa.int32(), pa.string())) if c == "industry" else (c, t)
                    for c, t in zip(df.drop("id").columns, df.drop("id").to_arrow().schema.types)
                ]
            )  # fmt: skip
        )
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, t.schema) as w:
        for b in t.to_batches(max_chunksize=64):  # several record batches
            w.write_batch(b)
    a2 = post(served["url"], sink.getvalue(), ARROW)
    assert a2.status_code == 200, a2.text
    assert [p["score"] for p in a2.json()["predictions"]] == [p["score"] for p in pj]
    assert all("id" not in p for p in a2.json()["predictions"])
    # a column of nulls is nulls whatever its type (a client's untyped empty column), as JSON's nulls are
    nulls = df.head(4).with_columns(alexa_rank_log10=pl.Series([None] * 4, dtype=pl.String))
    a3 = post(served["url"], ipc(nulls), ARROW)
    j3 = post(served["url"], _json_body(nulls), "application/json")
    assert a3.status_code == j3.status_code == 200 and a3.json()["predictions"] == j3.json()["predictions"]


def _error_cases(served) -> list[tuple[str, pl.DataFrame, str | None]]:
    "(name, the bad frame sent both ways, the `records.ROW.COLUMN` the 422 names or None for another status)."
    g = served["feats"].head(20)
    row = pl.int_range(20)

    def at(r: int, col: str, value) -> pl.Expr:
        return pl.when(row == r).then(pl.lit(value)).otherwise(pl.col(col)).alias(col)

    return [
        ("float column for an integer", g.with_columns(pl.col("active_weeks_90d").cast(pl.Float64)), "records.0.active_weeks_90d"),
        ("string column for a number", g.with_columns(pl.col("actions_email_28d").cast(pl.String)), "records.0.actions_email_28d"),
        ("int column for a category, a null first",
         g.with_columns(industry=pl.when(row == 0).then(None).otherwise(row)), "records.1.industry"),
        ("out of range", g.with_columns(at(7, "actions_email_28d", -1.0)), "records.7.actions_email_28d"),
        ("NaN", g.with_columns(at(5, "actions_crm_deals_28d", float("nan"))), "records.5.actions_crm_deals_28d"),
        ("infinity", g.with_columns(at(9, "alexa_rank_log10", float("inf"))), "records.9.alexa_rank_log10"),
        ("null where not nullable", g.with_columns(at(4, "days_since_last_activity", None)), "records.4.days_since_last_activity"),
        ("unknown category", g.with_columns(at(2, "industry", "Space Tourism")), "records.2.industry"),
        ("missing column", g.drop("users_crm_contacts_28d"), "records.0.users_crm_contacts_28d"),
        ("extra column", g.with_columns(typo=pl.lit(1)), "records.0.typo"),
        ("list column for a number", g.with_columns(actions_email_28d=pl.Series([[1.0]] * 20)), "records.0.actions_email_28d"),
        ("float id", g.with_columns(id=pl.lit(1.5)), "records.0.id"),
        ("too many rows", pl.concat([g] * 501), None),
    ]  # fmt: skip


def _json_body(df: pl.DataFrame) -> bytes:
    "The frame as JSON records, NaN and infinities as the literals a client's json.dumps writes."
    return json.dumps({"records": df.to_dicts()}).encode()


def test_each_error_class_gets_the_json_status_and_names_column_and_row(served):
    failures = []
    for name, df, where in _error_cases(served):
        j = post(served["url"], _json_body(df), "application/json")
        a = post(served["url"], ipc(df), ARROW)
        if a.status_code != j.status_code or not 400 <= a.status_code < 500:
            failures.append(f"{name}: arrow {a.status_code} json {j.status_code}: {a.text[:200]}")
        elif where is not None and not (where in a.json()["message"] and where in j.json()["message"]):
            failures.append(
                f"{name}: {where} not in arrow {a.json()['message']!r} / json {j.json()['message']!r}"
            )
        elif where is not None:
            loc = where.split(".")
            assert ["records", int(loc[1]), loc[2]] in [d["loc"] for d in a.json()["detail"]], name
    assert not failures, "\n".join(failures)


def test_bodies_that_are_not_a_table_are_400_413_415_never_500(served):
    url, big = served["url"], b"\xff" * (16 << 20)  # over the size limit (10 features x 10,000 records)
    for body, want in [(b"", 400), (b"  ", 400), (b"garbage, not arrow", 400), (b"\xff\xff\xff\xff\x10\x00", 400),
                       (ipc(served["feats"].head(3))[:-40], 400), (big, 413)]:  # fmt: skip
        a = post(url, body, ARROW)
        assert a.status_code == want, (body[:20], a.status_code, a.text[:200])
        assert a.json()["message"]
        assert post(url, body, "application/json").status_code == want  # the JSON path answers alike
    r = post(url, b"a,b", "text/csv")
    assert r.status_code == 415 and "application/json" in r.json()["message"] and ARROW in r.json()["message"]
    assert httpx.get(url + "/ready").status_code == 200


def test_token_request_id_and_openapi_apply_to_arrow(served):
    url, body = served["url"], ipc(served["feats"].head(2))
    assert post(url, body, ARROW, authorization="Bearer wrong").status_code == 401
    r = httpx.post(url + "/predict", content=body, headers={"content-type": ARROW})
    assert r.status_code == 401
    r = post(url, body, ARROW, "client-req-9")
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-req-9"
    assert (
        len(r.json()["predictions"]) == 2 and np.isfinite([p["score"] for p in r.json()["predictions"]]).all()
    )
    spec = httpx.get(url + "/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", ARROW}
