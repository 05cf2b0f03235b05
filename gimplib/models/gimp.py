"""GiMP: gene-induced multimodal pretraining (paper Sect. 2.3) and its fine-tuning model.

Pretraining (:class:`GiMP`), per mini-batch of windows of patch features:

1. Masked patch modelling (MPM): ``mask_ratio`` (0.5) of each window's *valid* positions
   are chosen uniformly at random per sample; their projected tokens are replaced by a
   learnable mask token, the aggregator runs on the whole sequence, and a light decoder
   reconstructs the original ``in_dim`` features; ``L_rec`` is the L1 error on the masked
   positions only (Eq. 3; :func:`gimplib.losses.masked_l1`): ``rec_reduction="sum"``
   (default) is Eq. 3 as written, a sum over masked positions of L1 norms, averaged over the
   windows of a batch (that batching is ours); ``rec_reduction="mean"`` (ours) averages over
   masked positions and feature dimensions (next to the triplet loss only the sum let MPM
   learn on the demo cohort; see the book's architecture page).
2. Gene-induced triplets: ``L_tri`` (Eq. 4) on ``concat(CLS_img, CLS_ge)`` with squared
   L2 distances and margin 0.8, triplets mined from the labels of the batch. ``CLS_ge``
   comes from a gene encoder pretrained beforehand and *frozen* here (eval mode,
   ``requires_grad=False``, run under ``torch.no_grad``; :meth:`GiMP.train` keeps it in
   eval mode).
3. ``L_pre = L_tri + L_rec``.

Switches cover every row of the paper's Table 2: ``gene_encoder`` = GroupMSA / SNN / None,
``use_mpm``, ``use_triplet`` (with ``gene_encoder=None`` the triplets are built from the
image-only ``CLS_img``).

Choices the paper leaves open (constructor arguments):

* Mask token vs dropping (MAE): a mask token, inserted *after* the input projection
  (``ReLU(Linear(x))``), as in BEiT/SimMIM: the mask token lives in the ``d``-dimensional
  token space, and every position keeps its place in the sequence, which the package's
  depth-wise residual convolution over neighbouring tokens relies on.
* Decoder: a per-token MLP ``LayerNorm -> Linear(d, decoder_hidden=512) -> GELU ->
  Linear(decoder_hidden, in_dim)`` on the aggregator's output tokens; the two Nystrom
  layers already mix context, and SimMIM showed that a light head suffices.
* ``triplet_input="masked"`` (default): ``CLS_img`` for the triplet loss is taken from the
  same masked forward pass as the reconstruction (one pass; masking doubles as
  augmentation). ``"full"`` runs a second, unmasked pass for it.
* ``normalize="l2"`` (default): ``CLS_img`` and ``CLS_ge`` are each L2-normalised before
  concatenation, so squared distances lie in [0, 8] and the margin 0.8 has a fixed scale
  (raw LayerNorm outputs have norms around ``sqrt(d)``, which would make 0.8 negligible).
  ``"none"`` uses the raw embeddings.
* Mining ``"all"`` (batch-all) with the ``"active"`` reduction; ``"hard"`` is available
  (see :func:`gimplib.losses.triplet_loss`).
* Number of masked positions: ``floor(mask_ratio * n_valid)`` per sample.
* Decoder initialisation (ours): the output layer starts at ``DECODER_OUT_INIT_SCALE``
  (1 %) of PyTorch's default, and :meth:`GiMP.init_decoder_bias` sets its bias to the
  training patches' mean (``pretrain_gimp`` does), so that the first reconstructions sit
  where the features do (why, measured: the book's architecture page).

Fine-tuning (:class:`GiMPClassifier`): an MLP head on ``CLS_pat = concat(CLS_img, CLS_ge)``
of the (pretrained) aggregator and the gene encoder, i.e. image-omic classification as in
the paper; :meth:`GiMPClassifier.from_pretrained` takes the weights out of a GiMP module,
state dict or checkpoint file.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimplib.losses import masked_l1, triplet_loss
from gimplib.models.aggregator import PatchAggregator, _row_index, _rows
from gimplib.models.heads import MLPHead
from gimplib.utils import exists

__all__ = ["GiMP", "GiMPClassifier", "aggregator_state_dict", "mpm_reference_l1", "random_patch_mask"]


#: Factor on PyTorch's default initialisation of the decoder's output weights (ours, issue 19).
DECODER_OUT_INIT_SCALE = 0.01


def random_patch_mask(valid: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Choose ``floor(ratio * n_valid)`` valid positions per sample uniformly at random.

    Args:
        valid: (b, n) bool, True for valid positions.
        ratio: fraction of valid positions to mask, in (0, 1).
        generator: optional torch generator (on ``valid``'s device) for reproducibility.

    Returns:
        (b, n) bool, True at the masked positions (always a subset of ``valid``).
    """
    assert valid.ndim == 2 and valid.dtype == torch.bool, f"valid must be bool (b, n), got {valid.dtype} {tuple(valid.shape)}"
    scores = torch.rand(valid.shape, device=valid.device, generator=generator)
    scores = scores.masked_fill(~valid, 2.0)  # invalid positions sort last
    rank = scores.argsort(dim=1).argsort(dim=1)
    n_mask = torch.floor(valid.sum(dim=1) * ratio).long()
    return rank < n_mask[:, None]


