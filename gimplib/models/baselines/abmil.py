"""ABMIL: attention-based deep multiple-instance learning with gated attention.

Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018.

What is the paper's and what is adapted:
    * Gated attention pooling (their eq. 9) over instance embeddings: kept as is.
    * The instance encoder: the paper trains a small CNN on image patches; we start from
      frozen 1024-d CLAM-style patch features, so the encoder is one Linear + ReLU + Dropout
      (as in every later WSI use of ABMIL). The defaults are the WSI ABMIL of the Mahmood
      lab's code, PORPOISE's ``PorpoiseAMIL`` ("small": Linear(1024, 512), gated attention
      512 -> 256, dropout 0.25 after the encoder and inside the attention); Ilse et al.'s
      own widths are ``embed_dim=500, attn_dim=128, dropout=0, attn_dropout=0``.
    * The bag classifier: the paper has one sigmoid output for a binary bag label; we use a
      ``num_classes``-way linear layer trained with softmax cross-entropy, so the same
      engine and metrics serve every row of the comparison.
    * Batches of bags with padding are allowed: padded patches get zero attention.
    * Official weights: :func:`gimplib.models.baselines.official.from_official` loads Ilse et
      al.'s ``GatedAttention`` (github.com/AMLab-Amsterdam/AttentionDeepMIL; its MNIST CNN is
      not part of this model, its 800-d output is the input here, one sigmoid output is
      ``num_classes=1``) and PORPOISE's ``PorpoiseAMIL`` (CLAM's ``Attn_Net_Gated``).
"""

from __future__ import annotations

from torch import Tensor, nn
from einops import einsum, rearrange

from gimplib.models.baselines._common import GatedAttention, check_inputs, masked_softmax, output
from gimplib.models.baselines.registry import register_system

__all__ = ["ABMIL"]


@register_system("abmil", block="pathology", cite="ilse2018abmil", tiny=dict(embed_dim=16, attn_dim=8),
                 widths=lambda embed_dim, **_: dict(embed_dim=embed_dim))
class ABMIL(nn.Module):
    """Gated-attention MIL classifier.

    Args:
        in_dim: patch feature size D.
        num_classes: number of bag classes C.
        embed_dim: instance embedding size after the first Linear.
        attn_dim: hidden size of the gated attention.
        dropout: dropout after the instance encoder (Ilse et al.: none; CLAM, PORPOISE: 0.25).
        attn_dropout: dropout inside the gated attention (PORPOISE's AMIL: 0.25; Ilse et al.: none).
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        attn_dropout: float = 0.25,
    ):
        super().__init__()
        self.in_dim = in_dim
        self.encoder = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(in_dim=embed_dim, hidden=attn_dim, dropout=attn_dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n) -> dict(logits (b, C), loss_aux 0, attn (b, n)). ``genes``, ``y`` unused."""
        mask = check_inputs("ABMIL", feats, mask, in_dim=self.in_dim)
        # instance embeddings and their attention weights (softmax over the valid patches)
        h = self.encoder(feats)
        a = masked_softmax(rearrange(self.attention(h), "b n 1 -> b n"), mask, dim=-1)
        # attention-weighted bag embedding -> class logits
        bag = einsum(a, h, "b n, b n d -> b d")
        return output(self.classifier(bag), attn=a)
