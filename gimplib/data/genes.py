"""Gene expression tables: a merged matrix or a GDC download, and their transforms.

Two inputs are read, both ending as one ``DataFrame`` (index ``case_id``, one float32
column per gene, Ensembl ids without their version):

* a merged matrix (CSV, TSV or parquet), one row per case with a ``case_id`` column (or
  index), or the transposed orientation (genes as rows), recognised from TCGA barcodes
  in the header;
* a GDC download folder of per-sample HTSeq files (``<file_id>/<name>.FPKM.txt.gz``,
  two tab-separated columns, no header) plus the GDC sample sheet that maps files to
  cases. Genes are aligned on their Ensembl id without version; the gene count is read
  from the files (60,483 in GDC's HTSeq-FPKM), never assumed.

:class:`GeneTransform` turns a table into model input (log2(x + 1) and/or per-gene
standardisation, optionally only the most variable genes, clipping of outliers and a gene
order for GroupMSA's fragments), fitted on training cases only; the kept gene list, in its
order, travels with its ``state_dict``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from gimplib.data.barcode import TCGA_BARCODE, gene_frame, is_tcga_barcode, patient_id, strip_version
from gimplib.data.gdc import read_gdc_expression
from gimplib.utils import DataError, atomic_path

__all__ = [
    "GeneTransform",
    "is_tcga_barcode",  # lives in gimplib.data.barcode, as do patient_id and strip_version
    "patient_id",
    "read_gdc_expression",  # lives in gimplib.data.gdc; re-exported here
    "read_gene_table",
    "strip_version",
    "write_gene_table",
]

_ENSEMBL = re.compile(r"^ENS[A-Z]*\d+")
_TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")


def _fraction(names: Iterable, pattern: re.Pattern) -> float:
    names = [str(n).strip() for n in names]
    return sum(bool(pattern.match(n)) for n in names) / max(1, len(names))


def _sep_for(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return "\t"
    return ","


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _TABLE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _read_raw(path: Path) -> pd.DataFrame:
    """The file as a frame whose first column holds the row ids (cases or genes)."""
    if not path.exists():
        raise DataError(f"{path}: gene table not found")
    suffix = _suffix(path)
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
            if not isinstance(df.index, pd.RangeIndex) or df.index.name is not None:
                df = df.reset_index()
            return df
        if suffix not in _TABLE_SUFFIXES:
            raise DataError(f"{path}: unknown gene table format; expected .csv, .tsv or .parquet")
        sep = _sep_for(path)
        try:  # pyarrow's reader is several times faster on wide expression matrices
            return pd.read_csv(path, sep=sep, engine="pyarrow")
        except DataError:
            raise
        except Exception:
            return pd.read_csv(path, sep=sep, low_memory=False)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot be read as a gene table ({err})") from err


def _first_bad_value(raw: pd.DataFrame, path: Path, row_kind: str, col_kind: str) -> None:
    """Raise naming the first non-numeric cell (frame: first column = row ids)."""
    ids = raw.iloc[:, 0].astype(str).to_numpy()
    for col in raw.columns[1:]:
        series = raw[col]
        if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            continue
        coerced = pd.to_numeric(series, errors="coerce")
        bad = coerced.isna() & series.notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{path}: non-numeric gene value {series.iloc[i]!r} for {row_kind} {ids[i]!r}, "
                f"{col_kind} {col!r}; expected numbers only"
            )


def _header(path: Path, sep: str) -> list[str]:
    import csv
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        return next(csv.reader([fh.readline()], delimiter=sep))


def _fast_matrix(path: Path) -> tuple[str, list[str], list[str], np.ndarray] | None:
    """(id column name, row ids, column names, values) for all-numeric tables, else None.

    Wide tables (tens of thousands of gene columns) are slow through a per-column
    reader; these paths read the numbers as one block. Anything unusual returns None
    and the general reader, which names the bad cell, takes over.
    """
    suffix = _suffix(path)
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            names = list(table.column_names)
            meta = table.schema.pandas_metadata or {}
            index_cols = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
            id_col = "case_id" if "case_id" in names else (index_cols[0] if index_cols else names[0])
            if id_col.startswith("__index_level_"):
                return None  # an unnamed index: RangeIndex-like, let pandas decide
            cols = [c for c in names if c != id_col]
            if not all(pa.types.is_integer(table.schema.field(c).type) or pa.types.is_floating(table.schema.field(c).type) for c in cols):
                return None
            if any(table.column(c).null_count for c in cols):
                return None  # nulls: the general path names the case
            values = np.empty((table.num_rows, len(cols)), dtype=np.float32)
            for j, c in enumerate(cols):
                values[:, j] = table.column(c).to_numpy()
            ids = [str(v) for v in table.column(id_col).to_pylist()]
            return id_col, ids, cols, values
        if suffix in (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz"):
            sep = _sep_for(path)
            header = _header(path, sep)
            if len(header) < 1000:
                return None  # narrow (or transposed) tables read fast enough through pandas
            values = np.loadtxt(path, delimiter=sep, skiprows=1, usecols=range(1, len(header)), dtype=np.float32, ndmin=2)
            ids = pd.read_csv(path, sep=sep, usecols=[0], dtype=str).iloc[:, 0].tolist()
            if len(ids) != values.shape[0]:
                return None
            return header[0], ids, header[1:], values
    except Exception:
        return None
    return None


def _transposed(id_name: str, ids: Sequence, names: Sequence) -> bool:
    if id_name == "case_id":
        return False
    header_cases = _fraction(names, TCGA_BARCODE) >= 0.8
    first_genes = _fraction(list(ids)[:200], _ENSEMBL) >= 0.8
    header_genes = _fraction(names, _ENSEMBL) >= 0.8
    return header_cases or (first_genes and not header_genes)


def read_gene_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a merged expression matrix in either orientation.

    Cases as rows: a ``case_id`` column (or the first column, or a parquet index) and one
    column per gene. Genes as rows: recognised when the header holds TCGA barcodes, or
    when the first column holds Ensembl ids and the header does not.

    Args:
        path: ``.csv``, ``.tsv`` (optionally ``.gz``) or ``.parquet`` (preferred for large
            tables: 946 cases x 60,480 genes load in seconds).

    Returns:
        DataFrame (n_cases, n_genes) float32, index ``case_id`` (ids as written), columns
        the gene ids (Ensembl versions removed).

    Raises:
        DataError: missing/unreadable file, non-numeric value, NaN/inf, a duplicated case
            or gene; the message names the file and the case/gene at fault.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: gene table not found")
    fast = _fast_matrix(path)
    if fast is not None:
        id_name, ids, names, values = fast
    else:
        raw = _read_raw(path)
        if raw.shape[1] < 2 or raw.shape[0] == 0:
            raise DataError(f"{path}: gene table of shape {raw.shape}; expected an id column and at least one gene")
        raw.columns = [str(c) for c in raw.columns]
        if "case_id" in raw.columns:
            raw = raw[["case_id"] + [c for c in raw.columns if c != "case_id"]]
        id_name, ids, names = raw.columns[0], raw.iloc[:, 0].astype(str).tolist(), list(raw.columns[1:])
        kinds = ("gene", "case") if _transposed(id_name, ids, names) else ("case", "gene")
        _first_bad_value(raw, path, *kinds)
        values = raw.iloc[:, 1:].to_numpy(dtype=np.float32)
    if len(ids) == 0 or len(names) == 0:
        raise DataError(f"{path}: gene table without rows or gene columns")
    if _transposed(id_name, ids, names):
        return gene_frame(values.T, names, ids, str(path))
    return gene_frame(values, ids, names, str(path))


def write_gene_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a gene table (index = case ids) atomically as parquet, CSV or TSV (by suffix).

    Parquet is much faster to read back for paper-sized tables (60,480 genes x 946 cases).
    """
    path = Path(path)
    out = df.copy()
    out.index = out.index.astype(str).rename("case_id")
    out.columns = [str(c) for c in out.columns]
    suffix = _suffix(path)
    with atomic_path(path) as tmp:
        if suffix in (".parquet", ".pq"):
            out.to_parquet(tmp)
        elif suffix in _TABLE_SUFFIXES:
            out.to_csv(tmp, sep=_sep_for(path), compression="gzip" if suffix.endswith(".gz") else None)
        else:
            raise DataError(f"{path}: unknown gene table format; expected .csv, .tsv or .parquet")
    return path


