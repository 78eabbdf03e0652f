"""The impact loop as a team runs it, through the real commands and the real HTTP server: design, register, four
weekly lists with a holdout (`hsml score --experiment`), lookups on `hsml serve --experiment`, calls and a later
extract with a planted effect, `hsml impact report`; and SRM on a broken log."""

import datetime as dt
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

HSML = [str(Path(sys.executable).parent / "hsml")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NAME, EXP, K, SHARE, H = "conv-loop", "loop-calls", 150, 0.3, 56
WEEKS = [dt.date(2020, 4, 6) + dt.timedelta(weeks=i) for i in range(4)]


def run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([*HSML, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=900)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _train_and_register(data: Path, tmp: Path, registry: Path) -> None:
    "A calibrated logistic regression on the minimal features (the training notebook is tested in test_train)."
    from hsml.bundle import save_bundle
    from hsml.contracts import load_tables
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.trainset import build_training_set

    ts = build_training_set(
        load_tables(data), "2019-06-03", "2020-02-03", 7, H, feature_set="minimal", audit=False
    )
    num, cat = columns_from_spec(ts.spec)
    pipe = fit_model(make_model("logreg", num, cat, seed=0), ts.frame, horizon_days=H)
    meta = {"name": NAME, "model": "logreg", "feature_set": "minimal", "horizon_days": H}
    save_bundle(tmp / "bundle", pipe, ts.spec, {}, meta, train_frame=ts.frame)
    r = run("registry", "publish", tmp / "bundle", "--name", NAME, "--alias", "production", "--registry", registry,
            "--tracking", "disabled")  # fmt: skip
    assert r.returncode == 0, r.stderr


def _serve(registry: Path, log: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [*HSML, "serve", "--model", f"{NAME}@production", "--registry", str(registry), "--port", str(port)]
    cmd += ["--experiment", EXP, "--holdout-share", str(SHARE), "--log", str(log)]
    out = open(tmp / "server.out", "w")
    proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / "server.out").read_text()
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise AssertionError("the server did not start")


def _later_extract(data: Path, later: Path, first: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    "Calls (70% of the treatment arm reached) and a later extract where a reached company converts with +0.10."
    called = first.filter(pl.col("arm") == "treatment")
    reached = rng.random(called.height) < 0.7
    calls = pl.DataFrame({"id": called["id"], "reached": reached.astype(int)})
    customers = pl.read_csv(data / "customers.csv", infer_schema_length=None)
    prospects = pl.read_csv(data / "noncustomers.csv", infer_schema_length=None)
    close = customers.select("id", pl.col("CLOSEDATE").str.to_date())
    soon = (pl.col("CLOSEDATE") > pl.col("as_of")) & (
        pl.col("CLOSEDATE") <= pl.col("as_of") + pl.duration(days=H)
    )
    cand = called.filter(pl.Series(reached)).select("id", "as_of").join(close, on="id", how="left")
    cand = cand.filter(~soon.fill_null(False))
    conv = cand.filter(pl.Series(rng.random(cand.height) < 0.10))
    conv = conv.select(
        "id",
        CLOSEDATE=(pl.col("as_of") + pl.duration(days=pl.Series(rng.integers(1, H + 1, conv.height)))).cast(
            pl.String
        ),
        MRR=pl.Series(rng.choice(customers["MRR"].filter(customers["MRR"] > 0).to_numpy(), conv.height)),
    )
    later.mkdir()
    upd = customers.join(conv, on="id", how="left", suffix="_new").with_columns(
        CLOSEDATE=pl.coalesce("CLOSEDATE_new", "CLOSEDATE"), MRR=pl.coalesce("MRR_new", "MRR")
    )
    moved = prospects.join(conv, on="id").select(customers.columns)
    pl.concat([upd.select(customers.columns), moved]).write_csv(later / "customers.csv")
    prospects.join(conv, on="id", how="anti").write_csv(later / "noncustomers.csv")
    shutil.copy(data / "usage_actions.csv", later / "usage_actions.csv")
    return calls


def _lookup(url: str, data: Path, cid: int, day: dt.date) -> dict:
    "POST /predict/company with the company's raw row and usage, as the CRM would."
    rows = [pl.read_csv(data / f, infer_schema_length=0) for f in ("customers.csv", "noncustomers.csv")]
    comp = pl.concat([r.select("id", "ALEXA_RANK", "EMPLOYEE_RANGE", "INDUSTRY") for r in rows])
    comp = comp.filter(pl.col("id") == str(cid)).row(0, named=True)
    usage = pl.read_csv(data / "usage_actions.csv", infer_schema_length=0).filter(pl.col("id") == str(cid))
    body = {"id": cid, "as_of": str(day), "company": {k: v for k, v in comp.items() if k != "id"}}
    body["usage"] = [{k: v for k, v in u.items() if k != "id"} for u in usage.iter_rows(named=True)]
    r = httpx.post(url + "/predict/company", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_impact_loop_through_the_commands_and_the_http_server(tmp_path):
    data, registry = tmp_path / "extract", tmp_path / "registry"
    assert run("data", "generate", "--out", data, "--companies", "3000", "--seed", "0").returncode == 0
    # 1. design
    r = run("impact", "design", "--baseline-rate", "0.02", "--effect", "0.07", "--k", K, "--holdout-share", SHARE,
            "--new-share", "0.45", "--json")  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["weeks"] <= 26
    # 2. train and register
    _train_and_register(data, tmp_path, registry)
    # 3. four weekly lists with a holdout, each appended to the prediction log
    log = tmp_path / "predictions.jsonl"
    for day in WEEKS:
        r = run("score", "--model", f"{NAME}@production", "--registry", registry, "--data-dir", data, "--as-of", day,
                "--out", tmp_path / f"list-{day}.csv", "--experiment", EXP, "--holdout-share", SHARE, "--log", log)  # fmt: skip
        assert r.returncode == 0, r.stderr
    lists = pl.concat(
        [
            pl.read_csv(tmp_path / f"list-{d}.csv", try_parse_dates=True).filter(pl.col("rank").is_not_null())
            for d in WEEKS
        ]
    )
    assert lists.group_by("id").agg(pl.col("arm").n_unique())["arm"].max() == 1  # sticky arms across weeks
    top = lists.filter(pl.col("rank") <= K)
    first = top.sort("as_of", "rank").group_by("id", maintain_order=True).first()
    # 4. the CRM looks companies up on the service during the first week: it shows the same arm
    serve_log = tmp_path / "serve.jsonl"
    proc, url = _serve(registry, serve_log, tmp_path)
    try:
        week1 = lists.filter(pl.col("as_of") == WEEKS[0]).sort("rank")
        picks = (
            week1.head(3)
            .vstack(week1.filter(pl.col("arm") == "holdout").head(2))
            .vstack(week1.slice(K + 10, 1))
        )
        for row in picks.iter_rows(named=True):
            ans = _lookup(url, data, row["id"], WEEKS[0])
            assert ans["experiment"] == EXP and ans["predictions"][0]["arm"] == row["arm"]
            assert abs(ans["predictions"][0]["score"] - row["score"]) < 1e-9
    finally:
        proc.terminate()
        proc.wait(30)
    logged = [json.loads(x) for x in serve_log.read_text().splitlines()]
    assert [x["arm"] for x in logged] == picks["arm"].to_list() and {x["experiment"] for x in logged} == {EXP}
    # 5. calls, then a later extract with a planted effect
    calls = _later_extract(data, tmp_path / "later", first, np.random.default_rng(7))
    calls.write_csv(tmp_path / "calls.csv")
    # 6. the impact report: the horizon comes from the logged model in the registry
    common = [
        "--data-dir",
        tmp_path / "later",
        "--calls",
        tmp_path / "calls.csv",
        "--k",
        K,
        "--registry",
        registry,
    ]
    r = run("impact", "report", "--log", log, *common, "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "report" / "impact.json").read_text())
    assert list(rep)[:6] == ["srm", "matured", "sequential", "immature", "drift", "calibration"]
    assert rep["outcomes"]["horizon_days"] == H and not rep["srm"]["alarm"]
    m = rep["matured"]
    assert m["companies"] == {a: int((first["arm"] == a).sum()) for a in ("treatment", "holdout")}
    planted = 0.10 * calls["reached"].mean()  # the effect of being in the called arm, in expectation
    assert m["lift"]["ci_low"] <= planted <= m["lift"]["ci_high"] and m["lift"]["ci_low"] > 0
    assert 0.6 < m["effect_on_reached"]["reach_difference"] < 0.8
    assert len(rep["sequential"]["by_week"]) == 4 and (tmp_path / "report" / "sequential.png").exists()
    # the service's lookups, logged beside the lists, change nothing: a lookup puts nobody on the list
    r = run("impact", "report", "--log", serve_log, "--log", log, *common, "--out", tmp_path / "with-lookups")
    assert r.returncode == 0, r.stderr
    both = json.loads((tmp_path / "with-lookups" / "impact.json").read_text())
    assert {k: v for k, v in both.items() if k != "log"} == {k: v for k, v in rep.items() if k != "log"}
    # 7. SRM: a worker (serving the odd ids) that lost the arm of its holdout lines voids the result, and says so
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    broken = [
        {k: v for k, v in x.items() if not (k == "arm" and x["arm"] == "holdout" and x["id"] % 2)}
        for x in lines
    ]
    (tmp_path / "broken.jsonl").write_text("".join(json.dumps(x) + "\n" for x in broken))
    r = run("impact", "report", "--log", tmp_path / "broken.jsonl", *common, "--out", tmp_path / "broken")
    assert r.returncode == 0 and "SAMPLE RATIO MISMATCH" in r.stderr
    assert json.loads((tmp_path / "broken" / "impact.json").read_text())["srm"]["alarm"] is True
