"""BioViL-style image-gene pretraining: global symmetric InfoNCE + masked gene modelling.

Boecking, Usuyama, Bannur, Castro, Schwaighofer, Hyland, Wetscherek, Naumann, Nori,
Alvarez-Valle, Poon & Oktay, "Making the Most of Text Semantics to Improve Biomedical
Vision-Language Processing", ECCV 2022.

What is the paper's and what is adapted (image-text -> image-gene):
    * Global alignment: image and report embeddings are projected into a joint space and
      aligned with a symmetric (image->text and text->image) InfoNCE over the batch. Kept,
      on ``CLS_img`` (PatchAggregator) and ``CLS_ge`` (GroupMSA) with two-layer projection
      heads; the temperature is fixed (``temperature``) rather than learned.
    * Masked language modelling on the report side, which BioViL keeps during joint
      training, becomes *masked gene modelling*: a fraction ``mgm_ratio`` (0.15, BERT's
      rate) of each expression vector is set to 0 (the training mean after
      standardisation; the input is continuous, so there is no [MASK] symbol), the gene
      encoder runs on the masked vector, and each gene-fragment token (the word-token
      analogue, see :func:`~gimplib.models.baselines._pretrain.gene_fragment_tokens`)
      predicts its own ``fragment_size`` gene values through a shared linear decoder;
      the loss is the mean squared error on the masked genes only.
    * BioViL's image encoder (ResNet-50 on a chest X-ray) and CXR-BERT are replaced by the
      two encoders GiMP uses (see the package note); BioViL's local, patch-level terms are
      not part of the method (the paper reports the global loss suffices) and not used.
    * ``L = L_global + mgm_weight * L_mgm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from gimplib.losses import info_nce
from gimplib.models.baselines._pretrain import PRETRAINER_TINY, ImageGenePretrainer, gene_fragment_tokens
from gimplib.models.baselines.registry import aggregator_widths, register_system

__all__ = ["BioViLStyle"]


@register_system("biovil", block="pretraining", cite="boecking2022biovil", tiny=PRETRAINER_TINY,
                 widths=aggregator_widths, recipes={"biovil": {"gene": "groupmsa"}})
class BioViLStyle(ImageGenePretrainer):
    """BioViL-style pretraining (see the module docstring).

    Args:
        mgm_ratio: fraction of genes masked per sample for masked gene modelling.
        mgm_weight: weight of the masked-gene-modelling loss.
        **cfg: :class:`~gimplib.models.baselines._pretrain.ImageGenePretrainer` arguments
            (``in_dim``, ``num_genes``, ``embed_dim``, ``gene_encoder``, ``temperature``, ...).
    """

    system = "BioViLStyle"

    def __init__(self, *, mgm_ratio: float = 0.15, mgm_weight: float = 1.0, **cfg):
        super().__init__(**cfg)
        if not 0.0 < mgm_ratio < 1.0:
            raise ValueError(f"BioViLStyle: mgm_ratio must be in (0, 1); got {mgm_ratio}")
        if self.freeze_gene_encoder and mgm_weight > 0:
            raise ValueError("BioViLStyle: masked gene modelling trains the gene encoder; use mgm_weight=0 with a frozen one")
        self.mgm_ratio, self.mgm_weight = mgm_ratio, mgm_weight
        enc = self.gene_encoder
        self.mgm_decoder = nn.Sequential(nn.LayerNorm(enc.embed_dim), nn.Linear(enc.embed_dim, enc.fragment_size))

    def forward(
        self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """One pretraining forward; see :meth:`pretrain_step`. Returns dict(loss, loss_global, loss_mgm)."""
        mask = self._check(feats, mask, genes)
        # global alignment of CLS_img and CLS_ge
        cls_img = self.aggregator(feats, mask).cls
        cls_ge = self.encode_genes(genes)
        loss_global = info_nce(self.img_proj(cls_img), self.gene_proj(cls_ge), temperature=self.temperature)
        # masked gene modelling: fragment tokens of the masked profile predict the hidden values
        loss_mgm = feats.new_zeros(())
        if self.mgm_weight > 0:
            hidden = torch.rand(genes.shape, device=genes.device, generator=generator) < self.mgm_ratio
            _, tokens, _ = gene_fragment_tokens(self.gene_encoder, genes.masked_fill(hidden, 0.0))
            pred = rearrange(self.mgm_decoder(tokens), "b f s -> b (f s)")[:, : self.num_genes]
            if bool(hidden.any()):
                loss_mgm = F.mse_loss(pred[hidden], genes[hidden])
        loss = loss_global + self.mgm_weight * loss_mgm
        return dict(loss=loss, loss_global=loss_global, loss_mgm=loss_mgm)
