"""load_cohort: joining dataset.csv, bags and genes; modalities; bad cohort folders."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from gimplib.data import load_cohort, read_clam_split, write_bag, write_bag_pt, write_gene_table
from gimplib.utils import DataError

from _data_helpers import case_name, make_cohort, slide_name


def test_loads_and_joins(tmp_path):
    root = make_cohort(tmp_path / "c", n_cases=6, two_slides=(0, 3))
    c = load_cohort(root, verbose=False)
    assert len(c) == 6 and c.has_slides and c.has_genes and c.num_classes == 2
    assert c.label_names == ["LUAD", "LUSC"]
    assert c.case_ids == [case_name(i) for i in range(6)]
    assert c.cases["y"].tolist() == [0, 1, 0, 1, 0, 1]
    assert len(c.slides) == 8 and c.feat_dim == 8
    assert c.slides_of(case_name(0)) == [root / "h5_files" / f"{slide_name(case_name(0), j)}.h5" for j in range(2)]
    # lengths come from the files' shapes: slide k has 20 + 3k patches
    assert c.slides["n_patches"].tolist() == [20 + 3 * k for k in range(8)]
    assert c.cases.loc[case_name(0), "n_patches"] == 20 + 23 and c.cases.loc[case_name(0), "n_slides"] == 2
    assert list(c.genes.index) == c.case_ids and c.genes.shape == (6, 5)
    sub = c.subset([case_name(3), case_name(1)])
    assert sub.case_ids == [case_name(3), case_name(1)] and len(sub.slides) == 3
    assert "6 cases" in repr(c)


def test_slides_only_genes_only_and_pt(tmp_path):
    slides_only = load_cohort(make_cohort(tmp_path / "s", genes=False), verbose=False)
    assert slides_only.has_slides and not slides_only.has_genes
    genes_only = load_cohort(make_cohort(tmp_path / "g", slides=False), verbose=False)
    assert genes_only.has_genes and not genes_only.has_slides and genes_only.feat_dim is None
    with pytest.raises(DataError, match=r"slides required but no h5_files/ or pt_files/"):
        load_cohort(tmp_path / "g", require=("slides", "genes"), verbose=False)
    # pt_files/ instead of h5_files/
    root = make_cohort(tmp_path / "p", n_cases=3, genes=False, slides=False)
    for sid in pd.read_csv(root / "dataset.csv")["slide_id"]:
        write_bag_pt(root / "pt_files" / f"{sid}.pt", np.ones((11, 4), np.float32))
    pt = load_cohort(root, verbose=False)
    assert pt.feat_dim == 4 and (pt.slides["n_patches"] == 11).all()
    assert all(p.suffix == ".pt" for p in pt.slides["path"])
    # only genes asked for, though slides exist
    assert not load_cohort(make_cohort(tmp_path / "r"), require=("genes",), verbose=False).has_slides


def test_barcodes_only_and_sample_barcodes_in_genes(tmp_path):
    root = make_cohort(tmp_path / "c", n_cases=4, two_slides=(1,))
    df = pd.read_csv(root / "dataset.csv")
    df[["slide_id", "label"]].to_csv(root / "dataset.csv", index=False)  # no case_id column
    genes = pd.read_parquet(root / "genes.parquet")
    genes.index = [f"{c}-01A" for c in genes.index]  # keyed by sample barcode
    normal = genes.iloc[[0]].copy()
    normal.index = [f"{case_name(0)}-11A"]  # plus a normal sample of patient 0
    normal.iloc[0] = 0.0
    write_gene_table(pd.concat([genes, normal]), root / "genes.parquet")
    c = load_cohort(root, verbose=False)
    assert c.case_ids == [case_name(i) for i in range(4)]
    assert len(c.slides_of(case_name(1))) == 2
    assert (c.genes.loc[case_name(0)] > 0).all()  # the tumour sample was kept


def test_clam_written_folder_loads_unchanged(tmp_path):
    """A folder as CLAM writes it: resizable chunked h5 appended in batches, dataset.csv,
    ragged split CSVs written by pandas with their index column."""
    root = make_cohort(tmp_path / "clam", n_cases=6, two_slides=(2,), clam=True, lengths=[150, 90, 200])
    with h5py.File(next((root / "h5_files").iterdir())) as f:
        assert f["features"].maxshape == (None, 8) and f["features"].chunks == (32, 8)
    slides = pd.read_csv(root / "dataset.csv")["slide_id"].tolist()
    (root / "splits").mkdir()
    # CLAM's save_splits: pd.concat of unequal Series -> NaN padding, index written
    parts = [pd.Series(slides[:4]), pd.Series(slides[4:5]), pd.Series(slides[5:])]
    pd.concat(parts, ignore_index=True, axis=1).set_axis(["train", "val", "test"], axis=1).to_csv(root / "splits" / "splits_0.csv")
    assert pd.read_csv(root / "splits" / "splits_0.csv").columns[0] == "Unnamed: 0"
    c = load_cohort(root, verbose=False)
    assert c.slides["n_patches"].tolist()[:3] == [150, 90, 200]
    split = read_clam_split(root / "splits" / "splits_0.csv", c)
    assert split["train"] == [case_name(i) for i in range(3)]  # case 2's two slides -> once
    assert split["val"] == [case_name(3)] and split["test"] == [case_name(4), case_name(5)]


def test_labels_option(tmp_path):
    root = make_cohort(tmp_path / "c", n_cases=4)
    c = load_cohort(root, labels={"LUSC": 0, "LUAD": 1}, verbose=False)
    assert c.label_names == ["LUSC", "LUAD"] and c.cases["y"].tolist() == [1, 0, 1, 0]
    with pytest.raises(DataError, match=r"dataset\.csv: unknown label\(s\) \(case 'TCGA-11-1001' label 'LUSC'.*expected one of \['LUAD', 'NORMAL'\]"):
        load_cohort(root, labels=["LUAD", "NORMAL"], verbose=False)


def test_missing_modalities_listed_or_dropped(tmp_path, capsys):
    root = make_cohort(tmp_path / "c", n_cases=6)
    genes = pd.read_parquet(root / "genes.parquet")
    write_gene_table(genes.drop(index=[case_name(2)]), root / "genes.parquet")
    (root / "h5_files" / f"{slide_name(case_name(4))}.h5").unlink()
    with pytest.raises(DataError) as err:
        load_cohort(root, verbose=False)
    msg = str(err.value)
    assert "1 case(s) have no genes in genes.parquet: ['TCGA-12-1002']" in msg
    assert f"{case_name(4)} ({slide_name(case_name(4))})" in msg and "drop_incomplete=True" in msg
    c = load_cohort(root, drop_incomplete=True)
    assert "dropped 2 of 6 case(s) (1 without genes, 1 without slides)" in capsys.readouterr().out
    assert case_name(2) not in c.case_ids and case_name(4) not in c.case_ids and len(c) == 4
    assert list(c.genes.index) == c.case_ids


def test_partially_missing_slides(tmp_path, capsys):
    root = make_cohort(tmp_path / "c", n_cases=3, two_slides=(1,), genes=False)
    (root / "h5_files" / f"{slide_name(case_name(1), 1)}.h5").unlink()
    with pytest.raises(DataError, match=rf"{slide_name(case_name(1), 1)}"):
        load_cohort(root, verbose=False)
    c = load_cohort(root, drop_incomplete=True)
    assert len(c) == 3 and len(c.slides_of(case_name(1))) == 1
    assert "1 missing slide file(s)" in capsys.readouterr().out


def test_bad_bags_in_cohort(tmp_path):
    root = make_cohort(tmp_path / "c", n_cases=4)
    odd = root / "h5_files" / f"{slide_name(case_name(2))}.h5"
    write_bag(odd, np.ones((5, 16), np.float32))
    with pytest.raises(DataError, match=rf"feature dim differs from the other bags' D=8: .*{odd.name} \(D=16\)"):
        load_cohort(root, verbose=False)
    odd.write_bytes(b"garbage")
    with pytest.raises(DataError, match=rf"{odd.name}: cannot be read as HDF5"):
        load_cohort(root, verbose=False)
    with h5py.File(odd, "w") as f:
        f.create_dataset("features", data=np.zeros((0, 8), np.float32))
    with pytest.raises(DataError, match=rf"{odd.name}: empty bag"):
        load_cohort(root, verbose=False)


def test_bad_genes_in_cohort(tmp_path):
    root = make_cohort(tmp_path / "c", n_cases=4)
    genes = pd.read_parquet(root / "genes.parquet")
    write_gene_table(pd.concat([genes, genes.iloc[[1]]]), root / "genes.parquet")
    with pytest.raises(DataError, match=rf"genes\.parquet: duplicated case\(s\) \['{case_name(1)}'\]"):
        load_cohort(root, verbose=False)
    genes.iloc[3, 0] = np.nan
    genes.to_csv(root / "genes.csv")
    (root / "genes.parquet").unlink()
    with pytest.raises(DataError, match=rf"genes\.csv: 1 NaN or inf gene value\(s\) \(case '{case_name(3)}'"):
        load_cohort(root, verbose=False)


def test_bad_dataset_csv(tmp_path):
    root = make_cohort(tmp_path / "c", n_cases=4, two_slides=())
    df = pd.read_csv(root / "dataset.csv")
    with pytest.raises(DataError, match=r"nowhere: cohort folder not found"):
        load_cohort(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"other\.csv: not found"):
        load_cohort(root, dataset_csv="other.csv")
    bad = df.copy()
    bad.loc[1, "label"] = "LUAD"
    bad = pd.concat([bad, bad.iloc[[1]].assign(slide_id="extra-slide", label="LUSC")])
    bad.to_csv(root / "conflict.csv", index=False)
    with pytest.raises(DataError, match=rf"conflict\.csv: case\(s\) \['{case_name(1)}'\] have slides with different labels"):
        load_cohort(root, dataset_csv="conflict.csv", verbose=False)
    pd.concat([df, df.iloc[[0]]]).to_csv(root / "dup.csv", index=False)
    with pytest.raises(DataError, match=rf"dup\.csv: slide\(s\) \['{slide_name(case_name(0))}'\] listed more than once"):
        load_cohort(root, dataset_csv="dup.csv", verbose=False)
    df.assign(label=[None, "LUSC", "LUAD", "LUSC"]).to_csv(root / "nolabel.csv", index=False)
    with pytest.raises(DataError, match=rf"nolabel\.csv: case\(s\) \['{case_name(0)}'\] have no label"):
        load_cohort(root, dataset_csv="nolabel.csv", verbose=False)


def test_real_gdc_download_as_the_gene_source(tmp_path, shared_data, capsys):
    folder = shared_data / "expression" / "gdc_htseq_fpkm_lusc"
    ids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    sheet = pd.DataFrame(
        {
            "File ID": ids,
            "File Name": [next((folder / i).glob("*.FPKM.txt.gz")).name for i in ids],
            "Data Category": "Transcriptome Profiling",
            "Data Type": "Gene Expression Quantification",
            "Project ID": "TCGA-LUSC",
            "Case ID": [case_name(i) for i in range(4)],
            "Sample ID": [f"{case_name(i)}-01A" for i in range(4)],
            "Sample Type": "Primary Tumor",
        }
    )
    sheet.to_csv(tmp_path / "gdc_sample_sheet.tsv", sep="\t", index=False)
    root = tmp_path / "cohort"
    root.mkdir()
    pd.DataFrame({"case_id": [case_name(i) for i in range(3)], "label": "LUSC"}).to_csv(root / "dataset.csv", index=False)
    c = load_cohort(root, gene_file=folder, sample_sheet=tmp_path / "gdc_sample_sheet.tsv")
    assert "1 case(s) of gdc_htseq_fpkm_lusc are not in dataset.csv" in capsys.readouterr().out
    assert c.has_genes and not c.has_slides and c.genes.shape == (3, 60483)
    assert c.case_ids == [case_name(i) for i in range(3)] and c.label_names == ["LUSC"]
