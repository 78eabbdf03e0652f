"""`hsml score` delivering the weekly list: through a catalog sink (a real local PostgreSQL table: a week of one
model version replaced, never duplicated; other weeks and versions untouched; a failed write rolled back), with a
holdout experiment's arms, and with a prediction log the impact report reads. Real subprocesses, real files."""

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

HSML = [str(Path(sys.executable).parent / "hsml")]  # the console script, as users run it
NAME = "sink-demo"
TABLE = "prospect_scores"


@pytest.fixture(scope="module")
def world(tmp_path_factory, score_data) -> dict:
    "Generated data, a small LightGBM published twice (v1, v2: two versions of one model) in a registry."
    import numpy as np

    from hsml.bundle import save_bundle
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.registry import publish
    from hsml.snapshots import data_end
    from hsml.trainset import build_training_set

    d = tmp_path_factory.mktemp("score-sink")
    tables = score_data["tables"]
    last = tables.usage["WHEN_TIMESTAMP"].max().date()
    ts = build_training_set(tables, last - dt.timedelta(days=140), last - dt.timedelta(days=56), 28, 28)
    f = ts.frame
    busy = f["actions_total_sum_84d"].fill_null(0).to_numpy()
    f = f.with_columns(label=pl.Series((busy > np.quantile(busy, 0.8)).astype(np.int8)))
    pipe = fit_model(
        make_model("lgbm", *columns_from_spec(ts.spec), seed=0, n_estimators=20, min_child_samples=5),
        f,
        horizon_days=28,
    )
    meta = {"name": NAME, "model": "lgbm", "feature_set": "default", "horizon_days": 28}
    save_bundle(d / "run" / "model", pipe, ts.spec, {}, meta, train_frame=f)
    for _ in (1, 2):
        publish(d / "run", NAME, root=d / "registry", tracking="disabled")
    latest = data_end(tables)["latest_as_of"]
    return {
        "tmp": d,
        "data": score_data["data"],
        "registry": d / "registry",
        "tables": tables,
        "latest": latest,
    }


