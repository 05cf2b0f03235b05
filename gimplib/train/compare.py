"""The paper's comparison: the rows of Tables 1 and 2 as recipes the engine trains over seeds.

A *row* is a line of one of the paper's tables (Jin et al., MICCAI 2023: Table 1 compares
GiMP with pathology-only MIL, pathology + genomics fusion and image-gene pre-training;
Table 2 ablates GiMP's parts). A *recipe* is how one system is trained with this package's
engine; rows that are the same system (Table 1's GiMP and Table 2's last row) share a recipe
and its runs. :func:`run_sweep` trains recipes x seeds (x folds), in parallel processes if
asked, into ``<out_root>/<recipe>/[fold_<k>/]seed_<s>/``; :func:`read_runs` reads the runs'
``metrics.json`` back and :func:`render_table` lays them out as mean +- sd beside the
paper's numbers. No figure in a table is typed in: each comes from a file a run wrote.

Recipes, by the task that trains them (:data:`RECIPES`):
    * ``train_baseline``: a registered system (:data:`gimplib.models.baselines.SYSTEMS`, blocks
      ``pathology`` and ``fusion``) trained end to end with cross-entropy plus its own
      auxiliary loss (:func:`~gimplib.train.train_baseline`). GiMP's aggregator and a gene
      encoder trained together on the concatenated class tokens, no pre-training
      (``gimp_fusion``), is one of them: Table 1's "GiMP w/o pre-training" and Table 2's first
      two rows (recipes ``fusion_snn``, ``fusion_groupmsa``).
    * ``finetune``: GiMP's patch aggregator with the MLP head, trained supervised on slides
      alone, no pre-training (:func:`~gimplib.train.finetune` without a checkpoint): Table 1's
      "GiMP w/o GroupMSA", which the paper places in the pathology block.
    * ``pretrain_baseline``: a registered system of the ``pretraining`` block (BioViL-, MGCA-,
      REFERS-style) on the same windows, from the supervised GroupMSA of the same seed, then
      the same image + genes fine-tuning as GiMP (Table 1's pathology + genomic block with
      pre-training).
    * ``pretrain_gimp``: a supervised gene encoder (when the row uses genes), pre-training with
      MPM and/or the triplet loss (:func:`~gimplib.train.pretrain_gimp`; without a gene encoder
      the triplets are built from ``CLS_img`` alone), then fine-tuning on ``CLS_pat`` (image +
      genes) when the row has a gene encoder, on ``CLS_img`` when it has none (Table 2
      "aggregator + MPM", "aggregator + triplet").

The registered systems' recipes are read off the registry; only GiMP's own are written here.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gimplib.data.bags import bag_cache_info, set_bag_cache
from gimplib.metrics import mean_sd
from gimplib.models.baselines import BLOCKS, SYSTEMS
from gimplib.train.options import TrainOptions
from gimplib.train.pretraining import finetune, pretrain_baseline, pretrain_gimp
from gimplib.train.tasks import train_baseline, train_gene_encoder
from gimplib.utils import load_json

__all__ = [
    "PAPER_TCGA",
    "RECIPES",
    "recipe_facts",
    "ROWS",
    "Job",
    "Recipe",
    "Row",
    "SweepConfig",
    "paper_claims",
    "read_runs",
    "render_table",
    "run_recipe",
    "run_sweep",
    "unavailable",
]


@dataclass(frozen=True)
class Row:
    """One line of the paper's Table 1 or 2, the recipe that regenerates it and the paper's figure.

    Attributes:
        table: ``"table1"`` or ``"table2"``.
        group: the block of the table (Table 1: a heading of
            :data:`~gimplib.models.baselines.BLOCKS`; Table 2: "ablation").
        label: the row's name as the paper gives it.
        recipe: key of :data:`RECIPES`.
        paper_accuracy: the paper's TCGA-NSCLC test accuracy for the row (Tables 1 and 2; the
            paper reports accuracy only).
        ours: True for a row of ours that the paper does not have (none at present).
    """

    table: str
    group: str
    label: str
    recipe: str
    paper_accuracy: float | None = None
    ours: bool = False


_PATH, _FUSE, _PRE = BLOCKS["pathology"], BLOCKS["fusion"], BLOCKS["pretraining"]

ROWS: tuple[Row, ...] = (
    Row("table1", _PATH, "ABMIL", "abmil", 0.7737),
    Row("table1", _PATH, "DSMIL", "dsmil", 0.7566),
    Row("table1", _PATH, "CLAM-SB", "clam_sb", 0.8519),
    Row("table1", _PATH, "CLAM-MB", "clam_mb", 0.8889),
    Row("table1", _PATH, "TransMIL", "transmil", 0.8836),
    Row("table1", _PATH, "GiMP w/o GroupMSA", "aggregator", 0.8995),
    Row("table1", _FUSE, "PORPOISE", "porpoise", 0.9524),
    Row("table1", _FUSE, "Pathomic Fusion", "pathomic", 0.9684),
    Row("table1", _FUSE, "MCAT", "mcat", 0.9632),
    Row("table1", _FUSE, "GiMP w/o pre-training", "fusion_groupmsa", 0.9737),
    Row("table1", _PRE, "MGCA", "mgca", 0.9105),
    Row("table1", _PRE, "BioViL", "biovil", 0.9316),
    Row("table1", _PRE, "REFERS", "refers", 0.9368),
    Row("table1", _PRE, "GiMP", "gimp", 0.9947),
    Row("table2", "ablation", "aggregator + SNN", "fusion_snn", 0.9684),
    Row("table2", "ablation", "aggregator + GroupMSA", "fusion_groupmsa", 0.9737),
    Row("table2", "ablation", "aggregator + MPM", "pre_mpm", 0.9579),
    Row("table2", "ablation", "aggregator + triplet", "pre_tri", 0.9263),
    Row("table2", "ablation", "aggregator + GroupMSA + triplet", "pre_groupmsa_tri", 0.9526),
    Row("table2", "ablation", "aggregator + GroupMSA + triplet + MPM (GiMP)", "gimp", 0.9974),
)

class Recipe(NamedTuple):
    """How one row is trained: the task that trains it (``"train_baseline"``, ``"finetune"``,
    ``"pretrain_baseline"`` or ``"pretrain_gimp"``) and its options (``name``: the registered
    system; ``gene``: the gene encoder, None or ``"snn"`` / ``"groupmsa"``; ``mpm``, ``triplet``:
    GiMP's pre-training losses)."""

    trainer: str
    options: dict[str, Any]


#: recipe -> :class:`Recipe`: the registered systems' recipes (read off the registry), then GiMP's own.
RECIPES: dict[str, Recipe] = {
    **{recipe: Recipe(system.trainer, {"name": name, **opts})
       for name, system in SYSTEMS.items() for recipe, opts in system.recipes.items()},
    "aggregator": Recipe("finetune", {}),
    "pre_mpm": Recipe("pretrain_gimp", {"gene": None, "mpm": True, "triplet": False}),
    "pre_tri": Recipe("pretrain_gimp", {"gene": None, "mpm": False, "triplet": True}),
    "pre_groupmsa_tri": Recipe("pretrain_gimp", {"gene": "groupmsa", "mpm": False, "triplet": True}),
    "gimp": Recipe("pretrain_gimp", {"gene": "groupmsa", "mpm": True, "triplet": True}),
}

#: The paper's TCGA-NSCLC accuracies by (table, row label), from :data:`ROWS`. Table 2's last
#: row is the same model as Table 1's GiMP: the paper gives 0.9947 and 0.9974 for it (its
#: own text speaks of 99.47 %, and 0.9974 x 190 test patients is not a whole number).
PAPER_TCGA: dict[tuple[str, str], dict[str, float]] = {
    (r.table, r.label): {"accuracy": r.paper_accuracy} for r in ROWS if r.paper_accuracy is not None
}


def recipe_facts(recipe: str) -> dict[str, Any]:
    """What a recipe trains, in the terms of the paper's tables (read off :data:`RECIPES`).

    Returns:
        ``gene_encoder`` (None, ``"snn"``, ``"groupmsa"`` or a published system's own),
        ``pretraining`` (None, ``"gimp"`` or the pre-training system), ``mpm`` (bool),
        ``triplet`` (None, ``"image"``: triplets on ``CLS_img``, or ``"image+genes"``: on
        ``concat(CLS_img, CLS_ge)``) and ``finetune_inputs`` (``"image"`` or ``"image+genes"``).
    """
    trainer, opt = RECIPES[recipe]
    system = SYSTEMS[opt["name"]] if "name" in opt else None
    # a fusion system reads genes through its own encoder, named after it; GiMP's through the recipe's
    gene = opt.get("gene") or (system.name if system is not None and system.reads_genes else None)
    inputs = "image+genes" if gene else "image"
    if trainer in ("train_baseline", "finetune"):
        return dict(gene_encoder=gene, pretraining=None, mpm=False, triplet=None, finetune_inputs=inputs)
    if trainer == "pretrain_baseline":
        return dict(gene_encoder=gene, pretraining=opt["name"], mpm=False, triplet=None, finetune_inputs=inputs)
    return dict(gene_encoder=gene, pretraining="gimp", mpm=opt["mpm"], triplet=inputs if opt["triplet"] else None,
                finetune_inputs=inputs)


@dataclass(frozen=True)
class SweepConfig:
    """The settings every row of a sweep shares (the paper's scale by default).

    Attributes:
        input: fine-tuning input, ``"bag"`` (whole bags) or ``"window"``.
        window_len: L of the pre-training windows (and of ``input="window"``).
        max_patches: with ``input="bag"``, a cap on training patches per bag (None: all).
        embed_dim, depth, num_heads, num_landmarks: the aggregator (and the baselines'
            widths: ABMIL, CLAM, TransMIL, PORPOISE and MCAT take ``embed_dim``; DSMIL and
            Pathomic Fusion keep their own small defaults).
        decoder_hidden: hidden width of the MPM decoder.
        rec_reduction: how ``L_rec`` is reduced: ``"sum"`` (Eq. 3 as written) or ``"mean"`` (ours).
        gene_embed_dim, fragment_size, num_groups, fragment_proj, gene_dropout: the gene
            encoders (GroupMSA; SNN uses ``gene_embed_dim``); the defaults of the last two are
            the ones 5-fold CV chose on real TCGA expression (book page genes_real).
        gene_clip, gene_order: the gene transform of every row that reads genes (clipping of
            the standardised values; genes ordered into fragments by co-expression clusters
            fitted on the training patients). ``gene_embed_dim=None`` (default) gives them the aggregator's
            ``embed_dim``: the paper's two encoders share one width d, so ``CLS_pat`` is 2d.
        finetune_gene_encoder: fine-tune the pre-trained gene encoder together with the rest
            (False, the default, keeps it frozen as during pre-training).
        gene_epochs, pretrain_epochs, finetune_epochs: schedule lengths (fine-tuning is also
            the supervised training of the baselines).
        lr, weight_decay: AdamW (cosine schedule) for every stage.
        baseline_lr: the learning rate of the ``baseline`` recipes, the eight published
            systems trained end to end (None: ``lr``). Their reference code trains at about
            2e-4 (CLAM's example command, TransMIL's configs); ABMIL and TransMIL put a
            Linear + ReLU on the non-negative patch features, whose units all die within an
            epoch at 1e-3 (measured on the demo cohort: ABMIL at chance, train loss stuck at
            ln 2), so a short schedule that gives GiMP a higher rate must not force it on them.
        pretrain_batch_size, batch_size: windows per pre-training step, bags per step.
        device, progress, overwrite: runtime options passed to every run.
    """

    input: str = "bag"
    window_len: int = 6000
    max_patches: int | None = None
    embed_dim: int = 512
    depth: int = 2
    num_heads: int = 8
    num_landmarks: int = 256
    decoder_hidden: int = 512
    rec_reduction: str = "sum"
    gene_embed_dim: int | None = None
    fragment_size: int = 256
    num_groups: int = 16
    fragment_proj: str = "per_fragment"
    gene_dropout: float = 0.5
    gene_clip: float | None = 5.0
    gene_order: str = "cluster"
    gene_epochs: int = 50
    pretrain_epochs: int = 100
    finetune_epochs: int = 70
    finetune_gene_encoder: bool = False
    lr: float = 1e-4
    baseline_lr: float | None = None
    weight_decay: float = 1e-2
    pretrain_batch_size: int = 8
    batch_size: int = 1
    device: str = "auto"
    progress: bool = False
    overwrite: bool = False

    def options(self, **fields: Any) -> TrainOptions:
        """The :class:`~gimplib.train.options.TrainOptions` every run of the sweep shares, with ``fields``."""
        return TrainOptions(lr=self.lr, weight_decay=self.weight_decay, device=self.device, overwrite=self.overwrite,
                            progress=self.progress, **fields)

    def aggregator(self) -> dict[str, Any]:
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                    num_landmarks=self.num_landmarks)

    def gene_kwargs(self, gene: str) -> dict[str, Any]:
        width = self.embed_dim if self.gene_embed_dim is None else self.gene_embed_dim
        if gene == "groupmsa":
            return dict(fragment_size=self.fragment_size, num_groups=self.num_groups, embed_dim=width,
                        fragment_proj=self.fragment_proj, gene_dropout=self.gene_dropout)
        return dict(embed_dim=width)

    def baseline_kwargs(self, name: str) -> dict[str, Any]:
        """A registered system's constructor arguments at this sweep's widths (its record's
        ``widths``); at ``embed_dim=512`` (the paper's scale) every published system is its
        official default architecture (MCAT: 256)."""
        return SYSTEMS[name].widths(**self.aggregator())


