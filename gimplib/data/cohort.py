"""A cohort: the cases of a CLAM-style folder with their labels, slides and genes.

``load_cohort`` reads the folder of ARCHITECTURE.md (``dataset.csv``, ``h5_files/`` or
``pt_files/``, a gene table or a GDC download) and joins the modalities by case id. It
reads only the bags' shapes (never their features), checks everything it can up front,
and fails with a message that names the file, slide or case at fault.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from gimplib.data.bags import bag_encoder, bag_info
from gimplib.data.barcode import is_normal_sample, is_tcga_barcode, patient_id
from gimplib.data.gdc import read_gdc_expression
from gimplib.data.genes import read_gene_table
from gimplib.utils import DataError

__all__ = ["Cohort", "load_cohort", "normalize_slide_id"]

MODALITIES = ("slides", "genes")
GENE_FILES = ("genes.parquet", "genes.pq", "genes.csv", "genes.tsv", "genes.csv.gz", "genes.tsv.gz")
_WSI_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".h5", ".pt")


def normalize_slide_id(slide_id: str) -> str:
    """A slide id as used for file names: whitespace and a slide/bag extension removed.

    CLAM's dataset CSVs hold bare ids (``TCGA-05-4244-01Z-00-DX1``); some lists carry the
    slide's file name (``....svs``), which is accepted too.
    """
    name = str(slide_id).strip()
    for suffix in _WSI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class Cohort:
    """Cases with labels, slides and genes, joined by case (patient) id.

    Attributes:
        data_dir: the folder it came from (None when built in memory).
        cases: index ``case_id``; columns ``label`` (str), ``y`` (int index into
            ``label_names``), and ``n_slides``, ``n_patches`` when there are slides.
        slides: columns ``slide_id``, ``case_id``, ``path`` (Path of the .h5 or .pt),
            ``n_patches`` (int); empty for a genes-only cohort.
        genes: raw gene table (n_cases, n_genes) float32, index ``case_id`` in ``cases``
            order, or None for a slides-only cohort.
        label_names: class names; ``y`` indexes into this list.
        feat_dim: patch feature dim D shared by every bag (None without slides).
    """

    data_dir: Path | None
    cases: pd.DataFrame
    slides: pd.DataFrame
    genes: pd.DataFrame | None
    label_names: list[str]
    feat_dim: int | None
    _slide_paths: dict[str, list[Path]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._slide_paths = {}
        for case, path in zip(self.slides.get("case_id", []), self.slides.get("path", [])):
            self._slide_paths.setdefault(case, []).append(Path(path))

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        parts = [f"{len(self)} cases"]
        counts = self.cases["label"].value_counts()
        parts.append(", ".join(f"{name}: {int(counts.get(name, 0))}" for name in self.label_names))
        if self.has_slides:
            parts.append(f"{len(self.slides)} slides, D={self.feat_dim}")
        if self.has_genes:
            parts.append(f"{self.genes.shape[1]} genes")
        return f"Cohort({'; '.join(parts)})"

    @property
    def has_slides(self) -> bool:
        """True when the cohort has bags."""
        return len(self.slides) > 0

    @property
    def has_genes(self) -> bool:
        """True when the cohort has a gene table."""
        return self.genes is not None

    @property
    def case_ids(self) -> list[str]:
        """All case ids, in cohort order."""
        return list(self.cases.index)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def slides_of(self, case_id: str) -> list[Path]:
        """Bag files of one case, in ``dataset.csv`` order."""
        if case_id not in self.cases.index:
            raise DataError(f"case {case_id!r} is not in the cohort")
        return list(self._slide_paths.get(case_id, []))

    def labels_of(self, case_ids: Sequence[str]) -> np.ndarray:
        """Class indices (n,) int64 of the given cases."""
        unknown = [c for c in case_ids if c not in self.cases.index]
        if unknown:
            raise DataError(f"case(s) {unknown[:5]} are not in the cohort")
        return self.cases.loc[list(case_ids), "y"].to_numpy(dtype=np.int64, copy=True)

    def subset(self, case_ids: Sequence[str]) -> "Cohort":
        """The cohort restricted to ``case_ids`` (in that order)."""
        case_ids = list(case_ids)
        self.labels_of(case_ids)  # validates
        keep = set(case_ids)
        return Cohort(
            data_dir=self.data_dir,
            cases=self.cases.loc[case_ids].copy(),
            slides=self.slides[self.slides["case_id"].isin(keep)].reset_index(drop=True)
            if self.has_slides
            else self.slides.copy(),
            genes=None if self.genes is None else self.genes.loc[case_ids].copy(),
            label_names=list(self.label_names),
            feat_dim=self.feat_dim,
        )


def _empty_slides() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide_id": pd.Series([], dtype=object),
            "case_id": pd.Series([], dtype=object),
            "path": pd.Series([], dtype=object),
            "n_patches": pd.Series([], dtype=np.int64),
        }
    )


def _read_dataset_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: not found; expected a CSV with columns case_id, slide_id, label")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as err:
        raise DataError(f"{path}: cannot be read as CSV ({err})") from err
    df.columns = [str(c).strip() for c in df.columns]
    df = df[[c for c in df.columns if not c.startswith("Unnamed:")]]  # a pandas index column
    if "label" not in df.columns:
        raise DataError(f"{path}: no 'label' column (has {list(df.columns)}); expected case_id, slide_id, label")
    if "case_id" not in df.columns and "slide_id" not in df.columns:
        raise DataError(f"{path}: needs a 'case_id' or 'slide_id' column (has {list(df.columns)})")
    if len(df) == 0:
        raise DataError(f"{path}: no rows")
    for col in ("case_id", "slide_id", "label"):
        if col in df.columns:
            df[col] = df[col].map(lambda v: v.strip() if isinstance(v, str) else v)
    if "case_id" not in df.columns:
        # only barcodes given: the patient is the first 12 characters of a TCGA barcode
        bad = [s for s in df["slide_id"].dropna() if not is_tcga_barcode(s)]
        if bad:
            raise DataError(
                f"{path}: no 'case_id' column and slide id {bad[0]!r} is not a TCGA barcode; "
                "add a case_id column (the patient of each slide)"
            )
        df["case_id"] = df["slide_id"].map(patient_id)
    missing_case = df["case_id"].isna()
    if missing_case.any():
        row = int(np.flatnonzero(missing_case.to_numpy())[0])
        raise DataError(f"{path}: row {row + 2} has no case_id")
    df["case_id"] = df["case_id"].map(patient_id)
    missing_label = df["label"].isna()
    if missing_label.any():
        cases = df.loc[missing_label, "case_id"].unique().tolist()
        raise DataError(f"{path}: case(s) {cases[:5]} have no label")
    if "slide_id" in df.columns:
        has = df["slide_id"].notna()
        df.loc[has, "slide_id"] = df.loc[has, "slide_id"].map(normalize_slide_id)
        dup = df.loc[has, "slide_id"][df.loc[has, "slide_id"].duplicated()].unique().tolist()
        if dup:
            raise DataError(f"{path}: slide(s) {dup[:5]} listed more than once; expected one row per slide")
    conflicts = df.groupby("case_id", sort=False)["label"].nunique()
    conflicts = conflicts[conflicts > 1].index.tolist()
    if conflicts:
        raise DataError(f"{path}: case(s) {conflicts[:5]} have slides with different labels")
    return df


#: A class with fewer cases than this gets a warning (its metrics mean little).
MIN_CLASS_CASES = 5


def _check_label_spellings(df: pd.DataFrame, path: Path) -> None:
    """Labels that differ only in case or spaces (``luad`` beside ``LUAD``) are one class mistyped."""
    raw = df.drop_duplicates("case_id")[["case_id", "label"]]
    groups: dict[str, list[str]] = {}
    for lab in raw["label"].unique():
        groups.setdefault(" ".join(str(lab).split()).casefold(), []).append(str(lab))
    clashes = [names for names in groups.values() if len(names) > 1]
    if clashes:
        parts = []
        for names in clashes:
            for name in names:
                cases = raw.loc[raw["label"] == name, "case_id"].tolist()
                parts.append(f"{name!r} ({len(cases)} case(s), e.g. {cases[:3]})")
        raise DataError(f"{path}: labels differ only in upper/lower case or spaces: {', '.join(parts)}; "
                        "spell each class one way in the label column")


def _warn_random_encoder(paths: Sequence[Path], data_dir: Path) -> None:
    """Bags from a randomly initialised encoder (``gimp-extract --random-weights``) carry no image content."""
    random = [p for p in paths if bag_encoder(p).get("encoder_weights") == "random"]
    if random:
        warnings.warn(f"{data_dir}: {len(random)} of {len(paths)} bag(s) were extracted with a RANDOM encoder "
                      f"(gimp-extract --random-weights), e.g. {random[0].name}: their features carry no image "
                      "content, so any result on them is a test of the pipeline, not of a model", stacklevel=3)


def _label_names(df: pd.DataFrame, labels: Sequence[str] | Mapping[str, int] | None, path: Path) -> tuple[list[str], dict[str, int]]:
    _check_label_spellings(df, path)
    if labels is None:
        names = sorted(df["label"].unique().tolist())
        return names, {n: i for i, n in enumerate(names)}
    if isinstance(labels, Mapping):
        mapping = {str(k): int(v) for k, v in labels.items()}
        classes = sorted(set(mapping.values()))
        if classes != list(range(len(classes))):
            raise DataError(f"labels={dict(labels)}: class indices must be 0..C-1, got {classes}")
        names = [next(k for k, v in mapping.items() if v == c) for c in classes]
    else:
        names = [str(n) for n in labels]
        mapping = {n: i for i, n in enumerate(names)}
    unknown = df.loc[~df["label"].isin(list(mapping)), ["case_id", "label"]].drop_duplicates()
    if len(unknown):
        shown = ", ".join(f"case {c!r} label {lab!r}" for c, lab in unknown.head(5).itertuples(index=False))
        raise DataError(f"{path}: unknown label(s) ({shown}); expected one of {list(mapping)}")
    return names, mapping


def _gene_table_to_patients(genes: pd.DataFrame, source: str, verbose: bool) -> pd.DataFrame:
    """Index sample barcodes by patient, keeping the tumour sample when a normal one is there too."""
    ids = [str(i) for i in genes.index]
    if not any(is_tcga_barcode(i) and len(i) > 12 for i in ids):
        genes.index = pd.Index([patient_id(i) for i in ids], name="case_id")
        return genes
    patients = [patient_id(i) for i in ids]
    normal = np.array([is_normal_sample(i) for i in ids])
    frame = pd.DataFrame({"patient": patients, "normal": normal})
    has_tumour = frame.groupby("patient")["normal"].transform(lambda s: (~s).any())
    keep = ~(frame["normal"] & has_tumour).to_numpy()
    if verbose and (~keep).sum():
        print(f"load_cohort: {source}: kept tumour samples, dropped {int((~keep).sum())} normal sample(s)")
    out = genes.iloc[np.flatnonzero(keep)]
    out.index = pd.Index(np.asarray(patients, dtype=object)[keep], name="case_id")
    dup = out.index[out.index.duplicated()].unique().tolist()
    if dup:
        samples = [i for i, p in zip(ids, patients) if p == dup[0]]
        raise DataError(
            f"{source}: duplicated case {dup[0]!r} (samples {samples}); expected one row per patient"
        )
    return out


def _resolve_gene_source(
    data_dir: Path, gene_file: str | os.PathLike | None, sample_sheet: str | os.PathLike | None
) -> Path | None:
    if gene_file is not None:
        path = Path(gene_file)
        if not path.is_absolute() and not path.exists():
            path = data_dir / path
        if not path.exists():
            raise DataError(f"{path}: gene file not found")
        return path
    if sample_sheet is not None:
        return Path(sample_sheet).parent
    for name in GENE_FILES:
        if (data_dir / name).exists():
            return data_dir / name
    return None


def load_cohort(
    data_dir: str | os.PathLike,
    *,
    gene_file: str | os.PathLike | None = None,
    sample_sheet: str | os.PathLike | None = None,
    labels: Sequence[str] | Mapping[str, int] | None = None,
    drop_incomplete: bool = False,
    require: Sequence[str] | None = None,
    dataset_csv: str = "dataset.csv",
    verbose: bool = True,
) -> Cohort:
    """Load a cohort folder in CLAM's layout.

    ``dataset.csv`` (case_id, slide_id, label; several slides per case allowed) is joined
    with the bags in ``h5_files/<slide_id>.h5`` (or ``pt_files/<slide_id>.pt``) and the gene
    table by case id. TCGA barcodes are reduced to the patient (first 12 characters), so a
    CSV without ``case_id`` or a gene table keyed by sample barcodes join correctly. Bags
    are checked from their shapes only (``bag_info``), never loaded.

    Args:
        data_dir: the cohort folder.
        gene_file: a gene table (CSV/TSV/parquet) or a GDC download folder; relative
            paths are looked up in ``data_dir``. Default: ``genes.parquet|csv|tsv`` there.
        sample_sheet: GDC sample sheet, when ``gene_file`` is a GDC download.
        labels: the allowed class names in class order (a list) or CLAM's label dict
            (``{"LUAD": 0, "LUSC": 1}``); default: sorted unique labels. A label outside
            it is an error.
        drop_incomplete: drop cases missing a required modality (and slides whose file is
            missing) and print how many, instead of raising an error that lists them.
        require: the modalities every case must have, a subset of ``("slides", "genes")``.
            Default: those the folder has.
        dataset_csv: file name of the dataset CSV inside ``data_dir``.
        verbose: print what was dropped and show progress over many bags.

    Returns:
        A :class:`Cohort`.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: cohort folder not found")
    csv_path = data_dir / dataset_csv
    df = _read_dataset_csv(csv_path)
    label_names, mapping = _label_names(df, labels, csv_path)
    gene_source = _resolve_gene_source(data_dir, gene_file, sample_sheet)
    require = _required_modalities(data_dir, df, csv_path, gene_source, require)

    case_order = list(dict.fromkeys(df["case_id"]))
    slides, feat_dim, missing_slide = _empty_slides(), None, {}
    if "slides" in require:
        slides, feat_dim, missing_slide = _read_slides(data_dir, df, case_order, verbose)
    genes, missing_genes = None, []
    if "genes" in require:
        genes, missing_genes = _read_genes(gene_source, sample_sheet, case_order, dataset_csv, verbose)

    incomplete = _incomplete_cases(csv_path, gene_source, case_order, slides, missing_slide, missing_genes,
                                   drop_incomplete, verbose)
    keep = [c for c in case_order if c not in incomplete]
    if not keep:
        raise DataError(f"{csv_path}: no case has every required modality {list(require)}")
    cases = _case_table(df, keep, mapping, csv_path)
    if "slides" in require:
        slides = slides[slides["case_id"].isin(set(keep))].reset_index(drop=True)
        per_case = slides.groupby("case_id")["n_patches"].agg(["size", "sum"])
        cases["n_slides"] = per_case.loc[keep, "size"].to_numpy(dtype=np.int64)
        cases["n_patches"] = per_case.loc[keep, "sum"].to_numpy(dtype=np.int64)
    if genes is not None:
        genes = genes.loc[keep]
    return Cohort(
        data_dir=data_dir,
        cases=cases,
        slides=slides,
        genes=genes,
        label_names=label_names,
        feat_dim=feat_dim,
    )


