"""`hsml impact …` as a user runs it (real subprocesses), and the estimators checked against reference computations."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from scipy.stats import norm

HSML = [str(Path(sys.executable).parent / "hsml")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HSML, *args], capture_output=True, text=True, env=ENV, timeout=600)


def test_design_matches_a_hand_computation():
    r = run(
        "impact",
        "design",
        "--baseline-rate",
        "0.05",
        "--effect",
        "0.02",
        "--k",
        "300",
        "--holdout-share",
        "0.2",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    # Fleiss' unequal-arm formula by hand: r = 4 treated per held-out company
    p0, p1, k = 0.05, 0.07, 4
    pbar = (p0 + k * p1) / (1 + k)
    za, zb = norm.ppf(0.975), norm.ppf(0.8)
    nh = math.ceil(
        (za * math.sqrt(pbar * (1 - pbar) * (1 + 1 / k)) + zb * math.sqrt(p0 * (1 - p0) + p1 * (1 - p1) / k))
        ** 2
        / 0.02**2
    )
    assert d["companies_per_arm"] == {"treatment": 4 * nh, "holdout": nh}
    assert d["weeks"] == math.ceil(5 * nh / 300) and d["weeks"] <= 26 and d["warning"] is None
    assert r.stderr == ""


def test_design_warns_past_26_weeks_and_rejects_bad_input():
    r = run(
        "impact",
        "design",
        "--baseline-rate",
        "0.05",
        "--effect",
        "0.02",
        "--k",
        "100",
        "--holdout-share",
        "0.2",
    )
    assert r.returncode == 0 and "weeks needed at K=100 per week: 72" in r.stdout
    assert "warning: 72 weeks is more than 26" in r.stderr
    r = run(
        "impact",
        "design",
        "--baseline-rate",
        "0.05",
        "--effect",
        "0.02",
        "--k",
        "100",
        "--holdout-share",
        "0",
    )
    assert r.returncode == 2 and "holdout share" in r.stderr and "Traceback" not in r.stderr


def test_simulate_recovers_the_planted_lift_and_catches_the_planted_faults():
    r = run("impact", "simulate", "--runs", "200", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert list(s) == [
        "runs",
        "true_lift",
        "coverage",
        "mean_estimate",
        "aa_false_positive_rate",
        "srm_alarm_rate_clean",
        "srm_detected_dropped_holdout",
        "psi_detected_shifted_feature",
        "miscalibration_detected",
    ]
    assert s["runs"] == 200 and s["true_lift"] == 0.02
    assert 0.90 <= s["coverage"] <= 0.99 and abs(s["mean_estimate"] - 0.02) < 0.002
    assert 0.01 <= s["aa_false_positive_rate"] <= 0.10 and s["srm_alarm_rate_clean"] <= 0.02
    assert s["srm_detected_dropped_holdout"] >= 0.95
    assert s["psi_detected_shifted_feature"] >= 0.99 and s["miscalibration_detected"] >= 0.99
