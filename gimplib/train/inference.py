"""Models back from checkpoints: rebuild, load the gene transform, embed cases (CLS vectors)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gimplib.data.datasets import BagDataset, WindowDataset
from gimplib.data.genes import GeneTransform
from gimplib.models.aggregator import PatchAggregator
from gimplib.models.any_modality import AnyModalityClassifier
from gimplib.models.baselines import build_baseline
from gimplib.models.gene_encoders import build_gene_encoder
from gimplib.models.gimp import GiMP, GiMPClassifier
from gimplib.train.checkpoint import load_checkpoint
from gimplib.train.common import gene_matrix
from gimplib.utils import exists, get_device

__all__ = ["Task", "build_gimp", "embed", "gene_encoder_spec", "load_gene_transform", "load_model"]


class Task(nn.Module):
    """Puts a model's training computation in ``forward``, so that DDP sees it.

    Args:
        net: the model.
        entry: which of the net's entry points ``forward`` runs: ``"genes"``
            (``net.classify(genes)``), ``"pretrain"`` (``net.pretrain_step``), ``"classifier"``
            (``net(feats, mask, genes)``, a :class:`GiMPClassifier`) or ``"baseline"`` (the
            baseline contract).

    ``state_dict`` / ``load_state_dict`` are the model's own, so checkpoints carry its keys.
    """

    def __init__(self, net: nn.Module, entry: str) -> None:
        super().__init__()
        self.net, self.entry = net, entry

    # checkpoints hold the model's own keys ("aggregator.proj.weight", not "net.aggregator...")
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, batch: Mapping[str, Any], with_y: bool = True) -> dict[str, torch.Tensor]:
        if self.entry == "genes":
            return {"logits": self.net.classify(batch["genes"])}
        if self.entry == "pretrain":
            return dict(self.net.pretrain_step(batch["feats"], batch["mask"], batch.get("genes"), batch["y"]))
        if self.entry == "classifier":
            return {"logits": self.net(batch["feats"], batch["mask"], genes=batch.get("genes"))}
        out = self.net(batch["feats"], mask=batch["mask"], genes=batch.get("genes"), y=batch["y"] if with_y else None)
        return {"logits": out["logits"], "loss_aux": out["loss_aux"]}


def build_gimp(config: Mapping[str, Any], in_dim: int, *, load_weights: bool) -> nn.Module:
    """A :class:`GiMP` from a pretraining config; the gene encoder's weights are loaded from its
    checkpoint when ``load_weights`` (a new run), else only its structure is built (they are then
    part of the GiMP checkpoint being loaded)."""
    gene_cfg = config["gene_encoder"]
    encoder = None
    if exists(gene_cfg):
        if load_weights:
            encoder = load_model(gene_cfg["ckpt"])
        else:
            encoder = build_gene_encoder(gene_cfg["encoder"], **gene_cfg["build"])
    return GiMP(**{"in_dim": in_dim, **config["model_kwargs"]}, gene_encoder=encoder)


def gene_encoder_spec(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """How to rebuild the gene encoder inside a pre-training checkpoint: ``{"encoder", "build"}``.

    GiMP records the supervised gene encoder it froze; the image-gene pre-training baselines
    record theirs, or built a fresh GroupMSA from ``model_kwargs["gene_cfg"]``. None when the
    pre-training had no gene encoder (image-only rows).
    """
    cfg = ckpt["config"]
    source = cfg.get("gene_encoder")
    if exists(source):
        return {"encoder": source["encoder"], "build": dict(source["build"])}
    if cfg.get("task") == "pretrain_baseline":
        gene_cfg = dict(cfg.get("model_kwargs", {}).get("gene_cfg") or {})
        return {"encoder": "groupmsa", "build": {"num_genes": ckpt["build"]["num_genes"], **gene_cfg}}
    return None


def load_gene_transform(path: str | os.PathLike) -> Any:
    """The fitted :class:`~gimplib.data.genes.GeneTransform` stored in a checkpoint, or None."""
    ckpt = load_checkpoint(path)
    return GeneTransform.from_state_dict(ckpt["gene_transform"]) if "gene_transform" in ckpt else None


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint from its config and load its weights (eval mode).

    Returns:
        gene run -> GroupMSA / SNN (with ``classify``); pretraining -> GiMP; baseline
        pretraining -> that pretrainer (BioViL-/MGCA-/REFERS-style); fine-tuning ->
        GiMPClassifier; baseline -> that system.
    """
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    task = cfg.get("task")
    in_dim = cfg["cohort"]["feat_dim"]
    if task == "genes":
        net, entry = build_gene_encoder(cfg["encoder"], **ckpt["build"]), "genes"
    elif task == "pretrain":
        net, entry = build_gimp(cfg, in_dim, load_weights=False), "pretrain"
    elif task == "finetune":
        spec = cfg.get("gene_encoder")
        encoder = build_gene_encoder(spec["encoder"], **spec["build"]) if exists(spec) else None
        kwargs = dict(aggregator=PatchAggregator(**cfg["aggregator_kwargs"]), gene_encoder=encoder,
                      num_classes=len(cfg["cohort"]["label_names"]),
                      freeze_gene_encoder=cfg.get("freeze_gene_encoder", True), **cfg["head_kwargs"])
        if cfg.get("modality_dropout"):  # our missing-modality extension
            net = AnyModalityClassifier(modality_dropout=cfg["modality_dropout"], **kwargs)
        else:
            net = GiMPClassifier(**kwargs)
        entry = "classifier"
    elif task == "pretrain_baseline":
        source = cfg["gene_encoder"]
        encoder = build_gene_encoder(source["encoder"], **source["build"]) if exists(source) else None
        net, entry = build_baseline(cfg["name"], gene_encoder=encoder, **ckpt["build"]), "pretrain"
    elif task == "baseline":
        net, entry = build_baseline(cfg["name"], **ckpt["build"]), "baseline"
    else:
        raise ValueError(f"{path}: unknown task {task!r} in the checkpoint's config")
    task_module = Task(net, entry)
    task_module.load_state_dict(ckpt["model"])
    return net.to(get_device(device)).eval()


