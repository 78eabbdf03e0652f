"""Every guard of the leakage audit fails on a planted leak in a real training set (issue 11 §3).

`tests/test_leakage_corpus.py` plants leaks a data scientist could write as features and checks the guard that names
each; it covers `events_before_as_of`, `existence_by_outcome`, `id_correlated` and `auc_canary`. This file plants one
leak for each other guard in a training set built by `build_training_set` on generated data (a few thousand
companies, the size at which the audit's samples and filters do real work), so that a faster guard that stopped
seeing its leak fails here: `population_unconverted` and `labels_point_in_time` (rows and labels edited after the
build, since the builder cannot make them), `outcome_derived` by class pattern and by tracking the conversion MRR,
and `id_like`.
"""

from __future__ import annotations

import polars as pl
import pytest

from hsml.features import FEATURE_SETS, FEATURES, feature
from hsml.leakage import AuditLimits, LeakageError, audit_training_set
from hsml.trainset import build_training_set

HORIZON = 56
MONDAYS = ("2019-06-03", "2020-03-30", 14)


class Extract:
    "The generated tables plus two fields of the won deal on the CRM's Deals object: its amount (the MRR), its close date."

    def __init__(self, tables):
        self.usage, self.fingerprints = tables.usage, {}
        self._companies = tables.companies().with_columns(
            DEAL_AMOUNT=pl.col("MRR").fill_null(0.0), DEAL_CLOSE=pl.col("CLOSEDATE")
        )

    def companies(self) -> pl.DataFrame:
        return self._companies


@pytest.fixture(scope="module")
def extract(tmp_path_factory):
    from hsml.contracts import load_tables
    from hsml.synth import generate

    d = tmp_path_factory.mktemp("guards")
    generate(d, companies=3000, seed=7)
    return Extract(load_tables(d))


@pytest.fixture(scope="module")
def honest(extract):
    "The `minimal` feature set, built and audited: the frame every planted leak below starts from."
    ts = build_training_set(extract, *MONDAYS, HORIZON, feature_set="minimal")
    assert ts.audit["ok"], ts.audit
    return ts


def refused(frame: pl.DataFrame, names: list[str], extract, guard: str, **kw) -> str:
    "Audit `frame`; it must raise LeakageError naming `guard`. Returns the message."
    with pytest.raises(LeakageError) as e:
        audit_training_set(frame, names, outcomes=extract.companies(), horizon_days=HORIZON, **kw)
    msg = str(e.value)
    assert f"[{guard}]" in msg, msg
    return msg


def test_population_unconverted(extract, honest):
    "A customer's row at an as-of date after it converted, slipped into the population."
    comps = extract.companies().filter(pl.col("CLOSEDATE").is_not_null())
    late = comps.select("id", as_of=pl.col("CLOSEDATE").cast(pl.Date) + pl.duration(days=7)).head(5)
    rows = honest.frame.join(late.select("id"), on="id", how="semi").group_by("id").first()
    sneak = rows.drop("as_of").join(late, on="id").select(honest.frame.columns)
    msg = refused(pl.concat([honest.frame, sneak]), honest.feature_names, extract, "population_unconverted")
    assert f"{sneak.height} row(s) already converted" in msg, msg


def test_labels_point_in_time(extract, honest):
    "Labels built with a 28-day horizon, audited as 56-day labels."
    short = build_training_set(extract, *MONDAYS, 28, feature_set="minimal", audit=False)
    assert short.frame["label"].sum() < honest.frame["label"].sum()
    refused(short.frame, short.feature_names, extract, "labels_point_in_time")


@pytest.fixture
def planted():
    "Register features for one test; unregister them after."
    names = []

    def plant(name, fn, **kw):
        feature(name=name, description=f"LEAKY on purpose: {name}", **kw)(fn)
        names.append(name)
        return name

    yield plant
    for n in names:
        FEATURES.pop(n, None)


def test_outcome_derived_class_pattern(extract, planted):
    "Days until the deal closes, 0 unless it closes within the label horizon: non-zero exactly on the positives."
    days = lambda ctx: (ctx.entity("DEAL_CLOSE").cast(pl.Date) - ctx.as_of).dt.total_days()  # noqa: E731
    leak = planted("days_to_close_in_horizon", lambda ctx: pl.when(days(ctx).is_between(1, HORIZON)).then(days(ctx)).otherwise(0))  # fmt: skip
    with pytest.raises(LeakageError) as e:
        build_training_set(extract, *MONDAYS, HORIZON, feature_set=[*FEATURE_SETS["minimal"], leak])
    assert f"[outcome_derived] {leak}: is non-zero exactly on the positive rows" in str(e.value), str(e.value)


def test_outcome_derived_tracks_the_conversion_mrr(extract, planted):
    "The won deal's amount: on the positives it is the conversion MRR (the canaries alone may not see it)."
    leak = planted("deal_amount", lambda ctx: ctx.entity("DEAL_AMOUNT"))
    with pytest.raises(LeakageError) as e:
        build_training_set(extract, *MONDAYS, HORIZON, feature_set=[*FEATURE_SETS["minimal"], leak])
    assert f"[outcome_derived] {leak}: tracks the conversion MRR on the positive rows" in str(e.value), str(
        e.value
    )


def test_id_like(extract, honest):
    "The portal id rescaled under an innocent name; with an entity sample smaller than the entities, then all."
    frame = honest.frame.with_columns(portal_number=pl.col("id") * 7 + 3)
    names = [*honest.feature_names, "portal_number"]
    n = frame["id"].n_unique()
    for id_sample in (500, n):
        msg = refused(frame, names, extract, "id_like", limits=AuditLimits(id_sample=id_sample))
        assert f"portal_number: constant per entity, unique across {min(id_sample, n)} entities" in msg, msg
