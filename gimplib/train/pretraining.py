"""GiMP's own stages: pretraining (MPM + gene-induced triplets), fine-tuning, and the pipeline.

Choices the paper leaves open, made here (all exposed as parameters):

* pretraining uses the training cases only and keeps its last epoch (the paper has no
  selection criterion for it); its validation loss is logged with fixed masks/windows;
* fine-tuning classifies ``CLS_pat = concat(CLS_img, CLS_ge)`` (image + genes) whenever the
  pre-training had a gene encoder, which stays frozen by default (``freeze_gene_encoder``);
* fine-tuning trains on whole bags (``input="bag"``) by default and always evaluates on
  whole bags; ``input="window"`` trains on random contiguous windows of ``window_len``;
* the aggregator is fine-tuned together with the MLP head (``freeze_aggregator=False``);
* the fine-tuned epoch is picked on validation ``accuracy`` (ties: lower validation loss).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from gimplib.data.datasets import WindowDataset, collate_bags
from gimplib.data.genes import GeneTransform
from gimplib.models.aggregator import PatchAggregator
from gimplib.models.any_modality import AnyModalityClassifier
from gimplib.models.baselines import SYSTEMS, build_baseline, canonical_name, systems_in
from gimplib.models.gimp import GiMP, GiMPClassifier, mpm_reference_l1, random_patch_mask
from gimplib.train.checkpoint import load_checkpoint
from gimplib.train.common import RunResult, bag_sets, finish_run, fit_gene_transform, gene_matrix, loader_for
from gimplib.train.engine import to_device
from gimplib.train.inference import Task, build_gimp, gene_encoder_spec, load_gene_transform, load_model
from gimplib.train.options import TrainOptions
from gimplib.train.tasks import fit_with, make_config, run_supervised, start_run, train_gene_encoder
from gimplib.utils import DataError, exists

__all__ = ["finetune", "gimp_pipeline", "pretrain_baseline", "pretrain_gimp"]


def pretrain_gimp(
    cohort: Any,
    split: Mapping[str, Sequence[str]],
    *,
    out_dir: str | os.PathLike,
    gene_encoder_ckpt: str | os.PathLike | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    window_len: int = 6000,
    options: TrainOptions | None = None,
    **option_kw: Any,
) -> RunResult:
    """GiMP pretraining (Sect. 2.3): MPM reconstruction + gene-induced triplets.

    Each training case contributes one random contiguous window of ``window_len`` patches
    per epoch (shorter bags are tiled). The gene encoder (from :func:`train_gene_encoder`)
    is frozen; without one, triplets are built from the image CLS alone.

    Args:
        cohort: a cohort with slides (and genes when ``gene_encoder_ckpt`` is given).
        split: training cases are used for training, validation cases for a logged loss.
        out_dir: run folder.
        gene_encoder_ckpt: ``best.pt`` of a :func:`train_gene_encoder` run, or None.
        model_kwargs: :class:`~gimplib.models.gimp.GiMP` arguments (``embed_dim``, ``depth``,
            ``num_heads``, ``num_landmarks``, ``use_mpm``, ``use_triplet``, ``mask_ratio``,
            ``margin``, ``mining``, ...); ``in_dim`` and the gene encoder are set here.
        window_len: patches per window (paper: 6000).
        options, \\*\\*option_kw: the shared :class:`TrainOptions` (``num_epochs`` defaults to 100,
            ``batch_size``, windows per step, to 8), as for :func:`train_gene_encoder`.

    Returns:
        :class:`RunResult` with ``checkpoint`` = ``checkpoint.pt`` (last epoch) and metrics
        ``train_loss``, ``train_loss_tri``, ``train_loss_rec`` (last epoch) and ``val_loss*``;
        with MPM also ``val_rec_l1`` (L1 per feature on the masked validation patches,
        whatever ``rec_reduction``) and, on the same windows and masks, the references
        ``val_ref_window_mean``, ``val_ref_nearest`` and ``val_ref_mean_patch`` (the mean
        patch of the training windows, which also initialises the decoder's output bias).
    """
    out_dir = Path(out_dir)
    opts = TrainOptions.for_task(pretrain_gimp, options, option_kw, num_epochs=100, batch_size=8)
    gene_cfg = _gene_encoder_source(gene_encoder_ckpt)
    config = make_config("pretrain", cohort, split, model_kwargs=dict(model_kwargs or {}), gene_encoder=gene_cfg,
                         window_len=window_len, options=opts)
    if done := start_run(out_dir, config, opts):
        return done
    _check_same_split(gene_encoder_ckpt, gene_cfg, config)
    gt = load_gene_transform(gene_encoder_ckpt) if exists(gene_encoder_ckpt) else None
    net = build_gimp(config, cohort.feat_dim, load_weights=True)
    extras = {"label_names": list(cohort.label_names)}
    if exists(gt):
        extras["gene_transform"] = gt.state_dict()
    return _pretrain_run(net, cohort, split, gt=gt, config=config, out_dir=out_dir, window_len=window_len, opts=opts,
                         extras=extras, desc="pretrain")


def _gene_encoder_source(gene_encoder_ckpt: str | os.PathLike | None) -> dict[str, Any] | None:
    """What a pretraining config records about the gene encoder checkpoint it starts from."""
    if not exists(gene_encoder_ckpt):
        return None
    g = load_checkpoint(gene_encoder_ckpt)
    if g["config"].get("task") != "genes":
        raise DataError(f"{gene_encoder_ckpt}: expected a gene-encoder checkpoint, "
                        f"found task {g['config'].get('task')!r}")
    return {"ckpt": str(gene_encoder_ckpt), "encoder": g["config"]["encoder"], "build": g["build"],
            "split_sha1": g["config"]["split"]["sha1"]}


def _check_same_split(ckpt: Any, source: Mapping[str, Any] | None, config: Mapping[str, Any]) -> None:
    if exists(source) and source["split_sha1"] != config["split"]["sha1"]:
        raise DataError(f"{ckpt} was trained on another split ({source['split_sha1']} vs "
                        f"{config['split']['sha1']}): its training cases may be this run's test cases")


def _pretrain_run(net: nn.Module, cohort: Any, split: Mapping[str, Sequence[str]], *, gt: Any, config: dict[str, Any],
                  out_dir: Path, window_len: int, opts: TrainOptions, extras: Mapping[str, Any], desc: str) -> RunResult:
    """Self-supervised training on random windows of the training cases; the last epoch is kept."""

    def windows(ids: Sequence[str]) -> Any:
        gm = gene_matrix(cohort, gt, ids) if exists(gt) else None
        return WindowDataset(cohort, list(ids), window_len=window_len, gene_matrix=gm, seed=opts.seed)

    train_ds = windows(split["train"])
    val_loader = loader_for(windows(split["val"]), batch_size=opts.batch_size, collate_fn=collate_bags,
                            num_workers=opts.num_workers)
    mpm = isinstance(net, GiMP) and net.use_mpm
    mean_patch = _mean_patch(train_ds) if mpm else None
    if mpm:  # a resumed run overwrites this with its checkpoint
        net.init_decoder_bias(mean_patch)

    def step(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return model(batch)

    def evaluate(model: nn.Module) -> dict[str, float]:
        # fixed windows and masks, so that epochs are comparable; the global RNG is untouched
        sums: dict[str, float] = {}
        dev = next(model.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(opts.seed)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(opts.seed)
            for batch in val_loader:
                batch = to_device(batch, dev)
                if mpm:  # MPM: the masks are drawn here, so the references see the same ones
                    out = _mpm_validation(model.net, batch, gen, mean_patch.to(dev))
                else:
                    out = model(batch)
                for k, v in out.items():
                    sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + float(v) / len(val_loader)
        return sums

    res = fit_with(Task(net, "pretrain"), train_ds, opts, step_fn=step, out_dir=out_dir, config=config,
                   collate_fn=collate_bags, eval_fn=evaluate, extras=extras, desc=desc)
    last = res.history.iloc[-1].to_dict()
    metrics = {k: float(v) for k, v in last.items() if k.startswith(("train_", "val_"))}
    metrics["epochs"] = int(last["epoch"]) + 1
    return finish_run(out_dir, metrics, None)


def _mean_patch(ds: Any, max_windows: int = 64) -> torch.Tensor:
    """(D,) the mean valid patch of a window dataset at its current epoch (the rows of at most
    ``max_windows`` of its windows, spread over the cases)."""
    total, count = None, 0
    for i in sorted({int(j) for j in torch.linspace(0, len(ds) - 1, min(len(ds), max_windows))}):
        item = ds[i]
        rows = item["feats"][item["mask"]].double()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += len(rows)
    return (total / count).float()


def _mpm_validation(net: GiMP, batch: Mapping[str, Any], gen: torch.Generator,
                    mean_patch: torch.Tensor) -> dict[str, torch.Tensor]:
    """GiMP's losses on one validation batch, plus its L1 per feature on the masked patches
    (``rec_l1``) and that of the references of :func:`mpm_reference_l1` on the same masks
    (``ref_window_mean``, ``ref_nearest``, ``ref_mean_patch``)."""
    feats, mask = batch["feats"], batch["mask"]
    mpm_mask = random_patch_mask(mask, net.mask_ratio, gen)
    out = dict(net.pretrain_step(feats, mask, batch.get("genes"), batch["y"], mpm_mask=mpm_mask))
    scale = 1.0 if net.rec_reduction == "mean" else feats.shape[0] / (mpm_mask.sum() * feats.shape[-1])
    out["rec_l1"] = out["loss_rec"] * scale
    out.update({f"ref_{k}": v for k, v in mpm_reference_l1(feats, mask, mpm_mask, mean_patch).items()})
    return out


def pretrain_baseline(
    name: str,
    cohort: Any,
    split: Mapping[str, Sequence[str]],
    *,
    out_dir: str | os.PathLike,
    gene_encoder_ckpt: str | os.PathLike | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    gene_transform: str = "log2p1",
    standardize: bool = True,
    top_k_var: int | None = None,
    window_len: int = 6000,
    options: TrainOptions | None = None,
    **option_kw: Any,
) -> RunResult:
    """Pretrain an image-gene baseline (``"biovil"``, ``"mgca"``, ``"refers"``) on the same windows as GiMP.

    The result's ``checkpoint.pt`` plays the role of GiMP's: :func:`finetune` starts from its
    aggregator and :func:`~gimplib.train.inference.embed` reads its ``CLS_pat``.

    Args:
        name: a system of the ``"pretraining"`` block of :data:`gimplib.models.baselines.SYSTEMS`.
        cohort, split, out_dir: as for :func:`pretrain_gimp` (the cohort needs genes).
        gene_encoder_ckpt: a GroupMSA ``best.pt`` of :func:`train_gene_encoder` on the same
            split to start the gene encoder from (trained jointly, as these methods' text
            encoders are, unless ``model_kwargs`` sets ``freeze_gene_encoder=True``); its
            gene transform is used. None: a fresh GroupMSA (``model_kwargs["gene_cfg"]``) on
            a :class:`GeneTransform` fitted here with the settings below.
        model_kwargs: the system's constructor arguments (``embed_dim``, ``depth``, ...);
            ``in_dim``, ``num_classes`` and ``num_genes`` are filled in.
        gene_transform, standardize, top_k_var: the transform when no ``gene_encoder_ckpt``.
        window_len, options, \\*\\*option_kw: as for :func:`pretrain_gimp`.

    Returns:
        :class:`RunResult` with ``checkpoint`` = ``checkpoint.pt`` (last epoch).
    """
    out_dir = Path(out_dir)
    key = canonical_name(name)
    if key not in SYSTEMS or SYSTEMS[key].trainer != "pretrain_baseline":
        raise ValueError(f"{name!r} is not an image-gene pretraining baseline; known: {sorted(systems_in('pretraining'))}")
    opts = TrainOptions.for_task(pretrain_baseline, options, option_kw, num_epochs=100, batch_size=8)
    source = _gene_encoder_source(gene_encoder_ckpt)
    transform = None if exists(source) else dict(transform=gene_transform, standardize=standardize,
                                                   top_k_var=top_k_var)
    config = make_config("pretrain_baseline", cohort, split, name=key, model_kwargs=dict(model_kwargs or {}),
                         gene_encoder=source, gene_transform=transform, window_len=window_len, options=opts)
    if done := start_run(out_dir, config, opts):
        return done
    _check_same_split(gene_encoder_ckpt, source, config)
    if exists(source):
        gt, encoder = load_gene_transform(gene_encoder_ckpt), load_model(gene_encoder_ckpt)
    else:
        gt, encoder = fit_gene_transform(cohort, split["train"], **transform), None
    build = {"in_dim": cohort.feat_dim, "num_classes": len(cohort.label_names), "num_genes": gt.num_genes,
             **config["model_kwargs"]}
    net = build_baseline(key, gene_encoder=encoder, **build)
    extras = {"label_names": list(cohort.label_names), "gene_transform": gt.state_dict(), "build": build}
    return _pretrain_run(net, cohort, split, gt=gt, config=config, out_dir=out_dir, window_len=window_len, opts=opts,
                         extras=extras, desc=key)


def _aggregator_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    names = set(inspect.signature(PatchAggregator).parameters)
    return {k: v for k, v in kwargs.items() if k in names}


def finetune(
    cohort: Any,
    split: Mapping[str, Sequence[str]],
    *,
    out_dir: str | os.PathLike,
    pretrained_ckpt: str | os.PathLike | None = None,
    aggregator_kwargs: Mapping[str, Any] | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    freeze_aggregator: bool = False,
    freeze_gene_encoder: bool = True,
    use_genes: bool | None = None,
    modality_dropout: float = 0.0,
    input: str = "bag",
    window_len: int = 6000,
    max_patches: int | None = None,
    select: str = "accuracy",
    options: TrainOptions | None = None,
    **option_kw: Any,
) -> RunResult:
    """Multimodal fine-tuning (Sect. 2.3): an MLP head on ``CLS_pat = concat(CLS_img, CLS_ge)``.

    With a pre-training checkpoint that has a gene encoder (GiMP with GroupMSA or SNN, and
    the BioViL-/MGCA-/REFERS-style baselines), the classifier reads the slide *and* the
    patient's expression, at fine-tuning, validation and test, as in the paper; the gene
    transform fitted for that encoder is reused. Without one (image-only pre-training, or
    ``pretrained_ckpt=None``: the supervised aggregator of Table 1's "GiMP w/o GroupMSA")
    the head sees ``CLS_img`` alone. The best epoch on validation is kept and tested.

    Args:
        cohort: a cohort with slides (and genes when the pre-training used them).
        split: ``{"train", "val", "test"}`` case ids.
        out_dir: run folder.
        pretrained_ckpt: ``checkpoint.pt`` of :func:`pretrain_gimp` or :func:`pretrain_baseline`
            (its aggregator and gene encoder are the starting point), or None to train the
            aggregator from scratch on slides alone.
        aggregator_kwargs: :class:`PatchAggregator` arguments; only without ``pretrained_ckpt``.
        head_kwargs: :class:`MLPHead` ``hidden`` / ``dropout`` for the classifier.
        freeze_aggregator: train the head only (a linear-probe-style evaluation).
        freeze_gene_encoder: keep the pre-trained gene encoder fixed (default, as during GiMP
            pre-training); False fine-tunes it too (our option; the paper does not say).
        use_genes: None (default, the paper): classify ``CLS_pat`` whenever the pre-training
            had a gene encoder. False drops the genes after pre-training and classifies
            ``CLS_img`` alone, an ablation of ours (what this library did before it followed
            the paper's multimodal fine-tuning).
        modality_dropout: 0 (default, the paper's classifier). Above 0, our extension for
            patients missing a modality: an :class:`~gimplib.models.AnyModalityClassifier`
            whose training patients lose one modality with this probability (a learned
            placeholder stands in), so that it also predicts from image alone or genes alone.
            Needs a pre-training with a gene encoder.
        input: ``"bag"`` (whole bags, optionally subsampled to ``max_patches`` during
            training) or ``"window"`` (random contiguous windows of ``window_len``).
        select: validation metric that picks the best epoch.
        options, \\*\\*option_kw: the shared :class:`TrainOptions`, as for :func:`train_gene_encoder`
            (``num_epochs`` defaults to 70, the paper's; ``batch_size`` to 1: bags are padded
            to a batch with masks).

    Returns:
        :class:`RunResult` (val and test metrics of the best epoch, with bootstrap CIs).

    Raises:
        DataError: the checkpoint is not a pre-training run of this split, or a case of the
            split has no expression although the classifier reads genes (the case is named).
    """
    out_dir = Path(out_dir)
    opts = TrainOptions.for_task(finetune, options, option_kw, num_epochs=70, batch_size=1)
    pre_cfg, gene_spec, pre = None, None, None
    if exists(pretrained_ckpt):
        if aggregator_kwargs:
            raise ValueError("aggregator_kwargs come from pretrained_ckpt; do not pass both")
        pre = load_checkpoint(pretrained_ckpt)
        if pre["config"].get("task") not in ("pretrain", "pretrain_baseline"):
            raise DataError(f"{pretrained_ckpt}: expected a pretrain_gimp / pretrain_baseline checkpoint, "
                            f"found task {pre['config'].get('task')!r}")
        pre_cfg = {"ckpt": str(pretrained_ckpt), "epoch": int(pre["epoch"]),
                   "split_sha1": pre["config"]["split"]["sha1"]}
        agg = _aggregator_kwargs({"in_dim": cohort.feat_dim, **pre["config"]["model_kwargs"]})
        gene_spec = gene_encoder_spec(pre) if use_genes is not False else None
        if use_genes and gene_spec is None:
            raise DataError(f"use_genes=True, but {pretrained_ckpt} was pre-trained without a gene encoder")
    else:
        if use_genes:
            raise ValueError("use_genes=True needs a pretrained_ckpt with a gene encoder")
        agg = {"in_dim": cohort.feat_dim, **dict(aggregator_kwargs or {})}
    config = make_config("finetune", cohort, split, pretrained=pre_cfg, aggregator_kwargs=agg, gene_encoder=gene_spec,
                         freeze_gene_encoder=freeze_gene_encoder, head_kwargs=dict(head_kwargs or {}),
                         freeze_aggregator=freeze_aggregator, input=input, window_len=window_len,
                         max_patches=max_patches, select=select, options=opts)
    if modality_dropout:  # recorded only when used, so that the paper's runs keep their configs
        if gene_spec is None:
            raise DataError("modality_dropout needs a pretrained_ckpt with a gene encoder (and use_genes not False)")
        config["modality_dropout"] = float(modality_dropout)
    if done := start_run(out_dir, config, opts):
        return done
    if exists(pre_cfg) and pre_cfg["split_sha1"] != config["split"]["sha1"]:
        raise DataError(f"{pretrained_ckpt} was pretrained on another split: its training cases may be test cases here")
    encoder, gt = None, None
    if exists(pre_cfg):
        pretrained = load_model(pretrained_ckpt)
        aggregator = pretrained.aggregator
        if exists(gene_spec):
            encoder = pretrained.gene_encoder
            if "gene_transform" not in pre:
                raise DataError(f"{pretrained_ckpt}: a pre-training with a gene encoder but no gene transform saved")
            gt = GeneTransform.from_state_dict(pre["gene_transform"])
    else:
        aggregator = PatchAggregator(**agg)
    if modality_dropout:
        net = AnyModalityClassifier(aggregator=aggregator, gene_encoder=encoder, num_classes=len(cohort.label_names),
                                    freeze_gene_encoder=freeze_gene_encoder, modality_dropout=modality_dropout,
                                    **config["head_kwargs"])
    else:
        net = GiMPClassifier(aggregator=aggregator, gene_encoder=encoder, num_classes=len(cohort.label_names),
                             freeze_gene_encoder=freeze_gene_encoder, **config["head_kwargs"])
    if freeze_aggregator:
        net.aggregator.requires_grad_(False)
    sets = bag_sets(cohort, split, input=input, window_len=window_len, max_patches=max_patches, seed=opts.seed,
                    gt=gt)
    extras = {"label_names": list(cohort.label_names)}
    if exists(gt):
        extras["gene_transform"] = gt.state_dict()
    return run_supervised(entry="classifier", net=net, config=config, out_dir=out_dir,
                          train_ds=sets.pop("train"), eval_sets=sets, collate_fn=collate_bags, opts=opts,
                          select=select, extras=extras, eval_batch_size=1)


def gimp_pipeline(
    cohort: Any,
    split: Mapping[str, Sequence[str]],
    *,
    out_dir: str | os.PathLike,
    use_genes: bool = True,
    gene_kwargs: Mapping[str, Any] | None = None,
    pretrain_kwargs: Mapping[str, Any] | None = None,
    finetune_kwargs: Mapping[str, Any] | None = None,
    **shared: Any,
) -> RunResult:
    """GiMP end to end on one split: gene encoder -> pretraining -> fine-tuning.

    Stages write to ``out_dir/genes``, ``out_dir/pretrain`` and ``out_dir/finetune`` (each
    reused / resumed on its own), so :func:`kfold` can run the whole method per fold.

    Args:
        cohort, split, out_dir: as for the stages.
        use_genes: False pretrains without a gene encoder (triplets on the image CLS alone).
        gene_kwargs: keywords of :func:`train_gene_encoder`.
        pretrain_kwargs: keywords of :func:`pretrain_gimp`.
        finetune_kwargs: keywords of :func:`finetune`.
        **shared: keywords given to every stage (``options=TrainOptions(...)``, or its fields:
            ``device``, ``seed``, ``progress``, ``overwrite``, ``amp``, ...); a stage's own
            keywords win.

    Returns:
        The fine-tuning :class:`RunResult`.
    """
    out_dir = Path(out_dir)
    gene_ckpt = None
    if use_genes:
        genes = train_gene_encoder(cohort, split, out_dir=out_dir / "genes", **{**shared, **dict(gene_kwargs or {})})
        gene_ckpt = genes.checkpoint
    pre = pretrain_gimp(cohort, split, out_dir=out_dir / "pretrain", gene_encoder_ckpt=gene_ckpt,
                        **{**shared, **dict(pretrain_kwargs or {})})
    return finetune(cohort, split, out_dir=out_dir / "finetune", pretrained_ckpt=pre.checkpoint,
                    **{**shared, **dict(finetune_kwargs or {})})