def _required_modalities(data_dir: Path, df: pd.DataFrame, csv_path: Path, gene_source: Path | None,
                         require: Sequence[str] | None) -> tuple[str, ...]:
    """The modalities every case must have (default: those the folder has), checked against the folder."""
    slide_dirs = [d for d in (data_dir / "h5_files", data_dir / "pt_files") if d.is_dir()]
    available = []
    if slide_dirs and "slide_id" in df.columns:
        available.append("slides")
    if gene_source is not None:
        available.append("genes")
    require = tuple(available) if require is None else tuple(require)
    bad = [m for m in require if m not in MODALITIES]
    if bad:
        raise ValueError(f"require: unknown modality {bad}; expected a subset of {MODALITIES}")
    if not require:
        raise DataError(f"{data_dir}: neither h5_files/ nor pt_files/ nor a gene table ({', '.join(GENE_FILES)}) found")
    if slide_dirs and "slide_id" not in df.columns and "slides" in require:
        n_bags = sum(1 for d in slide_dirs for _ in d.glob("*.*"))
        raise DataError(f"{csv_path}: no 'slide_id' column (has {list(df.columns)}), but {n_bags} bag(s) sit in "
                        f"{', '.join(d.name + '/' for d in slide_dirs)}; expected columns case_id, slide_id, label "
                        "(slide_id: each bag's file name without .h5/.pt)")
    if "slides" in require and "slides" not in available:
        what = "no 'slide_id' column in dataset.csv" if slide_dirs else "no h5_files/ or pt_files/ folder"
        raise DataError(f"{data_dir}: slides required but {what}")
    if "genes" in require and gene_source is None:
        raise DataError(f"{data_dir}: genes required but no gene table ({', '.join(GENE_FILES)}) found")
    return require


