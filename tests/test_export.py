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

mlflow_pyfunc = pytest.importorskip("mlflow.pyfunc", reason="the mlflow extra is not installed")


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
    model = mlflow_pyfunc.load_model(str(exported["out"]))
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
    cmd = [mlflow_cli, "models", "serve", "-m", str(exported["out"]), "--env-manager", "local"]
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
