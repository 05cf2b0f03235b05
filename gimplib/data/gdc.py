"""GDC downloads: per-sample HTSeq files plus a sample sheet -> one case x gene table.

The GDC data-transfer tool writes ``<file_id>/<file_name>`` (for RNA-seq before GDC's
data release 24: ``<file_id>/<uuid>.FPKM.txt.gz``, two tab-separated columns, Ensembl id
with version and value, no header). The GDC sample sheet maps each file to its case and
sample. Genes are aligned on the Ensembl id without version; how many there are is read
from the files (60,483 in GDC's HTSeq-FPKM), never assumed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from gimplib.data.barcode import gene_frame, is_normal_sample, strip_version
from gimplib.utils import DataError

__all__ = ["read_gdc_expression"]


def _read_sample_sheet(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: GDC sample sheet not found")
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    sheet = pd.read_csv(path, sep="\t" if "\t" in first else ",", dtype=str)
    sheet.columns = [c.strip() for c in sheet.columns]
    need = ["File ID", "File Name", "Case ID"]
    missing = [c for c in need if c not in sheet.columns]
    if missing:
        raise DataError(
            f"{path}: sample sheet lacks column(s) {missing} (has {list(sheet.columns)}); "
            "expected GDC's sample sheet with File ID, File Name, Case ID, Sample ID, Sample Type"
        )
    return sheet


def _read_htseq_file(path: Path):
    """Gene ids (an Arrow array, versions kept) and values (float64) of one HTSeq file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["gene", "value"], use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter="\t"),
            convert_options=pacsv.ConvertOptions(column_types={"gene": pa.string(), "value": pa.float64()}),
        )
    except Exception as err:  # pyarrow reports the column and the bad value
        raise DataError(
            f"{path}: cannot be read as an HTSeq expression file ({err}); "
            "expected two tab-separated columns (Ensembl id, value) and no header"
        ) from err
    # ids stay in Arrow: comparing a file's 60k ids with the first file's is then one C call
    table = table.filter(pc.invert(pc.starts_with(table.column("gene"), "__")))  # HTSeq-count summaries
    return table.column("gene").combine_chunks(), table.column("value").to_numpy()


def _locate(folder: Path, file_id: str, file_name: str, by_name: dict[str, Path] | None) -> Path | None:
    direct = folder / file_id / file_name
    if direct.exists():
        return direct
    if (folder / file_name).exists():
        return folder / file_name
    return by_name.get(file_name) if by_name is not None else None


