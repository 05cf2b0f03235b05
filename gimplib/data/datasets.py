"""Torch datasets over a :class:`~gimplib.data.cohort.Cohort`, and the bag collate.

* :class:`WindowDataset`: one random contiguous window of ``window_len`` patches per case
  per epoch (masked patch modeling, the paper's L = 6000). Only the window's rows are read
  from the h5 file. Bags shorter than the window are repeated (tiled) up to its length, as
  the paper does.
* :class:`BagDataset`: a case's whole bag (its slides concatenated), optionally
  subsampled to ``max_patches`` rows in their original order.
* :class:`GeneDataset`: the gene vector of a case.
* :func:`collate_bags`: pads bags of different lengths and returns a validity mask.

Items are dicts: ``feats`` (n, D) float32, ``mask`` (n,) bool (True = real patch),
``genes`` (G,) float32 when a gene matrix is given, ``y`` () int64, ``case_id`` str,
``index`` int. Randomness depends only on (seed, epoch, index), so results do not change
with the number of DataLoader workers. Files are opened lazily, per worker process.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from gimplib.data.bags import BagReader
from gimplib.data.cohort import Cohort
from gimplib.utils import DataError

__all__ = ["BagDataset", "GeneDataset", "WindowDataset", "collate_bags"]


class _CaseDataset(Dataset):
    """Shared bookkeeping: case ids, labels, optional gene rows, epoch."""

    def __init__(self, cohort: Cohort, case_ids: Sequence[str], gene_matrix: np.ndarray | None, seed: int) -> None:
        self.case_ids = [str(c) for c in case_ids]
        if not self.case_ids:
            raise DataError("dataset over zero cases")
        self.y = torch.as_tensor(np.array(cohort.labels_of(self.case_ids), dtype=np.int64))
        self.genes = None
        if gene_matrix is not None:
            gene_matrix = np.asarray(gene_matrix, dtype=np.float32)
            if gene_matrix.ndim != 2 or gene_matrix.shape[0] != len(self.case_ids):
                raise DataError(
                    f"gene_matrix of shape {gene_matrix.shape}; expected ({len(self.case_ids)}, G), "
                    "one row per case id in the same order"
                )
            if not np.isfinite(gene_matrix).all():
                row = int(np.flatnonzero(~np.isfinite(gene_matrix).all(axis=1))[0])
                raise DataError(f"gene_matrix: NaN or inf in the row of case {self.case_ids[row]!r}")
            self.genes = torch.from_numpy(np.require(gene_matrix, requirements="W"))
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.case_ids)

    def set_epoch(self, epoch: int) -> None:
        """Draw new windows / subsamples (call before each epoch; not seen by persistent workers)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _base_item(self, index: int) -> dict:
        item = {"y": self.y[index], "case_id": self.case_ids[index], "index": index}
        if self.genes is not None:
            item["genes"] = self.genes[index]
        return item