def run(world: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HSML_REGISTRY": str(world["registry"])}
    return subprocess.run([*HSML, *args], capture_output=True, text=True, env=env, timeout=600)


def write_catalog(path: Path, data: Path, outputs: str) -> Path:
    "A catalog YAML: the three CSVs of `data` as inputs, and the `outputs:` block given."
    files = {"customers": "customers.csv", "noncustomers": "noncustomers.csv", "usage": "usage_actions.csv"}
    lines = [f"{t}: {{type: csv, path: {data / f}}}" for t, f in files.items()]
    path.write_text("\n".join(lines) + "\noutputs:\n" + outputs)
    return path


def score_args(world: dict, version: int, as_of: dt.date, *extra: str) -> list[str]:
    return ["score", "--model", f"{NAME}@{version}", "--as-of", str(as_of), *extra]


# ---------------------------------------------------------------------------------------------------------
# a PostgreSQL table through the catalog


@pytest.fixture(scope="module")
def warehouse(world):
    "A throwaway local PostgreSQL and a catalog whose `scores` output is a table in it."
    from hsml.testing import local_postgres

    with local_postgres() as url:
        yield {"url": url, "catalog": write_catalog(world["tmp"] / "catalog.yaml", world["data"],
                                                    f"  scores: {{type: postgres, uri: '{url}', table: {TABLE}}}\n")}  # fmt: skip


def table(url: str) -> pl.DataFrame:
    "The scores table as a back-end team reads it: plain SQL."
    import psycopg

    with psycopg.connect(url) as con, con.cursor() as cur:
        cur.execute(f"select * from {TABLE} order by as_of, model_version, id")
        cols = [c.name for c in cur.description]
        return pl.DataFrame(cur.fetchall(), schema=cols, orient="row", infer_schema_length=None)


def counts(frame: pl.DataFrame) -> dict:
    return {(str(a), v): n for a, v, n in frame.group_by("as_of", "model_version").len().iter_rows()}


@pytest.mark.postgres
def test_sink_rewrite_replaces_the_week_of_one_version_only(world, warehouse):
    url, cat = warehouse["url"], str(warehouse["catalog"])
    w, w_before = world["latest"], world["latest"] - dt.timedelta(days=7)
    out = world["tmp"] / "also-a-file.parquet"
    r = run(world, *score_args(world, 1, w, "--catalog", cat, "--sink", "scores", "--out", str(out)))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"postgres table {TABLE} on" in r.stdout and f"those of {w}, {NAME} v1 replaced" in r.stdout, (
        r.stdout
    )
    first = table(url)
    listed = pl.read_parquet(out)  # --out keeps working beside the sink: the same rows
    assert first.height == listed.height > 0
    assert sorted(first["id"].to_list()) == sorted(listed["id"].to_list())
    assert first["score"].drop_nulls().sort().to_list() == listed["score"].drop_nulls().sort().to_list()

    # the same week of the same version again: replaced, never duplicated (the data from the catalog itself)
    r = run(world, *score_args(world, 1, w, "--catalog", cat, "--sink", "scores"))
    assert r.returncode == 0, r.stderr
    again = table(url)
    assert again.height == first.height and again.drop("model_digest").equals(first.drop("model_digest"))

    # another week and another version: added beside it
    for v, day in ((1, w_before), (2, w)):
        r = run(world, *score_args(world, v, day, "--data-dir", str(world["data"]), "--catalog", cat, "--sink", "scores"))  # fmt: skip
        assert r.returncode == 0, r.stderr
    n = first.height
    stored = table(url)
    c = counts(stored)
    assert c[(str(w), 1)] == n and c[(str(w), 2)] == n and c[(str(w_before), 1)] > 0 and len(c) == 3

    # week w of v1 rewritten with other content (every prospect ranked): only those rows change
    r = run(
        world, *score_args(world, 1, w, "--catalog", cat, "--sink", "scores", "--population", "unconverted")
    )
    assert r.returncode == 0, r.stderr
    after = table(url)
    mine = (pl.col("as_of") == w) & (pl.col("model_version") == 1)
    assert after.filter(mine)["unscored_reason"].null_count() == after.filter(mine).height  # the new list
    assert stored.filter(mine)["unscored_reason"].null_count() < stored.filter(mine).height  # the old one
    assert after.filter(~mine).equals(stored.filter(~mine))  # other weeks and versions untouched
    assert counts(after) == counts(stored)  # as many rows: the week's prospects, once


@pytest.mark.postgres
def test_sink_failed_write_leaves_the_table_as_it_was(world, warehouse):
    "A constraint the new rows break fails the insert after the old rows were deleted: all of it is rolled back."
    import psycopg

    url, cat = warehouse["url"], str(warehouse["catalog"])
    w = world["latest"]
    r = run(world, *score_args(world, 1, w, "--catalog", cat, "--sink", "scores"))
    assert r.returncode == 0, r.stderr
    before = table(url)
    assert before.filter(pl.col("rank") > 100).height > 0  # the week holds ranks the constraint refuses
    with psycopg.connect(url, autocommit=True) as con:  # a back-end team: only the top 100, on new rows
        con.execute(f"alter table {TABLE} add constraint top_100 check (rank <= 100) not valid")
    log = world["tmp"] / "not-written.jsonl"
    try:
        r = run(world, *score_args(world, 1, w, "--catalog", cat, "--sink", "scores", "--log", str(log)))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "write failed, nothing was changed" in r.stderr and "top_100" in r.stderr, r.stderr
        assert table(url).equals(before)
        assert not log.exists()  # the list was not delivered: no log lines claim it was
    finally:
        with psycopg.connect(url, autocommit=True) as con:
            con.execute(f"alter table {TABLE} drop constraint top_100")


TUTORIAL = Path(__file__).resolve().parents[1] / "nbs" / "tutorials" / "deploy_and_consume.ipynb"


@pytest.mark.postgres
def test_tutorial_backend_query_reads_the_table_without_hsml(world, warehouse, tmp_path):
    "The tutorial's back-end cell, run alone in a fresh interpreter (no hsml import), returns the top of the list."
    nb = json.loads(TUTORIAL.read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    found = [c for c in cells if "# backend.py" in c]
    assert len(found) == 1
    code = found[0].replace("#| postgres\n", "").replace('"conversion-demo"', repr(NAME))
    assert "import hsml" not in code and "from hsml" not in code  # plain psycopg and SQL
    r = run(
        world,
        *score_args(world, 2, world["latest"], "--catalog", str(warehouse["catalog"]), "--sink", "scores"),
    )
    assert r.returncode == 0, r.stderr
    (tmp_path / "backend.py").write_text(code.replace('"version": 1', '"version": 2'))
    env = {"PATH": os.environ["PATH"], "HSML_WAREHOUSE_URI": warehouse["url"]}
    p = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "backend.py")], capture_output=True, text=True, env=env
    )
    assert p.returncode == 0, p.stderr
    rows = [x for x in p.stdout.splitlines() if x.startswith("(")]
    expected = (
        table(warehouse["url"])
        .filter(
            (pl.col("model_version") == 2)
            & (pl.col("as_of") == world["latest"])
            & pl.col("rank").is_not_null()
        )
        .sort("rank")
    )
    assert [int(x[1:].split(",")[0]) for x in rows] == expected["id"].head(5).to_list()


