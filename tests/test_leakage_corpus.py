"""The leakage audit proven on a corpus of planted leaks (issue 8, item 10).

Each leak is a feature a data scientist could plausibly write. It is registered like any user feature, a training
set is built with `build_training_set` (which runs the audit), and the audit must refuse it with a message naming
the feature and the guard that caught it, and no honest feature. The built-in feature sets must pass on three seeds
of generated data (no false alarm). The data is small (a few thousand companies) and shared by every test.
"""

from __future__ import annotations

from datetime import date

import polars as pl
import pytest

from hsml.features import FEATURE_SETS, FEATURES, feature
from hsml.leakage import LeakageError, audit_training_set
from hsml.trainset import build_training_set

HORIZON = 56
MONDAYS = ("2019-06-03", "2020-03-30", 14)  # the synthetic stamps are Mondays: on the anchor weekday
THURSDAYS = (
    "2019-06-06",
    "2020-03-26",
    14,
)  # off the anchor: a row stamped before as_of still runs 4 days past it
ACTIONS = pl.sum_horizontal(pl.col("^ACTIONS_.*$"))
STAMP = pl.col("WHEN_TIMESTAMP").cast(pl.Datetime("ms"))
AS_OF = pl.col("as_of").cast(pl.Datetime("ms"))
DAY = pl.duration(days=1)


# ---------------------------------------------------------------- the data
class Extract:
    "The generated tables plus two CRM attributes read at extraction time (present only for customers)."

    def __init__(self, tables):
        self.usage, self.fingerprints = tables.usage, {}
        self._companies = tables.companies().with_columns(
            # a support plan the CRM fills in when a deal is won: it exists only for customers
            SUPPORT_PLAN=pl.when(pl.col("CLOSEDATE").is_not_null()).then(
                pl.when(pl.col("id") % 2 == 0).then(pl.lit("standard")).otherwise(pl.lit("premium"))
            ),
            # the won deal's close date on the Deals object: the outcome, under another name
            DEAL_CLOSE=pl.col("CLOSEDATE"),
        )

    def companies(self) -> pl.DataFrame:
        return self._companies


@pytest.fixture(scope="module")
def extract(tmp_path_factory):
    from hsml.contracts import load_tables
    from hsml.synth import generate

    d = tmp_path_factory.mktemp("corpus")
    generate(d, companies=3000, seed=5)
    return Extract(load_tables(d))


# ---------------------------------------------------------------- the planted leaks
def window_actions(name: str, start_days: int, end_days: int):
    """Actions over usage rows stamped in [as_of + start_days, as_of + end_days): a window someone got wrong.

    On weekly stamps a window shifted by one day already takes the whole week after as_of (the row stamped at as_of),
    the same rows as a shift by one week."""

    def fn(events: pl.LazyFrame, spine: pl.LazyFrame) -> pl.LazyFrame:
        ev = events.select("id", STAMP.alias("t"), ACTIONS.alias("a"))
        inside = (pl.col("t") >= AS_OF + start_days * DAY) & (pl.col("t") < AS_OF + end_days * DAY)
        j = spine.join(ev, on="id", how="left")
        return j.group_by("id", "as_of").agg(pl.col("a").filter(inside).sum().alias(name))

    return fn


def stamped_before(name: str, days: int):
    "Actions over rows stamped in [as_of - days, as_of): right on Mondays, future usage on a mid-week as_of."
    return window_actions(name, -days, 0)


def last_seen(events: pl.LazyFrame, spine: pl.LazyFrame) -> pl.LazyFrame:
    "Recency read from the whole table (a CRM 'last seen' field): as_of minus the company's latest stamp, ever."
    last = events.group_by("id").agg(STAMP.max().alias("t"))
    days = (AS_OF - pl.col("t")).dt.total_days().alias("days_since_last_seen")
    return spine.join(last, on="id", how="left").select("id", "as_of", days)


