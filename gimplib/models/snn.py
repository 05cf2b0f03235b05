"""SNN: self-normalising network gene encoder (Klambauer et al. 2017).

The genomic branch of Pathomic Fusion and PORPOISE: fully connected blocks of
``Linear -> SELU -> AlphaDropout`` with LeCun-normal weights (needed for self-normalisation),
here followed by a linear read-out to ``embed_dim``. It is the "SNN" gene encoder of the
paper's ablation (Table 2). Same API as :class:`gimplib.models.GroupMSA`.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from gimplib.utils import exists

__all__ = ["SNN"]


class SNN(nn.Module):
    """Self-normalising MLP gene encoder.

    Args:
        num_genes: genes per expression vector.
        embed_dim: output width (``CLS_ge``).
        hidden: widths of the ``Linear -> SELU -> AlphaDropout`` blocks.
        dropout: AlphaDropout rate (PORPOISE uses 0.25).
        num_classes: when given, a linear head for supervised pretraining (:meth:`classify`).
        gene_dropout: during training, zero this share of the input genes (plain dropout on
            the input, as GroupMSA's ``gene_dropout``; 0 = off, as in PORPOISE).
    """

    def __init__(
        self,
        *,
        num_genes: int,
        embed_dim: int = 256,
        hidden: tuple[int, ...] = (256, 256),
        dropout: float = 0.25,
        num_classes: int | None = None,
        gene_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= gene_dropout < 1.0:
            raise ValueError(f"gene_dropout must be in [0, 1), not {gene_dropout!r}")
        self.num_genes = num_genes
        self.embed_dim = embed_dim
        blocks: list[nn.Module] = []
        width = num_genes
        for h in hidden:
            blocks += [nn.Linear(width, h), nn.SELU(), nn.AlphaDropout(dropout)]
            width = h
        self.gene_dropout = nn.Dropout(gene_dropout)
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(width, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if exists(num_classes) else None
        for module in self.modules():
            if isinstance(module, nn.Linear):  # LeCun normal, as self-normalisation assumes
                nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features))
                nn.init.zeros_(module.bias)

    def forward(self, genes: Tensor, return_attn: bool = False) -> Tensor | tuple[Tensor, None]:
        """Encode expression vectors.

        Args:
            genes: (b, num_genes) expression values.
            return_attn: for API parity with GroupMSA; the SNN has no attention, so the
                second returned value is None (use gradient attributions instead).

        Returns:
            (b, embed_dim) embeddings, and ``None`` when ``return_attn``.
        """
        assert genes.ndim == 2, f"genes must be (b, g), got shape {tuple(genes.shape)}"
        assert genes.shape[1] == self.num_genes, f"SNN was built for {self.num_genes} genes, got {genes.shape[1]}"
        cls = self.proj(self.blocks(self.gene_dropout(genes)))
        return (cls, None) if return_attn else cls

    def classify(self, genes: Tensor) -> Tensor:
        """(b, num_genes) -> (b, num_classes) logits of the supervised-pretraining head."""
        if self.head is None:
            raise RuntimeError("this SNN has no classification head; build it with num_classes=...")
        return self.head(self.forward(genes))
