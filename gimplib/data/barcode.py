"""TCGA barcodes and Ensembl gene ids: the identifiers the gene readers and the cohort share.

A TCGA barcode starts with the patient, ``TCGA-<site>-<participant>`` (12 characters), then
the sample (``-01A``: type code 01-09 tumour, 10-19 normal, 20-29 control). Ensembl ids
carry a version (``ENSG00000141510.16``) that differs between releases; tables are joined on
the id without it.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd

from gimplib.utils import DataError

__all__ = ["TCGA_BARCODE", "gene_frame", "is_normal_sample", "is_tcga_barcode", "patient_id", "strip_version"]

# ENS + species + feature letters + digits; GDC's GENCODE v22 files write the PAR_Y copies
# as ENSGR0000... (an R after the G), which must lose their version too
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d+)\.\d+(.*)$")
#: The start of every TCGA barcode (the patient).
TCGA_BARCODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)
_SAMPLE_CODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-(\d{2})", re.IGNORECASE)


def strip_version(ensembl_id: str) -> str:
    """``ENSG00000141510.16`` -> ``ENSG00000141510``; other names are returned unchanged.

    GENCODE's pseudo-autosomal copies keep what tells them apart from the X-chromosome
    gene: ``ENSG00000002586.18_PAR_Y`` -> ``ENSG00000002586_PAR_Y``, and GDC's
    ``ENSGR0000002586.17`` -> ``ENSGR0000002586``.
    """
    name = str(ensembl_id).strip()
    m = _ENSEMBL_VERSION.match(name)
    return m.group(1) + m.group(2) if m else name


def is_tcga_barcode(name: str) -> bool:
    """True for ``TCGA-XX-XXXX`` and every longer TCGA barcode."""
    return bool(TCGA_BARCODE.match(str(name).strip()))


def patient_id(barcode: str) -> str:
    """The patient (case) id of a TCGA barcode: its first 12 characters, upper case.

    ``TCGA-05-4244-01A-01R-1107-07`` -> ``TCGA-05-4244``. Non-TCGA ids are returned unchanged.
    """
    name = str(barcode).strip()
    return name[:12].upper() if is_tcga_barcode(name) else name


def is_normal_sample(barcode: str) -> bool:
    """True for a TCGA sample barcode of normal tissue (sample type codes 10-19: ``TCGA-05-4244-11A``)."""
    m = _SAMPLE_CODE.match(str(barcode).strip())
    return bool(m) and 10 <= int(m.group(1)) <= 19  # TCGA sample codes 10-19 are normal tissue


def _check_finite(values: np.ndarray, cases: Sequence, genes: Sequence, source: str) -> None:
    finite = np.isfinite(values)
    if finite.all():
        return
    rows, cols = np.nonzero(~finite)
    n_bad = len(rows)
    where = ", ".join(f"case {cases[r]!r} gene {genes[c]!r}" for r, c in zip(rows[:3], cols[:3]))
    raise DataError(
        f"{source}: {n_bad} NaN or inf gene value(s) ({where}{', ...' if n_bad > 3 else ''}); "
        "expected finite values (impute or drop those genes first)"
    )


def gene_frame(values: np.ndarray, cases: Sequence, genes: Sequence, source: str) -> pd.DataFrame:
    """The case x gene table both gene readers end with: float32 values indexed by ``case_id``,
    one column per gene (Ensembl versions removed).

    Raises:
        DataError: a duplicated case, a gene twice once versions are removed, or a NaN/inf
            value (the cases and genes are named, with ``source``).
    """
    cases = pd.Index([str(c).strip() for c in cases], name="case_id")
    dup = cases[cases.duplicated()].unique()
    if len(dup):
        raise DataError(
            f"{source}: duplicated case(s) {list(dup[:5])}{' ...' if len(dup) > 5 else ''}; "
            "expected one row per case"
        )
    stripped = pd.Index([strip_version(g) for g in genes])
    dup_genes = stripped[stripped.duplicated()].unique()
    if len(dup_genes):
        raise DataError(
            f"{source}: gene(s) {list(dup_genes[:5])} appear more than once "
            "(after removing Ensembl versions); expected one column per gene"
        )
    values = np.ascontiguousarray(values, dtype=np.float32)
    _check_finite(values, cases, stripped, source)
    return pd.DataFrame(values, index=cases, columns=stripped, copy=False)