@torch.no_grad()
def embed(
    model_or_ckpt: nn.Module | str | os.PathLike,
    cohort: Any,
    case_ids: Sequence[str],
    *,
    input: str = "bag",
    window_len: int = 6000,
    max_patches: int | None = None,
    gene_transform: Any = None,
    device: str = "auto",
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of cases, e.g. for t-SNE: ``CLS_pat`` wherever the model has a gene branch.

    What is returned, by model:

    * GiMP after pre-training (:class:`~gimplib.models.GiMP`) and the image-gene pre-training
      baselines: ``CLS_pat = concat(n(CLS_img), n(CLS_ge))``, the space the pre-training
      shapes (``n`` = L2 normalisation, our choice); ``n(CLS_img)`` for image-only
      pre-training. This is what the paper's Fig. 2 draws.
    * A fine-tuned :class:`~gimplib.models.GiMPClassifier`: its head's input,
      ``concat(CLS_img, CLS_ge)`` (or ``CLS_img`` when it has no gene encoder).
    * A :class:`~gimplib.models.PatchAggregator`: ``CLS_img``.
    * A gene encoder (checkpoint of :func:`train_gene_encoder`): ``CLS_ge``.

    Args:
        model_or_ckpt: a checkpoint path or a model.
        cohort: the cohort holding ``case_ids``.
        case_ids: cases to embed.
        input: ``"bag"`` (whole bags; ``max_patches`` subsamples) or ``"window"`` (one
            window of ``window_len`` per case, seed 0).
        gene_transform: the fitted :class:`~gimplib.data.genes.GeneTransform` when a model
            (not a checkpoint path, which carries its own) needs genes.
        device, progress: runtime options.

    Returns:
        (len(case_ids), d) float32 array, rows in ``case_ids`` order.

    Raises:
        DataError: a case has no expression although the model needs it (the case is named).
    """
    dev = get_device(device)
    ids = list(case_ids)
    if isinstance(model_or_ckpt, nn.Module):
        net, transform = model_or_ckpt, gene_transform
    else:
        net, transform = load_model(model_or_ckpt), load_gene_transform(model_or_ckpt)
    net = net.to(dev).eval()
    if hasattr(net, "classify") and not hasattr(net, "aggregator"):  # a gene encoder: CLS_ge
        if transform is None:
            raise ValueError("embedding with a gene encoder needs its checkpoint (for the fitted gene transform)")
        genes = torch.from_numpy(gene_matrix(cohort, transform, ids))
        return torch.cat([net(chunk.to(dev)).float().cpu() for chunk in genes.split(256)]).numpy()

    if isinstance(net, PatchAggregator):
        def encode(feats, mask, genes):  # noqa: ANN001, ANN202
            return net(feats, mask).cls
        needs_genes = False
    elif hasattr(net, "embed_pair"):  # GiMP / image-gene pre-training: CLS_pat after pre-training
        encode, needs_genes = net.embed_pair, exists(getattr(net, "gene_encoder", None))
    elif hasattr(net, "cls_pat"):  # a fine-tuned GiMPClassifier
        def encode(feats, mask, genes):  # noqa: ANN001, ANN202
            return net.cls_pat(feats, mask, genes)[0]
        needs_genes = net.uses_genes
    else:
        raise ValueError(f"cannot embed with a {type(net).__name__}: it has no aggregator")
    gm = None
    if needs_genes:
        if transform is None:
            raise ValueError(f"the {type(net).__name__} reads genes: pass its checkpoint path or gene_transform=")
        gm = gene_matrix(cohort, transform, ids)
    if input == "window":
        data = WindowDataset(cohort, ids, window_len=window_len, gene_matrix=gm, seed=0)
    else:
        data = BagDataset(cohort, ids, gene_matrix=gm, max_patches=max_patches, seed=0)
    out = []
    for i in tqdm(range(len(data)), desc="embed", disable=not progress, leave=False):
        item = data[i]
        genes = item["genes"][None].to(dev) if needs_genes else None
        emb = encode(item["feats"][None].to(dev), item["mask"][None].to(dev), genes)
        out.append(emb[0].float().cpu().numpy())
    return np.stack(out).astype(np.float32)
