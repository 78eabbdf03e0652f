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

from hsml.runs import validate_params
from hsml.sweep import load_training_period, storage_url, sweep_main, validate_sweep_params
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


def test_sweep_never_sees_the_test_period(sample_dir, tmp_path):
    p = validate_sweep_params({"data_dir": str(sample_dir), "run_dir": str(tmp_path)})
    frame, spec, dates = load_training_period(p, tmp_path / ".hsml")
    cut = dt.date.fromisoformat(dates["test_from"]) - dt.timedelta(days=dates["horizon_days"])
    assert frame["as_of"].max() < cut
    assert frame["as_of"].max() + dt.timedelta(days=dates["horizon_days"]) < dt.date.fromisoformat(
        dates["test_from"]
    )


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