@dataclass(frozen=True, order=True)
class Job:
    """One run of a sweep: a recipe with one seed on one split (``fold`` None) or fold."""

    recipe: str
    seed: int
    fold: int | None = None

    def out_dir(self, out_root: str | os.PathLike) -> Path:
        base = Path(out_root) / self.recipe
        return (base if self.fold is None else base / f"fold_{self.fold}") / f"seed_{self.seed}"


def unavailable(recipe: str) -> str | None:
    """Why ``recipe`` cannot run (it is not a known recipe), or None."""
    if recipe not in RECIPES:
        return f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}"
    return None


def _gene_dir(out_root: Path, gene: str, seed: int, fold: int | None) -> Path:
    return Job(f"genes_{gene}", seed, fold).out_dir(out_root)


def _train_gene_encoder(cohort: Any, split: Mapping, gene: str, seed: int, fold: int | None, out_root: Path,
                        cfg: SweepConfig) -> Path:
    return train_gene_encoder(
        cohort, split, encoder=gene, encoder_kwargs=cfg.gene_kwargs(gene), clip=cfg.gene_clip,
        gene_order=cfg.gene_order, out_dir=_gene_dir(out_root, gene, seed, fold),
        options=cfg.options(num_epochs=cfg.gene_epochs, batch_size=32, seed=seed),
    ).checkpoint


