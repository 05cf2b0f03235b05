"""gimp-predict end to end on the smoke cohort: tiny runs trained here, then ``main(argv)`` on new patients,
and every refusal (feature width, encoder, genes missing, unknown gene set, a pre-training checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from gimplib.data.bags import read_bag, write_bag
from gimplib.predict import bag_encoder, describe_run, main, predict, sha256_file
from gimplib.utils import DataError

TINY_GENES = dict(encoder_kwargs=dict(fragment_size=32, num_groups=4, embed_dim=32, num_heads=2, dropout=0.0))
TINY_AGG = dict(embed_dim=32, depth=2, num_heads=2, num_landmarks=16, dropout=0.0)
FAST = dict(device="cpu", progress=False, n_boot=20, seed=0)


@pytest.fixture(scope="module")
def runs(smoke, tmp_path_factory):
    """GiMP (genes -> pretrain -> finetune), its any-modality variant, and ABMIL, one epoch each."""
    from gimplib.train import finetune, pretrain_gimp, train_baseline, train_gene_encoder

    cohort, split = smoke
    root = tmp_path_factory.mktemp("runs")
    genes = train_gene_encoder(cohort, split, out_dir=root / "genes", num_epochs=1, batch_size=8, **TINY_GENES, **FAST)
    pre = pretrain_gimp(cohort, split, out_dir=root / "pre", gene_encoder_ckpt=genes.checkpoint,
                        model_kwargs=dict(TINY_AGG, decoder_hidden=16), window_len=32, num_epochs=1, batch_size=6,
                        **FAST)
    head = dict(hidden=16, dropout=0.0)
    ft = finetune(cohort, split, out_dir=root / "ft", pretrained_ckpt=pre.checkpoint, head_kwargs=head,
                  max_patches=64, num_epochs=1, **FAST)
    anym = finetune(cohort, split, out_dir=root / "anym", pretrained_ckpt=pre.checkpoint, head_kwargs=head,
                    max_patches=64, num_epochs=2, modality_dropout=0.5, **FAST)
    abmil = train_baseline("abmil", cohort, split, out_dir=root / "abmil", model_kwargs=dict(embed_dim=32, attn_dim=16),
                           max_patches=64, num_epochs=1, **FAST)
    return {"genes": genes, "pre": pre, "ft": ft, "anym": anym, "abmil": abmil}


@pytest.fixture()
def new_patients(smoke, tmp_path):
    """The test split as a folder of 'new' patients: bags, dataset.csv, a gene table."""
    cohort, split = smoke
    ids = list(split["test"])
    folder = tmp_path / "new"
    (folder / "h5_files").mkdir(parents=True)
    rows = []
    for case in ids:
        for path in cohort.slides_of(case):
            shutil.copy(path, folder / "h5_files" / path.name)
            rows.append({"case_id": case, "slide_id": path.stem, "label": cohort.cases.loc[case, "label"]})
    pd.DataFrame(rows).to_csv(folder / "dataset.csv", index=False)
    cohort.genes.loc[ids].reset_index().to_csv(folder / "genes.csv", index=False)
    return folder, ids


def test_gimp_predict_end_to_end(runs, new_patients, smoke, tmp_path):
    cohort, _ = smoke
    folder, ids = new_patients
    out = tmp_path / "pred"
    assert main([str(runs["ft"].out_dir), str(folder), "-o", str(out), "--heatmaps", "--attributions", "--quiet"]) == 0
    table = pd.read_csv(out / "predictions.csv", dtype={"case_id": str})
    assert sorted(table.case_id) == sorted(ids)
    probs = table[[f"prob_{n}" for n in cohort.label_names]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0) and (table.modalities == "image+genes").all()
    assert set(table.pred_label) <= set(cohort.label_names)
    assert (table.checkpoint_sha256 == sha256_file(runs["ft"].checkpoint)).all()
    # the same probabilities as the run's own test predictions (same model, same whole bags)
    own = runs["ft"].predictions.query("split == 'test'").set_index("case_id")
    mine = table.set_index("case_id").loc[own.index]
    assert np.allclose(mine[f"prob_{cohort.label_names[1]}"], own["prob_1"], atol=1e-5)
    # heatmaps on the coordinates canvas (no raw slide), attention per patch, gene-group attributions
    info = json.loads((out / "predict_info.json").read_text())
    assert info["encoder_check"].startswith("encoder 'synthetic'")
    slide = cohort.slides_of(ids[0])[0].stem
    assert (out / "heatmaps" / f"{slide}.png").is_file() and info["heatmaps"][slide] == "canvas"
    att = pd.read_csv(out / "attention" / f"{slide}.csv")
    assert len(att) == read_bag(folder / "h5_files" / f"{slide}.h5").feats.shape[0]
    attr = pd.read_csv(out / "gene_attributions.csv", dtype={"case_id": str})
    assert set(attr.case_id) == set(ids) and attr.group.nunique() == 4


def test_predict_baseline_and_gene_only(runs, new_patients, tmp_path):
    folder, ids = new_patients
    t = predict(runs["abmil"].out_dir, folder, out_dir=tmp_path / "abmil", heatmaps=True, progress=False, device="cpu")
    assert (t.modalities == "image").all() and t.model.iloc[0] == "baseline:abmil"
    assert len(list((tmp_path / "abmil" / "heatmaps").glob("*.png"))) >= len(ids)
    g = predict(runs["genes"].checkpoint, None, out_dir=tmp_path / "g", genes=folder / "genes.csv",
                dataset_csv=folder / "dataset.csv", attributions=True, progress=False, device="cpu")
    assert (g.modalities == "genes").all() and (tmp_path / "g" / "gene_attributions.csv").is_file()


def test_any_modality_predicts_from_either(runs, new_patients, tmp_path):
    folder, ids = new_patients
    # two patients lose their expression, the rest keep it
    table = pd.read_csv(folder / "genes.csv", dtype={"case_id": str})
    table[~table.case_id.isin(ids[:2])].to_csv(folder / "genes.csv", index=False)
    t = predict(runs["anym"].out_dir, folder, out_dir=tmp_path / "a", progress=False, device="cpu").set_index("case_id")
    assert (t.loc[ids[:2], "modalities"] == "image").all() and (t.loc[ids[2:], "modalities"] == "image+genes").all()
    # the paper's classifier refuses, naming the cases
    with pytest.raises(DataError, match=ids[0]):
        predict(runs["ft"].out_dir, folder, out_dir=tmp_path / "b", progress=False, device="cpu")
    # genes alone: a dataset.csv that lists patients without slides
    only = folder.parent / "genes_only"
    only.mkdir()
    pd.DataFrame({"case_id": ids[2:]}).to_csv(only / "dataset.csv", index=False)
    g = predict(runs["anym"].out_dir, None, out_dir=tmp_path / "c", genes=folder / "genes.csv",
                dataset_csv=only / "dataset.csv", progress=False, device="cpu")
    assert (g.modalities == "genes").all() and len(g) == len(ids) - 2


def test_refusals(runs, new_patients, tmp_path, capsys):
    folder, ids = new_patients
    run = str(runs["ft"].out_dir)
    # genes missing for the model that needs them
    (folder / "genes.csv").unlink()
    assert main([run, str(folder), "-o", str(tmp_path / "x"), "--quiet"]) == 2
    assert "no gene table given" in capsys.readouterr().err
    # unknown gene set: gene symbols instead of the training ids
    g = pd.DataFrame(np.ones((len(ids), 3)), index=pd.Index(ids, name="case_id"), columns=["TP53", "KRT5", "EGFR"])
    g.to_csv(tmp_path / "symbols.csv")
    with pytest.raises(DataError, match="unknown gene set"):
        predict(run, folder, out_dir=tmp_path / "y", genes=tmp_path / "symbols.csv", progress=False)
    # a pre-training checkpoint is not a classifier
    with pytest.raises(DataError, match="fine-tune it first"):
        describe_run(runs["pre"].checkpoint)


def test_feature_width_and_encoder_refusals(runs, new_patients, tmp_path):
    folder, ids = new_patients
    # another feature width (a 1536-d foundation model's bags)
    wide = tmp_path / "wide"
    (wide / "h5_files").mkdir(parents=True)
    for h5 in (folder / "h5_files").glob("*.h5"):
        bag = read_bag(h5)
        write_bag(wide / "h5_files" / h5.name, np.zeros((len(bag), 1536), np.float32), bag.coords)
    shutil.copy(folder / "dataset.csv", wide)
    with pytest.raises(DataError, match="1536-d.*1024-d"):
        predict(runs["abmil"].out_dir, wide, out_dir=tmp_path / "w", progress=False)
    # same width, another encoder recorded in the bags
    for h5 in (folder / "h5_files").glob("*.h5"):
        with h5py.File(h5, "a") as f:
            del f["coords"].attrs["synthetic"]
            f["coords"].attrs["encoder"] = "uni_v1"
    assert bag_encoder(folder)["name"] == "uni_v1"
    with pytest.raises(DataError, match="uni_v1.*synthetic"):
        predict(runs["abmil"].out_dir, folder, out_dir=tmp_path / "e", progress=False)


def test_any_modality_classifier_contract():
    from gimplib.models import AnyModalityClassifier, GroupMSA, PatchAggregator

    torch.manual_seed(0)
    agg = PatchAggregator(in_dim=8, embed_dim=16, depth=1, num_heads=2, num_landmarks=4)
    net = AnyModalityClassifier(aggregator=agg, gene_encoder=GroupMSA(num_genes=20, fragment_size=5, num_groups=2,
                                                                      embed_dim=8, num_heads=2), num_classes=3,
                                hidden=8, modality_dropout=1.0)
    feats, genes = torch.randn(4, 10, 8), torch.randn(4, 20)
    net.train()
    net(feats, None, genes).sum().backward()
    assert net.missing_img.grad is not None and net.missing_ge.grad is not None  # every patient lost one modality
    net.eval()
    for f, g in ((feats, genes), (feats, None), (None, genes)):
        out = net(f, None, g)
        assert out.shape == (4, 3) and torch.isfinite(out).all()
    mixed = net(feats, None, genes, has_genes=torch.tensor([True, False, True, False]))
    assert torch.allclose(mixed[1], net(feats[1:2], None, None)[0], atol=1e-5)
    with pytest.raises(ValueError, match="at least one modality"):
        net(None, None, None)
    with pytest.raises(ValueError, match="needs a gene encoder"):
        AnyModalityClassifier(aggregator=agg, gene_encoder=None)


def test_other_feature_widths_flow_through(smoke, tmp_path):
    """1536-d bags (UNI2-h / GigaPath / H-optimus-0 width): in_dim comes from the bags, and predict checks it."""
    from gimplib.data.cohort import load_cohort
    from gimplib.train import finetune, train_baseline

    cohort, split = smoke
    folder = tmp_path / "wide"
    (folder / "h5_files").mkdir(parents=True)
    proj = np.random.default_rng(0).normal(size=(cohort.feat_dim, 1536)).astype(np.float32) / 32
    for path in cohort.slides["path"]:
        bag = read_bag(path)
        write_bag(folder / "h5_files" / Path(path).name, bag.feats @ proj, bag.coords,
                  attrs={"encoder": "uni_v2", "patch_size_level0": 512})
    shutil.copy(cohort.data_dir / "dataset.csv", folder)
    wide = load_cohort(folder, verbose=False)
    assert wide.feat_dim == 1536
    ft = finetune(wide, split, out_dir=tmp_path / "ft", aggregator_kwargs=TINY_AGG, head_kwargs=dict(hidden=16),
                  max_patches=64, num_epochs=1, **FAST)
    tm = train_baseline("transmil", wide, split, out_dir=tmp_path / "tm", model_kwargs=dict(embed_dim=32, num_heads=2),
                        max_patches=64, num_epochs=1, **FAST)
    for run in (ft, tm):
        info = describe_run(run.out_dir)
        assert info.in_dim == 1536 and info.encoder["name"] == "uni_v2"
        t = predict(run.out_dir, folder, out_dir=tmp_path / f"p_{info.name}", progress=False, device="cpu")
        assert len(t) == len(cohort) and (t.modalities == "image").all()
    with pytest.raises(DataError, match="1024-d.*1536-d"):  # 1024-d bags into a 1536-d run
        predict(ft.out_dir, cohort.data_dir, out_dir=tmp_path / "x", progress=False)
