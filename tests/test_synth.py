"""System tests of the built-in sample data generator (`hsml.synth.generate`)."""

from __future__ import annotations

import json
import resource
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest

from hsml.core import HsmlError, sha256_file
from hsml.synth import (
    CUSTOMERS_COLUMNS,
    INDUSTRY_LABELS,
    INDUSTRY_STYLES,
    JUNK_INDUSTRY_LABELS,
    NONCUSTOMERS_COLUMNS,
    RANK_SENTINEL,
    USAGE_COLUMNS,
    generate,
)


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_default")
    generate(out)
    return out


def _raw(d: Path, name: str) -> pl.DataFrame:
    return pl.read_csv(d / name, infer_schema_length=0)  # all strings, as a contract reads them


def test_deterministic_sha256(tmp_path: Path, default_dir: Path) -> None:
    again = generate(tmp_path / "again")
    for table, p in again.items():
        assert sha256_file(p) == sha256_file(default_dir / p.name), table
    other = generate(tmp_path / "other", seed=1)
    assert sha256_file(other["usage"]) != sha256_file(default_dir / "usage_actions.csv")


def test_default_scale_mirrors_real_extract(default_dir: Path) -> None:
    c, n = _raw(default_dir, "customers.csv"), _raw(default_dir, "noncustomers.csv")
    u = pl.read_csv(default_dir / "usage_actions.csv", try_parse_dates=True)
    assert 150 <= c["id"].n_unique() <= 260
    assert 4500 <= n["id"].n_unique() <= 5500
    assert 20_000 <= u.height <= 32_000
    span = (u["WHEN_TIMESTAMP"].max() - u["WHEN_TIMESTAMP"].min()).days
    assert 75 * 7 <= span <= 85 * 7
    assert u["WHEN_TIMESTAMP"].min().date() >= date(2019, 1, 7)
    # sparse: most companies have only a few active weeks
    per = u.group_by("id").len()["len"]
    assert per.median() <= 5


def test_exact_format(default_dir: Path) -> None:
    c, n, u = (_raw(default_dir, f) for f in ("customers.csv", "noncustomers.csv", "usage_actions.csv"))
    assert c.columns == CUSTOMERS_COLUMNS
    assert n.columns == NONCUSTOMERS_COLUMNS
    assert u.columns == USAGE_COLUMNS
    assert c["CLOSEDATE"].str.contains(r"^\d{4}-\d{2}-\d{2}$").all()
    assert c["MRR"].str.contains(r"^-?\d+\.\d{2}$").all()
    assert u["WHEN_TIMESTAMP"].str.contains(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}$").all()
    for df in (c, n, u):
        assert df["id"].str.contains(r"^\d+$").all()
    for col in USAGE_COLUMNS[1:]:
        assert u[col].str.contains(r"^\d+$").all(), col
    assert n["ALEXA_RANK"].drop_nulls().str.contains(r"^\d+$").all()
    assert set(n["EMPLOYEE_RANGE"].drop_nulls()) <= {
        "",
        "1",
        "2 to 5",
        "6 to 10",
        "11 to 25",
        "26 to 50",
        "51 to 200",
        "201 to 1000",
        "1001 to 10000",
        "10,001 or more",
    }
    assert "10,001 or more" in set(n["EMPLOYEE_RANGE"])  # a comma inside a quoted field
    # CLOSEDATE and usage within the span; the snapshot is taken after the latest timestamp
    end = date(2019, 1, 7) + timedelta(weeks=80)
    assert c["CLOSEDATE"].str.to_date().max() <= end


def test_every_kind_of_dirt(default_dir: Path) -> None:
    c, n = _raw(default_dir, "customers.csv"), _raw(default_dir, "noncustomers.csv")
    text_n = (default_dir / "noncustomers.csv").read_text()
    # empty strings for unknown industry / employee range: both empty fields and quoted ""
    for col in ("INDUSTRY", "EMPLOYEE_RANGE"):
        assert n[col].is_null().sum() > 50, col
    assert text_n.count('""') > 50
    # sentinel rank beside truly missing ranks
    assert (n["ALEXA_RANK"] == str(RANK_SENTINEL)).sum() > 500
    assert n["ALEXA_RANK"].is_null().sum() > 100
    assert (c["ALEXA_RANK"] == str(RANK_SENTINEL)).any() and c["ALEXA_RANK"].is_null().any()
    # duplicated ids: within customers, within noncustomers, across
    assert c["id"].is_duplicated().sum() >= 2
    assert n["id"].is_duplicated().sum() >= 2
    assert c["id"].is_in(n["id"].implode()).sum() >= 2
    # non-positive MRR
    mrr = c["MRR"].cast(pl.Float64)
    assert (mrr == 0).sum() >= 1 and (mrr < 0).sum() >= 1 and (mrr > 0).sum() > 100
    # industry labels of several eras / systems, lowercase, extra spaces, typos, junk
    labels = set(n["INDUSTRY"].drop_nulls()) | set(c["INDUSTRY"].drop_nulls())
    assert {"COMPUTER_SOFTWARE", "Technology - Software", "computer software", "Computer Sofware"} <= labels
    assert any(lab != lab.strip() or "  " in lab for lab in labels)
    assert {"N/A", "???"} <= labels
    assert labels - {""} <= set(INDUSTRY_LABELS)
    assert labels & set(JUNK_INDUSTRY_LABELS)