def run_recipe(job: Job, cohort: Any, split: Mapping[str, Sequence[str]], *, out_root: str | os.PathLike,
               config: SweepConfig, gene_ckpt: str | os.PathLike | None = None) -> Path:
    """Train one job; return the folder holding its ``metrics.json`` (reused when finished).

    A recipe that needs a supervised gene encoder uses ``gene_ckpt``, or else the one of its
    seed (and fold) under ``<out_root>/genes_<encoder>/``, trained here if not there yet.
    """
    cfg, out_root = config, Path(out_root)
    if (reason := unavailable(job.recipe)) is not None:
        raise ValueError(f"recipe {job.recipe!r} cannot run: {reason}")
    trainer, opt = RECIPES[job.recipe]
    out = job.out_dir(out_root)
    bags = dict(input=cfg.input, window_len=cfg.window_len, max_patches=cfg.max_patches, out_dir=out)
    supervised = cfg.options(num_epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, seed=job.seed)
    if trainer == "train_baseline":
        system = SYSTEMS[opt["name"]]
        model_kwargs = cfg.baseline_kwargs(system.name)
        if opt.get("gene") is not None:  # GiMP's encoders fused: the recipe names the gene encoder
            model_kwargs.update(gene_encoder=opt["gene"], gene_kwargs=cfg.gene_kwargs(opt["gene"]))
        if system.published and cfg.baseline_lr is not None:
            supervised = replace(supervised, lr=cfg.baseline_lr)
        # the gene transform settings are only read by the systems that read genes
        train_baseline(system.name, cohort, split, model_kwargs=model_kwargs, clip=cfg.gene_clip,
                       gene_order=cfg.gene_order, options=supervised, **bags)
        return out
    if trainer == "finetune":  # the aggregator, supervised on slides alone, no pre-training
        finetune(cohort, split, aggregator_kwargs=cfg.aggregator(), options=supervised, **bags)
        return out
    if opt["gene"] is None:
        gene_ckpt = None
    elif gene_ckpt is None:
        gene_ckpt = _train_gene_encoder(cohort, split, opt["gene"], job.seed, job.fold, out_root, cfg)
    pre = dict(gene_encoder_ckpt=gene_ckpt, window_len=cfg.window_len, out_dir=out / "pretrain",
               options=cfg.options(num_epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch_size, seed=job.seed))
    if trainer == "pretrain_baseline":
        pretrained = pretrain_baseline(opt["name"], cohort, split, model_kwargs=cfg.baseline_kwargs(opt["name"]),
                                       **pre).checkpoint
    else:
        model_kwargs = dict(cfg.aggregator(), use_mpm=opt["mpm"], use_triplet=opt["triplet"],
                            decoder_hidden=cfg.decoder_hidden, rec_reduction=cfg.rec_reduction)
        pretrained = pretrain_gimp(cohort, split, model_kwargs=model_kwargs, **pre).checkpoint
    finetune(cohort, split, pretrained_ckpt=pretrained, freeze_gene_encoder=not cfg.finetune_gene_encoder,
             options=supervised, **bags)
    return out


