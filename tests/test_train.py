"""End-to-end tests of the training loop: papermill runs of experiments/train.ipynb on the sample data.

Two real runs are shared by the whole module (session fixtures): one through `hsml.runs.train_main` (the wrapper
behind `hsml train`) and one through plain `papermill` on the command line with the same parameters.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import polars as pl
import pytest
import yaml

from hsml.core import HsmlError
from hsml.features import read_feature_spec
from hsml.runs import train_main, validate_params
from hsml.tracking import find_wandb_run_files, wandb_run_contents

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "experiments" / "train.ipynb"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
REGISTER_NAME = "conversion-lgbm-team-a"  # run_b's register_name


@pytest.fixture(scope="session")
def params(sample_dir, tmp_path_factory) -> dict:
    return {
        "model": "lgbm",
        "data_dir": str(sample_dir),
        "run_dir": str(tmp_path_factory.mktemp("runs")),
        "n_boot": 50,
        "tracking": "offline",
        "seed": 0,
    }


@pytest.fixture(scope="session")
def run_a(params) -> Path:
    return train_main(params, quiet=True)


@pytest.fixture(scope="session")
def run_b(params, tmp_path_factory) -> tuple[Path, str]:
    "The same parameters through plain papermill on the command line (-f YAML + -p)."
    out = tmp_path_factory.mktemp("pm") / "out.ipynb"
    home = out.parent / "home"  # W&B must not write into the home directory
    home.mkdir()
    cfg = out.parent / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {**yaml.safe_load((ROOT / "experiments/configs/lgbm.yaml").read_text()), **params,
             "register_name": REGISTER_NAME}
        )
    )  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "papermill", str(NB), str(out), "-f", str(cfg), "--no-progress-bar"],
        cwd=ROOT,
        env={**ENV, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = "\n".join(
        o.get("text", "")
        for c in nbformat.read(out, as_version=4).cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    line = [ln for ln in text.splitlines() if ln.startswith("run directory: ")]
    assert line, "the notebook must print where the run directory is"
    return Path(line[-1].split(": ", 1)[1]), str(out)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"model": "xgboost"}, "unknown model"),
        ({"as_of_start": "2020-02-30"}, "not a date"),
        ({"as_of_start": "2020-01-01", "as_of_end": "2019-01-01"}, "after as_of_end"),
        ({"as_of_start": "2019-06-01", "as_of_end": "2020-01-01", "test_from": "2021-01-01"}, "outside"),
        ({"capacities": [0, 10]}, "positive whole number"),
        ({"capacities": "ten"}, "positive whole number"),
        ({"tracking": "cloud"}, "not a tracking mode"),
        ({"every_days": -7}, "at least 1"),
        ({"register": "maybe"}, "true/false"),
        ({"mdoel": "lgbm"}, "unknown parameter"),
    ],
)
def test_validate_params_rejects(bad, msg):
    with pytest.raises(HsmlError, match=msg):
        validate_params(bad)


def test_train_main_fails_fast_without_run_dir(tmp_path, monkeypatch):
    import papermill

    def no_kernel(*a, **k):
        raise AssertionError("papermill must not start for invalid parameters")

    monkeypatch.setattr(papermill, "execute_notebook", no_kernel)
    with pytest.raises(HsmlError, match="unknown model"):
        train_main({"model": "nope", "run_dir": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


def test_bad_value_stops_in_first_cells(tmp_path, sample_dir):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(
            str(NB),
            str(tmp_path / "out.ipynb"),
            parameters={
                "capacities": [50, -3],
                "data_dir": str(sample_dir),
                "run_dir": str(tmp_path / "runs"),
            },
            kernel_name="python3",
            progress_bar=False,
        )
    assert e.value.ename == "HsmlError" and "capacities" in e.value.evalue
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    first_code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert e.value.cell_index <= first_code[3], "parameter errors must stop in the first cells"
    assert not (tmp_path / "runs").exists() or not [
        p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")
    ]


# ---------------------------------------------------------------- the run directory contract


def test_run_dir_contract(run_a, params):
    assert run_a.parent == Path(params["run_dir"]).absolute()
    names = {p.name for p in run_a.iterdir()}
    need = {
        "config.yaml",
        "manifest.json",
        "training_set.parquet",
        "feature_spec.json",
        "metrics.json",
        "plots",
        "model",
        "train.ipynb",
    }
    assert need <= names, need - names
    assert list((run_a / "plots").glob("*.png"))
    bundle = {p.name for p in (run_a / "model").iterdir()}
    assert {
        "model.joblib",
        "feature_spec.json",
        "input_schema.json",
        "metrics.json",
        "model_card.md",
        "hashes.json",
    } <= bundle

    cfg = yaml.safe_load((run_a / "config.yaml").read_text())
    assert cfg["model"] == "lgbm" and cfg["seed"] == 0
    assert cfg["as_of_start"] and cfg["as_of_end"] and cfg["test_from"]  # resolved, not empty

    man = json.loads((run_a / "manifest.json").read_text())
    keys = {
        "run_id",
        "git_sha",
        "git_dirty",
        "data_fingerprints",
        "python",
        "packages",
        "lock_sha256",
        "seed",
        "started_at",
        "finished_at",
    }
    assert keys <= set(man), keys - set(man)
    assert man["run_id"] == run_a.name
    assert set(man["data_fingerprints"]) == {"customers", "noncustomers", "usage"}
    # the recorded values are the ones computed here: file hashes, the checkout's commit
    files = {"customers": "customers.csv", "noncustomers": "noncustomers.csv", "usage": "usage_actions.csv"}
    sha = {
        t: hashlib.sha256((Path(params["data_dir"]) / f).read_bytes()).hexdigest() for t, f in files.items()
    }
    assert man["data_fingerprints"] == sha
    assert man["lock_sha256"] == hashlib.sha256((ROOT / "uv.lock").read_bytes()).hexdigest()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert man["git_sha"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert "lightgbm" in man["packages"] and man["started_at"] <= man["finished_at"]

    m = json.loads((run_a / "metrics.json").read_text())
    assert {"test", "baselines", "n_test", "n_test_positive"} <= set(m)
    for name in ("roc_auc", "pr_auc"):
        v = m["test"][name]
        assert v["ci_low"] <= v["value"] <= v["ci_high"]
    assert m["n_test_positive"] > 0

    ts = pl.read_parquet(run_a / "training_set.parquet")
    assert {"id", "as_of", "label"} <= set(ts.columns)
    assert ts["as_of"].n_unique() == 13

    timings = json.loads((run_a / "timings.json").read_text())
    assert {"kernel_start", "data", "features", "fit", "evaluation", "tracking"} <= set(timings)

    # the executed notebook is the report: it has outputs
    nb = nbformat.read(run_a / "train.ipynb", as_version=4)
    assert sum(len(c.get("outputs", [])) for c in nb.cells if c.cell_type == "code") > 5
    # nothing half-written beside it
    assert not [p for p in run_a.parent.iterdir() if p.name.endswith(".tmp")]


def test_recovers_planted_signal(run_a):
    m = json.loads((run_a / "metrics.json").read_text())
    assert m["test"]["roc_auc"]["value"] > 0.6
    assert m["test"]["roc_auc"]["ci_low"] > 0.5


def precision_at_k(as_of, y, score, k: int) -> float:
    "Positives among the top k of each as-of date's list over the rows contacted (a tie at the cut is split evenly)."
    tp = sel = 0.0
    for d in np.unique(as_of):
        s, t = score[as_of == d], y[as_of == d]
        kk = min(k, len(s))
        cut = np.sort(s)[::-1][kk - 1]
        above, tie = s > cut, s == cut
        tp += t[above].sum() + (kk - above.sum()) * t[tie].sum() / tie.sum()
        sel += kk
    return tp / sel


def test_metrics_recomputed_from_saved_predictions(run_a):
    "metrics.json against scikit-learn / numpy on test_predictions.parquet, whose scores are the bundle's."
    from sklearn.metrics import average_precision_score, roc_auc_score

    m = json.loads((run_a / "metrics.json").read_text())
    pred = pl.read_parquet(run_a / "test_predictions.parquet")
    assert pred.columns[:4] == ["id", "as_of", "label", "score"]
    # the rows are the weekly test grid: as_of >= test_from, every eval_every_days, as metrics.json says
    cfg = yaml.safe_load((run_a / "config.yaml").read_text())
    dates = sorted(pred["as_of"].unique().to_list())
    assert dates[0] >= dt.date.fromisoformat(cfg["test_from"])
    assert {(b - a).days for a, b in zip(dates, dates[1:])} == {cfg["eval_every_days"]}
    assert [str(d) for d in dates] == m["evaluation_grid"]["as_of_dates"]
    assert (pred.height, int(pred["label"].sum())) == (m["n_test"], m["n_test_positive"])
    assert pred.select("id", "as_of").is_unique().all()
    y, s, as_of = pred["label"].to_numpy(), pred["score"].to_numpy(), pred["as_of"].to_numpy()
    assert np.isclose(m["test"]["roc_auc"]["value"], roc_auc_score(y, s), rtol=1e-9)
    assert np.isclose(m["test"]["pr_auc"]["value"], average_precision_score(y, s), rtol=1e-9)
    assert m["capacities"] == [50, 100, 200]
    for k in m["capacities"]:
        want = precision_at_k(as_of, y, s, k)
        assert np.isclose(m["test"][f"precision_at_{k}"]["value"], want, rtol=1e-9), (k, want)
    assert len({round(m["test"][f"precision_at_{k}"]["value"], 9) for k in m["capacities"]}) > 1


def test_same_params_same_results(run_a, run_b):
    b, _ = run_b
    assert b != run_a and b.exists()
    ha = json.loads((run_a / "manifest.json").read_text())["training_set_hash"]
    hb = json.loads((b / "manifest.json").read_text())["training_set_hash"]
    assert ha == hb
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (run_a, b))
    assert ma == mb


def test_plain_papermill_run_gets_its_notebook(run_b):
    b, out = run_b
    for _ in range(100):  # copied by a detached helper once papermill exits
        if (b / "train.ipynb").exists():
            break
        time.sleep(0.1)
    assert (b / "train.ipynb").read_bytes() == Path(out).read_bytes()
    assert json.loads((b / "manifest.json").read_text())["run_id"] == b.name


# ---------------------------------------------------------------- W&B offline contents


def test_wandb_offline_contents(run_a):
    files = find_wandb_run_files(run_a)
    assert len(files) == 1 and files[0].is_relative_to(run_a)
    c = wandb_run_contents(files[0])
    assert c["project"] == "hsml"
    assert {"model", "seed", "capacities", "horizon_days", "test_from", "run_id"} <= set(c["config"])
    assert c["config"]["run_id"] == run_a.name
    m = json.loads((run_a / "metrics.json").read_text())
    assert c["summary"]["test/roc_auc"] == pytest.approx(m["test"]["roc_auc"]["value"])
    assert c["summary"]["test/roc_auc_ci_low"] == pytest.approx(m["test"]["roc_auc"]["ci_low"])
    logged = {
        k.split("/")[0] + ("/" + k.split("/")[1] if k.startswith("plots/") else "")
        for row in c["history"]
        for k in row
    }
    assert "training_set_summary" in logged and "metrics" in logged
    assert any(k.startswith("plots/") for k in logged)
    models = [a for a in c["artifacts"] if a["type"] == "model"]
    assert len(models) == 1 and "model.joblib" in models[0]["files"]
    man = json.loads((run_a / "manifest.json").read_text())
    assert man["wandb"]["run_id"] == c["run_id"]


def test_wandb_artifact_follows_register_name(run_a, run_b):
    "The bundle's W&B artifact is named as the registry names it: register_name, else conversion-<model>."
    b, _ = run_b
    for run, want in ((run_a, "conversion-lgbm"), (b, REGISTER_NAME)):
        c = wandb_run_contents(find_wandb_run_files(run)[0])
        assert [a["name"] for a in c["artifacts"] if a["type"] == "model"] == [want]
        assert json.loads((run / "model" / "bundle.json").read_text())["name"] == want


def test_default_sample_data_and_tracking_disabled(tmp_path):
    "data_dir empty -> sample data generated into the run area; tracking=disabled -> no W&B files; register; backtest."
    d = train_main(
        {
            "model": "logreg",
            "sample_companies": 2500,
            "n_boot": 20,
            "tracking": "disabled",
            "run_dir": str(tmp_path),
            "register": True,
            "registry": str(tmp_path / "registry"),
            "backtest_folds": 2,
        },
        quiet=True,
    )
    assert find_wandb_run_files(d) == []
    assert (d / "metrics.json").exists()
    assert list((tmp_path / ".hsml" / "sample_data").glob("companies-2500-seed-0/usage_actions.csv"))
    man = json.loads((d / "manifest.json").read_text())
    assert "wandb" not in man and man["data_source"].endswith("companies-2500-seed-0")
    # register=True published the bundle as version 1 of conversion-logreg
    assert man["registered"] == {"name": "conversion-logreg", "version": 1}
    assert (tmp_path / "registry").exists()
    # backtest_folds=2: a rolling-origin backtest, oldest fold first, each test block after its training data
    bt = json.loads((d / "backtest.json").read_text())
    assert [f["fold"] for f in bt] == [1, 2]
    assert all(f["train_until"] < f["test_from"] <= f["test_to"] for f in bt)
    # register=True bundles the model refitted on every labelled as-of date; both windows are recorded
    meta = json.loads((d / "model" / "bundle.json").read_text())
    ev_w, dep_w = meta["evaluated_model_train_window"], meta["deployed_model_train_window"]
    ts = pl.read_parquet(d / "training_set.parquet")
    assert dep_w["as_of_to"] == str(ts["as_of"].max()) and dep_w["n_rows"] == ts.height
    assert ev_w["as_of_to"] < dep_w["as_of_to"] and ev_w["n_rows"] < dep_w["n_rows"]
    assert meta["deployed_model"].startswith("refitted") and "estimate" in meta["test_metrics_estimate"]
    assert meta["population"] == "active_unconverted" and meta["horizon_days"] == 56
    card = (d / "model" / "model_card.md").read_text()
    assert "## Training windows" in card and "## Snapshot attributes" in card


# ---------------------------------------------------------------- one definition of the parameters, light imports


def test_parameters_cell_is_default_params():
    "The notebook's parameters cell and `runs.DEFAULT_PARAMS` hold the same names, order, defaults, types and comments."
    import ast
    import re

    import papermill as pm

    from hsml import runs

    cell = pm.inspect_notebook(str(NB))
    assert list(cell) == [*runs.DEFAULT_PARAMS, *runs.INTERNAL_PARAMS]
    source = Path(runs.__file__).read_text()
    block = source[source.index("DEFAULT_PARAMS: dict") : source.index("INTERNAL_PARAMS =")]
    comments = dict(re.findall(r'^    "(\w+)": .*?,  # (.*)$', block, flags=re.M))
    for name, default in runs.DEFAULT_PARAMS.items():
        p = cell[name]
        assert ast.literal_eval(p["default"]) == default, name
        assert p["inferred_type_name"] == type(default).__name__, name
        assert p["help"] == comments[name], name


FIRST_CELLS = """
import json, sys
import hsml, hsml.runs, hsml.tracking
light = sorted(m for m in ("polars", "sklearn", "wandb", "matplotlib", "scipy", "pandas") if m in sys.modules)
cells = json.loads(sys.argv[1])
for i, code in enumerate(cells):
    exec(code)
    if i == 1:  # after the parameters cell, as papermill injects
        run_dir, data_dir, tracking = sys.argv[2], sys.argv[3], "offline"
