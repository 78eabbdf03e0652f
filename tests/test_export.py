"""Artifacts other platforms load: the MLflow export, MLflow's own scoring server, and hsml's HTTP API called
without hsml (the deploy-and-consume tutorial's stdlib client and curl), all on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from hsml.bundle import demo_bundle, demo_frame, load_bundle, probe_frame
from hsml.cli import main
from hsml.testing import free_port

TUTORIAL = Path(__file__).resolve().parents[1] / "nbs" / "tutorials" / "deploy_and_consume.ipynb"


def test_import_hsml_never_imports_mlflow():
    code = (
        "import sys, hsml, hsml.cli, hsml.bundle, hsml.serve\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    "A demo bundle published to a registry, exported through the CLI by reference NAME:VERSION."
    from hsml.registry import publish

    pytest.importorskip("mlflow.pyfunc", reason="the mlflow extra is not installed")
    tmp = tmp_path_factory.mktemp("export")
    demo_bundle(tmp / "run" / "model", name="demo-export")
    reg = tmp / "registry"
    v = publish(tmp / "run", "demo-export", root=reg, tracking="disabled")
    out = tmp / "mlflow-model"
    assert (
        main(["bundle", "export", "--format", "mlflow", f"demo-export:{v}", str(out), "--registry", str(reg)])
        == 0
    )
    return {"tmp": tmp, "out": out, "bundle": load_bundle(tmp / "run" / "model"), "version": v}


def test_export_directory_is_an_mlflow_model(exported):
    import yaml

    out = exported["out"]
    mlmodel = yaml.safe_load((out / "MLmodel").read_text())
    assert "python_function" in mlmodel["flavors"]
    meta = mlmodel["metadata"]["hsml_bundle"]
    b = exported["bundle"]
    assert meta == {
        "name": "demo-export",
        "version": exported["version"],
        "digest": b.digest,
        "format_version": 1,
    }
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [c["name"] for c in inputs] == b.feature_names
    assert {c["name"]: c["type"] for c in inputs}["alexa_rank_unknown"] == "boolean"
    reqs = (out / "requirements.txt").read_text().split()
    names = {r.split("==")[0].lower().replace("_", "-") for r in reqs}
    assert {"numpy", "polars", "scikit-learn", "lightgbm", "joblib", "mlflow-skinny"} <= names
    assert all("==" in r for r in reqs), reqs
    assert not names & {"wandb", "optuna", "typer", "fastapi", "papermill", "torch"}
    example = json.loads((out / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == b.feature_names
    # the bundle inside is byte for byte the published one
    assert json.loads((out / "artifacts" / "bundle" / "hashes.json").read_text()) == b.hashes


def test_mlflow_load_model_scores_equal_bundle_predict(exported):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(exported["out"]))
    b = exported["bundle"]
    rows = demo_frame(2000, seed=11)
    np.testing.assert_array_equal(np.asarray(model.predict(rows.to_pandas())), b.predict(rows))
    probe = probe_frame(b.input_schema, n=64)  # nulls, extremes
    np.testing.assert_array_equal(np.asarray(model.predict(probe.to_pandas())), b.predict(probe))


def test_mlflow_models_serve_answers_the_same(exported):
    "`mlflow models serve --env-manager local` on 127.0.0.1: bounded start, one request, stopped by the test."
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    mlflow_cli = shutil.which("mlflow", path=env["PATH"])
    assert mlflow_cli, "the mlflow command is not installed"
    log = open(exported["tmp"] / "mlflow-serve.log", "w")
    # `timeout` ends the server by itself should this test process die before its `finally`
    cmd = [
        "timeout",
        "300",
        mlflow_cli,
        "models",
        "serve",
        "-m",
        str(exported["out"]),
        "--env-manager",
        "local",
    ]
    proc = subprocess.Popen(
        [*cmd, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # mlflow starts uvicorn as a child: stop the whole group we started
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (exported["tmp"] / "mlflow-serve.log").read_text()
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not start in 120 s"
            time.sleep(0.5)
        b = exported["bundle"]
        rows = demo_frame(300, seed=12).select(b.feature_names)
        body = {"dataframe_split": {"columns": rows.columns, "data": [list(r) for r in rows.iter_rows()]}}
        req = urllib.request.Request(
            url + "/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            got = json.loads(r.read())["predictions"]
        np.testing.assert_allclose(got, b.predict(rows), rtol=0, atol=1e-12)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_export_errors_are_one_line_exit_2(exported, capsys):
    tmp = exported["tmp"]
    assert main(["bundle", "export", "--format", "onnx", str(tmp / "run"), str(tmp / "x")]) == 2
    assert "--format 'onnx' is not supported" in capsys.readouterr().err
    assert main(["bundle", "export", str(tmp / "run"), str(exported["out"])]) == 2  # not empty
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["bundle", "export", "nobody:3", str(tmp / "y"), "--registry", str(tmp / "registry")]) == 2
    assert "no model named 'nobody'" in capsys.readouterr().err
    assert not (tmp / "x").exists() and not (tmp / "y").exists()


def test_categorical_bundle_through_mlflow(tmp_path):
    "A category feature: the input example validates, and MLflow scores strings like hsml does."
    import mlflow.pyfunc

    from hsml.export import export_mlflow

    b = load_bundle(demo_bundle(tmp_path / "b", kind="logreg_cat"))
    model = mlflow.pyfunc.load_model(str(export_mlflow(b.path, tmp_path / "m")))
    rows = demo_frame(400, seed=13, categorical=True)
    np.testing.assert_array_equal(np.asarray(model.predict(rows.to_pandas())), b.predict(rows))


# --- the deploy-and-consume tutorial's clients, against a real `hsml serve` on 127.0.0.1 -------------------


def tutorial_cell(start: str) -> str:
    "The one code cell of the tutorial whose source starts with `start`."
    nb = json.loads(TUTORIAL.read_text())
    found = [
        "".join(c["source"])
        for c in nb["cells"]
        if c["cell_type"] == "code" and "".join(c["source"]).startswith(start)
    ]
    assert len(found) == 1, f"{len(found)} cells of {TUTORIAL.name} start with {start!r}"
    return found[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    "A LightGBM model on generated sample data, published as NAME@production and served by `hsml serve`."
    import datetime as dt

    import polars as pl

    from hsml import synth
    from hsml.bundle import save_bundle
    from hsml.contracts import load_tables
    from hsml.models import columns_from_spec, fit_model, make_model
    from hsml.registry import publish
    from hsml.trainset import build_training_set

    tmp = tmp_path_factory.mktemp("served")
    synth.generate(tmp / "data", companies=400, seed=3)
    tables = load_tables(tmp / "data")
    last = tables.usage["WHEN_TIMESTAMP"].max().date()
    ts = build_training_set(
        tables,
        as_of_start=last - dt.timedelta(days=84),
        as_of_end=last - dt.timedelta(days=28),
        every_days=28,
        horizon_days=28,
    )
    rng = np.random.default_rng(0)  # random labels: the model only has to exist (few positives in 400)
    frame = ts.frame.with_columns(label=pl.Series(rng.integers(0, 2, ts.frame.height)))
    pipe = fit_model(make_model("lgbm", *columns_from_spec(ts.spec), seed=0, n_estimators=30), frame)
    meta = {"name": "consume", "model": "lgbm", "feature_set": "default", "horizon_days": 28}
    save_bundle(tmp / "run" / "model", pipe, ts.spec, {}, meta, train_frame=frame)
    publish(tmp / "run", "consume", root=tmp / "registry", tracking="disabled", alias="production")
    port = free_port()
    hsml_cli = str(Path(sys.executable).parent / "hsml")
    log = open(tmp / "server.log", "w")
    cmd = [
        "timeout",
        "600",
        hsml_cli,
        "serve",
        "--model",
        "consume@production",
        "--registry",
        str(tmp / "registry"),
    ]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log", str(tmp / "predictions.jsonl")],
        env={**os.environ, "HSML_API_TOKEN": "", "OMP_NUM_THREADS": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "hsml serve did not start in 90 s"
                time.sleep(0.2)
        rows = ts.frame.filter(pl.col("as_of") == ts.frame["as_of"].max()).head(4)
        cid, as_of = rows["id"][0], rows["as_of"][0].isoformat()
        raw = pl.read_csv(tmp / "data" / "noncustomers.csv", infer_schema=False).filter(
            pl.col("id") == str(cid)
        )
        usage = pl.read_csv(tmp / "data" / "usage_actions.csv", infer_schema=False)
        usage = usage.filter((pl.col("id") == str(cid)) & (pl.col("WHEN_TIMESTAMP") < as_of)).drop("id")
        b = load_bundle(tmp / "run" / "model")
        yield {
            "tmp": tmp,
            "url": url,
            "bundle": b,
            "rows": rows,
            "records": [{"id": r["id"], **{k: r[k] for k in b.feature_names}} for r in rows.to_dicts()],
            "company": {k: raw[k][0] for k in ("ALEXA_RANK", "EMPLOYEE_RANGE", "INDUSTRY")},
            "usage": usage.to_dicts(),
            "cid": cid,
            "as_of": as_of,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_tutorial_plain_python_client(served):
    "The tutorial's client.py cell (standard library only) against the real server: /predict, /predict/company."
    code = tutorial_cell("# client.py")
    assert "import hsml" not in code and "from hsml" not in code
    client: dict = {}
    exec(compile(code, "client.py", "exec"), client)
    b, url = served["bundle"], served["url"]
    scores = client["predict"](url, served["records"], request_id="test-client-1")
    np.testing.assert_allclose(scores, b.predict(served["rows"]), rtol=0, atol=1e-12)
    score = client["predict_company"](url, served["cid"], served["company"], served["usage"], served["as_of"])
    assert abs(score - scores[0]) < 1e-12  # the service computed the same features as the training set
    with pytest.raises(RuntimeError, match="422"):
        client["predict"](url, [{"id": 1}])


def test_tutorial_curl_examples(served, tmp_path):
    "The tutorial's curl cell, run by bash with the request files it names, against the real server."
    assert shutil.which("curl"), "curl is not installed"
    cell = tutorial_cell("%%bash\ncurl -s -X POST")
    script = cell.split("\n", 1)[1]
    (tmp_path / "predict_request.json").write_text(json.dumps({"records": served["records"][:1]}))
    body = {
        "id": served["cid"],
        "company": served["company"],
        "usage": served["usage"],
        "as_of": served["as_of"],
    }
    (tmp_path / "company_request.json").write_text(json.dumps(body))
    out = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "URL": served["url"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    answers = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(answers) == 2
    expected = served["bundle"].predict(served["rows"].head(1))[0]
    for a in answers:
        assert a["model"] == "consume" and a["version"] == 1
        assert abs(a["predictions"][0]["score"] - expected) < 1e-12
    assert answers[1]["id"] == served["cid"] and answers[1]["as_of"] == served["as_of"]


def test_cli_help_and_missing_extra(tmp_path):
    "`hsml --help` lists `bundle`; without MLflow the export is one clear message naming the extra, exit 2."
    hsml_cli = str(Path(sys.executable).parent / "hsml")
    top = subprocess.run([hsml_cli, "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "bundle" in top.stdout
    sub = subprocess.run([hsml_cli, "bundle", "export", "--help"], capture_output=True, text=True)
    assert sub.returncode == 0 and "Example" in sub.stdout and "--format" in sub.stdout
    bdir = demo_bundle(tmp_path / "b", n=300)
    code = (
        "import sys; sys.modules['mlflow'] = None\n"  # as if the extra were not installed
        "from hsml.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "bundle", "export", str(bdir), str(tmp_path / "m")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    assert "hsml[mlflow]" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()
