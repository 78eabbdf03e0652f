"""Sweeps: a 3-trial sweep through experiments/sweep.ipynb, and two workers sharing one study on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from hsml.core import HsmlError
from hsml.runs import validate_params
from hsml.sweep import (
    load_training_period,
    make_objective,
    make_storage,
    storage_url,
    sweep_main,
    validate_sweep_params,
)
from hsml.tracking import find_wandb_run_files, wandb_run_contents

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def trials_recorded(run_file: Path) -> list[int]:
    "Trial numbers recorded in a worker's W&B history (one row per finished trial)."
    return [int(row["trial"]) for row in wandb_run_contents(run_file)["history"] if "trial" in row]


def test_three_trial_sweep(sample_dir, tmp_path):
    params = {
        "model": "lgbm",
        "n_trials": 3,
        "study_name": "s3",
        "data_dir": str(sample_dir),
        "run_dir": str(tmp_path),
    }
    sdir = sweep_main(params)
    assert sdir == tmp_path / "s3"
    study = optuna.load_study(study_name="s3", storage=storage_url("", sdir))
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    assert (sdir / "sweep-worker0.ipynb").exists() and (sdir / "optuna.db").exists()

    # the best parameters: a YAML that train.ipynb -f accepts
    best = yaml.safe_load((sdir / "best_params.yaml").read_text())
    assert best["model"] == "lgbm" and best["model_params"] == study.best_params
    validate_params(best)
    from hsml.models import make_model

    make_model(best["model"], ["x"], [], seed=0, **best["model_params"])  # the model takes these parameters

    # every trial recorded once in W&B, with a trials table and the best value
    files = find_wandb_run_files(sdir)
    assert len(files) == 1
    assert sorted(trials_recorded(files[0])) == [0, 1, 2]
    c = wandb_run_contents(files[0])
    assert c["group"] == "s3" and c["config"]["model"] == "lgbm"
    assert c["summary"]["best_value"] == pytest.approx(study.best_value)
    assert any(k.startswith("trials") for row in c["history"] for k in row)


def _last_event(data_dir: Path) -> dt.date:
    "The data's last event, read straight from the CSVs: the latest usage stamp or close date."
    import polars as pl

    stamps = pl.read_csv(data_dir / "usage_actions.csv", infer_schema=False)["WHEN_TIMESTAMP"]
    closes = pl.read_csv(data_dir / "customers.csv", infer_schema=False)["CLOSEDATE"].drop_nulls()
    return max(dt.date.fromisoformat(max(stamps)[:10]), dt.date.fromisoformat(max(closes)[:10]))


@pytest.mark.parametrize("given", [False, True], ids=["default-dates", "given-dates"])
def test_sweep_never_sees_the_test_period(sample_dir, tmp_path, given):
    "The sweep's rows are exactly the as-of dates before test_from - horizon_days, computed here from the parameters."
    day = dt.timedelta(days=1)
    if given:
        start, end, every, horizon = dt.date(2019, 7, 1), dt.date(2020, 4, 27), 14, 42
        test_from = dt.date(2020, 2, 10)
        extra = {"as_of_start": str(start), "as_of_end": str(end), "every_days": every,
                 "horizon_days": horizon, "test_from": str(test_from)}  # fmt: skip
    else:  # the documented defaults: 13 as-of dates 28 days apart ending a horizon before the data ends,
        every, horizon, extra = 28, 56, {}  # the last 4 of them are the test period
        end = _last_event(sample_dir) - horizon * day
        start = end - 12 * every * day
        test_from = start + 9 * every * day
    cut = test_from - horizon * day
    want = [start + k * every * day for k in range(100) if start + k * every * day < cut]
    assert len(want) >= 3  # the check means something
    p = validate_sweep_params({"data_dir": str(sample_dir), "run_dir": str(tmp_path), **extra})
    frame, _, _ = load_training_period(p, tmp_path / ".hsml")
    assert frame["as_of"].unique().sort().to_list() == want
    assert (
        frame["as_of"].max() + horizon * day < test_from
    )  # labels of the last sweep row end before the test


def test_no_positive_validation_fold_is_reported():
    "Positives only early in the training period: no fold can be scored, and the trial says so."
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(0)
    dates = [dt.date(2020, 1, 6) + dt.timedelta(days=28 * k) for k in range(6)]
    frame = pl.DataFrame(
        {
            "as_of": [d for d in dates for _ in range(50)],
            "label": np.r_[np.tile(np.r_[np.ones(5), np.zeros(45)], 3), np.zeros(150)].astype(int),
            "x": rng.normal(size=300),
        }
    )
    objective = make_objective(frame, [{"name": "x", "dtype": "Float64"}], "logreg", horizon_days=28)
    with pytest.raises(
        HsmlError, match="no validation fold has positive labels in both its training and validation"
    ):
        optuna.create_study(direction="maximize").optimize(objective, n_trials=1)


@pytest.mark.parametrize(
    "storage, where",
    [
        (
            "postgresql://hsml:s3cret@127.0.0.1:1/sweeps",
            "...@127.0.0.1:1/sweeps",
        ),  # nothing listens on port 1
        ("sqlite:////nonexistent-dir/optuna.db", "at sqlite:////nonexistent-dir/optuna.db:"),
    ],
)
def test_unreachable_storage_is_reported(storage, where):
    with pytest.raises(HsmlError, match="cannot open the Optuna storage at") as e:
        make_storage(storage_url(storage, "."), attempts=1)
    assert where in str(e.value) and "s3cret" not in str(e.value)  # where it looked, never the password


WORKER = """
import json, sys
from hsml.sweep import run_sweep
r = run_sweep(json.loads(sys.argv[1]), progress=False)
print(json.dumps({"worker_trials": r.worker_trials, "run_file": str(r.wandb_run_file), "n_trials": r.n_trials}))
"""


@pytest.mark.postgres
def test_two_workers_share_one_postgres_study(sample_dir, tmp_path):
    from hsml.testing import local_postgres

    n_trials = 6
    with local_postgres() as url:
        base = {
            "model": "logreg",
            "n_trials": n_trials,
            "study_name": "dist",
            "storage": url,
            "data_dir": str(sample_dir),
            "run_dir": str(tmp_path),
        }
        procs = [
            subprocess.Popen([sys.executable, "-c", WORKER, json.dumps({**base, "worker": w})], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for w in (0, 1)
        ]  # fmt: skip
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
        study = optuna.load_study(study_name="dist", storage=storage_url(url, tmp_path))
        finished = sorted(t.number for t in study.trials if t.state.is_finished())
    assert len(finished) >= n_trials  # concurrent workers may start one extra trial each at the end
    assert all(o["worker_trials"] for o in outs), "both workers ran trials"
    # every trial recorded exactly once, by the worker that ran it
    recorded = [n for o in outs for n in trials_recorded(Path(o["run_file"]))]
    assert sorted(recorded) == finished
    assert len(set(recorded)) == len(recorded)
    assert (tmp_path / "dist" / "best_params.yaml").exists()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    "A small generated data set (600 companies): enough for two validation folds, quick to sweep."
    from hsml import synth

    d = tmp_path_factory.mktemp("tiny")
    synth.generate(d, companies=600, seed=4)
    return d


def test_many_workers_need_a_shared_postgres_storage(tmp_path, monkeypatch):
    with pytest.raises(HsmlError, match="workers=2 need a shared PostgreSQL storage, not a SQLite file"):
        validate_sweep_params({"workers": 2, "engine": "ray"})
    with pytest.raises(HsmlError, match="need a shared PostgreSQL storage, not sqlite:///x.db"):
        validate_sweep_params({"workers": 3, "storage": "sqlite:///x.db", "study_name": "s"})
    monkeypatch.setenv(
        "RAY_ADDRESS", "ray://10.0.0.1:10001"
    )  # a cluster's tasks cannot open this machine's file
    with pytest.raises(
        HsmlError, match="engine='ray' on the cluster at RAY_ADDRESS needs a shared PostgreSQL"
    ):
        validate_sweep_params({"engine": "ray"})
    with pytest.raises(HsmlError, match="unknown engine 'spark'"):
        validate_sweep_params({"engine": "spark"})


@pytest.mark.postgres
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_workers_share_one_postgres_study(tiny_dir, tmp_path, engine):
    "`workers=2`: two local processes (through the notebook) or two Ray tasks on a local Ray with 2 CPUs."
    from hsml.testing import local_postgres

    n_trials = 4
    with local_postgres() as url:
        params = {"model": "logreg", "n_trials": n_trials, "study_name": "w2", "storage": url, "workers": 2,
                  "engine": engine, "data_dir": str(tiny_dir), "run_dir": str(tmp_path)}  # fmt: skip
        if engine == "ray":
            pytest.importorskip("ray")
            from hsml.scale import ray_session
            from hsml.sweep import run_sweep

            with ray_session(num_cpus=2):
                result = run_sweep(params, progress=False)
            files = result.wandb_run_files
            assert result.n_trials == n_trials and result.worker_trials == list(range(n_trials))
        else:
            sdir = sweep_main(params)
            files = find_wandb_run_files(sdir)
        study = optuna.load_study(study_name="w2", storage=storage_url(url, tmp_path))
        trials = study.get_trials()
        best = study.best_params
    assert len(trials) == n_trials and all(t.state.is_finished() for t in trials)  # exactly as many as asked
    assert len(files) == 2 and all(Path(f).exists() for f in files)  # one W&B run per worker
    recorded = [n for f in files for n in trials_recorded(Path(f))]
    assert sorted(recorded) == list(range(n_trials))  # every trial in the W&B run of the worker that ran it
    saved = yaml.safe_load((tmp_path / "w2" / "best_params.yaml").read_text())
    assert saved["model_params"] == best  # the best parameters, readable afterwards


def test_a_dead_workers_trial_is_failed_when_the_sweep_ends(tiny_dir, tmp_path):
    "A trial left RUNNING by a dead worker, with no trial started after it: the sweep still ends with none running."
    from optuna.trial import TrialState

    from hsml.sweep import run_sweep

    params = {"model": "logreg", "n_trials": 2, "study_name": "z", "data_dir": str(tiny_dir),
              "run_dir": str(tmp_path), "tracking": "disabled", "heartbeat_interval": 1, "grace_period": 2}  # fmt: skip
    run_sweep(params, progress=False)
    url = storage_url("", tmp_path / "z")
    study = optuna.load_study(study_name="z", storage=make_storage(url, heartbeat_interval=1, grace_period=2))
    zombie = study._storage.create_new_trial(study._study_id)  # a worker starts a trial, beats once and dies
    study._storage.record_heartbeat(zombie)
    result = run_sweep(params, progress=False)  # the study has its 2 trials: no trial starts here
    trials = optuna.load_study(study_name="z", storage=url).get_trials()
    assert [t.state for t in trials] == [*(t.state for t in trials[:2]), TrialState.FAIL]
    assert all(t.state.is_finished() for t in trials) and result.n_trials == 3  # failed, not queued again


# ---------------------------------------------------------------- plugins: a user's own model type in every worker

PLUGIN = """
from sklearn.linear_model import LogisticRegression

