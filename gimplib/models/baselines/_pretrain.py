"""Shared machinery of the image-gene pretraining baselines (BioViL-, MGCA-, REFERS-style).

Each adapts an image-text pretraining method to (whole-slide image, expression profile)
pairs with the *same* two encoders as GiMP, so that only the pretraining objective differs:

* image side: :class:`gimplib.models.PatchAggregator` (Nystrom MIL, ``CLS_img`` plus patch
  tokens) in place of the chest X-ray ViT / ResNet;
* gene side: :class:`gimplib.models.GroupMSA` (``CLS_ge`` plus gene-fragment tokens) in
  place of the report's BERT. As a language model starts the text encoder of these
  methods, the stage-02 supervised GroupMSA can be passed as ``gene_encoder``; unlike in
  GiMP it is trained jointly (``freeze_gene_encoder=False``), as the text encoders are.

After pretraining, :meth:`ImageGenePretrainer.build_classifier` gives the same fine-tuning
model as GiMP (an MLP on ``CLS_pat = concat(CLS_img, CLS_ge)``,
:class:`gimplib.models.GiMPClassifier`): like GiMP, these rows sit in the paper's
pathology + genomic block with pre-training, so they are fine-tuned on image + genes.
``GiMPClassifier.from_pretrained(module)`` also works on these modules (their aggregator
weights live under ``aggregator.``, as in GiMP).

Labels are never used: these objectives are self-supervised (``y`` is accepted and ignored).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from gimplib.models.aggregator import PatchAggregator
from gimplib.models.gimp import GiMPClassifier
from gimplib.models.groupmsa import GroupMSA
from gimplib.utils import exists

__all__ = ["PRETRAINER_TINY", "ImageGenePretrainer", "gene_fragment_tokens", "projection"]

#: The tiny test configuration the pre-training systems share (their registry records add their own).
PRETRAINER_TINY: dict = dict(embed_dim=16, depth=1, num_heads=2, num_landmarks=4, proj_dim=8, dropout=0.0,
                             gene_cfg=dict(fragment_size=4, num_groups=3, embed_dim=16, num_heads=2, dropout=0.0))


def projection(in_dim: int, out_dim: int) -> nn.Sequential:
    """Two-layer projection head ``Linear -> ReLU -> Linear`` into the joint space (SimCLR/CLIP style)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))