# --------------------------------------------------------------------------- the sweep

_WORKER: dict[str, Any] = {}


def _init_worker(cohort: Any, bag_cache_gb: float, threads: int) -> None:
    torch.set_num_threads(threads)
    set_bag_cache(bag_cache_gb)
    _WORKER["cohort"] = cohort


def _run_in_worker(job: Job, split: Mapping, out_root: Path, config: SweepConfig, gene_ckpt: Path | None) -> Path:
    return run_recipe(job, _WORKER["cohort"], split, out_root=out_root, config=config, gene_ckpt=gene_ckpt)


def _job_error(job: Job, err: BaseException) -> RuntimeError:
    where = f"seed {job.seed}" + ("" if job.fold is None else f", fold {job.fold}")
    return RuntimeError(f"recipe {job.recipe!r} ({where}) failed: {type(err).__name__}: {err}")


def run_sweep(
    cohort: Any,
    splits: Mapping[str, Sequence[str]] | Sequence[Mapping[str, Sequence[str]]],
    recipes: Iterable[str],
    seeds: Iterable[int],
    *,
    out_root: str | os.PathLike,
    config: SweepConfig = SweepConfig(),
    n_jobs: int = 1,
    bag_cache_gb: float = 0.0,
) -> dict[Job, Path]:
    """Train every recipe with every seed (on one split, or on every fold).

    Finished runs are reused (unless ``config.overwrite``), so an interrupted sweep picks up
    where it stopped. The supervised gene encoders the recipes share are trained first, in
    this process; then the jobs run here (``n_jobs=1``) or in ``n_jobs`` fresh processes,
    each with its share of this process's torch threads and its own bag cache. Every job
    seeds itself, so the result does not depend on ``n_jobs``.

    Args:
        cohort: the cohort (a :class:`~gimplib.data.cohort.Cohort`; sent to the workers).
        splits: one split ``{"train", "val", "test": [case_id, ...]}``, or a list of them
            (k folds: each job then also has a ``fold``).
        recipes: keys of :data:`RECIPES`, each run once (duplicates are dropped).
        seeds: training seeds.
        out_root: runs go to ``<out_root>/<recipe>/[fold_<k>/]seed_<s>/``.
        config: the shared settings.
        n_jobs: processes to train in at once (CPU: up to the cores; on one GPU keep 1).
        bag_cache_gb: each process's in-memory bag cache (:func:`gimplib.data.set_bag_cache`).

    Returns:
        ``{Job: run folder}`` in recipe, fold, seed order.

    Raises:
        ValueError: an unknown or unavailable recipe, or ``n_jobs < 1``.
        RuntimeError: a job failed; the message names its recipe, seed and fold (the
            original error is chained). Jobs that finished keep their folders.

    With ``n_jobs > 1`` the workers are spawned (not forked), so a script that calls this
    must do so under ``if __name__ == "__main__":``, as for any ``multiprocessing`` code.
    """
    recipes = list(dict.fromkeys(recipes))
    for recipe in recipes:
        if (reason := unavailable(recipe)) is not None:
            raise ValueError(f"recipe {recipe!r} cannot run: {reason}")
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    # fold -> split: one split is fold None, k folds are 0 .. k-1
    split_of: dict[int | None, Mapping] = {None: splits} if isinstance(splits, Mapping) else dict(enumerate(splits))
    out_root = Path(out_root)
    jobs = [Job(r, int(s), f) for r in recipes for f in split_of for s in seeds]

    def gene_of(job: Job) -> tuple | None:  # the supervised gene encoder a job starts from
        trainer, opt = RECIPES[job.recipe]
        needs = trainer in ("pretrain_gimp", "pretrain_baseline") and opt["gene"] is not None
        return (opt["gene"], job.seed, job.fold) if needs else None

    gene_ckpts: dict[tuple | None, Path | None] = {None: None}
    for key in tqdm(sorted({gene_of(j) for j in jobs} - {None}, key=str), desc="gene encoders",
                    disable=not config.progress):
        gene, seed, fold = key
        gene_ckpts[key] = _train_gene_encoder(cohort, split_of[fold], gene, seed, fold, out_root, config)

    done: dict[Job, Path] = {}
    if n_jobs == 1 or len(jobs) <= 1:
        before = bag_cache_info()["max_bytes"] / 2**30
        set_bag_cache(max(before, bag_cache_gb))
        try:
            for job in tqdm(jobs, desc="runs", disable=not config.progress):
                try:
                    done[job] = run_recipe(job, cohort, split_of[job.fold], out_root=out_root, config=config,
                                           gene_ckpt=gene_ckpts[gene_of(job)])
                except Exception as err:
                    raise _job_error(job, err) from err
        finally:
            set_bag_cache(before)
        return done

    threads = max(1, torch.get_num_threads() // n_jobs)
    ctx = multiprocessing.get_context("spawn")  # no fork: torch, h5py and CUDA state stay in this process
    worker_cfg = replace(config, progress=False)
    pool = ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(cohort, bag_cache_gb, threads))
    try:
        futures = {pool.submit(_run_in_worker, job, split_of[job.fold], out_root, worker_cfg, gene_ckpts[gene_of(job)]): job
                   for job in jobs}
        with tqdm(total=len(jobs), desc=f"runs ({n_jobs} processes)", disable=not config.progress) as bar:
            for fut in as_completed(futures):
                job, err = futures[fut], fut.exception()
                if err is not None:
                    raise _job_error(job, err) from err
                done[job] = fut.result()
                bar.update(1)
    except BaseException:
        # a failed job or an interrupt: start nothing new and stop the runs in progress, so
        # that no process still writes to a run folder when this returns (checkpoints are
        # written atomically; an interrupted run resumes on the next call)
        workers = list((getattr(pool, "_processes", None) or {}).values())  # no public API before 3.14
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            proc.terminate()
        raise
    pool.shutdown()
    return {job: done[job] for job in jobs}