from hsml.models import register_model, register_space


@register_model("plugin_logreg", description="a user's own model type (sweep test plugin)")
def plugin_logreg(numeric, categorical, seed, C: float = 1.0):
    return LogisticRegression(C=C, max_iter=500, random_state=seed)


@register_space("plugin_logreg")
def plugin_logreg_space(trial):
    return {"C": trial.suggest_float("C", 0.01, 10.0, log=True)}
"""


def test_sweep_notebook_parameters_are_sweep_defaults():
    "experiments/sweep.ipynb's parameters cell names every sweep parameter, `plugins` among them, in order."
    import papermill as pm

    from hsml.sweep import SWEEP_DEFAULTS

    cell = pm.inspect_notebook(str(ROOT / "experiments" / "sweep.ipynb"))
    assert list(cell) == list(SWEEP_DEFAULTS) and "plugins" in cell
    assert cell["plugins"]["default"] == "[]"


@pytest.mark.postgres
def test_a_plugin_model_type_sweeps_in_two_worker_processes(tiny_dir, tmp_path, monkeypatch):
    "`plugins` reaches the notebook's kernel and both spawned workers: a model type from the user's file sweeps."
    from hsml.testing import local_postgres

    (tmp_path / "my_models.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)  # a relative plugin path, as a user gives it
    with local_postgres() as url:
        params = {"model": "plugin_logreg", "plugins": ["my_models.py"], "n_trials": 2, "study_name": "pl",
                  "storage": url, "workers": 2, "data_dir": str(tiny_dir), "run_dir": str(tmp_path / "sweeps")}  # fmt: skip
        sdir = sweep_main(params)
        trials = optuna.load_study(study_name="pl", storage=storage_url(url, sdir)).get_trials()
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    best = yaml.safe_load((sdir / "best_params.yaml").read_text())
    assert best["model"] == "plugin_logreg" and best["plugins"] == [str(tmp_path / "my_models.py")]
    assert set(best["model_params"]) == {"C"}
    validate_params(best)  # train.ipynb -f accepts it: the plugin is named in the file