@torch.no_grad()
def mpm_reference_l1(
    feats: Tensor, mask: Tensor | None, mpm_mask: Tensor, mean_patch: Tensor | None = None
) -> dict[str, Tensor]:
    """L1 per feature on the masked positions of three reconstructions that need no training.

    * ``window_mean``: the mean of the window's visible (valid, unmasked) patches;
    * ``nearest``: the nearest visible patch in sequence order (ties: the earlier one);
    * ``mean_patch``: a fixed patch (the training set's mean), no context at all.

    MPM has learned something from context only if it beats the first two. Each value is
    ``sum |.| / (n_masked * D)``, as :func:`gimplib.losses.masked_l1` with ``"mean"``.

    Args:
        feats: (b, n, D) windows of patch features.
        mask: (b, n) bool, True for valid patches (None: all valid).
        mpm_mask: (b, n) bool, the masked positions (a subset of the valid ones).
        mean_patch: (D,) the constant reconstruction; None leaves ``mean_patch`` out.

    Returns:
        dict of scalar tensors ``window_mean``, ``nearest`` (and ``mean_patch``).
    """
    assert feats.ndim == 3, f"feats must be (b, n, D), got shape {tuple(feats.shape)}"
    b, n, _ = feats.shape
    valid = mask if exists(mask) else torch.ones(b, n, dtype=torch.bool, device=feats.device)
    assert mpm_mask.shape == (b, n) and mpm_mask.dtype == torch.bool, (
        f"mpm_mask must be bool (b, n) = {(b, n)}, got {mpm_mask.dtype} {tuple(mpm_mask.shape)}"
    )
    visible = valid & ~mpm_mask
    if not bool(visible.any(dim=1).all()):
        raise ValueError("every window needs at least one visible patch for the reference reconstructions")
    window_mean = (feats * visible[..., None]).sum(1) / visible.sum(1, keepdim=True)
    out = {"window_mean": masked_l1(window_mean[:, None].expand_as(feats), feats, mpm_mask)}
    # nearest visible position on each side: running max / min of the visible indices
    pos = torch.arange(n, device=feats.device).expand(b, n)
    left = torch.where(visible, pos, -1).cummax(dim=1).values
    right = torch.where(visible, pos, n).flip(1).cummin(dim=1).values.flip(1)
    use_left = (left >= 0) & ((right >= n) | (pos - left <= right - pos))
    nearest = torch.where(use_left, left, right).clamp(0, n - 1)
    out["nearest"] = masked_l1(feats.gather(1, nearest[..., None].expand_as(feats)), feats, mpm_mask)
    if exists(mean_patch):
        out["mean_patch"] = masked_l1(mean_patch.to(feats).expand_as(feats), feats, mpm_mask)
    return out