def _read_slides(data_dir: Path, df: pd.DataFrame, case_order: Sequence[str],
                 verbose: bool) -> tuple[pd.DataFrame, int | None, dict[str, list[str]]]:
    """(slides table, feature dim D, case -> slide ids without a bag): every bag's shape, read
    from its header only; a bag of another D than the others is an error naming it."""
    records, missing_slide = [], {}
    rows = df[df["slide_id"].notna()][["slide_id", "case_id"]].itertuples(index=False)
    for slide_id, case_id in rows:
        path = None
        for folder, suffix in ((data_dir / "h5_files", ".h5"), (data_dir / "pt_files", ".pt")):
            if (folder / f"{slide_id}{suffix}").exists():
                path = folder / f"{slide_id}{suffix}"
                break
        if path is None:
            missing_slide.setdefault(case_id, []).append(slide_id)
        else:
            records.append((slide_id, case_id, path))
    iterator = tqdm(records, desc="bag shapes", leave=False) if verbose and len(records) > 200 else records
    shapes = [bag_info(path) for _, _, path in iterator]
    _warn_random_encoder([path for _, _, path in records], data_dir)
    slides, feat_dim = _empty_slides(), None
    if records:
        dims = Counter(d for _, d in shapes)
        feat_dim = dims.most_common(1)[0][0]
        odd = [(rec[2], d) for rec, (_, d) in zip(records, shapes) if d != feat_dim]
        if odd:
            shown = ", ".join(f"{p} (D={d})" for p, d in odd[:5])
            raise DataError(
                f"feature dim differs from the other bags' D={feat_dim}: {shown}; "
                "every bag must come from the same feature extractor"
            )
        slides = pd.DataFrame(
            {
                "slide_id": [r[0] for r in records],
                "case_id": [r[1] for r in records],
                "path": [r[2] for r in records],
                "n_patches": np.array([n for n, _ in shapes], dtype=np.int64),
            }
        )
    with_slide = set(slides["case_id"])
    for case in case_order:  # cases whose rows carry no slide_id at all
        if case not in with_slide and case not in missing_slide:
            missing_slide[case] = []
    return slides, feat_dim, missing_slide


