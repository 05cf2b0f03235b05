"""Gene tables (merged matrices, GDC downloads) and the gene transform."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
import torch

from gimplib.data import (
    GeneTransform,
    patient_id,
    read_gdc_expression,
    read_gene_table,
    strip_version,
    write_gene_table,
)
from gimplib.utils import DataError

GDC_FILES = {  # the four real GDC HTSeq-FPKM files in ../shared/data (file id -> file name)
    "ff13bba0-f0c7-42c4-b141-dc5aafdf99ff": "00068002-f4f0-4610-bfe6-67169c760d21.FPKM.txt.gz",
    "df86639d-ea3a-44b9-8596-5b887229c706": "05b3d48b-dad7-4cc0-9a7d-26c40542053e.FPKM.txt.gz",
    "a050fe0b-cba6-45c9-88e4-3586c9e99426": "091be805-db73-4d7c-852a-c13b9923c13a.FPKM.txt.gz",
    "428baf9d-1632-40a6-ae37-97196473fc4f": "4bc9290d-823f-4c98-8cca-f683588cbd49.FPKM.txt.gz",
}
SHEET_COLUMNS = ["File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID", "Sample Type"]


def _table(n_cases=4, n_genes=6, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        rng.lognormal(0, 1, (n_cases, n_genes)).astype(np.float32),
        index=pd.Index([f"TCGA-AB-{1000 + i}" for i in range(n_cases)], name="case_id"),
        columns=[f"ENSG{i:011d}" for i in range(n_genes)],
    )


def _sheet(rows) -> pd.DataFrame:
    return pd.DataFrame(
        [
            [fid, name, "Transcriptome Profiling", "Gene Expression Quantification", "TCGA-LUSC", case, sample, stype]
            for fid, name, case, sample, stype in rows
        ],
        columns=SHEET_COLUMNS,
    )


def test_strip_version_and_patient_id():
    assert strip_version("ENSG00000141510.16") == "ENSG00000141510"
    assert strip_version("ENSG00000002586.18_PAR_Y") == "ENSG00000002586_PAR_Y"
    assert strip_version("ENSMUSG00000000001.4") == "ENSMUSG00000000001"
    assert strip_version("ENSGR0000264510.4") == "ENSGR0000264510"  # GDC PAR_Y ids
    assert strip_version("TP53") == "TP53" and strip_version(" KRT5 ") == "KRT5"
    assert patient_id("TCGA-05-4244-01A-01R-1107-07") == "TCGA-05-4244"
    assert patient_id("tcga-05-4244-01z-00-dx1") == "TCGA-05-4244"
    assert patient_id("patient_7") == "patient_7"


@pytest.mark.parametrize("kind", ["csv_col", "csv_index", "tsv", "parquet", "parquet_col", "csv_T", "parquet_T", "tsv_T_nontcga"])
def test_read_gene_table_layouts(tmp_path, kind):
    df = _table()
    versioned = df.copy()
    versioned.columns = [f"{g}.{i + 1}" for i, g in enumerate(df.columns)]  # GDC-style versions
    if kind == "csv_col":
        path = tmp_path / "g.csv"
        versioned.reset_index().to_csv(path, index=False)
    elif kind == "csv_index":
        path = tmp_path / "g.csv"
        versioned.rename_axis("sample").to_csv(path)
    elif kind == "tsv":
        path = tmp_path / "g.tsv"
        versioned.to_csv(path, sep="\t")
    elif kind == "parquet":
        path = write_gene_table(versioned, tmp_path / "g.parquet")
    elif kind == "parquet_col":
        path = tmp_path / "g.parquet"
        versioned.reset_index().to_parquet(path, index=False)
    elif kind == "csv_T":  # genes as rows, TCGA barcodes in the header
        path = tmp_path / "g.csv"
        versioned.T.rename_axis("gene_id").to_csv(path)
    elif kind == "parquet_T":
        path = tmp_path / "g.parquet"
        versioned.T.rename_axis("gene_id").to_parquet(path)
    else:  # genes as rows, header of non-TCGA ids: recognised from the Ensembl row ids
        path = tmp_path / "g.tsv"
        other = versioned.copy()
        other.index = [f"P{i}" for i in range(len(other))]
        other.T.to_csv(path, sep="\t")
        df = df.set_axis(pd.Index([f"P{i}" for i in range(len(df))], name="case_id"), axis=0)
    out = read_gene_table(path)
    assert out.index.name == "case_id"
    assert list(out.index) == list(df.index) and list(out.columns) == list(df.columns)
    assert out.to_numpy().dtype == np.float32
    np.testing.assert_allclose(out.to_numpy(), df.to_numpy(), rtol=1e-6)


def test_wide_tables_take_the_fast_path(tmp_path):
    df = _table(n_cases=5, n_genes=1500, seed=1)
    df.to_csv(tmp_path / "wide.csv")
    write_gene_table(df, tmp_path / "wide.parquet")
    for name in ("wide.csv", "wide.parquet"):
        out = read_gene_table(tmp_path / name)
        assert out.shape == (5, 1500) and list(out.index) == list(df.index)
        np.testing.assert_allclose(out.to_numpy(), df.to_numpy(), rtol=1e-6)
    bad = df.astype(object)
    bad.iloc[3, 1234] = "high"
    bad.to_csv(tmp_path / "wide_bad.csv")  # the fast path bails out; the error still names the cell
    with pytest.raises(DataError, match=r"wide_bad\.csv: non-numeric gene value 'high' for case 'TCGA-AB-1003', gene 'ENSG00000001234'"):
        read_gene_table(tmp_path / "wide_bad.csv")


def test_bad_gene_tables(tmp_path):
    df = _table()
    dup = pd.concat([df, df.iloc[[2]]])
    dup.to_csv(tmp_path / "dup.csv")
    with pytest.raises(DataError, match=r"dup\.csv: duplicated case\(s\) \['TCGA-AB-1002'\]"):
        read_gene_table(tmp_path / "dup.csv")

    text = df.astype(object)
    text.iloc[1, 4] = "high"
    text.to_csv(tmp_path / "text.csv")
    with pytest.raises(DataError, match=r"text\.csv: non-numeric gene value 'high' for case 'TCGA-AB-1001', gene 'ENSG00000000004'"):
        read_gene_table(tmp_path / "text.csv")
    text.T.to_csv(tmp_path / "textT.csv")
    with pytest.raises(DataError, match=r"textT\.csv: non-numeric gene value 'high' for gene 'ENSG00000000004', case 'TCGA-AB-1001'"):
        read_gene_table(tmp_path / "textT.csv")

    for bad, name in ((np.nan, "nan"), (np.inf, "inf")):
        b = df.copy()
        b.iloc[3, 2] = bad
        b.to_csv(tmp_path / f"{name}.csv")
        with pytest.raises(DataError, match=rf"{name}\.csv: 1 NaN or inf gene value\(s\) \(case 'TCGA-AB-1003' gene 'ENSG00000000002'\)"):
            read_gene_table(tmp_path / f"{name}.csv")
        write_gene_table(b, tmp_path / f"{name}.parquet")
        with pytest.raises(DataError, match=rf"{name}\.parquet: 1 NaN or inf.*TCGA-AB-1003"):
            read_gene_table(tmp_path / f"{name}.parquet")

    twice = df.copy()
    twice.columns = ["ENSG00000000001.1", "ENSG00000000001.2", *df.columns[2:]]
    twice.to_csv(tmp_path / "twice.csv")
    with pytest.raises(DataError, match=r"twice\.csv: gene\(s\) \['ENSG00000000001'\] appear more than once"):
        read_gene_table(tmp_path / "twice.csv")
    with pytest.raises(DataError, match=r"absent\.csv: gene table not found"):
        read_gene_table(tmp_path / "absent.csv")


def test_write_gene_table_is_atomic(tmp_path):
    with pytest.raises(DataError, match=r"g\.xlsx: unknown gene table format"):
        write_gene_table(_table(), tmp_path / "g.xlsx")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- GDC downloads


def _write_htseq(path, genes, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        for g, v in zip(genes, values):
            fh.write(f"{g}\t{v}\n")


def test_gdc_layout_aligns_genes_by_id(tmp_path):
    genes = [f"ENSG{i:011d}.{i % 3 + 1}" for i in range(7)]
    values = np.arange(7, dtype=float)
    order = [6, 0, 3, 1, 5, 2, 4]  # second file lists genes in another order, other versions
    _write_htseq(tmp_path / "f1" / "a.FPKM.txt.gz", genes, values)
    _write_htseq(tmp_path / "f2" / "b.FPKM.txt.gz", [genes[i].split(".")[0] + ".9" for i in order], values[order] * 10)
    _write_htseq(tmp_path / "f3" / "c.FPKM.txt.gz", genes[:5], values[:5])  # 2 genes fewer
    sheet = _sheet([
        ("f1", "a.FPKM.txt.gz", "TCGA-AA-0001", "TCGA-AA-0001-01A", "Primary Tumor"),
        ("f2", "b.FPKM.txt.gz", "TCGA-AA-0002", "TCGA-AA-0002-01A", "Primary Tumor"),
    ])
    sheet.to_csv(tmp_path / "sheet.tsv", sep="\t", index=False)
    out = read_gdc_expression(tmp_path, tmp_path / "sheet.tsv")
    assert list(out.columns) == [g.split(".")[0] for g in genes]
    np.testing.assert_allclose(out.loc["TCGA-AA-0002"].to_numpy(), values * 10)

    sheet3 = pd.concat([sheet, _sheet([("f3", "c.FPKM.txt.gz", "TCGA-AA-0003", "TCGA-AA-0003-01A", "Primary Tumor")])])
    sheet3.to_csv(tmp_path / "gdc_sample_sheet.2024.tsv", sep="\t", index=False)
    out3 = read_gdc_expression(tmp_path)  # finds the sample sheet in the folder
    assert out3.shape == (3, 5)  # only genes common to every file


def test_gdc_bad_inputs(tmp_path):
    _write_htseq(tmp_path / "f1" / "a.FPKM.txt.gz", ["ENSG00000000001.1", "ENSG00000000002.1"], ["1.5", "oops"])
    _sheet([("f1", "a.FPKM.txt.gz", "TCGA-AA-0001", "", "Primary Tumor")]).to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    with pytest.raises(DataError, match=r"a\.FPKM\.txt\.gz: cannot be read as an HTSeq expression file"):
        read_gdc_expression(tmp_path, tmp_path / "s.tsv")
    _sheet([("f9", "z.FPKM.txt.gz", "TCGA-AA-0001", "", "")]).to_csv(tmp_path / "m.tsv", sep="\t", index=False)
    with pytest.raises(DataError, match=r"1 file\(s\) of the sample sheet are missing: \['f9/z\.FPKM\.txt\.gz'\]"):
        read_gdc_expression(tmp_path, tmp_path / "m.tsv")
    pd.DataFrame({"File ID": ["f1"]}).to_csv(tmp_path / "cols.tsv", sep="\t", index=False)
    with pytest.raises(DataError, match=r"cols\.tsv: sample sheet lacks column\(s\) \['File Name', 'Case ID'\]"):
        read_gdc_expression(tmp_path, tmp_path / "cols.tsv")


def _real_sheet(tmp_path, cases):
    rows = []
    for (fid, name), (case, sample, stype) in zip(GDC_FILES.items(), cases):
        rows.append((fid, name, case, sample, stype))
    path = tmp_path / "gdc_sample_sheet.tsv"
    _sheet(rows).to_csv(path, sep="\t", index=False)
    return path


def test_real_gdc_files(tmp_path, shared_data):
    folder = shared_data / "expression" / "gdc_htseq_fpkm_lusc"
    sheet = _real_sheet(tmp_path, [
        ("TCGA-AA-0001", "TCGA-AA-0001-01A", "Primary Tumor"),
        ("TCGA-AA-0002", "TCGA-AA-0002-01A", "Primary Tumor"),
        ("TCGA-AA-0003", "TCGA-AA-0003-01A", "Primary Tumor"),
        ("TCGA-AA-0003", "TCGA-AA-0003-11A", "Solid Tissue Normal"),  # the normal-lung profile
    ])
    out = read_gdc_expression(folder, sheet)
    assert out.shape == (3, 60483)  # read from the files, not assumed
    assert out.index.tolist() == ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"]
    assert all("." not in g for g in out.columns[:100]) and out.columns.is_unique
    # values match the file, gene by gene (read independently here)
    fid, name = "a050fe0b-cba6-45c9-88e4-3586c9e99426", GDC_FILES["a050fe0b-cba6-45c9-88e4-3586c9e99426"]
    raw = pd.read_csv(folder / fid / name, sep="\t", header=None, names=["gene", "fpkm"])
    raw["gene"] = raw["gene"].str.split(".").str[0]
    expected = raw.set_index("gene")["fpkm"].reindex(out.columns).to_numpy(np.float32)
    np.testing.assert_allclose(out.loc["TCGA-AA-0003"].to_numpy(), expected, rtol=1e-6)
    # squamous markers high in the tumours (KRT5 = ENSG00000186081)
    assert (out["ENSG00000186081"] > 50).all()

    # as four cases, the normal sample is kept; as one case with two tumour files, an error
    four = read_gdc_expression(folder, _real_sheet(tmp_path, [(f"TCGA-AA-000{i}", "", "Primary Tumor") for i in range(4)]))
    assert four.shape == (4, 60483)
    dup = _real_sheet(tmp_path, [("TCGA-AA-0001", "", "Primary Tumor")] * 2 + [("TCGA-AA-0002", "", "Primary Tumor")] * 2)
    with pytest.raises(DataError, match=r"duplicated case 'TCGA-AA-0001' has 2 tumour files"):
        read_gdc_expression(folder, dup)
    mean = read_gdc_expression(folder, dup, duplicates="mean")
    np.testing.assert_allclose(mean.loc["TCGA-AA-0001"], four.iloc[:2].mean(axis=0), rtol=1e-5)


# --------------------------------------------------------------------------- transform


def test_transform_fits_on_train_only():
    df = _table(n_cases=8, n_genes=6)
    train, test = df.iloc[:5], df.iloc[5:]
    gt = GeneTransform(transform="log2p1", standardize=True).fit(train)
    x_train, x_test = gt.transform(train), gt.transform(test)
    logged = np.log2(df.to_numpy(np.float64) + 1)
    mu, sd = logged[:5].mean(0), logged[:5].std(0)
    np.testing.assert_allclose(x_test, (logged[5:] - mu) / sd, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x_train.mean(0), 0, atol=1e-5)
    assert abs(x_test.mean()) > 1e-3  # test rows did not take part in the fit
    assert x_train.dtype == np.float32 and gt.num_genes == 6


def test_transform_none_and_no_standardize():
    df = _table() - 0.5  # z-score-like values, some negative
    np.testing.assert_allclose(GeneTransform(transform="none", standardize=False).fit_transform(df), df.to_numpy())
    with pytest.raises(DataError, match=r"negative gene value.*TCGA-AB-100\d.*transform='none'"):
        GeneTransform(transform="log2p1").fit(df)


def test_top_k_var_and_gene_list_travels(tmp_path):
    df = _table(n_cases=10, n_genes=8)
    df["ENSG00000000005"] = np.tile([0.0, 1000.0], 5)  # the two most variable genes after the log
    df["ENSG00000000002"] = np.tile([0.0, 40.0], 5)
    train = df.iloc[:7]
    gt = GeneTransform(top_k_var=2).fit(train)
    assert gt.genes == ["ENSG00000000002", "ENSG00000000005"]  # kept in table order
    var = np.log2(train.to_numpy() + 1).var(0)
    assert set(np.argsort(-var)[:2]) == {2, 5}
    shuffled = df[list(df.columns[::-1]) + []].assign(extra=1.0)  # other order, an extra column
    np.testing.assert_allclose(gt.transform(shuffled), gt.transform(df), rtol=1e-6)
    torch.save(gt.state_dict(), tmp_path / "gt.pt")
    back = GeneTransform.from_state_dict(torch.load(tmp_path / "gt.pt", weights_only=True))
    assert back.genes == gt.genes
    np.testing.assert_allclose(back.transform(df), gt.transform(df))
    with pytest.raises(DataError, match=r"lacks 1 of the 2 fitted genes \(\['ENSG00000000005'\]\)"):
        gt.transform(df.drop(columns=["ENSG00000000005"]))
    with pytest.raises(RuntimeError, match="not fitted"):
        GeneTransform().transform(df)


def test_clip_bounds_outliers_after_standardising(tmp_path):
    df = _table(n_cases=40, n_genes=5, seed=1) - 1.0
    df.iloc[3, 2] = 5000.0  # an outlier of the kind normalised TCGA tables carry
    train, test = df.iloc[:30], df.iloc[30:].copy()
    test.iloc[0, 0] = -1e4
    plain = GeneTransform(transform="none").fit(train)
    gt = GeneTransform(transform="none", clip=3.0).fit(train)
    x, x_test = gt.transform(train), gt.transform(test)
    assert x.max() == pytest.approx(3.0) and x_test.min() == pytest.approx(-3.0)
    inside = np.abs(plain.transform(df)) < 3
    np.testing.assert_allclose(gt.transform(df)[inside], plain.transform(df)[inside])  # only the tails move
    back = GeneTransform.from_state_dict(gt.state_dict())
    np.testing.assert_allclose(back.transform(test), x_test)
    legacy = {k: v for k, v in plain.state_dict().items() if k not in ("clip", "order", "order_seed")}
    np.testing.assert_allclose(GeneTransform.from_state_dict(legacy).transform(df), plain.transform(df))
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="clip must be a positive number"):
            GeneTransform(clip=bad)


def test_gene_orders_are_fitted_on_train_and_travel():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 3))
    # genes 0, 2, 4 follow one factor and 1, 3, 5 another: the cluster order puts each trio together
    values = np.stack([base[:, i % 2] + 0.05 * rng.normal(size=60) for i in range(6)], 1)
    df = pd.DataFrame(values.astype(np.float32), index=[f"TCGA-AB-{1000 + i}" for i in range(60)],
                      columns=[f"ENSG{i:011d}" for i in range(6)])
    col = GeneTransform(transform="none", order="column").fit(df)
    assert col.genes == list(df.columns)
    clus = GeneTransform(transform="none", order="cluster").fit(df.iloc[:40])
    first = {int(g[-1]) % 2 for g in clus.genes[:3]}
    assert len(first) == 1 and sorted(clus.genes) == sorted(df.columns)
    rand = GeneTransform(transform="none", order="random", order_seed=3).fit(df)
    assert rand.genes == GeneTransform(transform="none", order="random", order_seed=3).fit(df).genes
    assert rand.genes != col.genes
    # the output columns follow the fitted order, with each gene's own statistics
    x = rand.transform(df)
    j = rand.genes.index("ENSG00000000004")
    np.testing.assert_allclose(x[:, j], col.transform(df)[:, 4], rtol=1e-5, atol=1e-6)
    back = GeneTransform.from_state_dict(clus.state_dict())
    assert back.genes == clus.genes and back.order == "cluster"
    np.testing.assert_allclose(back.transform(df), clus.transform(df))
    with pytest.raises(ValueError, match="order must be one of"):
        GeneTransform(order="chromosome")


def test_cluster_order_of_many_genes_goes_through_kmeans(monkeypatch):
    import gimplib.data.genes as genes_mod

    rng = np.random.default_rng(1)
    factors = rng.normal(size=(80, 4))
    # 48 genes, 12 per factor, interleaved in the table
    values = np.stack([factors[:, i % 4] + 0.1 * rng.normal(size=80) for i in range(48)], 1)
    df = pd.DataFrame(values.astype(np.float32), index=[f"TCGA-AB-{1000 + i}" for i in range(80)],
                      columns=[f"ENSG{i:011d}" for i in range(48)])
    exact = GeneTransform(transform="none", order="cluster").fit(df)
    monkeypatch.setattr(genes_mod, "CLUSTER_EXACT_MAX", 16)  # 48 genes: k-means into 12 clusters of ~4
    approx = GeneTransform(transform="none", order="cluster").fit(df)
    for gt in (exact, approx):
        assert sorted(gt.genes) == sorted(df.columns)
        factor = [int(g[4:]) % 4 for g in gt.genes]
        changes = sum(a != b for a, b in zip(factor, factor[1:]))
        assert changes == 3, factor  # each factor's 12 genes form one run


def test_barcode_helpers_live_in_their_own_module_and_gdc_does_not_import_genes():
    import ast
    from pathlib import Path

    from gimplib.data import barcode, gdc

    assert barcode.is_normal_sample("TCGA-05-4244-11A") and not barcode.is_normal_sample("TCGA-05-4244-01A")
    assert patient_id is barcode.patient_id and strip_version is barcode.strip_version  # re-exported by genes
    tree = ast.parse(Path(gdc.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "gimplib.data.genes" not in imported  # no cycle gdc <-> genes