heavy = sorted(m for m in ("sklearn", "wandb", "matplotlib", "lightgbm") if m in sys.modules)
print(json.dumps({"import_hsml": light, "first_cells": heavy, "tracker": type(tracker).__name__}))
"""


def test_first_cells_and_import_hsml_stay_light(tmp_path, sample_dir):
    "`import hsml.runs` loads no data stack; the notebook's first cells (W&B started) no scikit-learn, W&B or matplotlib."
    nb = nbformat.read(NB, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    upto = next(i for i, c in enumerate(code) if "runs.Run(" in c)
    r = subprocess.run(
        [sys.executable, "-c", FIRST_CELLS, json.dumps(code[: upto + 1]), str(tmp_path / "runs"), str(sample_dir)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"import_hsml": [], "first_cells": [], "tracker": "ProcessTracker"}
    assert not list((tmp_path / "runs").glob("[!.]*"))  # an unfinished run publishes nothing


TRACK = """
import json, sys
from pathlib import Path
from hsml.core import HsmlError
from hsml.tracking import start_tracker
d = Path(sys.argv[1])
t = start_tracker("offline", "hsml-test", run_area=d / "run", shared=d / "area", name="p1", config={"seed": 0},
                  process=True)
t.log_summary({"test": {"roc_auc": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}}})
t.log_artifact(d / "model", name="conversion-p1", type="model")
t.finish()
bad = start_tracker("offline", "hsml-test", run_area=d / "bad", shared=d / "area", process=True)
bad.log_artifact(d / "no-such-dir", name="x", type="model")
try:
    bad.finish()
    error = None
