"""A straightforward pandas implementation of the hsml snapshot panel and the default feature set.

Used by `benchmarks/snapshots.py` (speed and value-for-value agreement), whose agreement check runs on a small
size in `tests/test_benchmarks.py`. (`tests/test_trainset.py` has its own plain-Python row-by-row reference.)
Deliberately plain, not tuned for speed: a loop over as-of dates and windows, boolean masks, groupby.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd

ACTIONS = ["ACTIONS_CRM_CONTACTS", "ACTIONS_CRM_COMPANIES", "ACTIONS_CRM_DEALS", "ACTIONS_EMAIL"]
USERS = ["USERS_CRM_CONTACTS", "USERS_CRM_COMPANIES", "USERS_CRM_DEALS", "USERS_EMAIL"]
EMPLOYEE_LEVELS = ["1", "2 to 5", "6 to 10", "11 to 25", "26 to 50", "51 to 200", "201 to 1000", "1001 to 10000",
                   "10,001 or more"]  # fmt: skip
PERIOD = pd.Timedelta(days=7)  # usage rows are weekly


def panel(
    companies: pd.DataFrame, usage: pd.DataFrame, as_of_dates: list[date], horizon: int
) -> pd.DataFrame:
    "Population (not converted on/before as_of, >= 1 usage row before as_of), label, conversion_mrr."
    first = usage.groupby("id")["WHEN_TIMESTAMP"].min()
    out = []
    for a in as_of_dates:
        ts_a = pd.Timestamp(a)
        close = pd.to_datetime(companies["CLOSEDATE"])
        ok = (close.isna() | (close > ts_a)) & companies["id"].map(first).lt(ts_a).fillna(False).astype(bool)
        p = companies.loc[ok, ["id"]].copy()
        c = close[ok]
        lab = (c > ts_a) & (c <= ts_a + pd.Timedelta(days=horizon))
        p["as_of"] = a
        p["label"] = lab.astype("int8").to_numpy()
        p["conversion_mrr"] = np.where(lab, companies.loc[ok, "MRR"], np.nan)
        out.append(p)
    return pd.concat(out, ignore_index=True)


def features(companies: pd.DataFrame, usage: pd.DataFrame, pan: pd.DataFrame) -> pd.DataFrame:
    "The hsml `default` feature set for the (id, as_of) rows of `pan`, computed the plain way."
    rows = []
    for a, grp in pan.groupby("as_of", sort=True):
        ts_a = pd.Timestamp(a)
        f = grp[["id", "as_of"]].set_index("id")
        before = usage[usage["WHEN_TIMESTAMP"] < ts_a]
        end = before["WHEN_TIMESTAMP"] + PERIOD  # a row stands for the week starting at its stamp
        sums = {}
        for w in (7, 28, 56, 84):  # rows whose whole week ended in (as_of - w, as_of]
            win = before[(end > ts_a - pd.Timedelta(days=w)) & (end <= ts_a)]
            g = win.groupby("id")
            s = g[ACTIONS + USERS].sum().reindex(f.index, fill_value=0)
            s["__rows"] = g.size().reindex(f.index, fill_value=0)
            sums[w] = s
        for w in (7, 28, 84):
            for c in ACTIONS + USERS:
                f[f"{c.lower()}_sum_{w}d"] = sums[w][c]
            f[f"actions_total_sum_{w}d"] = sums[w][ACTIONS].sum(axis=1)
            f[f"active_periods_{w}d"] = sums[w]["__rows"]
        for c in ACTIONS:
            f[f"{c.lower()}_trend_28d"] = np.log1p(sums[28][c]) - np.log1p(sums[56][c] - sums[28][c])
        tot28, tot56 = sums[28][ACTIONS].sum(axis=1), sums[56][ACTIONS].sum(axis=1)
        f["actions_total_trend_28d"] = np.log1p(tot28) - np.log1p(tot56 - tot28)
        g = before.groupby("id")["WHEN_TIMESTAMP"]
        last, first = g.max().reindex(f.index), g.min().reindex(f.index)
        f["days_since_last_activity"] = (
            ts_a - last.dt.normalize()
        ).dt.days - 7  # from the weekly period's end
        f["days_since_first_activity"] = (ts_a - first.dt.normalize()).dt.days - 7
        for w in (28, 84):
            f[f"objects_used_{w}d"] = (sums[w][ACTIONS] > 0).sum(axis=1)
            act, usr = sums[w][ACTIONS].sum(axis=1), sums[w][USERS].sum(axis=1)
            f[f"actions_per_user_{w}d"] = np.where(usr > 0, act / usr.where(usr > 0, 1), 0.0)
        rows.append(f.reset_index())
    out = pd.concat(rows, ignore_index=True)
    comp = companies.drop_duplicates("id").set_index("id")
    emp = comp["EMPLOYEE_RANGE"].astype("object")
    order = emp.map({lvl: i for i, lvl in enumerate(EMPLOYEE_LEVELS)})
    out["employee_range_order"] = out["id"].map(order)
    out["employee_range_unknown"] = out["id"].map(emp.isna().astype(int))
    out["log_alexa_rank"] = out["id"].map(np.log(comp["ALEXA_RANK"].astype("float64")))
    out["alexa_rank_unknown"] = out["id"].map(comp["ALEXA_RANK"].isna().astype(int))
    out["industry"] = out["id"].map(comp["INDUSTRY"].astype("object"))
    return out.sort_values(["as_of", "id"]).reset_index(drop=True)


def _smoke() -> None:
    d = date(2024, 3, 1)
    comp = pd.DataFrame({"id": [1], "CLOSEDATE": [None], "MRR": [None], "ALEXA_RANK": [10], "EMPLOYEE_RANGE": ["1"],
                         "INDUSTRY": ["x"]})  # fmt: skip
    use = pd.DataFrame({"id": [1], "WHEN_TIMESTAMP": [pd.Timestamp(d - timedelta(days=3))],
                        **{c: [1] for c in ACTIONS + USERS}})  # fmt: skip
    p = panel(comp, use, [d], 14)
    print(features(comp, use, p).T)


if __name__ == "__main__":
    _smoke()