def read_gdc_expression(
    folder: str | os.PathLike,
    sample_sheet: str | os.PathLike | None = None,
    *,
    duplicates: str = "error",
    num_threads: int | None = None,
    verbose: bool = False,
) -> pd.DataFrame:
    """Read a GDC download of per-sample HTSeq files into one case x gene table.

    Files are found as ``folder/<File ID>/<File Name>`` (the GDC transfer tool's layout),
    else by name anywhere under ``folder``. Each case keeps its tumour sample when it
    also has a normal one (TCGA sample codes 10-19 or a "Normal" sample type).

    Args:
        folder: the download folder.
        sample_sheet: GDC sample sheet (TSV) with columns File ID, File Name, Case ID
            (Sample ID and Sample Type are used when present). Default: the single
            ``gdc_sample_sheet*.tsv`` in ``folder``.
        duplicates: a case with several tumour files: ``"error"``, ``"mean"`` or ``"first"``.
        num_threads: parallel file readers (default: up to 8).
        verbose: print what was dropped.

    Returns:
        DataFrame (n_cases, n_genes) float32, index ``case_id`` (TCGA patient ids as in the
        sheet), columns Ensembl ids without version (the genes common to every file, in the
        first file's order).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: GDC download folder not found")
    if sample_sheet is None:
        found = sorted(folder.glob("gdc_sample_sheet*.tsv"))
        if len(found) != 1:
            raise DataError(
                f"{folder}: {len(found)} gdc_sample_sheet*.tsv files; pass sample_sheet= "
                "(the GDC sample sheet maps each file to its case)"
            )
        sample_sheet = found[0]
    sheet = _read_sample_sheet(Path(sample_sheet))
    if duplicates not in ("error", "mean", "first"):
        raise ValueError(f"duplicates must be 'error', 'mean' or 'first', not {duplicates!r}")

    rows, missing, by_name = [], [], None
    for rec in sheet.itertuples(index=False):
        rec = dict(zip(sheet.columns, rec))
        file_id, file_name = str(rec["File ID"]).strip(), str(rec["File Name"]).strip()
        cases = sorted({c.strip() for c in str(rec["Case ID"]).split(",") if c.strip()})
        if len(cases) != 1:
            raise DataError(f"{sample_sheet}: file {file_name} maps to case(s) {cases}; expected exactly one")
        path = _locate(folder, file_id, file_name, by_name)
        if path is None and by_name is None:
            by_name = {p.name: p for p in folder.rglob("*") if p.is_file()}
            path = by_name.get(file_name)
        if path is None:
            missing.append(f"{file_id}/{file_name}")
            continue
        sample = str(rec.get("Sample ID", "") or "")
        sample_type = str(rec.get("Sample Type", "") or "")
        normal = "normal" in sample_type.lower() or any(is_normal_sample(s) for s in sample.split(","))
        rows.append((cases[0], path, normal))
    if missing:
        raise DataError(
            f"{folder}: {len(missing)} file(s) of the sample sheet are missing: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    if not rows:
        raise DataError(f"{sample_sheet}: no files listed")

    # one sample per case: tumour over normal, then the duplicates policy
    by_case: dict[str, list[tuple[Path, bool]]] = {}
    for case, path, normal in rows:
        by_case.setdefault(case, []).append((path, normal))
    chosen: dict[str, list[Path]] = {}
    n_normal_dropped = 0
    for case, files in by_case.items():
        tumour = [p for p, normal in files if not normal]
        keep = tumour if tumour else [p for p, _ in files]
        n_normal_dropped += len(files) - len(keep)
        if len(keep) > 1 and duplicates == "error":
            raise DataError(
                f"{sample_sheet}: duplicated case {case!r} has {len(keep)} tumour files "
                f"({[p.name for p in keep]}); pass duplicates='mean' or 'first'"
            )
        chosen[case] = keep[:1] if duplicates == "first" else keep
    if verbose and n_normal_dropped:
        print(f"read_gdc_expression: kept the tumour sample, dropped {n_normal_dropped} normal sample file(s)")

    paths = [p for files in chosen.values() for p in files]
    workers = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parsed = list(_progress(pool.map(_read_htseq_file, paths), len(paths), verbose))

    ref_raw = parsed[0][0]
    ref_ids = pd.Index([strip_version(g) for g in ref_raw.to_pylist()])
    common = ref_ids
    per_file_ids = []
    for path, (genes, _) in zip(paths, parsed):
        # GDC files share one row order: reuse the stripped ids instead of re-parsing 60k names
        same = genes.equals(ref_raw)
        ids = ref_ids if same else pd.Index([strip_version(g) for g in genes.to_pylist()])
        if ids.has_duplicates:
            dup = list(ids[ids.duplicated()].unique()[:5])
            raise DataError(f"{path}: gene(s) {dup} appear twice (after removing versions)")
        per_file_ids.append(ids)
        if not ids.equals(common):
            common = common[common.isin(ids)]
    if len(common) == 0:
        raise DataError(f"{folder}: the files share no gene ids")
    if verbose and len(common) < len(ref_ids):
        print(f"read_gdc_expression: {len(ref_ids) - len(common)} gene(s) not in every file were dropped")

    values = np.empty((len(paths), len(common)), dtype=np.float32)
    for i, (ids, (_, vals)) in enumerate(zip(per_file_ids, parsed)):
        values[i] = vals if ids.equals(common) else vals[ids.get_indexer(common)]
        if not np.isfinite(values[i]).all():
            j = int(np.flatnonzero(~np.isfinite(values[i]))[0])
            raise DataError(f"{paths[i]}: NaN or inf value for gene {common[j]!r}; expected finite values")

    cases, out, start = [], [], 0
    for case, files in chosen.items():
        cases.append(case)
        out.append(values[start : start + len(files)].mean(axis=0))
        start += len(files)
    return gene_frame(np.stack(out), cases, list(common), str(folder))


def _progress(it: Iterable, total: int, verbose: bool) -> Iterable:
    if not verbose or total < 20:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc="GDC files", leave=False)
