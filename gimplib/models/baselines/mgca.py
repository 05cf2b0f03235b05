"""MGCA-style image-gene pretraining: instance-, token- and prototype-level alignment.

Wang, Zhou, Hu, Wang & Yu, "Multi-Granularity Cross-modal Alignment for Generalized
Medical Visual Representation Learning", NeurIPS 2022.

What is the paper's and what is adapted (image-text -> image-gene):
    * Instance-wise alignment (ITA): InfoNCE between the projected global image and report
      embeddings, both directions summed (as the reference code does). Kept on ``CLS_img`` /
      ``CLS_ge`` (temperature 0.07).
    * Token-wise alignment (CTA): each word token attends over the image patch tokens; the
      attended image feature must match its own word against the other words of the same
      report (InfoNCE within a sample, both directions), weighted by the word's importance;
      symmetrically each patch attends over the words. Kept with *gene-fragment tokens*
      (the GroupMSA fragments, see
      :func:`~gimplib.models.baselines._pretrain.gene_fragment_tokens`) as words and the
      aggregator's patch tokens as image tokens, through separate token projection heads.
      Importance weights (the paper reads them off the last CLS attention of each encoder,
      clipped to its 10th-90th percentiles and renormalised): patches use the aggregator's
      CLS attention, fragments the GroupMSA CLS attention of their group split evenly over
      the group's fragments; both are detached, clipped and renormalised the same way.
      The token loss is the sum of the fragment-side and patch-side terms. A window has
      thousands of patches (a ViT image has 196), so the patch-side term uses at most
      ``max_token_patches`` valid patches drawn at random per sample and step (its
      similarity matrix is quadratic in their number). Padded patches take no part.
    * Prototype-level alignment (CPA): both global embeddings are scored against
      ``num_prototypes`` shared, L2-normalised prototypes; Sinkhorn-Knopp (3 iterations,
      eps = 0.05) turns each modality's scores into a balanced soft cluster assignment,
      and each modality predicts the other's assignment (swapped prediction, temperature
      0.2). Kept; the paper uses 500 prototypes for ~200k studies, we default to 32 for
      cohorts of hundreds of cases.
    * ``L = instance_weight * L_ITA + token_weight * L_CTA + proto_weight * L_CPA`` with the
      reference code's weights 1, 0.7 and 0.5. The reference code also keeps the prototypes
      themselves fixed during the first epoch (the encoders still learn from CPA); do that
      with ``model.prototypes.requires_grad_(False)`` for the first epoch's steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimplib.losses import info_nce
from gimplib.models.baselines._pretrain import (
    PRETRAINER_TINY,
    ImageGenePretrainer,
    gene_fragment_tokens,
    projection,
)
from gimplib.models.baselines.registry import aggregator_widths, register_system

__all__ = ["MGCAStyle", "sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, *, eps: float = 0.05, iters: int = 3) -> Tensor:
    """Balanced soft assignment of b samples to K prototypes (SwAV's Sinkhorn-Knopp).

    Alternately normalises ``exp(scores / eps)`` so that every prototype receives mass
    1/K and every sample 1/b; the result is rescaled so that each sample's row sums to 1.

    Args:
        scores: (b, K) similarities of samples to prototypes.

    Returns:
        (b, K) assignments, rows summing to 1.
    """
    q = torch.exp((scores - scores.max()) / eps).T  # (K, b)
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def _importance(weights: Tensor) -> Tensor:
    """Attention weights clipped to their 10th-90th percentiles and renormalised to sum 1."""
    weights = weights.float()  # quantile needs float32/64 (autocast may hand over half precision)
    low, high = torch.quantile(weights, torch.tensor([0.1, 0.9], device=weights.device))
    weights = weights.clamp(low, high)
    return weights / weights.sum().clamp_min(1e-12)


def _two_way_nce(sim: Tensor, weight: Tensor) -> Tensor:
    """Importance-weighted InfoNCE of a square similarity matrix, rows and columns (targets: diagonal)."""
    target = torch.arange(sim.shape[0], device=sim.device)
    per_token = 0.5 * (F.cross_entropy(sim, target, reduction="none") + F.cross_entropy(sim.T, target, reduction="none"))
    return (weight * per_token).sum()


@register_system("mgca", block="pretraining", cite="wang2022mgca",
                 tiny=dict(PRETRAINER_TINY, num_prototypes=4, max_token_patches=8),
                 widths=aggregator_widths, recipes={"mgca": {"gene": "groupmsa"}})
class MGCAStyle(ImageGenePretrainer):
    """MGCA-style pretraining (see the module docstring).

    Args:
        token_temperature: temperature of the token-level cross-attention and InfoNCE.
        num_prototypes: number of shared prototypes.
        proto_temperature: temperature of the swapped prototype prediction.
        sinkhorn_eps: entropy regularisation of Sinkhorn-Knopp.
        sinkhorn_iters: Sinkhorn-Knopp iterations.
        max_token_patches: patches per sample in the patch-side token loss.
        instance_weight: weight of the instance-level InfoNCE.
        token_weight: weight of the token-level loss.
        proto_weight: weight of the prototype-level loss.
        temperature: temperature of the instance-level InfoNCE.
        **cfg: :class:`~gimplib.models.baselines._pretrain.ImageGenePretrainer` arguments.
    """

    system = "MGCAStyle"

    def __init__(
        self,
        *,
        token_temperature: float = 0.1,
        num_prototypes: int = 32,
        proto_temperature: float = 0.2,
        sinkhorn_eps: float = 0.05,
        sinkhorn_iters: int = 3,
        max_token_patches: int = 512,
        instance_weight: float = 1.0,
        token_weight: float = 0.7,
        proto_weight: float = 0.5,
        temperature: float = 0.07,
        **cfg,
    ):
        super().__init__(temperature=temperature, **cfg)
        self.token_temperature, self.proto_temperature = token_temperature, proto_temperature
        self.sinkhorn_eps, self.sinkhorn_iters = sinkhorn_eps, sinkhorn_iters
        self.max_token_patches = max_token_patches
        self.instance_weight, self.token_weight, self.proto_weight = instance_weight, token_weight, proto_weight
        self.patch_proj = projection(self.embed_dim, self.proj_dim)
        self.frag_proj = projection(self.gene_encoder.embed_dim, self.proj_dim)
        self.prototypes = nn.Linear(self.proj_dim, num_prototypes, bias=False)

    def forward(
        self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """One pretraining forward; see :meth:`pretrain_step`. Returns dict(loss, loss_instance, loss_token, loss_proto)."""
        mask = self._check(feats, mask, genes)
        use_tokens = self.token_weight > 0
        # both encoders: global embeddings, tokens and the importance weights
        out = self.aggregator(feats, mask, return_attn=use_tokens)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_gene_encoder):
            cls_ge, frags, group_attn = gene_fragment_tokens(self.gene_encoder, genes)
        img, gen = self.img_proj(out.cls), self.gene_proj(cls_ge)
        # instance level (both directions summed)
        loss_instance = 2.0 * info_nce(img, gen, temperature=self.temperature, symmetric=True)
        # token level
        loss_token = feats.new_zeros(())
        if use_tokens:
            loss_token = self._token_loss(out.tokens, out.attn, mask, frags, group_attn, generator)
        # prototype level
        loss_proto = self._proto_loss(img, gen) if self.proto_weight > 0 else feats.new_zeros(())
        loss = self.instance_weight * loss_instance + self.token_weight * loss_token + self.proto_weight * loss_proto
        return dict(loss=loss, loss_instance=loss_instance, loss_token=loss_token, loss_proto=loss_proto)

    def _token_loss(
        self, tokens: Tensor, attn: Tensor, mask: Tensor, frags: Tensor, group_attn: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """Cross-attention token alignment, fragments -> patches and patches -> fragments, mean over the batch."""
        tau = self.token_temperature
        patches = F.normalize(self.patch_proj(tokens), dim=-1)  # (b, n, p)
        words = F.normalize(self.frag_proj(frags), dim=-1)  # (b, f, p)
        group_of = torch.arange(words.shape[1], device=words.device) // self.gene_encoder.group_size
        w_words = group_attn.detach()[:, group_of]
        w_patches = attn.detach()
        losses = []
        for i in range(tokens.shape[0]):
            p_i, a_i, w_i = patches[i][mask[i]], w_patches[i][mask[i]], words[i]
            # each fragment gathers its image context; it must pick out its own fragment
            ctx = F.normalize((w_i @ p_i.T / tau).softmax(dim=-1) @ p_i, dim=-1)
            loss_words = _two_way_nce(w_i @ ctx.T / tau, _importance(w_words[i]))
            # each patch (a random subset on long windows) gathers its gene context
            if p_i.shape[0] > self.max_token_patches:
                keep = torch.randperm(p_i.shape[0], device=p_i.device, generator=generator)[: self.max_token_patches]
                p_i, a_i = p_i[keep], a_i[keep]
            ctx = F.normalize((p_i @ w_i.T / tau).softmax(dim=-1) @ w_i, dim=-1)
            loss_patches = _two_way_nce(p_i @ ctx.T / tau, _importance(a_i))
            losses.append(loss_words + loss_patches)
        return torch.stack(losses).mean()

    def _proto_loss(self, img: Tensor, gen: Tensor) -> Tensor:
        """Swapped prediction of the Sinkhorn cluster assignments of the two modalities."""
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=-1))
        s_img = self.prototypes(F.normalize(img, dim=-1))
        s_gen = self.prototypes(F.normalize(gen, dim=-1))
        q_img = sinkhorn_knopp(s_img.detach(), eps=self.sinkhorn_eps, iters=self.sinkhorn_iters)
        q_gen = sinkhorn_knopp(s_gen.detach(), eps=self.sinkhorn_eps, iters=self.sinkhorn_iters)
        loss_img = -(q_gen * F.log_softmax(s_img / self.proto_temperature, dim=-1)).sum(dim=-1).mean()
        loss_gen = -(q_img * F.log_softmax(s_gen / self.proto_temperature, dim=-1)).sum(dim=-1).mean()
        return 0.5 * (loss_img + loss_gen)
