"""The prediction log through a sink, over real HTTP: two server processes logging to one PostgreSQL table hold
every answered company exactly once; a failed write (a table of the wrong shape, a log path the server cannot
open) is retried, shown in /health and /ready meanwhile, and loses no line."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
from test_serve import NAME, Server, _company_body, world  # noqa: F401  (world: the fixture)

from hsml.serve import LOG_FIELDS, LOG_SCHEMA
from hsml.sinks import PostgresSink


def _catalog(world, tmp: Path, output: str) -> Path:
    "A catalog YAML: the sample tables, and `output` under `outputs: predictions:`."
    p = world["paths"]
    cat = tmp / "catalog.yaml"
    cat.write_text(
        f"customers: {{type: csv, path: {p['customers']}}}\n"
        f"noncustomers: {{type: csv, path: {p['noncustomers']}}}\n"
        f"usage: {{type: csv, path: {p['usage']}}}\n"
        f"outputs:\n  predictions: {output}\n"
    )
    return cat


def _traffic(world, url: str, tag: str, n_threads: int = 2, n_requests: int = 12) -> set[tuple[str, str]]:
    "Batches of /predict and a few /predict/company from concurrent clients: the (request_id, id) of every 200."
    last = max(world["feats"]["as_of"].to_list())
    week = world["feats"].filter(pl.col("as_of") == last).head(60)  # one row per company
    recs = [r | {"id": i} for r, i in zip(week.select(world["bundle"].feature_names).to_dicts(), week["id"])]
    company = world["feats"].filter(pl.col("as_of") == last)["id"].head(2).to_list()
    answered: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def client(t: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for k in range(n_requests):
                rid = f"{tag}-{t}-{k}"
                if k < len(company):
                    body = _company_body(world, company[k], last)
                    r = c.post("/predict/company", json=body, headers={"x-request-id": rid})
                else:
                    r = c.post(
                        "/predict", json={"records": recs[k : k + 5 + k]}, headers={"x-request-id": rid}
                    )
                assert r.status_code == 200, r.text
                got = {(r.json()["request_id"], str(p["id"])) for p in r.json()["predictions"]}
                with lock:
                    answered.update(got)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    return answered


def _rows(read, want: int, timeout: float = 30) -> pl.DataFrame:
    "The stored log once it holds `want` rows (or whatever it holds at the deadline)."
    deadline, df = time.monotonic() + timeout, pl.DataFrame()
    while time.monotonic() < deadline:
        try:
            df = read()
        except Exception:  # the table may not exist yet
            df = pl.DataFrame()
        if df.height >= want:
            break
        time.sleep(0.2)
    return df


def _exactly_once(df: pl.DataFrame, answered: set) -> None:
    keys = list(zip(df["request_id"].to_list(), df["id"].cast(pl.String).to_list()))
    assert len(keys) == len(set(keys)), "a (request_id, id) is stored twice"
    assert set(keys) == answered


def _wait_health(url: str, check, timeout: float = 30) -> dict:
    deadline, h = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health").json()["prediction_log"]
        if check(h):
            return h
        time.sleep(0.1)
    raise AssertionError(f"/health never showed the expected log state: {h}")


@pytest.fixture(scope="module")
def pg():
    from hsml.testing import local_postgres

    with local_postgres() as url:
        yield url


@pytest.mark.postgres
def test_two_workers_log_to_one_postgres_table(world, tmp_path, pg, monkeypatch):
    "`hsml serve --workers 2 --log-sink predictions --catalog FILE`: the table holds every answer exactly once."
    monkeypatch.setenv("HSML_LOG_DB", pg)  # the catalog reads the URI from the environment
    cat = _catalog(world, tmp_path, "{type: postgres, uri: '${HSML_LOG_DB}', table: predictions}")
    env = {"HSML_REGISTRY": str(world["registry"]), "HSML_API_TOKEN": "", "HSML_LOG_DB": pg}
    s = Server(
        f"{NAME}@production",
        env,
        tmp_path,
        workers=2,
        cli=["--log-sink", "predictions", "--catalog", str(cat)],
    )
    sink = PostgresSink(pg, "predictions")
    try:
        answered = _traffic(world, s.url, "pg", n_threads=3)
        assert len(answered) > 100
        df = _rows(sink.read, len(answered))
        _exactly_once(df, answered)
        h = _wait_health(s.url, lambda h: h["pending"] == 0)
        assert h["to"].startswith("postgres table predictions on postgresql://") and h["error"] is None
    finally:
        s.stop()
    df = sink.read()  # after the shutdown flush: still exactly once
    _exactly_once(df, answered)
    assert df.columns == list(LOG_FIELDS) and df.schema == pl.Schema(LOG_SCHEMA)
    assert (df["model"] == NAME).all() and df["timestamp"].is_not_null().all()
    company = df.filter(pl.col("endpoint") == "predict/company")
    assert company.height == 6 and (company["rank"] == 1).all() and company["as_of"].is_not_null().all()


@pytest.mark.postgres
def test_a_failed_table_write_is_retried_and_loses_nothing(world, tmp_path, pg):
    "A table of the wrong shape makes every write fail: /health and /ready say so; once it is fixed, all rows land once."
    import psycopg

    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("create table broken_log (request_id bigint)")
    cat = _catalog(world, tmp_path, f"{{type: postgres, uri: '{pg}', table: broken_log}}")
    env = {"HSML_REGISTRY": str(world["registry"]), "HSML_API_TOKEN": ""}
    s = Server(f"{NAME}@production", env, tmp_path, cli=["--log-sink", "predictions", "--catalog", str(cat)])
    sink = PostgresSink(pg, "broken_log")
    try:
        answered = _traffic(world, s.url, "fail", n_threads=1, n_requests=6)
        h = _wait_health(s.url, lambda h: h["error"] is not None)
        assert "write failed, nothing was changed" in h["error"] and h["pending"] == len(answered)
        r = httpx.get(s.url + "/ready")
        assert r.status_code == 503 and r.json()["problem"].startswith("prediction log: HsmlError"), r.text
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute("drop table broken_log")  # the fix: the next retry creates the right table
        h = _wait_health(s.url, lambda h: h["pending"] == 0)
        assert h["error"] is None and h["written"] == len(answered)
        assert httpx.get(s.url + "/ready").status_code == 200
        _exactly_once(sink.read(), answered)
    finally:
        s.stop()
    _exactly_once(sink.read(), answered)


def test_a_failed_jsonl_write_is_retried_and_loses_nothing(world, tmp_path):
    """A catalog `jsonl` output is the default log format (the same lines); a log the server cannot open (a
    directory in its place) is retried until it can: every answered company is then in the file once."""
    log = tmp_path / "logs" / "predictions.jsonl"
    log.mkdir(parents=True)
    cat = _catalog(world, tmp_path, "{type: jsonl, path: logs/predictions.jsonl}")
    env = {"HSML_REGISTRY": str(world["registry"]), "HSML_API_TOKEN": ""}
    s = Server(f"{NAME}@production", env, tmp_path, cli=["--log-sink", "predictions", "--catalog", str(cat)])
    try:
        answered = _traffic(world, s.url, "dir", n_threads=1, n_requests=6)
        h = _wait_health(s.url, lambda h: h["error"] is not None)
        assert h["error"].startswith("IsADirectoryError") and h["pending"] == len(answered)
        assert h["to"] == str(log)
        log.rmdir()
        h = _wait_health(s.url, lambda h: h["pending"] == 0)
        assert h["error"] is None and h["written"] == len(answered)
    finally:
        s.stop()
    df = pl.read_ndjson(log, infer_schema_length=None)
    assert df.columns[:7] == ["request_id", "model", "version", "digest", "endpoint", "as_of", "timestamp"]
    assert set(df.columns) == set(LOG_FIELDS)
    _exactly_once(df, answered)
