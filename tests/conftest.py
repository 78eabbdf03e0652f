"""Shared fixtures: one generated sample data set per session, and a quiet, single-threaded environment."""

import os
from pathlib import Path

import pytest

# two-thread OpenMP fits were seen to run 50x slower on a busy two-core machine
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    "The default sample data (5,200 companies, seed 0), generated once per test session."
    from hsml import synth

    d = tmp_path_factory.mktemp("sample")
    synth.generate(d, companies=5200, seed=0)
    return d


@pytest.fixture(scope="session")
def demo_lgbm_dir(tmp_path_factory) -> Path:
    "The demo LightGBM bundle (nine features, fast path) written once per session: the serving tests' small model."
    from hsml.bundle import demo_bundle

    return demo_bundle(tmp_path_factory.mktemp("demo-lgbm") / "model", "lgbm", n=2000)


@pytest.fixture(scope="session")
def score_data(tmp_path_factory) -> dict:
    "The scoring tests' data (600 companies, seed 4; test_cli, test_score_sink): its directory and clean tables."
    from hsml import synth
    from hsml.contracts import load_tables

    d = tmp_path_factory.mktemp("score-data") / "data"
    synth.generate(d, companies=600, seed=4)
    return {"data": d, "tables": load_tables(d)}
