"""A fine-tuned GiMP classifier that still predicts when a patient lacks one modality (our extension).

The paper's classifier (:class:`~gimplib.models.gimp.GiMPClassifier`) reads
``CLS_pat = concat(CLS_img, CLS_ge)`` and so needs both the slide and the expression.
:class:`AnyModalityClassifier` adds two learned placeholders, one for a missing ``CLS_img``
and one for a missing ``CLS_ge``, and *modality dropout* during fine-tuning: with
probability ``modality_dropout`` a training patient loses one of its two modalities (each
equally likely) and the placeholder takes its place. One model then classifies from image +
genes, image alone or genes alone. It is off by default (``finetune(modality_dropout=0)``
builds the paper's classifier); the book reports it as ours, not the paper's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gimplib.models.aggregator import PatchAggregator
from gimplib.models.gimp import GiMPClassifier
from gimplib.utils import exists

__all__ = ["AnyModalityClassifier"]


class AnyModalityClassifier(GiMPClassifier):
    """:class:`GiMPClassifier` with learned placeholders for a missing ``CLS_img`` / ``CLS_ge``.

    Args:
        aggregator: the patch aggregator.
        gene_encoder: the gene encoder (required: a model without one reads images only).
        num_classes, hidden, dropout, freeze_gene_encoder: as for :class:`GiMPClassifier`.
        modality_dropout: probability that a training patient loses one modality (which
            one is a fair coin); 0 trains on both only (the placeholders then stay untrained).
    """

    def __init__(
        self,
        *,
        aggregator: PatchAggregator,
        gene_encoder: nn.Module,
        num_classes: int = 2,
        hidden: int = 256,
        dropout: float = 0.25,
        freeze_gene_encoder: bool = True,
        modality_dropout: float = 0.5,
    ) -> None:
        if not exists(gene_encoder):
            raise ValueError("AnyModalityClassifier needs a gene encoder: without one there is no second modality")
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {modality_dropout}")
        super().__init__(aggregator=aggregator, gene_encoder=gene_encoder, num_classes=num_classes, hidden=hidden,
                         dropout=dropout, freeze_gene_encoder=freeze_gene_encoder)
        self.modality_dropout = float(modality_dropout)
        self.missing_img = nn.Parameter(torch.zeros(aggregator.embed_dim))
        self.missing_ge = nn.Parameter(torch.zeros(gene_encoder.embed_dim))

    def cls_pat(
        self,
        feats: Tensor | None,
        mask: Tensor | None = None,
        genes: Tensor | None = None,
        return_attn: bool = False,
        has_image: Tensor | None = None,
        has_genes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``concat(CLS_img, CLS_ge)`` (b, d_img + d_ge), a placeholder standing in for what is missing.

        Args:
            feats: (b, n, in_dim) patch features, or None when no patient of the batch has a slide.
            mask: (b, n) bool, True for valid patches.
            genes: (b, G) model-ready expression, or None when no patient has it.
            return_attn: also compute the (b, n) CLS attention over patches (None without feats).
            has_image, has_genes: (b,) bool, False for a patient whose row of ``feats`` /
                ``genes`` is a dummy (a batch that mixes complete and incomplete patients).

        Returns:
            The embedding and the attention (None unless requested and feats were given).
        """
        if feats is None and genes is None:
            raise ValueError("AnyModalityClassifier: a patient needs at least one modality; got neither feats nor genes")
        b = (feats if exists(feats) else genes).shape[0]
        attn = None
        if exists(feats):
            out = self.aggregator(feats, mask, return_attn=return_attn)
            img, attn = out.cls, out.attn
        else:
            img = self.missing_img.expand(b, -1)
        if exists(genes):
            if genes.ndim != 2 or genes.shape[0] != b:
                raise ValueError(f"genes must be (b, G) with b = {b}, got shape {tuple(genes.shape)}")
            ge = self.encode_genes(genes).to(img.dtype)
        else:
            ge = self.missing_ge.to(img.dtype).expand(b, -1)
        keep_img = has_image if exists(has_image) else torch.ones(b, dtype=torch.bool, device=img.device)
        keep_ge = has_genes if exists(has_genes) else torch.ones(b, dtype=torch.bool, device=img.device)
        if self.training and self.modality_dropout > 0:
            drop = torch.rand(b, device=img.device) < self.modality_dropout
            which = torch.rand(b, device=img.device) < 0.5  # True: the image goes, False: the genes go
            both = keep_img & keep_ge
            keep_img = keep_img & ~(drop & which & both)
            keep_ge = keep_ge & ~(drop & ~which & both)
        img = torch.where(keep_img[:, None], img, self.missing_img.to(img.dtype))
        ge = torch.where(keep_ge[:, None], ge, self.missing_ge.to(img.dtype))
        return torch.cat([img, ge], dim=-1), attn

    def forward(
        self,
        feats: Tensor | None,
        mask: Tensor | None = None,
        genes: Tensor | None = None,
        return_attn: bool = False,
        has_image: Tensor | None = None,
        has_genes: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Classify patients from whatever they have: slide + genes, slide alone or genes alone.

        Args:
            feats, mask, genes, has_image, has_genes: as for :meth:`cls_pat`.
            return_attn: also return the (b, n) CLS attention (None without feats).

        Returns:
            (b, num_classes) logits, and the attention when requested.
        """
        emb, attn = self.cls_pat(feats, mask, genes, return_attn=return_attn, has_image=has_image,
                                 has_genes=has_genes)
        logits = self.head(emb)
        return (logits, attn) if return_attn else logits
