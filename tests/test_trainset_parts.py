"""A training set built in parts (one Parquet file per as-of date) against the same one built in one piece.

`hsml features build --parts` builds a date at a time, so a training set larger than memory can be built,
hashed and audited (issue 11 §1). At this small size both ways fit: the content hash, the audit and every reader
(pl.read_parquet, pl.scan_parquet, TrainingSet.load eager and lazy, scan_training_set) must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from hsml.trainset import (
    TrainingSet,
    audit_by_columns,
    build_training_set,
    build_training_set_parts,
    content_hash,
    scan_training_set,
)

START, END, EVERY, HORIZON = "2019-06-03", "2020-05-25", 21, 56


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from hsml.contracts import load_tables
    from hsml.synth import generate

    d = tmp_path_factory.mktemp("sample")
    generate(d, companies=1500, seed=5)
    return d, load_tables(d)


@pytest.fixture(scope="module")
def whole(sample):
    return build_training_set(sample[1], START, END, EVERY, HORIZON)


def _cli(*args: str) -> subprocess.CompletedProcess:
    hsml = Path(sys.executable).parent / "hsml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(hsml), "features", "build", *args], capture_output=True, text=True, env=env)


def test_parts_have_the_one_piece_hash_and_audit(sample, whole, tmp_path):
    ts = build_training_set_parts(
        sample[1], START, END, EVERY, HORIZON, tmp_path / "t.parquet", columns_per_pass=5
    )
    assert ts.content_hash == whole.content_hash
    assert ts.audit == whole.audit and ts.audit["ok"]
    assert ts.rows == whole.frame.height and ts.summary.equals(whole.summary)
    assert isinstance(ts.frame, pl.LazyFrame) and ts.frame.collect().equals(whole.frame)
    assert ts.parts == [f"{d}.parquet" for d in whole.summary["as_of"]]
    assert sorted(p.name for p in (tmp_path / "t.parquet").iterdir()) == ts.parts
    man = json.loads((tmp_path / "t.manifest.json").read_text())
    assert man["parts"] == ts.parts and man["content_hash"] == whole.content_hash
    assert {k: v for k, v in man.items() if k != "parts"} == whole.manifest()


def test_every_reader_agrees(sample, whole, tmp_path):
    p = build_training_set_parts(sample[1], START, END, EVERY, HORIZON, tmp_path / "t.parquet").parts and (
        tmp_path / "t.parquet"
    )
    assert pl.read_parquet(p).equals(whole.frame)  # what runs and tests read today
    assert pl.scan_parquet(p).collect().equals(whole.frame)
    assert scan_training_set(p).collect().equals(whole.frame)
    for lazy in (False, True):
        back = TrainingSet.load(p, lazy=lazy)
        assert back.content_hash == whole.content_hash and isinstance(back.frame, pl.LazyFrame) is lazy
    assert content_hash(scan_training_set(p), whole.spec, whole.timing) == whole.content_hash


def test_cli_parts_same_hash_as_one_file(sample, whole, tmp_path):
    d, _ = sample
    args = ["--data-dir", str(d), "--as-of-start", START, "--as-of-end", END, "--every-days", str(EVERY),
            "--horizon-days", str(HORIZON)]  # fmt: skip
    one, parts = (
        _cli(*args, "--out", str(tmp_path / "one.parquet")),
        _cli(*args, "--out", str(tmp_path / "p.parquet"), "--parts"),
    )
    assert one.returncode == 0 and parts.returncode == 0, one.stderr + parts.stderr
    assert whole.content_hash in one.stdout and whole.content_hash in parts.stdout
    assert (tmp_path / "one.parquet").is_file() and (tmp_path / "p.parquet").is_dir()
    assert (
        one.stdout.split("leakage audit")[0] == parts.stdout.split("leakage audit")[0]
    )  # the same summary table
    # rebuilt over the other layout at the same path: the old files do not linger
    again = _cli(*args, "--out", str(tmp_path / "one.parquet"), "--parts")
    assert again.returncode == 0 and TrainingSet.load(tmp_path / "one.parquet").parts is not None
    assert pl.read_parquet(tmp_path / "one.parquet").equals(whole.frame)


def test_audit_by_columns_reports_what_the_audit_reports(sample, whole):
    from hsml.leakage import audit_training_set

    frame = whole.frame.with_columns(
        (pl.col("label") * 3 + pl.col("actions_email_sum_28d")).alias("email_plus_outcome"),
        pl.col("conversion_mrr").alias("mrr_seen"),
    )
    names = [*whole.feature_names, "email_plus_outcome", "mrr_seen"]
    kw = dict(outcomes=sample[1].companies(), horizon_days=HORIZON)
    want = audit_training_set(frame, names, raise_on_failure=False, **kw).to_dict()
    assert not want["ok"]
    for n in (1, 4, 7, 64):
        assert audit_by_columns(frame.lazy(), names, n, raise_on_failure=False, **kw).to_dict() == want, n


def test_a_modified_or_missing_part_is_refused(sample, tmp_path):
    from hsml.core import HsmlError

    ts = build_training_set_parts(sample[1], START, END, EVERY, HORIZON, tmp_path / "t.parquet", audit=False)
    first = tmp_path / "t.parquet" / ts.parts[0]
    pl.read_parquet(first).with_columns(pl.col("actions_email_sum_7d") + 1).write_parquet(first)
    with pytest.raises(HsmlError, match="does not match its manifest"):
        TrainingSet.load(tmp_path / "t.parquet")
    first.unlink()
    with pytest.raises(HsmlError, match=ts.parts[0]):
        TrainingSet.load(tmp_path / "t.parquet")