except HsmlError as e:
    error = str(e)
print(json.dumps({"run_file": str(t.run_file), "wandb_imported": "wandb" in sys.modules, "error": error}))
"""


def test_process_tracker_writes_the_run_and_reports_errors(tmp_path):
    "W&B in a child process: the same offline run, wandb never imported by the caller, a failed call raised at finish."
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.joblib").write_bytes(b"x" * 10)
    r = subprocess.run(
        [sys.executable, "-c", TRACK, str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["wandb_imported"] is False
    c = wandb_run_contents(got["run_file"])
    assert c["summary"]["test/roc_auc_ci_low"] == 0.7 and c["config"]["seed"] == 0
    assert [a["name"] for a in c["artifacts"] if a["type"] == "model"] == ["conversion-p1"]
    assert got["error"] and "log_artifact" in got["error"] and "no-such-dir" in got["error"]


# ---------------------------------------------------------------- crash atomicity


def test_crash_leaves_no_run_dir(tmp_path, params):
    "A failure just before the run is published (everything else written) leaves no run directory."
    nb = nbformat.read(NB, as_version=4)
    last = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(last, nbformat.v4.new_code_cell("raise RuntimeError('injected crash')"))
    broken = tmp_path / "broken.ipynb"
    nbformat.write(nb, broken)
    runs_dir = tmp_path / "runs"
    with pytest.raises(HsmlError, match="injected crash"):
        train_main(
            {**params, "model": "logreg", "tracking": "disabled", "run_dir": str(runs_dir)},
            notebook=broken,
            quiet=True,
        )
    left = [p.name for p in runs_dir.iterdir() if not p.name.startswith(".")]
    assert left == []
    assert not [p for p in runs_dir.iterdir() if p.name.endswith(".tmp")]
    assert list((runs_dir / ".failed").glob("*.ipynb"))  # the failed notebook is kept for debugging


def trackers_alive() -> set[int]:
    import psutil

    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if "serve_tracker" in " ".join(p.info["cmdline"] or []):
            out.add(p.info["pid"])
    return out


def test_crash_with_wandb_leaves_no_run_dir_and_no_tracker(tmp_path, params):
    "A failure after W&B started (in its own process) leaves no run directory and no W&B process behind."
    nb = nbformat.read(NB, as_version=4)
    last = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(last, nbformat.v4.new_code_cell("raise RuntimeError('injected crash')"))
    broken = tmp_path / "broken.ipynb"
    nbformat.write(nb, broken)
    runs_dir, before = tmp_path / "runs", trackers_alive()
    with pytest.raises(HsmlError, match="injected crash"):
        train_main({**params, "model": "logreg", "run_dir": str(runs_dir)}, notebook=broken, quiet=True)
    assert [p.name for p in runs_dir.iterdir() if not p.name.startswith(".")] == []
    assert not [p for p in runs_dir.iterdir() if p.name.endswith(".tmp")]
    assert trackers_alive() - before == set()


def test_crash_under_plain_papermill_leaves_no_run_dir(tmp_path, params):
    runs_dir = tmp_path / "runs"
    r = subprocess.run(
        [sys.executable, "-m", "papermill", str(NB), str(tmp_path / "o.ipynb"), "--no-progress-bar",
         "-p", "data_dir", params["data_dir"], "-p", "run_dir", str(runs_dir), "-p", "feature_set", "no_such_set",
         "-p", "tracking", "disabled"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode != 0
    for _ in range(50):  # the kernel removes its temporary directory when it exits
        if not [p for p in runs_dir.iterdir() if p.name.endswith(".tmp")]:
            break
        time.sleep(0.1)
    assert [p.name for p in runs_dir.iterdir() if p.name != ".hsml"] == []


# ---------------------------------------------------------------- registry


def test_register_publishes_the_bundle(run_a, tmp_path):
    pytest.importorskip("hsml.registry")
    from hsml.runs import publish_bundle

    v = publish_bundle(
        run_a / "model", {"model": "lgbm", "registry": str(tmp_path / "reg"), "tracking": "disabled"}
    )
    assert v == 1


# ---------------------------------------------------------------- leakage guards

LEAKY_CELL = """
import polars as pl
from hsml.features import FEATURE_SETS, feature, register_feature_set


