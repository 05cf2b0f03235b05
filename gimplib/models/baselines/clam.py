"""CLAM-SB and CLAM-MB: clustering-constrained attention multiple-instance learning.

Lu, Williamson, Chen, Chen, Barbieri & Mahmood, "Data-efficient and weakly supervised
computational pathology on whole-slide images", Nature Biomedical Engineering 5, 2021;
reference code github.com/mahmoodlab/CLAM (``models/model_clam.py``).

What is the paper's and what is adapted:
    * Gated attention pooling over 1024-d patch features projected to ``embed_dim``; one
      attention branch (SB) or one branch per class (MB, each class pools its own bag
      embedding and scores it with its own linear layer). Kept.
    * Instance-level clustering: per class c, an instance classifier (2 outputs) is trained
      on pseudo-labels: for the true class, the ``k_sample`` most attended patches are
      positives and the ``k_sample`` least attended ones negatives; with ``subtyping`` (the
      paper's setting for mutually exclusive subtypes, like LUAD vs LUSC) the most attended
      patches of every *other* class's branch are negatives for that class. Kept, and the
      instance loss is averaged over classes (subtyping) and over the bags of a batch.
    * Instance loss: the smooth top-1 SVM (Berrada, Zisserman & Kumar, ICLR 2018, alpha = 1,
      tau = 1) of the reference code's ``--inst_loss svm`` (its README's commands), written
      here from its formula, including the ``smooth-topk`` package's switch of a row to the
      hard SVM when its score gap is >= tau * log(1000) (``svm_hard_switch``);
      ``inst_loss="ce"`` switches to cross-entropy (the reference ``main.py`` default).
    * Objective: the paper minimises ``bag_weight * CE + (1 - bag_weight) * L_inst`` with
      bag_weight = 0.7. The engine minimises ``CE + loss_aux``, so ``loss_aux`` is
      ``(1 - bag_weight) / bag_weight * L_inst``: the same objective divided by bag_weight.
    * Bags smaller than ``2 * k_sample`` use ``k = n_valid // 2`` (the paper assumes big
      bags); bags with fewer than 2 valid patches contribute no instance loss. The instance
      loss needs the label, hence ``forward(..., y=...)``; without ``y`` it is 0.
    * Padding: padded patches get zero attention and are never sampled.
    * Parameters that legitimately get no gradient: none with ``subtyping=True`` when every
      class's branch is sampled; with ``subtyping=False`` the instance classifiers of the
      classes absent from the batch get none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from gimplib.models.baselines._common import GatedAttention, check_inputs, masked_softmax, output
from gimplib.models.baselines.registry import register_system

__all__ = ["CLAM_MB", "CLAM_SB", "smooth_top1_svm_loss"]


def smooth_top1_svm_loss(
    logits: Tensor, y: Tensor, *, alpha: float = 1.0, tau: float = 1.0, hard_thresh: float | None = None
) -> Tensor:
    """Smooth top-1 multi-class SVM loss (Berrada et al. 2018), mean over rows.

    ``L(s, y) = tau * log sum_j exp((alpha * [j != y] + s_j) / tau) - s_y``; it is the
    cross-entropy when alpha = 0 and tau = 1, and tends to the hinge loss as tau -> 0.

    With ``hard_thresh`` (the ``smooth-topk`` package's ``SmoothTop1SVM``, which CLAM uses,
    has 1000), a row whose two largest scores differ by at least ``tau * log(hard_thresh)``
    takes the hard loss ``max_j (s_j + alpha * [j != y]) - s_y`` instead, as that package does.

    Args:
        logits: scores s (m, C).
        y: target classes (m,).
        alpha: margin.
        tau: temperature.
        hard_thresh: switch rows with a large score gap to the hard SVM; None = never.
    """
    margin = alpha * (1.0 - F.one_hot(y, logits.shape[-1]).to(logits.dtype))
    s_y = logits.gather(1, y[:, None]).squeeze(1)
    loss = tau * torch.logsumexp((logits + margin) / tau, dim=-1) - s_y
    if hard_thresh is not None and logits.shape[-1] > 1:
        top2 = logits.detach().topk(2, dim=-1).values
        hard = (top2[:, 0] - top2[:, 1]) >= tau * math.log(hard_thresh)
        loss = torch.where(hard, (logits + margin).amax(dim=-1) - s_y, loss)
    return loss.mean()


class _CLAM(nn.Module):
    multi_branch: bool = False

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        inst_loss: str = "svm",
        bag_weight: float = 0.7,
        subtyping: bool = True,
        svm_hard_switch: bool = True,
    ):
        super().__init__()
        if inst_loss not in ("svm", "ce"):
            raise ValueError(f"{type(self).__name__}: inst_loss must be 'svm' or 'ce'; got {inst_loss!r}")
        if not 0.0 < bag_weight <= 1.0:
            raise ValueError(f"{type(self).__name__}: bag_weight must be in (0, 1]; got {bag_weight}")
        self.in_dim, self.num_classes = in_dim, num_classes
        self.k_sample, self.inst_loss, self.subtyping = k_sample, inst_loss, subtyping
        self.inst_weight = (1.0 - bag_weight) / bag_weight
        self.svm_hard_thresh = 1e3 if svm_hard_switch else None
        self.encoder = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        branches = num_classes if self.multi_branch else 1
        self.attention = GatedAttention(in_dim=embed_dim, hidden=attn_dim, num_branches=branches, dropout=dropout)
        self.instance_classifiers = nn.ModuleList([nn.Linear(embed_dim, 2) for _ in range(num_classes)])

    def _bag_logits(self, bags: Tensor) -> Tensor:
        raise NotImplementedError

    def _instance_loss(self, h: Tensor, scores: Tensor, mask: Tensor, y: Tensor) -> Tensor:
        """Pseudo-labelled instance loss, averaged over the bags that can be sampled."""
        losses = []
        for i in range(h.shape[0]):
            valid = mask[i]
            n_valid = int(valid.sum())
            if n_valid < 2:
                continue
            k = min(self.k_sample, n_valid // 2)
            h_i, s_i = h[i][valid], scores[i][valid]
            per_class = []
            for c, clf in enumerate(self.instance_classifiers):
                a = s_i[:, c if self.multi_branch else 0]
                top = a.topk(k).indices
                if c == int(y[i]):
                    idx = torch.cat([top, (-a).topk(k).indices])
                    target = torch.cat([torch.ones(k), torch.zeros(k)]).to(device=h.device, dtype=torch.long)
                elif self.subtyping:
                    idx, target = top, torch.zeros(k, device=h.device, dtype=torch.long)
                else:
                    continue
                logits = clf(h_i[idx])
                if self.inst_loss == "svm":
                    per_class.append(smooth_top1_svm_loss(logits, target, hard_thresh=self.svm_hard_thresh))
                else:
                    per_class.append(F.cross_entropy(logits, target))
            losses.append(torch.stack(per_class).mean())
        if not losses:
            return h.new_zeros(())
        return torch.stack(losses).mean()

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n), y (b,) | None -> dict(logits (b, C), loss_aux, attn (b, n), loss_inst).

        ``attn`` is the attention of the single branch (SB) or of the predicted class (MB).
        """
        mask = check_inputs(type(self).__name__, feats, mask, in_dim=self.in_dim)
        # patch embeddings and per-branch attention over the valid patches
        h = self.encoder(feats)
        scores = self.attention(h)
        attn = masked_softmax(scores, mask[..., None], dim=1)
        # one bag embedding per branch -> bag logits
        bags = einsum(attn, h, "b n k, b n e -> b k e")
        logits = self._bag_logits(bags)
        # instance-level clustering on the most / least attended patches
        loss_inst = self._instance_loss(h, scores, mask, y) if y is not None else h.new_zeros(())
        if self.multi_branch:
            pred = logits.argmax(dim=-1)
            attn_out = attn.gather(2, pred[:, None, None].expand(-1, attn.shape[1], 1))
        else:
            attn_out = attn
        return output(logits, self.inst_weight * loss_inst, attn=rearrange(attn_out, "b n 1 -> b n"), loss_inst=loss_inst.detach())


