"""REFERS-style image-gene pretraining: cross-supervision of the image branch by genes + InfoNCE.

Zhou, Chen, Wang, Zhang, Zhou & Yu, "Generalized radiograph representation learning via
cross-supervision between images and free-text radiology reports", Nature Machine
Intelligence 4, 2022.

What is the paper's and what is adapted (image-text -> image-gene):
    * Multi-view fusion: REFERS encodes every radiograph (view) of a study with the same
      transformer and fuses the views' class tokens with an attention-based view-fusion
      module into one study representation. Kept: a case's *views* are windows of its
      slides. Pass ``feats`` as (b, v, n, D) (v windows per case, e.g. from several slides,
      ``mask`` (b, v, n)) or as (b, n, D), which is split into ``num_views`` contiguous parts
      of the window (each part a view). Each view runs through the PatchAggregator;
      gated attention (Ilse et al. 2018) over the valid views gives the fused ``CLS_img``.
    * Report generation (the cross-supervision of the image branch from the text side)
      becomes *expression generation*: a decoder MLP predicts the case's (standardised)
      expression vector from the fused image representation, mean squared error. A
      profile of numbers has no word order to generate autoregressively, so regression
      replaces the paper's transformer text decoder.
    * Study-report consistency: symmetric InfoNCE between the projected fused image
      representation and the projected ``CLS_ge`` of GroupMSA. Kept.
    * ``L = gen_weight * L_gen + con_weight * L_con`` (1 and 1).
    * Fine-tuning uses one window/bag and the aggregator's ``CLS_pat`` (REFERS fine-tunes the
      single-view transformer too); the view-fusion module is pretraining-only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from gimplib.losses import info_nce
from gimplib.models.baselines._common import GatedAttention, masked_softmax
from gimplib.models.baselines._pretrain import PRETRAINER_TINY, ImageGenePretrainer
from gimplib.utils import default
from gimplib.models.baselines.registry import aggregator_widths, register_system

__all__ = ["REFERSStyle", "split_views"]


def split_views(feats: Tensor, mask: Tensor, num_views: int) -> tuple[Tensor, Tensor]:
    """Split windows (b, n, D) into ``min(num_views, n)`` contiguous views (b, v, ceil(n / v), D).

    The last view is padded (mask False) when n is not a multiple of v.
    """
    n = feats.shape[1]
    v = max(1, min(num_views, n))
    length = math.ceil(n / v)
    pad = v * length - n
    feats = F.pad(feats, (0, 0, 0, pad))
    mask = F.pad(mask, (0, pad), value=False)
    return rearrange(feats, "b (v l) d -> b v l d", v=v), rearrange(mask, "b (v l) -> b v l", v=v)


@register_system("refers", block="pretraining", cite="zhou2022refers",
                 tiny=dict(PRETRAINER_TINY, num_views=2, decoder_hidden=16),
                 widths=aggregator_widths, recipes={"refers": {"gene": "groupmsa"}})
class REFERSStyle(ImageGenePretrainer):
    """REFERS-style pretraining (see the module docstring).

    Args:
        num_views: views per case when ``feats`` is (b, n, D).
        gen_weight: weight of the expression-generation loss.
        con_weight: weight of the contrastive loss.
        decoder_hidden: hidden width of the expression decoder.
        **cfg: :class:`~gimplib.models.baselines._pretrain.ImageGenePretrainer` arguments.
    """

    system = "REFERSStyle"

    def __init__(self, *, num_views: int = 4, gen_weight: float = 1.0, con_weight: float = 1.0, decoder_hidden: int = 512, **cfg):
        super().__init__(**cfg)
        if num_views < 1:
            raise ValueError(f"REFERSStyle: num_views must be >= 1; got {num_views}")
        self.num_views, self.gen_weight, self.con_weight = num_views, gen_weight, con_weight
        d = self.embed_dim
        self.view_attention = GatedAttention(in_dim=d, hidden=max(d // 2, 1))
        self.gene_decoder = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, decoder_hidden), nn.GELU(), nn.Linear(decoder_hidden, self.num_genes)
        )

    def fuse_views(self, feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Views (b, v, n, D), mask (b, v, n) -> fused image representation (b, d), view weights (b, v)."""
        b, v = feats.shape[:2]
        view_valid = mask.any(dim=-1)
        if not bool(view_valid.any(dim=1).all()):
            bad = (~view_valid.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"REFERSStyle: case(s) {bad} in the batch have no valid patch in any view")
        cls = self.aggregator(feats[view_valid], mask[view_valid]).cls
        views = cls.new_zeros(b, v, cls.shape[-1])
        views[view_valid] = cls
        weights = masked_softmax(rearrange(self.view_attention(views), "b v 1 -> b v"), view_valid, dim=-1)
        return einsum(weights, views, "b v, b v d -> b d"), weights

    def embed_image(self, feats: Tensor, mask: Tensor | None = None) -> Tensor:
        """Joint-space image embedding (b, proj_dim) of the fused views; ``feats`` (b, n, D) or (b, v, n, D)."""
        if feats.ndim == 3:
            mask = default(mask, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device))
            feats, mask = split_views(feats, mask, self.num_views)
        mask = default(mask, torch.ones(feats.shape[:-1], dtype=torch.bool, device=feats.device))
        return self.img_proj(self.fuse_views(feats, mask)[0])

    def forward(
        self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """One pretraining forward; see :meth:`pretrain_step` (``feats`` may also be (b, v, n, D)).

        Returns dict(loss, loss_gen, loss_con).
        """
        mask = self._check(feats, mask, genes, views=True)
        if feats.ndim == 3:
            feats, mask = split_views(feats, mask, self.num_views)
        # study (case) representation from its views
        fused, _ = self.fuse_views(feats, mask)
        # cross-supervision: the image side must produce the expression profile
        loss_gen = F.mse_loss(self.gene_decoder(fused), genes)
        # case-profile consistency
        loss_con = info_nce(self.img_proj(fused), self.gene_proj(self.encode_genes(genes)), temperature=self.temperature)
        loss = self.gen_weight * loss_gen + self.con_weight * loss_con
        return dict(loss=loss, loss_gen=loss_gen, loss_con=loss_con)