@feature(name="all_time_actions", description="LEAKY on purpose: all usage ever, no cut-off", kind="frame")
def _all_time(events, spine):
    tot = events.group_by("id").agg(pl.sum_horizontal(pl.col("^ACTIONS_.*$")).sum().alias("all_time_actions"))
    return spine.join(tot, on="id", how="left").with_columns(pl.col("all_time_actions").fill_null(0))


register_feature_set("leaky", FEATURE_SETS["default"] + ["all_time_actions"])
"""


def test_leaky_variant_trips_the_guards(tmp_path, params):
    "A feature summing all usage ever (post-conversion included) is stopped by the leakage audit: no run dir."
    nb = nbformat.read(NB, as_version=4)
    params_cell = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(params_cell + 1, nbformat.v4.new_code_cell(LEAKY_CELL))
    leaky = tmp_path / "leaky.ipynb"
    nbformat.write(nb, leaky)
    runs_dir = tmp_path / "runs"
    with pytest.raises(HsmlError, match="LeakageError") as e:
        train_main(
            {**params, "feature_set": "leaky", "tracking": "disabled", "run_dir": str(runs_dir)},
            notebook=leaky,
            quiet=True,
        )
    assert "all_time_actions" in str(e.value)
    assert [p.name for p in runs_dir.iterdir() if not p.name.startswith(".")] == []


def test_wandb_keeps_out_of_home(run_b):
    _, out = run_b
    home = Path(out).parent / "home"
    assert not [p for p in home.rglob("*") if "wandb" in p.name.lower()]


PLUGIN = """
import polars as pl
from sklearn.ensemble import ExtraTreesClassifier