def this_weeks_row(events: pl.LazyFrame, spine: pl.LazyFrame) -> pl.LazyFrame:
    "The usage row 'of the as-of week', joined forward: the row stamped at as_of covers the week after it."
    ev = events.select("id", STAMP.alias("t"), ACTIONS.alias("as_of_week_actions")).sort("t")
    sp = spine.with_columns(AS_OF.alias("t")).sort("t")
    j = sp.join_asof(ev, on="t", by="id", strategy="forward", tolerance="6d", check_sortedness=False)
    return j.select("id", "as_of", pl.col("as_of_week_actions").fill_null(0))


def portal_prefix(events: pl.LazyFrame, spine: pl.LazyFrame) -> pl.LazyFrame:
    "The leading digits of the portal id (looks like a region or a cohort code)."
    return spine.with_columns((pl.col("id") // 100_000).alias("portal_prefix"))


def register_corpus() -> list[str]:
    frame = {
        "actions_28d_to_tomorrow": (window_actions("actions_28d_to_tomorrow", -27, 1),
                                    "actions over [as_of - 27 days, as_of + 1 day): the window shifted by one day"),
        "actions_28d_next_week": (window_actions("actions_28d_next_week", -21, 7),
                                  "actions over [as_of - 21 days, as_of + 7 days): shifted one week into the future"),
        "actions_28d_stamped_before": (stamped_before("actions_28d_stamped_before", 28),
                                       "actions over rows stamped in [as_of - 28 days, as_of), period ignored"),
        "days_since_last_seen": (last_seen, "as_of minus the latest usage stamp in the whole table"),
        "as_of_week_actions": (this_weeks_row, "actions of the usage row stamped in the as-of week (forward join)"),
        "portal_prefix": (portal_prefix, "the portal id's leading digits"),
        "actions_in_horizon": (window_actions("actions_in_horizon", 0, HORIZON),
                               "actions over the label window [as_of, as_of + horizon)"),
    }  # fmt: skip
    for name, (fn, text) in frame.items():
        feature(name=name, description=f"LEAKY on purpose: {text}", kind="frame")(fn)
    feature(name="support_plan", description="LEAKY on purpose: an attribute filled in for customers only")(
        lambda ctx: ctx.entity("SUPPORT_PLAN")
    )
    days_to_close = lambda ctx: (ctx.entity("DEAL_CLOSE") - ctx.as_of).dt.total_days()  # noqa: E731
    feature(
        name="deal_closing_in_quarter", description="LEAKY on purpose: a deal closes within 90 days of as_of"
    )(lambda ctx: days_to_close(ctx).is_between(1, 90).fill_null(False).cast(pl.Int8))
    return [*frame, "support_plan", "deal_closing_in_quarter"]


@pytest.fixture(scope="module")
def corpus():
    names = register_corpus()
    yield names
    for n in names:
        FEATURES.pop(n, None)


# (leak, the as-of grid, the guard that must name it)
LEAKS = [
    pytest.param("actions_28d_to_tomorrow", MONDAYS, "events_before_as_of", id="window-shifted-one-day"),
    pytest.param("actions_28d_next_week", MONDAYS, "events_before_as_of", id="window-shifted-one-week"),
    pytest.param("days_since_last_seen", MONDAYS, "events_before_as_of", id="recency-read-after-as_of"),
    pytest.param("actions_28d_stamped_before", THURSDAYS, "events_before_as_of", id="off-anchor-as_of"),
    pytest.param("support_plan", MONDAYS, "existence_by_outcome", id="attribute-only-for-customers"),
    pytest.param("as_of_week_actions", MONDAYS, "events_before_as_of", id="join-pulls-events-after-as_of"),
    pytest.param("portal_prefix", MONDAYS, "id_correlated", id="derived-from-the-id"),
    pytest.param("actions_in_horizon", MONDAYS, "events_before_as_of", id="usage-over-the-label-horizon"),
    pytest.param("deal_closing_in_quarter", MONDAYS, "auc_canary", id="outcome-within-the-label-horizon"),
]


@pytest.mark.parametrize("leak, grid, guard", LEAKS)
def test_planted_leak_is_caught(extract, corpus, leak, grid, guard):
    honest = FEATURE_SETS["minimal"]
    with pytest.raises(LeakageError) as e:
        build_training_set(extract, *grid, HORIZON, feature_set=[*honest, leak])
    msg = str(e.value)
    assert f"[{guard}] {leak}: " in msg, msg  # names the check and the feature
    assert not [h for h in honest if f"] {h}: " in msg], msg  # and no honest feature


def test_auc_canary_alone_misses_the_one_week_shift(extract, corpus):
    "Why the probe matters: without it, the shifted window passes every canary."
    ts = build_training_set(extract, *MONDAYS, HORIZON, feature_set=["actions_28d_next_week"], audit=False)
    rep = audit_training_set(ts.frame, ["actions_28d_next_week"], outcomes=extract.companies(),
                             horizon_days=HORIZON, raise_on_failure=False)  # fmt: skip
    assert rep.ok and 0.6 < rep.auc["actions_28d_next_week"] < 0.95, rep


def test_honest_twin_of_each_window_leak_passes(extract, corpus):
    "The same free-form code with the window on the right side of as_of is not flagged (Mondays)."
    feature(name="actions_28d_honest", description="actions over [as_of - 28 days, as_of)", kind="frame")(
        stamped_before("actions_28d_honest", 28)
    )
    try:
        ts = build_training_set(extract, *MONDAYS, HORIZON, feature_set=["actions_28d_honest"])
        assert ts.audit["ok"]
    finally:
        FEATURES.pop("actions_28d_honest")


# ---------------------------------------------------------------- no false alarm
@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda s: f"seed{s}")
def seeded(request, tmp_path_factory):
    from hsml.contracts import load_tables
    from hsml.synth import generate

    d = tmp_path_factory.mktemp(f"seed{request.param}")
    generate(d, companies=2000, seed=request.param)
    return load_tables(d)


@pytest.mark.parametrize("grid", [MONDAYS, THURSDAYS], ids=["mondays", "thursdays"])
@pytest.mark.parametrize("feature_set", ["default", "usage", "firmographics", "minimal"])
def test_builtin_feature_sets_raise_no_alarm(seeded, feature_set, grid):
    ts = build_training_set(seeded, *grid, HORIZON, feature_set=feature_set)
    assert ts.audit["ok"] and not ts.audit["skipped"], ts.audit
    assert {"events_before_as_of", "existence_by_outcome", "id_correlated"} <= set(ts.audit["checked"])
    assert ts.summary["positives"].sum() >= 20  # the canaries had something to look at


def test_period_rule_probe_sees_what_the_old_probe_could_not(extract, corpus):
    "On a Thursday grid the features' own `stamp < as_of` rule agrees with itself; the period rule does not."
    from hsml.features import compute_features
    from hsml.leakage import past_only

    name = "actions_28d_stamped_before"
    ts = build_training_set(extract, *THURSDAYS, HORIZON, feature_set=[name], audit=False)
    comps, usage = extract.companies(), extract.usage

    def same_rule(rows: pl.DataFrame) -> pl.DataFrame:  # the probe before issue 8: usage stamped before as_of
        return pl.concat([compute_features(comps, usage.filter(STAMP < pl.lit(a).cast(pl.Datetime("ms"))), part, [name])
                          for (a,), part in rows.group_by("as_of", maintain_order=True)])  # fmt: skip

    kw = dict(outcomes=comps, horizon_days=HORIZON, raise_on_failure=False)
    assert audit_training_set(ts.frame, [name], recompute=same_rule, **kw).ok
    rep = audit_training_set(ts.frame, [name], recompute=past_only(comps, usage, [name]), **kw)
    assert [(f.guard, f.column) for f in rep.findings] == [("events_before_as_of", name)] * 3
    assert date.fromisoformat(THURSDAYS[0]).weekday() == 3
