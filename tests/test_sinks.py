"""Sinks under concurrency: two writer processes appending to one log (JSON lines, PostgreSQL) lose no line;
keyed rewrites from two processes leave exactly one copy of each week."""

import multiprocessing as mp

import polars as pl
import pytest

from hsml.sinks import CsvSink, JsonlSink, PostgresSink, sink_from_spec

N_BATCHES, BATCH = 40, 25


def _append(spec: dict, worker: int) -> None:
    sink = sink_from_spec(spec)
    for b in range(N_BATCHES):
        ids = [worker * 100_000 + b * BATCH + i for i in range(BATCH)]
        sink.write(pl.DataFrame({"request_id": f"w{worker}-{b}", "id": ids, "score": [0.5] * BATCH}))


def _run_two(target, first_arg) -> None:
    "Run `target(first_arg, worker)` in two spawned processes at once; both must succeed."
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(first_arg, w)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def _check_complete(frame: pl.DataFrame) -> None:
    assert frame.height == 2 * N_BATCHES * BATCH
    assert frame["id"].n_unique() == frame.height
    assert frame["request_id"].n_unique() == 2 * N_BATCHES


def test_two_workers_append_to_one_jsonl_log(tmp_path):
    spec = {"type": "jsonl", "path": str(tmp_path / "predictions.jsonl")}
    _run_two(_append, spec)
    _check_complete(JsonlSink(spec["path"]).read())


@pytest.mark.postgres
def test_two_workers_append_to_one_postgres_table():
    from hsml.testing import local_postgres

    with local_postgres() as url:
        spec = {"type": "postgres", "uri": url, "table": "predictions"}
        PostgresSink(url, "predictions").write(
            pl.DataFrame({"request_id": ["seed"], "id": [0], "score": [0.0]})
        )
        _run_two(_append, spec)
        _check_complete(PostgresSink(url, "predictions").read().filter(pl.col("request_id") != "seed"))


def _rewrite(path: str, worker: int) -> None:
    sink = CsvSink(path)
    for week in range(15):
        for attempt in (1, 2):  # every week written twice: replaced, never duplicated
            rows = pl.DataFrame(
                {"as_of": f"w{worker}-{week}", "version": 1, "id": [1, 2, 3], "attempt": attempt}
            )
            sink.write(rows, keys=["as_of", "version"])


def test_keyed_rewrites_from_two_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "scores.csv")
    CsvSink(path).write(pl.DataFrame({"as_of": ["seed"], "version": [1], "id": [9], "attempt": [0]}))
    _run_two(_rewrite, path)
    out = CsvSink(path).read()
    assert out.height == 1 + 2 * 15 * 3  # the seed week untouched, every week of both writers once
    assert out.filter(pl.col("as_of") != "seed")["attempt"].unique().to_list() == [2]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.postgres
def test_keyed_delete_is_served_by_the_key_index():
    "A table created by a keyed write is indexed on its keys, and the replacing delete can use that index."
    import psycopg

    from hsml.sinks import _PgWrite
    from hsml.testing import local_postgres

    weeks = pl.DataFrame({"as_of": [f"w{i // 50}" for i in range(5000)], "model": "m", "id": range(5000)})
    with local_postgres() as url:
        PostgresSink(url, "scores").write(weeks, keys=["as_of", "model"])
        PostgresSink(url, "scores").write(weeks.filter(pl.col("as_of") == "w3"), keys=["as_of", "model"])
        assert PostgresSink(url, "scores").read().height == 5000  # replaced, not appended
        new = weeks.filter(pl.col("as_of") == "w7").with_columns(pl.col("id").cast(pl.String))
        w = _PgWrite('"scores"', new, ["as_of", "model"])
        with psycopg.connect(url) as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("select indexdef from pg_indexes where tablename = 'scores'")
            assert [r[0] for r in cur.fetchall()] == [
                "CREATE INDEX scores_hsml_keys ON public.scores USING btree (as_of, model)"
            ]
            cur.execute(w.stage())
            with cur.copy(w.copy()) as cp:
                cp.write(new.write_csv())
            cur.execute("set local enable_seqscan = off")
            cur.execute("explain " + w.delete())
            plan = "\n".join(r[0] for r in cur.fetchall())
    assert "scores_hsml_keys" in plan, plan
