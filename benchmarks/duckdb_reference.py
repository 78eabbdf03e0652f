"""The hsml as-of panel and `default` feature set written as DuckDB SQL: the tool a data scientist would reach for.

Used by `benchmarks/snapshots.py` (speed: `duckdb_s`, `ratio_duckdb`; value-for-value agreement on the first size),
whose agreement check runs on a small size in `tests/test_benchmarks.py`. Written the idiomatic way, not as a
translation of hsml's numpy code:

- the population is a cross join of companies and as-of dates filtered by the policy (not converted by `as_of`,
  at least one usage period ended by it), with the first conversion per company (`DISTINCT ON`);
- the windowed sums are one range join of the panel to the usage rows whose period ended in
  `(as_of - 84 days, as_of]` (DuckDB plans it as an IEJoin / hash join on id with a range filter), aggregated
  once with `FILTER` clauses per window (7, 28, 56 and 84 days);
- the last activity is an `ASOF JOIN` (the latest period end at or before `as_of`), the first a plain `min`.

The point-in-time rule is hsml's: a usage row stands for the week starting at its stamp and counts at `as_of`
only once that whole week has ended (`stamp + 7 days <= as_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path

ACTIONS = ["ACTIONS_CRM_CONTACTS", "ACTIONS_CRM_COMPANIES", "ACTIONS_CRM_DEALS", "ACTIONS_EMAIL"]
USERS = ["USERS_CRM_CONTACTS", "USERS_CRM_COMPANIES", "USERS_CRM_DEALS", "USERS_EMAIL"]
EMPLOYEE_LEVELS = ["1", "2 to 5", "6 to 10", "11 to 25", "26 to 50", "51 to 200", "201 to 1000", "1001 to 10000",
                   "10,001 or more"]  # fmt: skip
PERIOD_DAYS = 7  # usage rows are weekly
WINDOWS = (7, 28, 56, 84)  # 56: the trend's "28 days before the last 28"


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def sql(horizon_days: int) -> str:
    "The query: reads the tables `comp`, `u` (usage with `end_ts`) and `dates`; returns the training set."
    cols = ACTIONS + USERS
    in_win = {w: f"u.end_ts > p.as_of - INTERVAL {w} DAY" for w in WINDOWS}
    sums = ",\n        ".join(
        [f"sum(u.{c}) FILTER (WHERE {in_win[w]})::BIGINT AS {c}_{w}" for w in WINDOWS for c in cols]
        + [f"count(*) FILTER (WHERE {in_win[w]})::BIGINT AS rows_{w}" for w in WINDOWS]
    )
    feats = []
    for w in (7, 28, 84):
        feats += [f"coalesce(s.{c}_{w}, 0) AS {c.lower()}_sum_{w}d" for c in cols]
        feats.append(f"coalesce({' + '.join(f's.{c}_{w}' for c in ACTIONS)}, 0) AS actions_total_sum_{w}d")
        feats.append(f"coalesce(s.rows_{w}, 0) AS active_periods_{w}d")
    tot = lambda w: f"coalesce({' + '.join(f's.{c}_{w}' for c in ACTIONS)}, 0)"  # noqa: E731
    users = lambda w: f"coalesce({' + '.join(f's.{c}_{w}' for c in USERS)}, 0)"  # noqa: E731
    for c in ACTIONS:
        a28, a56 = f"coalesce(s.{c}_28, 0)", f"coalesce(s.{c}_56, 0)"
        feats.append(f"ln(1 + {a28}::DOUBLE) - ln(1 + ({a56} - {a28})::DOUBLE) AS {c.lower()}_trend_28d")
    feats.append(
        f"ln(1 + {tot(28)}::DOUBLE) - ln(1 + ({tot(56)} - {tot(28)})::DOUBLE) AS actions_total_trend_28d"
    )
    feats += [
        "date_diff('day', CAST(l.last_end AS DATE), p.as_of) AS days_since_last_activity",
        "date_diff('day', CAST(f.first_end AS DATE), p.as_of) AS days_since_first_activity",
    ]
    for w in (28, 84):
        feats.append(
            " + ".join(f"(coalesce(s.{c}_{w}, 0) > 0)::INT" for c in ACTIONS) + f" AS objects_used_{w}d"
        )
        feats.append(
            f"CASE WHEN {users(w)} > 0 THEN {tot(w)}::DOUBLE / {users(w)} ELSE 0.0 END AS actions_per_user_{w}d"
        )
    levels = "[" + ", ".join(_q(x) for x in EMPLOYEE_LEVELS) + "]"
    feats += [
        f"list_position({levels}, c.EMPLOYEE_RANGE) - 1 AS employee_range_order",
        "(c.EMPLOYEE_RANGE IS NULL)::INT AS employee_range_unknown",
        "ln(c.ALEXA_RANK::DOUBLE) AS log_alexa_rank",
        "(c.ALEXA_RANK IS NULL)::INT AS alexa_rank_unknown",
        "c.INDUSTRY AS industry",
    ]
    feat_sql = ",\n    ".join(feats)
    return f"""
