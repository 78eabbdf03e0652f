"""Data gathering end to end: the broken-input corpus, catalogs, generated data, and the SQL source on a
real local PostgreSQL server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from hsml import synth
from hsml.contracts import CLEAN_SCHEMAS, Tables, check, load_tables, validate_frames
from hsml.core import HsmlError
from hsml.sources import TABLES, Catalog

ROOT = Path(__file__).resolve().parents[1]
BROKEN = Path(__file__).parent / "broken"
sys.path.insert(0, str(BROKEN))
import make_corpus  # noqa: E402

CASES = sorted(make_corpus.CASES)


# --- the broken-input corpus ---------------------------------------------------------------------------------


def test_corpus_is_big_enough_and_in_step(tmp_path):
    assert len(CASES) >= 15
    make_corpus.write_corpus(tmp_path)
    for case in CASES:
        want = sorted(p.name for p in (tmp_path / case).iterdir())
        have = sorted(p.name for p in (BROKEN / case).iterdir())
        assert have == want, f"{case}: run python tests/broken/make_corpus.py"
        for name in want:
            assert (BROKEN / case / name).read_bytes() == (tmp_path / case / name).read_bytes(), (
                f"{case}/{name} differs from make_corpus.py: run python tests/broken/make_corpus.py"
            )


def test_base_of_corpus_is_valid(tmp_path):
    "Each broken case is the valid base extract with one defect: the base itself loads."
    for table, fname in make_corpus.FILES.items():
        (tmp_path / fname).write_text(make_corpus.BASE[table])
    tb = load_tables(tmp_path)
    assert tb.report.usable
    assert (tb.customers.height, tb.noncustomers.height, tb.usage.height) == (3, 3, 5)


@pytest.mark.parametrize("case", CASES)
def test_broken_input_gives_one_clear_error(case):
    expect = [
        ln for ln in (BROKEN / case / "expect.txt").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    with pytest.raises(HsmlError) as e:
        check(BROKEN / case)
    msg = str(e.value)
    for fragment in expect:
        assert fragment in msg, f"{case}: {fragment!r} not in {msg!r}"
    assert str(BROKEN / case) in msg  # the full path of the file, not just its name
    assert "Traceback" not in msg


def test_cli_broken_input_exit_2_without_traceback(case: str = "truncated_row"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).parent / "hsml"
    r = subprocess.run(
        [str(exe), "data", "check", str(BROKEN / case)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    expect = [
        ln for ln in (BROKEN / case / "expect.txt").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    assert all(f in r.stderr for f in expect), r.stderr


def test_missing_directory_and_catalog_errors(tmp_path):
    with pytest.raises(HsmlError, match="no such directory|neither a directory"):
        check(tmp_path / "nope")
    (tmp_path / "c.yaml").write_text(
        "customers: {type: csv, path: x/customers.csv}\n"
        "noncustomers: {type: csv, path: x/noncustomers.csv}\n"
        "usage: {type: sql, uri: '${HSML_TEST_UNSET_VAR}', query: select 1}\n"
    )
    with pytest.raises(
        HsmlError, match=r"c.yaml.usage.uri: environment variable HSML_TEST_UNSET_VAR is not set"
    ):
        check(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("customers: {type: csv, path: x/customers.csv}\nusage: [1, 2]\n")
    with pytest.raises(HsmlError, match="d.yaml: usage: expected a mapping"):
        check(tmp_path / "d.yaml")


# --- the shipped example catalog -----------------------------------------------------------------------------


def _base_dir(tmp_path: Path) -> Path:
    d = tmp_path / "base"
    d.mkdir()
    for table, fname in make_corpus.FILES.items():
        (d / fname).write_text(make_corpus.BASE[table])
    return d


def test_example_csv_catalog_reads_the_same_as_the_directory(tmp_path, monkeypatch):
    d = _base_dir(tmp_path)
    monkeypatch.setenv("HSML_DATA_DIR", str(d))
    cat = Catalog.from_yaml(ROOT / "experiments/configs/catalog.yaml")
    a, b = load_tables(cat), load_tables(d)
    assert a.report.to_dict() == b.report.to_dict()
    assert a.fingerprints == b.fingerprints
    for t in TABLES:
        assert getattr(a, t).equals(getattr(b, t))


def test_parquet_source_matches_csv(tmp_path):
    d = _base_dir(tmp_path)
    spec = {}
    for t, fname in make_corpus.FILES.items():
        p = tmp_path / f"{t}.parquet"
        pl.read_csv(d / fname, infer_schema=False).write_parquet(p)
        spec[t] = {"type": "parquet", "path": p.name}
    a = load_tables(Catalog.from_dict(spec, base_dir=tmp_path))
    b = load_tables(d)
    assert a.report.to_dict() == b.report.to_dict()
    for t in TABLES:
        assert getattr(a, t).equals(getattr(b, t))


# --- generated data ------------------------------------------------------------------------------------------


USAGE_DIRT = [  # appended to a generated usage file (generated rows are Monday midnights): (line, rule, column)
    ("2019-03-05 10:00:00.000,1,0,0,-3,1,0,0,1,{id}", "negative_count", "ACTIONS_EMAIL"),
    ("2019-03-05 10:00:00.000,1,0,0,0,1,0,0,0,999999999", "unknown_id", "id"),
    (",1,0,0,0,1,0,0,0,{id}", "missing_value", "WHEN_TIMESTAMP"),
    ("2019-03-12 10:00:00.000,1,0,0,0,1,0,0,0,{id}", None, None),
    ("2019-03-12 10:00:00.000,1,0,0,0,1,0,0,0,{id}", "duplicate_key", "WHEN_TIMESTAMP"),
    ("2019-03-05 10:00:00.000,1,0,0,0,1,0,0,0,", "missing_id", "id"),
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict, Tables]:
    d = tmp_path_factory.mktemp("synth")
    synth.generate(d, companies=2500, seed=7)
    manifest = json.loads((d / "synth_manifest.json").read_text())
    nc = pl.read_csv(d / "noncustomers.csv", infer_schema=False)
    pid = nc["id"].unique().sort()[0]  # a prospect
    with open(d / "usage_actions.csv", "a") as f:
        for line, _, _ in USAGE_DIRT:
            f.write(line.format(id=pid) + "\n")
    return d, manifest, load_tables(d)


def test_generated_data_invariant_and_clean_schema(generated):
    _, _, tb = generated
    rep = tb.report.to_dict()
    assert tb.report.usable
    for t in TABLES:
        r = rep[t]
        assert r["rows_in"] == r["rows_clean"] + r["rows_quarantined"]
        assert r["rows_quarantined"] == tb.quarantine[t].height
        assert set(tb.quarantine[t].columns) >= {"_line", "_rule", "_column"}
        CLEAN_SCHEMAS[t].validate(getattr(tb, t))
        assert all(set(i) == {"table", "column", "rule", "count"} for i in r["issues"])
    comp = tb.companies()
    assert comp["id"].is_unique().all()
    assert comp.height == tb.customers.height + tb.noncustomers.height
    assert comp["is_customer"].sum() == tb.customers.height


def test_generated_data_reports_every_issue_class(generated):
    _, m, tb = generated
    c, rep = m["counts"], tb.report
    assert rep.tables["customers"].rows_in == c["customers_rows"]
    assert tb.customers.height == c["customers_unique"]
    assert rep.count("customers", "duplicate_id") == c["dup_within_customers"]
    assert rep.count("noncustomers", "duplicate_id") == c["dup_within_noncustomers"] + c["dup_across"]
    assert rep.count("customers", "nonpositive_mrr") == c["mrr_zero"] + c["mrr_negative"]
    assert tb.customers["MRR_NONPOSITIVE"].sum() <= c["mrr_zero"] + c["mrr_negative"]
    for t in ("customers", "noncustomers"):
        assert rep.count(t, "rank_sentinel") == c[f"{t}_rank_sentinel"]
        assert rep.count(t, "missing_value", "ALEXA_RANK") == c[f"{t}_rank_blank"]
        assert rep.count(t, "missing_value", "EMPLOYEE_RANGE") == c[f"{t}_employee_blank"]
        styles = ["enum", "taxonomy", "lower", "messy", "typo"]
        assert rep.count(t, "industry_folded") == sum(c[f"{t}_industry_{s}"] for s in styles)
        blank_or_junk = rep.count(t, "missing_value", "INDUSTRY") + rep.count(t, "unknown_industry")
        assert blank_or_junk == c[f"{t}_industry_blank"] + c[f"{t}_industry_junk"]
        assert rep.count(t, "unknown_industry") > 0
    assert rep.count("usage", "post_conversion_usage") == c["usage_rows_customers_post"]
    # the dirt appended to the usage file, each under its rule, at its line
    n_gen = c["usage_rows"]
    q = tb.quarantine["usage"].select("_line", "_rule", "_column").rows()
    want = [(n_gen + 2 + i, r, col) for i, (_, r, col) in enumerate(USAGE_DIRT) if r]
    assert sorted(q) == sorted(want)
    # no real conversion was lost: every customer id survives
    assert rep.count("customers", "conversion_quarantined") == 0


def test_generated_canonical_industries(generated):
    "Every label the generator writes maps to the canonical name it meant."
    d, _, tb = generated
    raw = pl.concat(
        [
            pl.read_csv(d / "customers.csv", infer_schema=False).select("id", "INDUSTRY"),
            pl.read_csv(d / "noncustomers.csv", infer_schema=False).select("id", "INDUSTRY"),
        ]
    )
    got = dict(tb.companies().select("id", "INDUSTRY").iter_rows())
    wrong = []
    for id_, lab in raw.unique("id", keep="first").iter_rows():
        want = synth.INDUSTRY_LABELS.get(lab) if lab else None
        if want is not None and got.get(int(id_)) != want:
            wrong.append((lab, got.get(int(id_)), want))
    assert not wrong[:10]


def test_generated_validate_frames_same_as_load(generated):
    d, _, tb = generated
    raw = {t: pl.read_csv(d / f, infer_schema=False) for t, f in make_corpus.FILES.items()}
    tb2 = validate_frames(raw)
    assert tb2.report.to_dict() == tb.report.to_dict()
    for t in TABLES:
        assert getattr(tb2, t).equals(getattr(tb, t))


# --- the warehouse: SQL on a real local PostgreSQL -----------------------------------------------------------

_PG_COLUMNS = {
    "customers": ["CLOSEDATE", "MRR", "ALEXA_RANK", "EMPLOYEE_RANGE", "INDUSTRY", "id"],
    "noncustomers": ["ALEXA_RANK", "EMPLOYEE_RANGE", "INDUSTRY", "id"],
    "usage_actions": [
        "WHEN_TIMESTAMP", "ACTIONS_CRM_CONTACTS", "ACTIONS_CRM_COMPANIES", "ACTIONS_CRM_DEALS", "ACTIONS_EMAIL",
        "USERS_CRM_CONTACTS", "USERS_CRM_COMPANIES", "USERS_CRM_DEALS", "USERS_EMAIL", "id",
    ],
}  # fmt: skip


def _load_into_postgres(url: str, data_dir: Path) -> None:
    "Load the three CSVs into text tables (lower-case columns, a row_no in file order), plus a typed usage table."
    import psycopg

    with psycopg.connect(url, autocommit=True) as con:
        for table, cols in _PG_COLUMNS.items():
            lc = [c.lower() for c in cols]
            con.execute(f"create table {table} (row_no bigserial, {', '.join(f'{c} text' for c in lc)})")
            with con.cursor().copy(
                f"copy {table} ({', '.join(lc)}) from stdin with (format csv, header true)"
            ) as cp:
                cp.write((data_dir / f"{table}.csv").read_bytes())
        counts = [c.lower() for c in _PG_COLUMNS["usage_actions"][1:-1]]
        con.execute(
            "create table usage_typed as select row_no, nullif(when_timestamp, '')::timestamp as when_timestamp, "
            + ", ".join(f"nullif({c}, '')::bigint as {c}" for c in counts)
            + ", nullif(id, '')::bigint as id from usage_actions"
        )


def _ordered_catalog(url: str, usage_table: str = "usage_actions") -> Catalog:
    "A catalog reading the tables in file order (row_no), so line numbers and first-row-wins match the CSVs."

    def q(table: str, cols: list[str], src: str | None = None) -> dict:
        sel = ", ".join(f'{c.lower()} as "{c}"' for c in cols)
        return {"type": "sql", "uri": url, "query": f"select {sel} from {src or table} order by row_no"}

    return Catalog.from_dict(
        {
            "customers": q("customers", _PG_COLUMNS["customers"]),
            "noncustomers": q("noncustomers", _PG_COLUMNS["noncustomers"]),
            "usage": q("usage_actions", _PG_COLUMNS["usage_actions"], usage_table),
        }
    )


@pytest.mark.postgres
def test_sql_source_on_real_postgres(generated, monkeypatch):
    from hsml.testing import local_postgres

    d, _, from_csv = generated
    with local_postgres() as url:
        _load_into_postgres(url, d)
        # 1. the shipped example catalog: only the config differs from the CSV directory
        monkeypatch.setenv("HSML_WAREHOUSE_URI", url)
        ex = load_tables(ROOT / "experiments/configs/catalog_postgres.yaml")
        assert ex.report.to_dict() == from_csv.report.to_dict()
        assert ex.customers.equals(from_csv.customers)
        assert ex.usage.equals(from_csv.usage)
        assert ex.noncustomers["id"].equals(from_csv.noncustomers["id"])
        assert set(ex.fingerprints) == set(TABLES) and ex.fingerprints != from_csv.fingerprints
        # 2. in file order, through both engines, and usage from a typed table: identical to CSV, line for line
        for engine in ("connectorx", "adbc"):
            for usage_table in ("usage_actions", "usage_typed"):
                cat = _ordered_catalog(url, usage_table)
                for src in cat.sources.values():
                    src.engine = engine
                tb = load_tables(cat)
                assert tb.report.to_dict() == from_csv.report.to_dict()
                for t in TABLES:
                    assert getattr(tb, t).equals(getattr(from_csv, t)), (engine, usage_table, t)
                    cols = ["_line", "_rule", "_column"]
                    assert tb.quarantine[t].select(cols).equals(from_csv.quarantine[t].select(cols))
        # 3. the fingerprint is of the query plus its result: stable, and it changes with the data
        fp = _ordered_catalog(url).fingerprints()
        assert fp == _ordered_catalog(url).fingerprints()
        import psycopg

        with psycopg.connect(url, autocommit=True) as con:
            con.execute("update customers set mrr = '1.00' where row_no = 1")
        fp2 = _ordered_catalog(url).fingerprints()
        assert fp2["customers"] != fp["customers"] and fp2["usage"] == fp["usage"]
        # 4. a broken query is one clear error
        bad = Catalog.from_dict({**{t: {"type": "csv", "path": str(d / f)} for t, f in make_corpus.FILES.items()},
                                 "usage": {"type": "sql", "uri": url, "query": "select * from no_such_table"}})  # fmt: skip
        with pytest.raises(HsmlError, match="query failed.*no_such_table"):
            load_tables(bad)