class GiMP(nn.Module):
    """GiMP pretraining model: Nystrom aggregator + MPM decoder + frozen gene encoder.

    Args:
        in_dim: patch feature width.
        embed_dim: aggregator width ``d``.
        gene_encoder: a pretrained GroupMSA / SNN (frozen here), or None (image only).
        use_mpm: masked patch modelling (``L_rec``).
        use_triplet: triplet loss (``L_tri``).
        mask_ratio: fraction of valid positions masked per window.
        margin: triplet margin.
        mining: ``"all"`` (batch-all) or ``"hard"`` (batch-hard).
        triplet_reduction: ``"active"`` or ``"valid"`` (batch-all only).
        normalize: ``"l2"`` (each CLS L2-normalised before concatenation) or ``"none"``.
        triplet_input: ``"masked"`` (CLS from the MPM pass) or ``"full"`` (extra unmasked pass).
        decoder_hidden: hidden width of the MPM decoder MLP.
        rec_reduction: ``"sum"`` (Eq. 3 as written, averaged over the windows of a batch) or
            ``"mean"`` (L1 per feature, ours); see :func:`gimplib.losses.masked_l1`.
        depth: aggregator layers.
        num_heads: aggregator heads.
        num_landmarks: Nystrom landmarks.
        pinv_iterations: pseudo-inverse iterations.
        dropout: aggregator dropout.
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        embed_dim: int = 512,
        gene_encoder: nn.Module | None = None,
        use_mpm: bool = True,
        use_triplet: bool = True,
        mask_ratio: float = 0.5,
        margin: float = 0.8,
        mining: str = "all",
        triplet_reduction: str = "active",
        normalize: str = "l2",
        triplet_input: str = "masked",
        decoder_hidden: int = 512,
        rec_reduction: str = "sum",
        depth: int = 2,
        num_heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not (use_mpm or use_triplet):
            raise ValueError("GiMP needs use_mpm or use_triplet (or both); with neither there is nothing to pretrain")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if normalize not in ("l2", "none"):
            raise ValueError(f"normalize must be 'l2' or 'none', got {normalize!r}")
        if triplet_input not in ("masked", "full"):
            raise ValueError(f"triplet_input must be 'masked' or 'full', got {triplet_input!r}")
        if mining not in ("all", "hard"):
            raise ValueError(f"mining must be 'all' or 'hard', got {mining!r}")
        if rec_reduction not in ("mean", "sum"):
            raise ValueError(f"rec_reduction must be 'mean' or 'sum', got {rec_reduction!r}")
        self.use_mpm = use_mpm
        self.use_triplet = use_triplet
        self.mask_ratio = mask_ratio
        self.margin = margin
        self.mining = mining
        self.triplet_reduction = triplet_reduction
        self.normalize = normalize
        self.triplet_input = triplet_input
        self.rec_reduction = rec_reduction

        self.aggregator = PatchAggregator(
            in_dim=in_dim,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            dropout=dropout,
        )
        if use_mpm:
            self.mask_token = nn.Parameter(torch.randn(embed_dim) * 0.02)
            self.decoder = nn.Sequential(
                nn.LayerNorm(embed_dim), nn.Linear(embed_dim, decoder_hidden), nn.GELU(), nn.Linear(decoder_hidden, in_dim)
            )
            # the output layer starts near zero, so the first reconstructions are nearly a
            # constant (its bias; see init_decoder_bias) instead of random patterns that
            # training would first remove by collapsing the tokens (see the module docstring)
            with torch.no_grad():
                self.decoder[-1].weight.mul_(DECODER_OUT_INIT_SCALE)
            nn.init.zeros_(self.decoder[-1].bias)
        self.gene_encoder = gene_encoder
        if exists(gene_encoder):
            gene_encoder.requires_grad_(False)
            gene_encoder.eval()

    def train(self, mode: bool = True) -> "GiMP":
        """Set train/eval mode; the frozen gene encoder always stays in eval mode."""
        super().train(mode)
        if exists(self.gene_encoder):
            self.gene_encoder.eval()
        return self

    @torch.no_grad()
    def init_decoder_bias(self, mean_patch: Tensor) -> None:
        """Set the decoder's output bias to the training set's mean patch (before training).

        With the zero-initialised output layer, the first reconstruction of every masked
        patch is then the mean patch, the best context-free guess, and training starts
        from the patch-to-patch variation instead of from the features' common level.

        Args:
            mean_patch: (in_dim,) the mean feature vector of the training patches.
        """
        if not self.use_mpm:
            raise RuntimeError("this GiMP has use_mpm=False: it has no decoder")
        bias = self.decoder[-1].bias
        if mean_patch.shape != bias.shape:
            raise ValueError(f"mean_patch must be ({bias.shape[0]},), got shape {tuple(mean_patch.shape)}")
        if not bool(torch.isfinite(mean_patch).all()):
            raise ValueError("mean_patch has non-finite values")
        bias.copy_(mean_patch.to(bias))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser should see (everything but the frozen gene encoder)."""
        return [p for p in self.parameters() if p.requires_grad]

    def _normalize(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.normalize == "l2" else x

    @staticmethod
    def _valid(feats: Tensor, mask: Tensor | None) -> Tensor:
        assert feats.ndim == 3, f"feats must be (b, n, D), got shape {tuple(feats.shape)}"
        b, n, _ = feats.shape
        valid = mask if exists(mask) else torch.ones(b, n, dtype=torch.bool, device=feats.device)
        assert valid.shape == (b, n) and valid.dtype == torch.bool, (
            f"mask must be bool (b, n) = {(b, n)}, got {valid.dtype} {tuple(valid.shape)}"
        )
        return valid

    def _encode_masked(
        self,
        feats: Tensor,
        mask: Tensor | None,
        valid: Tensor,
        mpm_mask: Tensor | None,
        generator: torch.Generator | None,
        need_masked_only: bool = False,
    ) -> tuple[Tensor, Any]:
        if not self.use_mpm:
            raise RuntimeError("this GiMP has use_mpm=False: it has no mask token and no decoder")
        if exists(mpm_mask):
            assert mpm_mask.shape == valid.shape and mpm_mask.dtype == torch.bool, (
                f"mpm_mask must be bool (b, n) = {tuple(valid.shape)}, got {mpm_mask.dtype} {tuple(mpm_mask.shape)}"
            )
            if bool((mpm_mask & ~valid).any()):
                raise ValueError("mpm_mask marks padded positions; it must be a subset of the valid positions")
            mpm = mpm_mask
        else:
            mpm = random_patch_mask(valid, self.mask_ratio, generator)
        # MPM: the masked positions get the mask token; only the others are projected
        keep = ~mpm
        index = _row_index(keep)  # by index: a masked scatter's backward is a slow masked select
        tokens = self.aggregator.embed(_rows(feats, index)[None])[0]
        b, n = mpm.shape
        tokens = tokens.new_zeros(b * n, tokens.shape[-1]).index_copy(0, index, tokens)
        tokens = torch.where(keep.reshape(-1, 1), tokens, self.mask_token.to(tokens.dtype)).view(b, n, -1)
        return mpm, self.aggregator.encode(tokens, mask, need=mpm if need_masked_only else None)

    def _loss_rec(self, masked_tokens: Tensor, feats: Tensor, mpm: Tensor) -> Tensor:
        """``L_rec`` with the decoder run on the masked rows only (what Eq. 3 reads, as in MAE).

        ``masked_tokens`` (k, d) are the aggregator's outputs at the k masked positions in
        row-major order (``AggregatorOutput.needed``). The same value as
        ``masked_l1(decoder(tokens), feats, mpm, reduction=rec_reduction)``.
        """
        n_masked = int(mpm.sum())
        if n_masked == 0:  # the same exact 0 with a graph as masked_l1
            empty = masked_tokens.reshape(feats.shape[0], 0, masked_tokens.shape[-1])
            return masked_l1(self.decoder(empty), feats[:, :0], mpm[:, :0], reduction=self.rec_reduction)
        total = (self.decoder(masked_tokens) - _rows(feats, _row_index(mpm))).abs().sum()
        if self.rec_reduction == "sum":
            return total / feats.shape[0]
        return total / (n_masked * feats.shape[-1])

    def reconstruct(
        self,
        feats: Tensor,
        mask: Tensor | None = None,
        *,
        mpm_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mask, encode and decode a batch of windows (the MPM half of :meth:`forward`).

        Args:
            feats: (b, n, in_dim) windows of patch features.
            mask: (b, n) bool, True for valid patches (None: all valid).
            mpm_mask: (b, n) bool, the positions to mask (a subset of the valid ones);
                None draws ``floor(mask_ratio * n_valid)`` per window at random.
            generator: optional generator for the random mask.

        Returns:
            ``pred`` (b, n, in_dim), the decoder's output at every position (only the
            masked ones are trained), and ``mpm_mask`` (b, n) bool, the masked positions.
        """
        mpm, out = self._encode_masked(feats, mask, self._valid(feats, mask), mpm_mask, generator)
        return self.decoder(out.tokens), mpm

    def forward(
        self,
        feats: Tensor,
        mask: Tensor | None = None,
        genes: Tensor | None = None,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        mpm_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One pretraining forward; see :meth:`pretrain_step` (``forward`` so that DDP wraps it)."""
        valid = self._valid(feats, mask)
        zero = feats.new_zeros(())

        loss_rec = zero
        if self.use_mpm:
            # L_rec reads the masked rows and L_tri the CLS: the last layer computes only those
            mpm, out = self._encode_masked(feats, mask, valid, mpm_mask, generator, need_masked_only=True)
            masked_tokens = getattr(out, "needed", None)  # an encoder that gives tokens only: gather them
            if masked_tokens is None:
                masked_tokens = _rows(out.tokens, _row_index(mpm))
            loss_rec = self._loss_rec(masked_tokens, feats, mpm)
        else:
            out = self.aggregator(feats, mask)

        # gene-induced triplets on concat(CLS_img, CLS_ge)
        loss_tri = zero
        if self.use_triplet:
            if y is None:
                raise ValueError("use_triplet=True needs the labels y (b,) to mine triplets")
            cls_img = out.cls
            if self.use_mpm and self.triplet_input == "full":
                cls_img = self.aggregator(feats, mask).cls
            emb = self._normalize(cls_img)
            if exists(self.gene_encoder):
                if genes is None:
                    raise ValueError("this GiMP has a gene encoder, so pretrain_step needs genes (b, g)")
                with torch.no_grad():
                    cls_ge = self.gene_encoder(genes)
                emb = torch.cat([emb, self._normalize(cls_ge).to(emb.dtype)], dim=-1)
            loss_tri = triplet_loss(
                emb, y, margin=self.margin, mining=self.mining, squared=True, reduction=self.triplet_reduction
            )
        return {"loss": loss_tri + loss_rec, "loss_tri": loss_tri, "loss_rec": loss_rec}

    @torch.no_grad()
    def embed_pair(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None) -> Tensor:
        """The embedding the triplet loss sees, from an unmasked pass: ``CLS_pat`` after pre-training.

        ``concat(n(CLS_img), n(CLS_ge))`` (b, d_img + d_ge) with ``n`` the ``normalize``
        setting (L2 by default, ours); ``n(CLS_img)`` alone without a gene encoder. This is
        what the paper's Fig. 2 draws (t-SNE of ``CLS_pat`` after pre-training).

        Args:
            feats: (b, n, in_dim) patch features.
            mask: (b, n) bool, True for valid patches.
            genes: (b, G) model-ready expression (needed when a gene encoder is set).
        """
        emb = self._normalize(self.aggregator(feats, mask).cls)
        if exists(self.gene_encoder):
            if genes is None:
                raise ValueError("this GiMP has a gene encoder: CLS_pat needs genes (b, G)")
            emb = torch.cat([emb, self._normalize(self.gene_encoder(genes)).to(emb.dtype)], dim=-1)
        return emb

    def pretrain_step(
        self,
        feats: Tensor,
        mask: Tensor | None,
        genes: Tensor | None,
        y: Tensor | None,
        generator: torch.Generator | None = None,
        mpm_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Pretraining losses of one mini-batch (call ``loss.backward()`` on the result).

        Args:
            feats: (b, n, in_dim) windows of patch features.
            mask: (b, n) bool, True for valid patches (None: all valid).
            genes: (b, g) expression vectors (needed when a gene encoder is set).
            y: (b,) labels for triplet mining (needed when ``use_triplet``).
            generator: optional generator for the MPM masks.
            mpm_mask: (b, n) bool, the positions to mask (None: drawn at random).

        Returns:
            dict of scalar tensors: ``loss`` (= ``loss_tri + loss_rec``), ``loss_tri``,
            ``loss_rec`` (a switched-off term is 0).
        """
        return self(feats, mask, genes, y, generator, mpm_mask)


def _load_state(source: Any) -> dict[str, Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise TypeError(f"expected a GiMP module, a state dict or a checkpoint path, got {type(source).__name__}")
    if "model" in source and isinstance(source["model"], dict):  # a gimplib.train checkpoint
        source = source["model"]
    return source


def aggregator_state_dict(source: nn.Module | dict | str | os.PathLike) -> dict[str, Tensor]:
    """The aggregator weights inside a GiMP module, state dict or checkpoint file.

    Accepts a :class:`GiMP`, its ``state_dict()``, a checkpoint dict with a ``"model"``
    entry, or a path to such a file; a DDP ``module.`` prefix is stripped.

    Returns:
        State dict of a :class:`PatchAggregator` (keys without the ``aggregator.`` prefix).
    """
    state = _load_state(source)
    prefix = "aggregator."
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
    if not out:
        raise KeyError(f"no '{prefix}*' weights found (first keys: {list(state)[:5]})")
    return out


class GiMPClassifier(nn.Module):
    """Multimodal fine-tuning model (paper Sect. 2.3, "Multimodal Fine-Tuning").

    An MLP head on ``CLS_pat = concat(CLS_img, CLS_ge)`` (width ``d_img + d_ge``): the slide
    (a bag or a window of patch features) goes through the aggregator, the patient's
    expression through the gene encoder. This is the paper's image-omic classifier: both
    modalities are inputs at fine-tuning and at test time. Without a gene encoder (the
    paper's image-only rows: Table 1 "GiMP w/o GroupMSA", Table 2 "aggregator + MPM" and
    "aggregator + triplet") the head sees ``CLS_img`` alone.

    The head sees the raw concatenation, as the paper writes it; the L2 normalisation of each
    token before the triplet loss is a pre-training choice of ours and is not applied here.

    Args:
        aggregator: the patch aggregator (e.g. from :meth:`from_pretrained`).
        gene_encoder: the gene encoder (GroupMSA / SNN) whose ``CLS_ge`` joins ``CLS_img``,
            or None for an image-only classifier.
        num_classes: output classes.
        hidden: MLP hidden width (0 for a linear head).
        dropout: MLP dropout.
        freeze_gene_encoder: keep the gene encoder fixed (eval mode, no gradients), as during
            GiMP pre-training; False fine-tunes it with the rest (our option; the paper does
            not say).
    """

    def __init__(
        self,
        *,
        aggregator: PatchAggregator,
        gene_encoder: nn.Module | None = None,
        num_classes: int = 2,
        hidden: int = 256,
        dropout: float = 0.25,
        freeze_gene_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.gene_encoder = gene_encoder
        self.freeze_gene_encoder = bool(freeze_gene_encoder) and exists(gene_encoder)
        gene_dim = gene_encoder.embed_dim if exists(gene_encoder) else 0
        self.head = MLPHead(in_dim=aggregator.embed_dim + gene_dim, num_classes=num_classes, hidden=hidden, dropout=dropout)
        if self.freeze_gene_encoder:
            gene_encoder.requires_grad_(False)
            gene_encoder.eval()
        elif exists(gene_encoder):  # e.g. taken out of a GiMP, where it was frozen
            gene_encoder.requires_grad_(True)

    @property
    def uses_genes(self) -> bool:
        """True when the classifier reads the patient's expression (it has a gene encoder)."""
        return exists(self.gene_encoder)

    def train(self, mode: bool = True) -> "GiMPClassifier":
        """Set train/eval mode; a frozen gene encoder always stays in eval mode."""
        super().train(mode)
        if self.freeze_gene_encoder:
            self.gene_encoder.eval()
        return self

    def encode_genes(self, genes: Tensor) -> Tensor:
        """``CLS_ge`` (b, d_ge) of expression vectors (b, G); no autograd when frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_gene_encoder):
            return self.gene_encoder(genes)

    def cls_pat(
        self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, return_attn: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``CLS_pat`` = concat(CLS_img, CLS_ge) (b, d_img + d_ge), or ``CLS_img`` without genes.

        Args:
            feats: (b, n, in_dim) patch features (a whole bag or a window).
            mask: (b, n) bool, True for valid patches.
            genes: (b, G) model-ready expression (required when the model has a gene encoder).
            return_attn: also compute the (b, n) CLS attention over patches.

        Returns:
            The embedding and the attention (None unless requested).
        """
        if self.uses_genes:
            if genes is None:
                raise ValueError(
                    "this GiMPClassifier has a gene encoder: it classifies concat(CLS_img, CLS_ge), "
                    "so it needs the patients' expression (genes (b, G)); got None"
                )
            if genes.ndim != 2 or genes.shape[0] != feats.shape[0]:
                raise ValueError(f"genes must be (b, G) with b = {feats.shape[0]}, got shape {tuple(genes.shape)}")
        out = self.aggregator(feats, mask, return_attn=return_attn)
        emb = out.cls
        if self.uses_genes:
            emb = torch.cat([emb, self.encode_genes(genes).to(emb.dtype)], dim=-1)
        return emb, out.attn

    def forward(
        self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, return_attn: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Classify patients from their slide and (when the model has a gene encoder) expression.

        Args:
            feats: (b, n, in_dim) patch features (a whole bag or a window).
            mask: (b, n) bool, True for valid patches.
            genes: (b, G) model-ready expression of the same patients.
            return_attn: also return the (b, n) CLS attention over patches.

        Returns:
            (b, num_classes) logits, and the attention when requested.
        """
        emb, attn = self.cls_pat(feats, mask, genes, return_attn=return_attn)
        logits = self.head(emb)
        return (logits, attn) if return_attn else logits

    @classmethod
    def from_pretrained(
        cls,
        source: nn.Module | dict | str | os.PathLike,
        *,
        gene_encoder: nn.Module | None = None,
        num_classes: int = 2,
        hidden: int = 256,
        dropout: float = 0.25,
        freeze_gene_encoder: bool = True,
        **aggregator_kwargs: Any,
    ) -> "GiMPClassifier":
        """Build a classifier whose aggregator (and gene encoder) start from pre-training.

        ``in_dim``, ``embed_dim``, ``depth`` and ``num_heads`` are read from the weights;
        other aggregator settings (``num_landmarks``, ``pinv_iterations``, ``dropout``, ...)
        come from ``aggregator_kwargs`` and must match pretraining for ``num_landmarks``.
        When ``source`` is a :class:`GiMP` module its gene encoder is taken (a copy) unless
        ``gene_encoder`` is given; from a state dict or file, pass the gene encoder built
        from the same checkpoint (:func:`gimplib.train.load_model` does this for you).

        Args:
            source: a :class:`GiMP`, its state dict, a checkpoint dict or a checkpoint path.
            gene_encoder: the gene encoder for ``CLS_ge`` (None: the module's own, if any).
            num_classes: output classes.
            hidden: MLP hidden width.
            dropout: MLP dropout.
            freeze_gene_encoder: keep the gene encoder fixed during fine-tuning.
            **aggregator_kwargs: extra :class:`PatchAggregator` arguments.
        """
        state = aggregator_state_dict(source)
        embed_dim, in_dim = state["proj.weight"].shape
        depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        num_heads = state["layers.0.attn.res_conv.weight"].shape[0]
        config = dict(in_dim=in_dim, embed_dim=embed_dim, depth=depth, num_heads=num_heads) | aggregator_kwargs
        aggregator = PatchAggregator(**config)
        aggregator.load_state_dict(state)
        if gene_encoder is None and isinstance(source, nn.Module) and exists(getattr(source, "gene_encoder", None)):
            gene_encoder = copy.deepcopy(source.gene_encoder)
        return cls(aggregator=aggregator, gene_encoder=gene_encoder, num_classes=num_classes, hidden=hidden,
                   dropout=dropout, freeze_gene_encoder=freeze_gene_encoder)