# --------------------------------------------------------------------------- tables


def read_runs(done: Mapping[Job, Path]) -> pd.DataFrame:
    """One row per finished run, read from its ``metrics.json``: recipe, seed, fold,
    accuracy, auc (test) and the run folder."""
    records = []
    for job, out in done.items():
        m = load_json(Path(out) / "metrics.json")
        records.append(dict(recipe=job.recipe, seed=job.seed, fold=job.fold, accuracy=m["test_accuracy"],
                            auc=m["test_auc"], run=str(out)))
    return pd.DataFrame(records, columns=["recipe", "seed", "fold", "accuracy", "auc", "run"])


def _cell(values: Sequence[float]) -> str:
    mean, sd = mean_sd(np.asarray(values, dtype=float))
    return f"{mean:.3f} ± {sd:.3f}" if len(values) > 1 else f"{mean:.3f}"


def render_table(runs: pd.DataFrame, table: str, *, ours: str = "ours",
                 missing: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Table 1 or 2: mean +- sd (sample sd over seeds and folds) of test accuracy and AUC per
    row, beside the paper's accuracy for the row (the paper reports no AUC).

    Args:
        runs: :func:`read_runs` output.
        table: ``"table1"`` or ``"table2"``.
        ours: how to name our columns (e.g. ``"ours, synthetic"``).
        missing: recipe -> text shown for a row without runs (default ``"not run"``).
    """
    if table not in {r.table for r in ROWS}:
        raise ValueError(f"unknown table {table!r}; known: {sorted({r.table for r in ROWS})}")
    out = []
    for row in (r for r in ROWS if r.table == table):
        r = runs[runs["recipe"] == row.recipe]
        facts = recipe_facts(row.recipe)
        out.append({
            "group": row.group, "system": row.label + (" (ours)" if row.ours else ""), "runs": len(r),
            "inputs": facts["finetune_inputs"],
            f"accuracy ({ours})": _cell(r["accuracy"].tolist()) if len(r) else (missing or {}).get(row.recipe, "not run"),
            f"AUC ({ours})": _cell(r["auc"].tolist()) if len(r) else "",
            "accuracy (paper, TCGA)": "" if row.paper_accuracy is None else f"{row.paper_accuracy:.4f}",
        })
    return pd.DataFrame(out).set_index(["group", "system"])


# --------------------------------------------------------------------------- the paper's claims

def _table1_rows(block: str, *, but: str) -> tuple[str, ...]:
    """The recipes of one block of Table 1, in the table's order, without GiMP's own row ``but``."""
    return tuple(r.recipe for r in ROWS if r.table == "table1" and r.group == BLOCKS[block] and r.recipe != but)


_IMAGE_MIL = _table1_rows("pathology", but="aggregator")
_FUSION = tuple(r.recipe for r in ROWS if r.table == "table1" and r.group == BLOCKS["fusion"])
_IMAGE_GENE_PRETRAINING = _table1_rows("pretraining", but="gimp")


def _row_stats(runs: pd.DataFrame, recipes: Sequence[str], pick: str) -> tuple[str, float, float, int] | None:
    """(recipe, mean, sd, n) of the best (``pick="max"``) or worst (``"min"``) of ``recipes`` by mean accuracy."""
    stats = []
    for recipe in recipes:
        acc = runs.loc[runs["recipe"] == recipe, "accuracy"].to_numpy(dtype=float)
        if len(acc):
            mean, sd = mean_sd(acc)
            stats.append((recipe, float(mean), float(sd) if len(acc) > 1 else 0.0, len(acc)))
    if not stats:
        return None
    return (max if pick == "max" else min)(stats, key=lambda s: s[1])


def _beats(runs: pd.DataFrame, a: Sequence[str], b: Sequence[str], n_test: int, pick_a: str = "max") -> dict[str, Any]:
    """Does the best (or worst) of ``a`` beat the best of ``b``? A verdict with its numbers."""
    sa, sb = _row_stats(runs, a, pick_a), _row_stats(runs, b, "max")
    if sa is None or sb is None:
        return dict(ours="rows not run", verdict="not run")
    diff = sa[1] - sb[1]
    # one test patient, or twice the standard error of the difference of the means over seeds
    noise = max(1.0 / n_test, 2.0 * float(np.sqrt(sa[2] ** 2 / sa[3] + sb[2] ** 2 / sb[3])))
    verdict = "holds" if diff > noise else "does not hold" if diff < -noise else "cannot tell at this size"
    label: dict[str, str] = {}
    for r in ROWS:  # a recipe in both tables is named by its first (Table 1) row
        label.setdefault(r.recipe, r.label)
    text = (f"{label.get(sa[0], sa[0])} {sa[1]:.3f} ± {sa[2]:.3f} vs {label.get(sb[0], sb[0])} "
            f"{sb[1]:.3f} ± {sb[2]:.3f}: difference {diff:+.3f}, resolution ± {noise:.3f}")
    return dict(ours=text, verdict=verdict)


#: The paper's claims 1-4 as comparisons of rows: (claim, rows A, rows B, which of A: "max" or
#: "min"); "A beats B" compares that row of A with the best row of B (claim 5 is Fig. 2's).
_CLAIMS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str], ...] = (
    ("1. The aggregator alone beats the MIL baselines (Table 1, pathology block)",
     ("aggregator",), _IMAGE_MIL, "max"),
    ("2a. Fusing genes beats every image-only model (weakest fusion row vs best image-only row)",
     _FUSION, (*_IMAGE_MIL, "aggregator"), "min"),
    ("2b. GroupMSA beats SNN as the gene encoder (Table 2, fused without pre-training)",
     ("fusion_groupmsa",), ("fusion_snn",), "max"),
    ("3a. Gene-induced pre-training beats no pre-training (GiMP vs GiMP w/o pre-training)",
     ("gimp",), ("fusion_groupmsa",), "max"),
    ("3b. ... and beats image-gene pre-training in the style of MGCA, BioViL, REFERS (best of them)",
     ("gimp",), _IMAGE_GENE_PRETRAINING, "max"),
    ("4a. Removing MPM from pre-training costs accuracy (GiMP vs aggregator + GroupMSA + triplet)",
     ("gimp",), ("pre_groupmsa_tri",), "max"),
    ("4b. Removing the genes from pre-training costs accuracy (GiMP vs the better image-only pre-training row)",
     ("gimp",), ("pre_mpm", "pre_tri"), "max"),
)


def paper_claims(runs: pd.DataFrame, *, n_test: int, separability: Mapping[str, Mapping[str, float]] | None = None
                 ) -> pd.DataFrame:
    """The paper's five testable claims, each with this run's verdict and the numbers behind it.

    A claim "A beats B" *holds* when A's mean test accuracy over seeds (and folds) exceeds B's
    by more than the resolution of the comparison, the larger of one test patient
    (``1 / n_test``) and twice the standard error of the difference of the two means; it *does
    not hold* when B leads by more than that; otherwise the sizes cannot tell. Where a claim
    is about a group of rows (e.g. "the MIL baselines"), the best of that group is compared.

    Args:
        runs: :func:`read_runs` output.
        n_test: test patients per run (the resolution floor).
        separability: Fig. 2's scores by panel, ``{"GiMP": {"silhouette", "knn_accuracy"}, ...}``
            (stage 06); claim 5 is "not run" without them.

    Returns:
        One row per (sub-)claim: ``claim``, ``paper`` (the paper's figures), ``ours``, ``verdict``.
    """
    paper = {r.recipe: r.paper_accuracy for r in ROWS}
    out = []
    for claim, a, b, pick_a in _CLAIMS:
        best = max if pick_a == "max" else min
        out.append(dict(claim=claim, paper=f"{best(paper[r] for r in a):.4f} vs {max(paper[r] for r in b):.4f}",
                        **_beats(runs, a, b, n_test, pick_a=pick_a)))
    claim5 = "5. CLS_pat after GiMP pre-training separates the classes better than without genes, BioViL, MGCA (Fig. 2)"
    if separability and "GiMP" in separability and len(separability) > 1:
        mine = separability["GiMP"]
        others = {k: v for k, v in separability.items() if k != "GiMP"}
        wins = [all(mine[m] > v[m] for v in others.values()) for m in ("silhouette", "knn_accuracy")]
        losses = [all(mine[m] < v[m] for v in others.values()) for m in ("silhouette", "knn_accuracy")]
        verdict = "holds" if all(wins) else "does not hold" if any(losses) else "mixed (no clear ranking)"
        text = "; ".join(f"{k}: silhouette {v['silhouette']:.3f}, kNN {v['knn_accuracy']:.3f}"
                         for k, v in separability.items())
        out.append(dict(claim=claim5, paper="visual (t-SNE panels)", ours=text, verdict=verdict))
    else:
        out.append(dict(claim=claim5, paper="visual (t-SNE panels)", ours="stage 06 not run", verdict="not run"))
    return pd.DataFrame(out)