@register_system("clam_sb", block="pathology", cite="lu2021clam", tiny=dict(embed_dim=16, attn_dim=8, k_sample=3),
                 widths=lambda embed_dim, **_: dict(embed_dim=embed_dim))
class CLAM_SB(_CLAM):
    """CLAM, single attention branch.

    Args:
        in_dim: patch feature size D.
        num_classes: number of bag classes C.
        embed_dim: patch embedding size (CLAM "small": 512).
        attn_dim: hidden size of the gated attention (CLAM "small": 256).
        dropout: dropout after the encoder and inside the attention.
        k_sample: patches sampled per side for the instance loss.
        inst_loss: "svm" (smooth top-1 SVM, default) or "ce".
        bag_weight: weight of the bag loss in the paper's objective (0.7).
        subtyping: also train every other class's instance classifier on negatives.
        svm_hard_switch: rows with a score gap >= log(1000) take the hard SVM loss, as the
            reference code's ``SmoothTop1SVM`` (off: always the smooth loss).
    """

    multi_branch = False

    def __init__(self, **cfg):
        super().__init__(**cfg)
        self.classifier = nn.Linear(self.encoder[0].out_features, self.num_classes)

    def _bag_logits(self, bags: Tensor) -> Tensor:
        return self.classifier(bags[:, 0])


@register_system("clam_mb", block="pathology", cite="lu2021clam", tiny=dict(embed_dim=16, attn_dim=8, k_sample=3),
                 widths=lambda embed_dim, **_: dict(embed_dim=embed_dim))
class CLAM_MB(_CLAM):
    """CLAM, one attention branch and one bag classifier per class (same arguments as CLAM_SB)."""

    multi_branch = True

    def __init__(self, **cfg):
        super().__init__(**cfg)
        embed_dim = self.encoder[0].out_features
        self.classifiers = nn.ModuleList([nn.Linear(embed_dim, 1) for _ in range(self.num_classes)])

    def _bag_logits(self, bags: Tensor) -> Tensor:
        return torch.cat([clf(bags[:, c]) for c, clf in enumerate(self.classifiers)], dim=-1)