def gene_fragment_tokens(encoder: nn.Module, genes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run a GroupMSA and also return its gene-fragment tokens (the analogue of word tokens).

    The fragment tokens are read (through a forward hook) at the output of the last
    intra-group block, where each fragment has attended to the fragments of its group.

    Args:
        encoder: a :class:`gimplib.models.GroupMSA`.
        genes: (b, num_genes) expression values.

    Returns:
        ``cls`` (b, d) = ``CLS_ge``, ``tokens`` (b, num_fragments, d) in gene order, and the
        CLS attention over groups (b, num_groups).
    """
    if not all(hasattr(encoder, a) for a in ("intra", "num_fragments", "group_size", "fragment_size")):
        raise ValueError(f"gene-fragment tokens need a GroupMSA gene encoder; got {type(encoder).__name__}")
    captured: dict[str, Tensor] = {}
    handle = encoder.intra[-1].register_forward_hook(lambda mod, inp, out: captured.__setitem__("x", out[0]))
    try:
        cls, group_attn = encoder(genes, return_attn=True)
    finally:
        handle.remove()
    # drop the group token of each group; the padded slots sit after the real fragments
    tokens = rearrange(captured["x"][:, 1:], "(b g) k d -> b (g k) d", b=genes.shape[0])
    return cls, tokens[:, : encoder.num_fragments], group_attn


class ImageGenePretrainer(nn.Module):
    """Base class: the two encoders, projection heads, input checks and the fine-tuning model.

    Args:
        in_dim: patch feature size D.
        num_classes: classes of the fine-tuning model built by :meth:`build_classifier`.
        num_genes: genes per expression vector (read from ``gene_encoder`` when given).
        embed_dim: aggregator width d.
        gene_encoder: a (possibly pretrained) GroupMSA; None builds a fresh one from ``gene_cfg``.
        gene_cfg: GroupMSA arguments when ``gene_encoder`` is None (``num_genes`` is added).
        freeze_gene_encoder: keep the gene encoder fixed (GiMP's setting) instead of training it.
        proj_dim: width of the joint embedding space.
        temperature: temperature of the global InfoNCE.
        depth: aggregator layers.
        num_heads: aggregator heads.
        num_landmarks: Nystrom landmarks.
        dropout: aggregator dropout.
    """

    system = "ImageGenePretrainer"

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        num_genes: int | None = None,
        embed_dim: int = 512,
        gene_encoder: nn.Module | None = None,
        gene_cfg: dict[str, Any] | None = None,
        freeze_gene_encoder: bool = False,
        proj_dim: int = 128,
        temperature: float = 0.07,
        depth: int = 2,
        num_heads: int = 8,
        num_landmarks: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        if gene_encoder is None:
            if num_genes is None:
                raise ValueError(f"{self.system}: give num_genes (or a gene_encoder)")
            gene_encoder = GroupMSA(num_genes=num_genes, **(gene_cfg or {}))
        elif exists(num_genes) and getattr(gene_encoder, "num_genes", num_genes) != num_genes:
            raise ValueError(f"{self.system}: num_genes={num_genes} but the gene encoder was built for {gene_encoder.num_genes}")
        self.in_dim, self.num_classes, self.temperature = in_dim, num_classes, temperature
        self.embed_dim, self.proj_dim = embed_dim, proj_dim
        self.num_genes = gene_encoder.num_genes
        self.aggregator = PatchAggregator(
            in_dim=in_dim, embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_landmarks=num_landmarks, dropout=dropout
        )
        self.gene_encoder = gene_encoder
        self.freeze_gene_encoder = freeze_gene_encoder
        if freeze_gene_encoder:
            gene_encoder.requires_grad_(False)
            gene_encoder.eval()
        gene_dim = gene_encoder.embed_dim
        self.img_proj = projection(embed_dim, proj_dim)
        self.gene_proj = projection(gene_dim, proj_dim)

    def train(self, mode: bool = True) -> "ImageGenePretrainer":
        """Set train/eval mode; a frozen gene encoder always stays in eval mode."""
        super().train(mode)
        if self.freeze_gene_encoder:
            self.gene_encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser should see."""
        return [p for p in self.parameters() if p.requires_grad]

    def encode_genes(self, genes: Tensor) -> Tensor:
        """``CLS_ge`` (b, gene_dim), without autograd when the encoder is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_gene_encoder):
            return self.gene_encoder(genes)

    def embed_image(self, feats: Tensor, mask: Tensor | None = None) -> Tensor:
        """Joint-space image embedding (b, proj_dim): the projected ``CLS_img`` of the window/bag."""
        return self.img_proj(self.aggregator(feats, mask).cls)

    def embed_genes(self, genes: Tensor) -> Tensor:
        """Joint-space gene embedding (b, proj_dim): the projected ``CLS_ge``."""
        return self.gene_proj(self.encode_genes(genes))

    def _check(self, feats: Tensor, mask: Tensor | None, genes: Tensor | None, *, views: bool = False) -> Tensor:
        """Validate inputs; return a bool mask shaped like ``feats[..., 0]``."""
        ranks = (3, 4) if views else (3,)
        shape = "(b, n, D) or (b, v, n, D)" if views else "(b, n, D)"
        if feats.ndim not in ranks:
            raise ValueError(f"{self.system}: feats must be {shape}; got shape {tuple(feats.shape)}")
        if feats.shape[-1] != self.in_dim:
            raise ValueError(f"{self.system}: feats have {feats.shape[-1]} features per patch; built with in_dim={self.in_dim}")
        if genes is None:
            raise ValueError(f"{self.system} needs genes (b, G) for pretraining; got None")
        if genes.shape != (feats.shape[0], self.num_genes):
            raise ValueError(
                f"{self.system}: genes must be (b, G) = {(feats.shape[0], self.num_genes)}; got {tuple(genes.shape)}"
            )
        if mask is None:
            return torch.ones(feats.shape[:-1], dtype=torch.bool, device=feats.device)
        if mask.shape != feats.shape[:-1]:
            raise ValueError(f"{self.system}: mask must be {tuple(feats.shape[:-1])}; got {tuple(mask.shape)}")
        return mask.bool()

    def pretrain_step(
        self, feats: Tensor, mask: Tensor | None, genes: Tensor | None, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Pretraining losses of one mini-batch (call ``loss.backward()`` on the result).

        Args:
            feats: (b, n, in_dim) windows of patch features.
            mask: (b, n) bool, True for valid patches (None: all valid).
            genes: (b, num_genes) expression vectors of the same cases.
            y: ignored (self-supervised); accepted for the engine's common call.
            generator: optional torch generator, on the inputs' device, for the method's
                random choices (gene masks, patch subsets).

        Returns:
            dict of scalar tensors with ``loss`` and its named terms.
        """
        return self(feats, mask, genes, y, generator)

    def build_classifier(
        self, *, num_classes: int | None = None, hidden: int = 256, dropout: float = 0.25, freeze_gene_encoder: bool = True
    ) -> GiMPClassifier:
        """The fine-tuning model: copies of the pretrained aggregator and gene encoder with GiMP's
        MLP head on ``CLS_pat = concat(CLS_img, CLS_ge)`` (image-omic, as GiMP is fine-tuned)."""
        return GiMPClassifier(
            aggregator=copy.deepcopy(self.aggregator), gene_encoder=copy.deepcopy(self.gene_encoder),
            num_classes=num_classes or self.num_classes, hidden=hidden, dropout=dropout,
            freeze_gene_encoder=freeze_gene_encoder,
        )

    @torch.no_grad()
    def embed_pair(self, feats: Tensor, mask: Tensor | None, genes: Tensor) -> Tensor:
        """``CLS_pat`` after pre-training for figures: concat of the L2-normalised ``CLS_img`` and
        ``CLS_ge`` (b, d_img + d_ge), the same construction as :meth:`GiMP.embed_pair`."""
        cls_img = self.aggregator(feats, mask).cls
        cls_ge = self.encode_genes(genes)
        return torch.cat([F.normalize(cls_img, dim=-1), F.normalize(cls_ge, dim=-1).to(cls_img.dtype)], dim=-1)