def _read_genes(gene_source: Path, sample_sheet: str | os.PathLike | None, case_order: Sequence[str],
                dataset_csv: str, verbose: bool) -> tuple[pd.DataFrame, list[str]]:
    """(gene table indexed by patient, cases of ``case_order`` without a row in it)."""
    if gene_source.is_dir():
        genes = read_gdc_expression(gene_source, sample_sheet, verbose=verbose)
    else:
        genes = read_gene_table(gene_source)
    genes = _gene_table_to_patients(genes, str(gene_source), verbose)
    missing_genes = [c for c in case_order if c not in genes.index]
    extra = len(genes.index.difference(pd.Index(case_order)))
    if verbose and extra:
        print(f"load_cohort: {extra} case(s) of {gene_source.name} are not in {dataset_csv} (ignored)")
    return genes, missing_genes


def _incomplete_cases(csv_path: Path, gene_source: Path | None, case_order: Sequence[str], slides: pd.DataFrame,
                      missing_slide: Mapping[str, list[str]], missing_genes: Sequence[str], drop_incomplete: bool,
                      verbose: bool) -> set[str]:
    """The cases to drop for a missing modality; without ``drop_incomplete`` any missing genes
    or slide file is an error that lists the cases (and their slides)."""
    incomplete = set(missing_genes)
    slide_incomplete = {c for c, s in missing_slide.items() if c not in set(slides["case_id"])}
    incomplete |= slide_incomplete
    partial = {c: s for c, s in missing_slide.items() if c not in slide_incomplete}
    if (incomplete or partial) and not drop_incomplete:
        lines = []
        if missing_genes:
            lines.append(
                f"{len(missing_genes)} case(s) have no genes in {gene_source.name}: "
                f"{missing_genes[:10]}{' ...' if len(missing_genes) > 10 else ''}"
            )
        if missing_slide:
            shown = [f"{c} ({', '.join(s) or 'no slide_id'})" for c, s in list(missing_slide.items())[:10]]
            lines.append(
                f"{len(missing_slide)} case(s) have a slide with no bag in h5_files/ or pt_files/: "
                f"{shown}{' ...' if len(missing_slide) > 10 else ''}"
            )
        raise DataError(f"{csv_path}: " + "; ".join(lines) + "; to drop them, pass drop_incomplete=True "
                        "(book runner: -p drop_incomplete=true; gimp-train: --drop-incomplete)")
    if verbose and (incomplete or partial):
        n_slides = sum(len(s) for s in missing_slide.values())
        print(
            f"load_cohort: dropped {len(incomplete)} of {len(case_order)} case(s) "
            f"({len(missing_genes)} without genes, {len(slide_incomplete)} without slides)"
            + (f" and {n_slides} missing slide file(s)" if n_slides else "")
        )
    return incomplete


def _case_table(df: pd.DataFrame, keep: Sequence[str], mapping: Mapping[str, int], csv_path: Path) -> pd.DataFrame:
    """One row per kept case: ``label`` (its first row's) and ``y``; warns about tiny classes."""
    first = df.drop_duplicates("case_id").set_index("case_id")
    cases = pd.DataFrame(
        {"label": first.loc[keep, "label"].astype(str).to_numpy()},
        index=pd.Index(keep, name="case_id"),
    )
    cases["y"] = cases["label"].map(mapping).astype(np.int64)
    counts = cases["label"].value_counts()
    small = {name: int(n) for name, n in counts.items() if n < MIN_CLASS_CASES}
    if small:
        warnings.warn(f"{csv_path}: class(es) with fewer than {MIN_CLASS_CASES} cases: {small}; their "
                      "metrics will rest on a handful of cases (check the label column)", stacklevel=3)
    return cases