class _BagCaseDataset(_CaseDataset):
    def __init__(self, cohort: Cohort, case_ids: Sequence[str], gene_matrix: np.ndarray | None, seed: int) -> None:
        super().__init__(cohort, case_ids, gene_matrix, seed)
        if not cohort.has_slides:
            raise DataError("the cohort has no slides (genes-only); use GeneDataset")
        by_case = cohort.slides.groupby("case_id", sort=False)
        self.segments: list[list[tuple[str, int]]] = []
        for case in self.case_ids:
            if case not in by_case.groups:
                raise DataError(f"case {case!r} has no slide in the cohort")
            rows = by_case.get_group(case)
            self.segments.append([(str(p), int(n)) for p, n in zip(rows["path"], rows["n_patches"])])
        self.feat_dim = int(cohort.feat_dim)
        # opened lazily, one pool per worker process (BagReader drops handles when pickled)
        self.reader = BagReader()

    def _read_range(self, index: int, start: int, stop: int, with_coords: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [start, stop) of the case's slides taken as one concatenated sequence."""
        feats, coords, offset = [], [], 0
        for path, n in self.segments[index]:
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                bag = self.reader.read(path, lo, hi, with_coords=with_coords)
                feats.append(bag.feats)
                coords.append(bag.coords)
            offset += n
        out_coords = np.concatenate(coords) if with_coords and all(c is not None for c in coords) else None
        return np.concatenate(feats), out_coords


class WindowDataset(_BagCaseDataset):
    """A random contiguous window of each case's bag, new every epoch.

    A case's slides are taken as one sequence (in ``dataset.csv`` order); its window
    starts at a uniform random row. A sequence shorter than ``window_len`` is repeated
    from a random offset up to ``window_len`` rows (``tile_short=True``, the paper's
    choice; ``mask`` is then all True) or zero-padded (``tile_short=False``; ``mask`` is
    False on the padding).

    Args:
        cohort: a cohort with slides.
        case_ids: the cases (e.g. a split's ``train``).
        window_len: L, rows per window (the paper: 6000).
        gene_matrix: (len(case_ids), G) model-ready genes in ``case_ids`` order, or None.
        seed: windows depend only on (seed, epoch, index).
        tile_short: repeat short bags (True) or pad them (False).
        with_coords: also return ``coords`` (L, 2) when every slide has them.

    Item:
        ``feats`` (L, D) float32, ``mask`` (L,) bool, ``y`` () int64, ``case_id``,
        ``index``, ``start`` (first row of the window), ``genes`` (G,) when given,
        ``coords`` (L, 2) int64 when asked for and available.
    """

    def __init__(
        self,
        cohort: Cohort,
        case_ids: Sequence[str],
        *,
        window_len: int = 6000,
        gene_matrix: np.ndarray | None = None,
        seed: int = 0,
        tile_short: bool = True,
        with_coords: bool = False,
    ) -> None:
        super().__init__(cohort, case_ids, gene_matrix, seed)
        if window_len < 1:
            raise ValueError(f"window_len must be >= 1, got {window_len}")
        self.window_len = int(window_len)
        self.tile_short = tile_short
        self.with_coords = with_coords

    def __getitem__(self, index: int) -> dict:
        L = self.window_len
        total = sum(n for _, n in self.segments[index])
        rng = self._rng(index)
        mask = torch.ones(L, dtype=torch.bool)
        if total >= L:
            start = int(rng.integers(0, total - L + 1))
            feats, coords = self._read_range(index, start, start + L, self.with_coords)
        else:
            feats, coords = self._read_range(index, 0, total, self.with_coords)
            if self.tile_short:
                start = int(rng.integers(0, total))
                rows = (start + np.arange(L)) % total
                feats = feats[rows]
                coords = coords[rows] if coords is not None else None
            else:
                start = 0
                feats = np.concatenate([feats, np.zeros((L - total, feats.shape[1]), np.float32)])
                if coords is not None:
                    coords = np.concatenate([coords, np.zeros((L - total, 2), np.int64)])
                mask[total:] = False
        item = self._base_item(index)
        item.update(feats=torch.from_numpy(np.ascontiguousarray(feats)), mask=mask, start=start)
        if coords is not None:
            item["coords"] = torch.from_numpy(np.ascontiguousarray(coords))
        return item


class BagDataset(_BagCaseDataset):
    """Each case's whole bag: its slides concatenated in ``dataset.csv`` order.

    Args:
        cohort: a cohort with slides.
        case_ids: the cases.
        gene_matrix: (len(case_ids), G) model-ready genes in ``case_ids`` order, or None.
        max_patches: keep at most this many rows, a random subset in original order
            (redrawn each epoch); None keeps all.
        seed: subsamples depend only on (seed, epoch, index).

    Item:
        ``feats`` (n, D) float32, ``mask`` (n,) bool (all True), ``coords`` (n, 2) int64
        when every slide has coords, ``y`` () int64, ``case_id``, ``index``, ``genes`` (G,).
    """

    def __init__(
        self,
        cohort: Cohort,
        case_ids: Sequence[str],
        *,
        gene_matrix: np.ndarray | None = None,
        max_patches: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(cohort, case_ids, gene_matrix, seed)
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be >= 1 or None, got {max_patches}")
        self.max_patches = max_patches

    def __getitem__(self, index: int) -> dict:
        total = sum(n for _, n in self.segments[index])
        feats, coords = self._read_range(index, 0, total, True)
        if self.max_patches is not None and total > self.max_patches:
            rows = np.sort(self._rng(index).choice(total, self.max_patches, replace=False))
            feats = feats[rows]
            coords = coords[rows] if coords is not None else None
        item = self._base_item(index)
        item.update(feats=torch.from_numpy(np.ascontiguousarray(feats)), mask=torch.ones(len(feats), dtype=torch.bool))
        if coords is not None:
            item["coords"] = torch.from_numpy(np.ascontiguousarray(coords))
        return item


class GeneDataset(_CaseDataset):
    """The gene vector of each case.

    Args:
        cohort: the cohort (for labels).
        case_ids: the cases.
        gene_matrix: (len(case_ids), G) model-ready genes (e.g. ``GeneTransform.transform``).

    Item:
        ``genes`` (G,) float32, ``y`` () int64, ``case_id``, ``index``.
    """

    def __init__(self, cohort: Cohort, case_ids: Sequence[str], gene_matrix: np.ndarray) -> None:
        if gene_matrix is None:
            raise DataError("GeneDataset needs a gene_matrix")
        super().__init__(cohort, case_ids, gene_matrix, seed=0)

    def __getitem__(self, index: int) -> dict:
        return self._base_item(index)


def collate_bags(batch: list[dict]) -> dict:
    """Stack items of different lengths, padding with zeros.

    Args:
        batch: items of the datasets above.

    Returns:
        ``feats`` (b, n_max, D) float32 and ``mask`` (b, n_max) bool (False on padding)
        when items have feats; ``coords`` (b, n_max, 2) int64 when every item has them;
        ``genes`` (b, G) when every item has them; ``y`` (b,) int64; ``index`` (b,) int64;
        ``start`` (b,) when present; ``case_id`` list of b str.
    """
    if not batch:
        raise ValueError("collate_bags got an empty batch")
    out: dict = {
        "y": torch.stack([item["y"] for item in batch]),
        "index": torch.as_tensor([item["index"] for item in batch], dtype=torch.long),
        "case_id": [item["case_id"] for item in batch],
    }
    if all("feats" in item for item in batch):
        n_max = max(item["feats"].shape[0] for item in batch)
        dim = batch[0]["feats"].shape[1]
        feats = torch.zeros(len(batch), n_max, dim, dtype=torch.float32)
        mask = torch.zeros(len(batch), n_max, dtype=torch.bool)
        with_coords = all("coords" in item for item in batch)
        coords = torch.zeros(len(batch), n_max, 2, dtype=torch.long) if with_coords else None
        for i, item in enumerate(batch):
            n = item["feats"].shape[0]
            feats[i, :n] = item["feats"]
            mask[i, :n] = item["mask"]
            if with_coords:
                coords[i, :n] = item["coords"]
        out.update(feats=feats, mask=mask)
        if with_coords:
            out["coords"] = coords
    if all("genes" in item for item in batch):
        out["genes"] = torch.stack([item["genes"] for item in batch])
    if all("start" in item for item in batch):
        out["start"] = torch.as_tensor([item["start"] for item in batch], dtype=torch.long)
    return out