# ----------------------------------------------------------------------------- transform


class GeneTransform:
    """Gene table -> model input, fitted on the training cases only.

    Steps, in order: ``log2(x + 1)`` (``transform="log2p1"``, for FPKM/TPM/counts) or
    nothing (``"none"``, for already-normalised values such as z-scores); optionally keep
    the ``top_k_var`` genes of highest variance (after the log); optionally standardise
    each gene to zero mean and unit variance; optionally clip every value to
    ``[-clip, clip]`` (normalised tables carry outliers of several thousand that would
    otherwise dominate a model's input); finally put the genes in the ``order`` that
    decides which genes share a GroupMSA fragment. Every statistic comes from :meth:`fit`;
    :meth:`transform` only applies them, selecting the kept genes by name in the fitted
    order, so a table whose columns are in another order (or has extra genes) gives the
    same result.

    Args:
        transform: ``"log2p1"`` or ``"none"``.
        standardize: per-gene z-scoring with the training mean and sd.
        top_k_var: keep only this many genes, ranked by training variance (None = all).
        clip: clip the (standardised) values to ``[-clip, clip]``; None = no clipping.
        order: gene order of the output: ``"column"`` (the table's), ``"random"`` (a fixed
            permutation drawn with ``order_seed``) or ``"cluster"`` (co-expression order:
            average-linkage clustering of the training genes on ``1 - |correlation|``, so
            correlated genes sit side by side).
        order_seed: seed of the ``"random"`` order.
        eps: a gene whose training sd is below this is only centred (sd taken as 1).
    """

    ORDERS = ("column", "random", "cluster")

    def __init__(
        self,
        *,
        transform: str = "log2p1",
        standardize: bool = True,
        top_k_var: int | None = None,
        clip: float | None = None,
        order: str = "column",
        order_seed: int = 0,
        eps: float = 1e-6,
    ) -> None:
        if transform not in ("log2p1", "none"):
            raise ValueError(f"transform must be 'log2p1' or 'none', not {transform!r}")
        if top_k_var is not None and top_k_var < 1:
            raise ValueError(f"top_k_var must be a positive int or None, not {top_k_var!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be a positive number or None, not {clip!r}")
        if order not in self.ORDERS:
            raise ValueError(f"order must be one of {self.ORDERS}, not {order!r}")
        self.transform_name = transform
        self.standardize = standardize
        self.top_k_var = top_k_var
        self.clip = None if clip is None else float(clip)
        self.order = order
        self.order_seed = order_seed
        self.eps = eps
        self.genes: list[str] | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def __repr__(self) -> str:
        kept = "unfitted" if self.genes is None else f"{len(self.genes)} genes"
        return (
            f"GeneTransform(transform={self.transform_name!r}, standardize={self.standardize}, "
            f"top_k_var={self.top_k_var}, clip={self.clip}, order={self.order!r}, {kept})"
        )

    @property
    def num_genes(self) -> int:
        """Number of genes the transform outputs (after fitting)."""
        self._check_fitted()
        return len(self.genes)

    def _check_fitted(self) -> None:
        if self.genes is None:
            raise RuntimeError("GeneTransform is not fitted; call fit(train_table) first")

    def _log(self, x: np.ndarray, df: pd.DataFrame, genes: Sequence[str]) -> np.ndarray:
        if self.transform_name == "none":
            return x.astype(np.float32, copy=True)
        if (x < 0).any():
            r, c = (int(v[0]) for v in np.nonzero(x < 0))
            raise DataError(
                f"negative gene value {x[r, c]} (case {df.index[r]!r}, gene {genes[c]!r}); log2p1 "
                "expects non-negative FPKM/TPM/counts; for normalised values (z-scores, log values) use "
                "gene_transform='none' (book runner: -p gene_transform=none; gimp-train: --set gene_transform=none)"
            )
        return np.log2(x.astype(np.float32) + np.float32(1.0))

    def fit(self, df: pd.DataFrame) -> "GeneTransform":
        """Fit on the TRAINING cases.

        Args:
            df: (n_train, n_genes) gene table (index case_id, columns gene ids).

        Returns:
            self.
        """
        if len(df) < 2:
            raise DataError(f"GeneTransform.fit needs at least 2 training cases, got {len(df)}")
        genes = np.asarray([str(g) for g in df.columns], dtype=object)
        x = self._log(df.to_numpy(dtype=np.float32), df, genes)
        if self.top_k_var is not None and self.top_k_var < x.shape[1]:
            var = x.var(axis=0, dtype=np.float64)
            keep = np.sort(np.argpartition(-var, self.top_k_var - 1)[: self.top_k_var])
            x, genes = x[:, keep], genes[keep]
        if self.standardize:
            mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
            std = x.std(axis=0, dtype=np.float64).astype(np.float32)
            std = np.where(std < self.eps, np.float32(1.0), std)
        perm = self._order(x if not self.standardize else (x - mean) / std)
        self.genes = list(genes[perm])
        if self.standardize:
            self.mean, self.std = mean[perm], std[perm]
        return self

    def _order(self, x: np.ndarray) -> np.ndarray:
        """Permutation of the kept genes (columns of the training matrix ``x``)."""
        n = x.shape[1]
        if self.order == "random":
            return np.random.default_rng(self.order_seed).permutation(n)
        if self.order == "cluster" and n > 2:
            if self.clip is not None:
                x = np.clip(x, -self.clip, self.clip)
            return _coexpression_order(x, seed=self.order_seed)
        return np.arange(n)

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Apply the fitted transform.

        Args:
            df: (n, any genes) table holding at least the fitted genes.

        Returns:
            float32 array (n, num_genes), columns in :attr:`genes` order.
        """
        self._check_fitted()
        idx = pd.Index([str(c) for c in df.columns]).get_indexer(self.genes)
        if (idx < 0).any():
            absent = [g for g, i in zip(self.genes, idx) if i < 0]
            raise DataError(
                f"gene table lacks {len(absent)} of the {len(self.genes)} fitted genes "
                f"({absent[:5]}{' ...' if len(absent) > 5 else ''})"
            )
        x = self._log(df.to_numpy(dtype=np.float32)[:, idx], df, self.genes)
        if self.standardize:
            x -= self.mean
            x /= self.std
        if self.clip is not None:
            np.clip(x, -self.clip, self.clip, out=x)
        return x

    def fit_transform(self, df: pd.DataFrame) -> np.ndarray:
        """:meth:`fit` then :meth:`transform` on the same (training) table."""
        return self.fit(df).transform(df)

    def state_dict(self) -> dict:
        """Everything needed to rebuild the fitted transform (loadable with ``weights_only=True``)."""
        self._check_fitted()
        return {
            "transform": self.transform_name,
            "standardize": self.standardize,
            "top_k_var": self.top_k_var,
            "clip": self.clip,
            "order": self.order,
            "order_seed": self.order_seed,
            "eps": self.eps,
            "genes": list(self.genes),
            "mean": None if self.mean is None else torch.from_numpy(self.mean.copy()),
            "std": None if self.std is None else torch.from_numpy(self.std.copy()),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "GeneTransform":
        """Rebuild a fitted transform from :meth:`state_dict`."""
        obj = cls(
            transform=state["transform"],
            standardize=state["standardize"],
            top_k_var=state["top_k_var"],
            clip=state.get("clip"),  # absent in transforms saved before clipping existed
            order=state.get("order", "column"),
            order_seed=state.get("order_seed", 0),
            eps=state["eps"],
        )
        obj.genes = list(state["genes"])
        if state["mean"] is not None:
            obj.mean = np.asarray(state["mean"], dtype=np.float32)
            obj.std = np.asarray(state["std"], dtype=np.float32)
        return obj


#: above this many genes the co-expression order is computed per k-means cluster of genes
#: (the exact clustering needs a genes x genes matrix: 29 GB in float64 at 60,480 genes)
CLUSTER_EXACT_MAX = 8000


def _linkage_order(x: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering of the columns of ``x`` on 1 - |correlation|."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if x.shape[1] <= 2:
        return np.arange(x.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(x, rowvar=False), nan=0.0)  # constant genes: no correlation
    dist = np.clip(1.0 - np.abs(corr), 0.0, None)
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


def _coexpression_order(x: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Gene order that puts co-expressed genes (columns of the training matrix ``x``) side by side.

    Up to :data:`CLUSTER_EXACT_MAX` genes: the leaf order of average-linkage clustering on
    ``1 - |correlation|``. Above: k-means of the genes' standardised profiles into clusters
    of about ``CLUSTER_EXACT_MAX / 4`` genes, the clusters in the leaf order of their
    centroids, and each cluster ordered exactly (a cluster still too large is ordered by
    its genes' loading on the cluster's first principal component).
    """
    n = x.shape[1]
    if n <= CLUSTER_EXACT_MAX:
        return _linkage_order(x)
    from sklearn.cluster import KMeans

    z = x - x.mean(0)
    z /= np.maximum(np.linalg.norm(z, axis=0), 1e-12)
    k = int(np.ceil(n / max(CLUSTER_EXACT_MAX // 4, 1)))
    labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(z.T).labels_
    present = np.unique(labels)
    centroids = np.stack([z[:, labels == c].mean(1) for c in present], 1)
    order = []
    for c in present[_linkage_order(centroids)]:
        members = np.flatnonzero(labels == c)
        if len(members) <= CLUSTER_EXACT_MAX:
            order.append(members[_linkage_order(x[:, members])])
        else:
            _, _, vt = np.linalg.svd(z[:, members], full_matrices=False)
            order.append(members[np.argsort(vt[0])])
    return np.concatenate(order)
