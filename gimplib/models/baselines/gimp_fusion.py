"""GiMP's own encoders fused end to end, without pretraining.

Jin et al., "Gene-Induced Multimodal Pre-training for Image-Omic Classification", MICCAI 2023:
Table 1's "GiMP w/o pre-training" row and the first two rows of the Table 2 ablation
("aggregator + SNN", "aggregator + GroupMSA") train the image aggregator and a gene encoder
together on the labels, with no pretraining stage. The paper does not say how the two
embeddings are combined for those rows; here CLS_img and CLS_ge are concatenated (the same
``concat(CLS_img, CLS_ge)`` that GiMP's triplet loss uses) and an MLP head classifies the
result. Both encoders are the library's (:class:`~gimplib.models.PatchAggregator`,
:class:`~gimplib.models.GroupMSA` or :class:`~gimplib.models.SNN`), so the rows differ from
GiMP only in the training recipe.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gimplib.models.aggregator import PatchAggregator
from gimplib.models.baselines._common import check_inputs, output
from gimplib.models.gene_encoders import build_gene_encoder
from gimplib.models.heads import MLPHead
from gimplib.models.baselines.registry import aggregator_widths, register_system

__all__ = ["GiMPFusion"]


@register_system(
    "gimp_fusion", block="fusion", cite="jin2023gimp",
    tiny=dict(embed_dim=16, num_heads=2, num_landmarks=4, hidden=16, gene_encoder="groupmsa",
              gene_kwargs=dict(fragment_size=4, num_groups=2, embed_dim=8, num_heads=2)),
    widths=aggregator_widths,
    recipes={"fusion_snn": {"gene": "snn"}, "fusion_groupmsa": {"gene": "groupmsa"}},  # Table 2's first rows
    published=False,
)
class GiMPFusion(nn.Module):
    """Patch aggregator + gene encoder, CLS tokens concatenated, MLP head; trained jointly.

    Args:
        in_dim: patch feature size D.
        num_classes: number of classes C.
        num_genes: length G of the gene vector.
        embed_dim: aggregator width d.
        depth: Nystrom layers of the aggregator.
        num_heads: attention heads of the aggregator.
        num_landmarks: Nystrom landmarks.
        gene_encoder: ``"snn"`` or ``"groupmsa"``.
        gene_kwargs: extra constructor arguments of the gene encoder (e.g. ``embed_dim``,
            ``fragment_size``, ``num_groups``).
        hidden: width of the MLP head.
        dropout: dropout of the aggregator and the head.
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        num_genes: int,
        embed_dim: int = 512,
        depth: int = 2,
        num_heads: int = 8,
        num_landmarks: int = 256,
        gene_encoder: str = "groupmsa",
        gene_kwargs: dict | None = None,
        hidden: int = 256,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.in_dim, self.num_genes = in_dim, num_genes
        self.aggregator = PatchAggregator(
            in_dim=in_dim, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            num_landmarks=num_landmarks, dropout=dropout,
        )
        self.gene_encoder = build_gene_encoder(gene_encoder, num_genes=num_genes, **dict(gene_kwargs or {}))
        self.head = MLPHead(in_dim=embed_dim + self.gene_encoder.embed_dim, num_classes=num_classes, hidden=hidden, dropout=dropout)

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n), genes (b, G) -> dict(logits (b, C), loss_aux 0, attn None)."""
        mask = check_inputs("GiMPFusion", feats, mask, genes, in_dim=self.in_dim, needs_genes=True, num_genes=self.num_genes)
        img = self.aggregator(feats, mask)
        cls_ge = self.gene_encoder(genes)
        logits = self.head(torch.cat([img.cls, cls_ge], dim=-1))
        return output(logits)