WITH outcome AS (
    SELECT DISTINCT ON (id) id, CLOSEDATE::DATE AS close, MRR::DOUBLE AS mrr
    FROM comp WHERE CLOSEDATE IS NOT NULL ORDER BY id, CLOSEDATE, MRR NULLS LAST
),
first_end AS (SELECT id, min(end_ts) AS first_end FROM u GROUP BY id),
panel AS (
    SELECT k.id, d.as_of,
           (o.close > d.as_of AND o.close <= d.as_of + INTERVAL {horizon_days} DAY) AS in_window, o.mrr
    FROM (SELECT DISTINCT id FROM comp) k CROSS JOIN dates d
    LEFT JOIN outcome o USING (id) LEFT JOIN first_end f USING (id)
    WHERE (o.close IS NULL OR o.close > d.as_of) AND f.first_end <= d.as_of
),
sums AS (
    SELECT p.id, p.as_of,
        {sums}
    FROM panel p JOIN u ON u.id = p.id AND u.end_ts <= p.as_of AND u.end_ts > p.as_of - INTERVAL 84 DAY
    GROUP BY p.id, p.as_of
),
last_end AS (
    SELECT p.id, p.as_of, u.end_ts AS last_end
    FROM panel p ASOF LEFT JOIN (SELECT id, end_ts FROM u) u ON p.id = u.id AND p.as_of::TIMESTAMP >= u.end_ts
)
SELECT p.id, p.as_of, coalesce(p.in_window, false)::TINYINT AS label,
    CASE WHEN p.in_window THEN p.mrr END AS conversion_mrr,
    {feat_sql}
FROM panel p
LEFT JOIN sums s USING (id, as_of)
LEFT JOIN last_end l USING (id, as_of)
LEFT JOIN first_end f USING (id)
LEFT JOIN (SELECT DISTINCT ON (id) * FROM comp) c USING (id)
ORDER BY p.as_of, p.id
"""


def training_set(
    companies: str | Path,  # companies Parquet (hsml `Tables.companies()`)
    usage: str | Path,  # clean usage Parquet (id, WHEN_TIMESTAMP, the 8 usage columns)
    as_of_dates: Sequence[date],  # the as-of grid
    horizon_days: int,  # label window
    threads: int | None = None,  # DuckDB threads (default: all cores)
):
    "The training set as a polars frame (via Arrow), sorted by as_of, id."
    import duckdb
    import polars as pl
    import pyarrow as pa

    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.execute(f"CREATE TEMP VIEW comp AS SELECT * FROM read_parquet({_q(str(companies))})")
    con.execute(
        f"CREATE TEMP TABLE u AS SELECT id, WHEN_TIMESTAMP::TIMESTAMP + INTERVAL {PERIOD_DAYS} DAY AS end_ts, "
        f"{', '.join(ACTIONS + USERS)} FROM read_parquet({_q(str(usage))})"
    )
    con.register("dates_arrow", pa.table({"as_of": pa.array(sorted(set(as_of_dates)), pa.date32())}))
    con.execute("CREATE TEMP TABLE dates AS SELECT as_of FROM dates_arrow")
    out = pl.from_arrow(con.sql(sql(horizon_days)).to_arrow_table())
    con.close()
    return out


if __name__ == "__main__":  # print the query
    print(sql(56))