def test_sink_errors_are_one_clear_message(world, tmp_path):
    cat = write_catalog(
        tmp_path / "c.yaml", world["data"], f"  scores: {{type: csv, path: {tmp_path / 's.csv'}}}\n"
    )
    w = str(world["latest"])
    cases = [
        (["--data-dir", str(world["data"]), "--sink", "scores"], "no catalog was given"),
        (["--catalog", str(cat), "--sink", "warehouse"], "no output named 'warehouse'"),
        (["--data-dir", str(world["data"])], "nothing to write the list to"),
        (["--out", str(tmp_path / "s.csv")], "no data to score"),
        (["--catalog", str(cat), "--sink", "scores", "--holdout-share", "0.2"], "go together"),
        (["--catalog", str(cat), "--sink", "scores", "--experiment", "e", "--holdout-share", "1.5"], "1.5"),
    ]
    for extra, msg in cases:
        r = run(world, "score", "--model", f"{NAME}@1", "--as-of", w, *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr, (extra, r.stderr)
    assert not (tmp_path / "s.csv").exists()  # every check before the scoring


# ---------------------------------------------------------------------------------------------------------
# a holdout experiment and the prediction log


def test_experiment_arms_and_prediction_log_feed_the_impact_report(world, tmp_path):
    from hsml.impact_design import assign_arm
    from hsml.impact_report import read_prediction_logs

    log = tmp_path / "predictions.jsonl"
    weeks = [world["latest"] - dt.timedelta(days=d) for d in (70, 63)]  # matured within the extract
    lists = []
    for week in weeks:
        out = tmp_path / f"scores-{week}.parquet"
        r = run(world, *score_args(world, 2, week, "--data-dir", str(world["data"]), "--out", str(out),
                                   "--experiment", "q3-calls", "--holdout-share", "0.3", "--log", str(log)))  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "experiment q3-calls:" in r.stdout and "holdout (share 0.3)" in r.stdout, r.stdout
        lists.append(pl.read_parquet(out))
    for df in lists:
        cols = df.columns
        assert cols[: cols.index("arm") + 1] == [
            "id",
            "as_of",
            "score",
            "rank",
            "decile",
            "experiment",
            "arm",
        ]
        scored = df.filter(pl.col("unscored_reason").is_null())
        unscored = df.filter(pl.col("unscored_reason").is_not_null())
        assert scored["rank"].to_list() == list(range(1, scored.height + 1))  # 1 = highest score
        assert scored["score"].is_sorted(descending=True)
        assert scored["arm"].to_list() == assign_arm("q3-calls", scored["id"].to_list(), 0.3)
        assert (scored["experiment"] == "q3-calls").all()
        assert (
            unscored.height > 0
            and unscored.select("experiment", "arm", "rank").null_count().row(0) == (unscored.height,) * 3
        )  # not in the experiment
    both = (
        lists[0]
        .join(lists[1], on="id", suffix="_2")
        .filter(pl.col("arm").is_not_null() & pl.col("arm_2").is_not_null())
    )
    assert both.height > 0 and (both["arm"] == both["arm_2"]).all()  # sticky across weeks

    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert set(lines[0]) >= {"request_id", "model", "version", "id", "score", "timestamp", "experiment", "arm",
                             "rank", "as_of", "holdout_share"}  # fmt: skip
    assert len(lines) == sum(df["unscored_reason"].null_count() for df in lists)  # one per scored company
    assert len({x["request_id"] for x in lines}) == 2  # one per run
    assert {(x["model"], x["version"], x["holdout_share"]) for x in lines} == {(NAME, 2, 0.3)}
    frame, info = read_prediction_logs(log)
    assert info["predictions"] == len(lines) and info["torn_lines"] == 0
    logged = frame.filter(pl.col("as_of") == str(weeks[0])).select(
        pl.col("id").cast(pl.Int64), "score", "rank", "arm"
    )
    listed = lists[0].filter(pl.col("unscored_reason").is_null()).select("id", "score", "rank", "arm")
    assert logged.sort("id").equals(listed.sort("id"))

    r = run(world, "impact", "report", "--log", str(log), "--data-dir", str(world["data"]), "--out",
            str(tmp_path / "impact"), "--k", "60")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "impact" / "impact.json").read_text())
    first_week = set(lists[0].filter(pl.col("rank") <= 60)["id"].to_list())
    later = set(lists[1].filter(pl.col("rank") <= 60)["id"].to_list()) - first_week
    assert rep["srm"]["n_treatment"] + rep["srm"]["n_holdout"] == len(first_week | later)  # each company once