from hsml.features import feature, register_feature_set, FEATURE_SETS
from hsml.models import register_model


@register_model("plugin_trees", description="extra trees from the user's own file", preprocess="onehot")
def plugin_trees(numeric, categorical, seed, n_estimators: int = 60):
    return ExtraTreesClassifier(n_estimators=n_estimators, min_samples_leaf=20, random_state=seed, n_jobs=1)


@feature(description="share of email among all actions over the last 28 days", window=28)
def plugin_email_share_28d(ctx):
    total = ctx.sum("ACTIONS_EMAIL", 28) + ctx.sum("ACTIONS_CRM_CONTACTS", 28)
    return pl.when(total > 0).then(ctx.sum("ACTIONS_EMAIL", 28) / total).otherwise(0.0)


register_feature_set("plugin", [*FEATURE_SETS["minimal"], "plugin_email_share_28d"])
"""


def test_plugins_bring_the_users_own_model_and_feature(tmp_path, sample_dir):
    "`plugins` imports the user's own file in both processes: its model and feature set train end to end."
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN)
    r = subprocess.run(
        [str(Path(sys.executable).parent / "hsml"), "train", "-p", f"plugins=[{plugin}]",
         "-p", "model=plugin_trees", "-p", "feature_set=plugin", "-p", f"data_dir={sample_dir}",
         "-p", "tracking=disabled", "-p", "n_boot=50", "-p", f"run_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, env=ENV, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    run = next(p for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    spec, _ = read_feature_spec(json.loads((run / "feature_spec.json").read_text()))
    assert "plugin_email_share_28d" in [f["name"] for f in spec]
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == [str(plugin)]
    assert json.loads((run / "model" / "bundle.json").read_text())["model"] == "plugin_trees"


# ---------------------------------------------------------------- attribute check and the summary


def test_attribute_check_in_metrics(run_a):
    m = json.loads((run_a / "metrics.json").read_text())["attribute_check"]
    assert set(m["attributes"]) == {"ALEXA_RANK", "EMPLOYEE_RANGE", "INDUSTRY"}
    for a in m["attributes"].values():
        assert set(a["missing_rate"]) == {"positives", "negatives"}
    for metric in ("roc_auc", "precision_at_100"):
        d = m["difference"][metric]
        assert d["ci_low"] <= d["value"] <= d["ci_high"]
        assert m["without_attributes"][metric]["value"] is not None
    assert isinstance(m["verdict"], str) and "ROC AUC" in m["verdict"]
    assert (run_a / "plots" / "attribute_distribution.png").exists()


def test_run_prints_a_summary(run_b):
    _, out = run_b
    text = "\n".join(
        o.get("text", "")
        for c in nbformat.read(out, as_version=4).cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    summary = text.split("== summary ==", 1)[1]
    for needle in (
        "ROC AUC",
        "precision@100",
        "baseline",
        "observed / expected",
        "attribute check:",
        "run directory: ",
    ):
        assert needle in summary, needle