def test_usage_before_and_after_conversion_and_jump(default_dir: Path) -> None:
    c = pl.read_csv(default_dir / "customers.csv", try_parse_dates=True)
    u = pl.read_csv(default_dir / "usage_actions.csv", try_parse_dates=True)
    first = c.group_by("id").agg(pl.col("CLOSEDATE").min())
    acts = [col for col in u.columns if col.startswith("ACTIONS")]
    cu = u.join(first, on="id").with_columns(
        post=pl.col("WHEN_TIMESTAMP").dt.date() >= pl.col("CLOSEDATE"), actions=pl.sum_horizontal(acts)
    )
    by = cu.group_by("post").agg(pl.len(), pl.col("actions").mean())
    pre = by.filter(~pl.col("post")).row(0, named=True)
    post = by.filter(pl.col("post")).row(0, named=True)
    assert pre["len"] > 300 and post["len"] > 3000
    assert post["actions"] > 2.5 * pre["actions"]


def test_ids_encode_nothing(default_dir: Path) -> None:
    c, n = _raw(default_dir, "customers.csv"), _raw(default_dir, "noncustomers.csv")
    ids_c, ids_n = c["id"].cast(pl.Int64), n["id"].cast(pl.Int64)
    assert not ids_c.is_sorted() and not ids_n.is_sorted()
    assert 0.6 < ids_c.median() / ids_n.median() < 1.6
    # customers' ids are not in close-date order either
    assert (
        abs(pl.DataFrame({"i": ids_c, "d": c["CLOSEDATE"].str.to_date()}).select(pl.corr("i", "d"))[0, 0])
        < 0.3
    )


def test_manifest_counts(default_dir: Path) -> None:
    m = json.loads((default_dir / "synth_manifest.json").read_text())
    k = m["counts"]
    c = _raw(default_dir, "customers.csv")
    assert k["customers_rows"] == c.height
    assert k["customers_unique"] == c["id"].n_unique()
    assert k["dup_within_customers"] == c.height - c["id"].n_unique()
    assert k["mrr_zero"] == (c["MRR"].cast(pl.Float64) == 0).sum()
    assert k["usage_rows"] == pl.read_csv(default_dir / "usage_actions.csv").height


def test_conversions_spread_over_span(default_dir: Path) -> None:
    c = (
        pl.read_csv(default_dir / "customers.csv", try_parse_dates=True)
        .group_by("id")
        .agg(pl.col("CLOSEDATE").min())
    )
    start = date(2019, 1, 7)
    # 13 as-of dates every 28 days from start + 8 weeks, horizon 84 days: positives in every window
    for k in range(13):
        a = start + timedelta(days=56 + 28 * k)
        assert (
            c.filter((pl.col("CLOSEDATE") > a) & (pl.col("CLOSEDATE") <= a + timedelta(days=84))).height >= 5
        )


def test_custom_span_and_errors(tmp_path: Path) -> None:
    p = generate(tmp_path / "s", companies=800, seed=3, start="2021-03-01", end=date(2021, 9, 1))
    u = pl.read_csv(p["usage"], try_parse_dates=True)
    assert u["WHEN_TIMESTAMP"].min().date() >= date(2021, 3, 1)
    assert u["WHEN_TIMESTAMP"].max().date() <= date(2021, 9, 1)
    c = pl.read_csv(p["customers"], try_parse_dates=True)
    assert c["CLOSEDATE"].max() <= date(2021, 9, 1)
    with pytest.raises(HsmlError, match="end"):
        generate(tmp_path / "x", start="2021-03-01", end="2021-03-05")
    with pytest.raises(HsmlError, match="companies"):
        generate(tmp_path / "x", companies=0)
    with pytest.raises(HsmlError, match="too many"):
        generate(tmp_path / "x", companies=100, usage_rows=100_000)