# ---------------------------------------------------------------------------------------------------------
# the same through papermill


def test_score_notebook_writes_through_the_sink_with_an_experiment(world, tmp_path):
    import papermill as pm

    from hsml.impact_report import read_prediction_logs

    nb = Path(__file__).resolve().parents[1] / "experiments" / "score.ipynb"
    cat = write_catalog(
        tmp_path / "c.yaml", world["data"], "  scores: {type: parquet, path: weekly.parquet}\n"
    )
    params = {"model": f"{NAME}@2", "registry": str(world["registry"]), "catalog": str(cat), "sink": "scores"}
    params |= {"experiment": "q3-calls", "holdout_share": 0.2, "log": str(tmp_path / "p.jsonl"), "top_n": 5}
    for k in (1, 2):  # the same week twice: its rows once in the sink, two runs in the log
        pm.execute_notebook(str(nb), str(tmp_path / f"run{k}.ipynb"), parameters=params, progress_bar=False,
                            kernel_name="python3")  # fmt: skip
    stored = pl.read_parquet(tmp_path / "weekly.parquet")
    assert stored["as_of"].unique().to_list() == [world["latest"]] and stored["id"].is_unique().all()
    assert (stored["model_version"] == 2).all() and "arm" in stored.columns
    scored = stored.filter(pl.col("unscored_reason").is_null())
    assert set(scored["arm"].unique().to_list()) == {"treatment", "holdout"}
    frame, info = read_prediction_logs(tmp_path / "p.jsonl")
    assert info["records"] == 2 * scored.height and frame["request_id"].n_unique() == 2
    # with a sink and no out: no default file
    assert not list(Path.cwd().glob(f"experiments/runs/scores-{NAME}-*"))
    text = (tmp_path / "run2.ipynb").read_text()
    assert "experiment q3-calls:" in text and "weekly.parquet" in text
