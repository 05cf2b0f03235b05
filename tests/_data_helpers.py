"""Builders of small cohort folders in CLAM's layout, shared by the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from gimplib.data import write_bag, write_gene_table


def case_name(i: int) -> str:
    return f"TCGA-{10 + i % 7:02d}-{1000 + i:04d}"


def slide_name(case: str, j: int = 0) -> str:
    return f"{case}-01Z-00-DX{j + 1}"


def clam_save_hdf5(path: Path, feats: np.ndarray, coords: np.ndarray, *, batch: int = 64, chunk_rows: int = 32) -> None:
    """Write a bag the way CLAM's feature extraction does: one resizable dataset per key,
    created from the first batch with ``maxshape=(None, D)`` and ``chunks=(32, D)``, then
    grown with ``resize`` for every further batch (file opened in append mode)."""
    for lo in range(0, len(feats), batch):
        asset = {"features": feats[lo : lo + batch], "coords": coords[lo : lo + batch]}
        with h5py.File(path, "a") as f:
            for key, val in asset.items():
                if key not in f:
                    ds = f.create_dataset(
                        key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                        chunks=(chunk_rows,) + val.shape[1:], dtype=val.dtype,
                    )
                    ds[:] = val
                    if key == "coords":
                        ds.attrs.update({"patch_size": 256, "patch_level": 0})
                else:
                    ds = f[key]
                    ds.resize(len(ds) + len(val), axis=0)
                    ds[-len(val):] = val


def make_cohort(
    root: Path,
    *,
    n_cases: int = 6,
    dim: int = 8,
    n_genes: int = 5,
    lengths: list[int] | None = None,
    two_slides: tuple[int, ...] = (0,),
    genes: bool = True,
    slides: bool = True,
    clam: bool = False,
    seed: int = 0,
) -> Path:
    """A cohort folder: dataset.csv, h5_files/ (optional), genes.parquet (optional).

    Case i has label LUAD for even i, LUSC for odd i; cases in ``two_slides`` have two
    slides. Features of slide k of case i are ``100*i + 10*k + row/1000`` in column 0, so
    tests can tell rows apart.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for i in range(n_cases):
        case = case_name(i)
        label = "LUAD" if i % 2 == 0 else "LUSC"
        for j in range(2 if i in two_slides else 1):
            sid = slide_name(case, j)
            rows.append({"case_id": case, "slide_id": sid, "label": label})
            if slides:
                n = lengths[k % len(lengths)] if lengths else 20 + 3 * k
                feats = rng.random((n, dim), dtype=np.float32)
                feats[:, 0] = 100 * i + 10 * j + np.arange(n) / 1000
                coords = np.stack([np.arange(n) % 5, np.arange(n) // 5], 1).astype(np.int64) * 256
                path = root / "h5_files" / f"{sid}.h5"
                path.parent.mkdir(exist_ok=True)
                if clam:
                    clam_save_hdf5(path, feats, coords)
                else:
                    write_bag(path, feats, coords)
            k += 1
    pd.DataFrame(rows).to_csv(root / "dataset.csv", index=False)
    if genes:
        cases = [case_name(i) for i in range(n_cases)]
        table = pd.DataFrame(
            rng.lognormal(1.0, 1.0, (n_cases, n_genes)).astype(np.float32),
            index=pd.Index(cases, name="case_id"),
            columns=[f"ENSG{100 + g:011d}" for g in range(n_genes)],
        )
        write_gene_table(table, root / "genes.parquet")
    return root