def test_usage_rows_knob(tmp_path: Path) -> None:
    p = generate(tmp_path / "dense", companies=4000, usage_rows=100_000)
    n = pl.read_csv(p["usage"]).height
    assert 90_000 <= n <= 110_000


def test_chunked_large_run_bounded_memory(tmp_path: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    p = generate(tmp_path / "big", companies=200_000, seed=5, progress=False)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    m = json.loads((tmp_path / "big" / "synth_manifest.json").read_text())["counts"]
    assert 7_000 <= m["customers_unique"] <= 9_000
    assert 190_000 <= m["noncustomers_unique"] <= 194_000
    ids = pl.concat([pl.read_csv(p[t], columns=["id"]) for t in ("customers", "noncustomers")]).unique()
    assert ids.height == 200_000  # every company listed, ids unique across blocks
    u = pl.scan_csv(p["usage"]).select(pl.len()).collect().item()
    assert u == m["usage_rows"] and 0.9e6 <= u <= 1.3e6
    assert grown_mib < 1500, grown_mib  # blocks of 20k companies: memory does not grow with the run


def _honest_and_leaky_auc(d: Path) -> tuple[float, float]:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from hsml.synth import _quick_panel

    start = date(2019, 1, 7)
    as_ofs = [start + timedelta(days=56 + 28 * k) for k in range(13)]
    panel = _quick_panel(d, as_ofs, horizon=56)
    feats = [c for c in panel.columns if c not in ("id", "as_of", "label")]

    def X(df: pl.DataFrame) -> np.ndarray:
        return np.log1p(df.select(feats).to_numpy().astype(float))

    train = panel.filter(pl.col("as_of") <= as_ofs[7])
    test = panel.filter(pl.col("as_of") >= as_ofs[7] + timedelta(days=56))
    assert train["label"].sum() >= 30 and test["label"].sum() >= 15
    lr = LogisticRegression(max_iter=1000).fit(X(train), train["label"])
    honest = roc_auc_score(test["label"], lr.predict_proba(X(test))[:, 1])
    acts = [c for c in USAGE_COLUMNS if c.startswith("ACTIONS")]
    totals = pl.read_csv(d / "usage_actions.csv").group_by("id").agg(a=pl.sum_horizontal(acts).sum())
    cust = pl.read_csv(d / "customers.csv", columns=["id"]).unique().with_columns(y=pl.lit(1))
    pros = pl.read_csv(d / "noncustomers.csv", columns=["id"]).unique().with_columns(y=pl.lit(0))
    every = pl.concat([cust, pros]).unique("id", keep="first").join(totals, on="id", how="left").fill_null(0)
    return honest, roc_auc_score(every["y"], every["a"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_truth(tmp_path: Path, seed: int) -> None:
    generate(tmp_path, seed=seed)
    honest, leaky = _honest_and_leaky_auc(tmp_path)
    assert 0.68 < honest < 0.9, honest  # real but imperfect signal, point in time
    assert leaky > 0.95, leaky  # summing all usage (post-conversion jump) looks suspiciously good


def test_import_in_a_kernel_prints_no_iprogress_warning() -> None:
    "tqdm.auto warns 'IProgress not found' at import in a Jupyter kernel without ipywidgets (not a dependency)."
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import hsml.synth, hsml.score")])
    NotebookClient(nb, kernel_name="python3", timeout=300).execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert "IProgress" not in text, text


def test_manifest_is_reproducible_key_order_included(tmp_path: Path, default_dir: Path) -> None:
    # the same arguments give the same manifest bytes; the counts' keys come in one fixed order for any run
    generate(tmp_path / "again")
    manifest = (default_dir / "synth_manifest.json").read_text()
    assert (tmp_path / "again" / "synth_manifest.json").read_text() == manifest
    keys = list(json.loads(manifest)["counts"])
    for table in ("customers", "noncustomers"):
        styles = [k for k in keys if k.removeprefix(f"{table}_industry_") in INDUSTRY_STYLES]
        assert styles == [f"{table}_industry_{s}" for s in INDUSTRY_STYLES]
    generate(tmp_path / "small", companies=300, seed=4)
    assert list(json.loads((tmp_path / "small" / "synth_manifest.json").read_text())["counts"]) == keys
