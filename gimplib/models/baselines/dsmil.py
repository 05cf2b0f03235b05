"""DSMIL: dual-stream multiple-instance learning.

Li, Li & Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide Image
Classification with Self-supervised Contrastive Learning", CVPR 2021; reference code
github.com/binli123/dsmil-wsi (``dsmil.py``: ``FCLayer`` + ``BClassifier``).

What is the paper's and what is adapted:
    * Stream 1 (max-pooling instance classifier): a linear instance classifier scores every
      patch per class; the bag score of stream 1 is the per-class maximum. Kept.
    * Stream 2 (critical-instance attention): for each class the highest-scoring patch is the
      critical instance; every patch attends to it through a query projection
      (``softmax_i(<q_i, q_m> / sqrt(k))``), the attention-weighted values form one bag
      embedding per class, and a 1-D convolution over the class axis (kernel = the value
      width) gives the bag logits. Kept: query projection Linear -> ReLU -> Linear -> Tanh
      (the reference code's non-linear option; ``nonlinear_query=False`` gives its plain
      Linear); the values are the features themselves, as in the reference code's default
      (``passing_v=False``); ``value_projection=True`` gives its other option, Dropout +
      Linear (D -> D) + ReLU, which costs a D x D product per patch.
    * Loss: the paper trains with the sum of a bag loss and the max-instance loss. Here
      ``logits`` is the bag stream (what the engine trains with cross-entropy and what the
      metrics read) and ``loss_aux = max_loss_weight * CE(max-instance logits, y)``; with
      the default weight 1 the objective is twice the paper's 0.5/0.5 average. The paper
      uses binary cross-entropy per class (multi-label); with one label per bag we use
      softmax cross-entropy for both streams. ``logits_max`` is returned too.
    * Features: the paper trains its own SimCLR embedder; we use the given patch features.
      The multi-scale variant is not used (one magnification).
    * Padding: padded patches can be neither the critical instance nor attended to.
    * Gradients: the critical instance is chosen by an argmax, so the instance classifier
      learns only from the max-instance loss; without ``y`` it gets no gradient (by design).
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange, repeat
from torch import Tensor, nn

from gimplib.models.baselines._common import ce_or_zero, check_inputs, output
from gimplib.models.baselines.registry import register_system

__all__ = ["DSMIL"]


@register_system("dsmil", block="pathology", cite="li2021dsmil", tiny=dict(query_dim=8))
class DSMIL(nn.Module):
    """Dual-stream MIL classifier.

    Args:
        in_dim: patch feature size D (also the value width, as in the paper).
        num_classes: number of bag classes C.
        query_dim: width of the query projection.
        dropout: dropout on the value projection's input (with ``value_projection``).
        nonlinear_query: two-layer tanh query projection instead of one Linear.
        max_loss_weight: weight of the max-instance loss returned as ``loss_aux``.
        value_projection: pass the values through Dropout + Linear (D -> D) + ReLU instead of
            using the features as they are (the reference code's ``passing_v``).
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        query_dim: int = 128,
        dropout: float = 0.0,
        nonlinear_query: bool = True,
        max_loss_weight: float = 1.0,
        value_projection: bool = False,
    ):
        super().__init__()
        self.in_dim = in_dim
        self.max_loss_weight = max_loss_weight
        self.instance_classifier = nn.Linear(in_dim, num_classes)
        if nonlinear_query:
            self.query = nn.Sequential(nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
        else:
            self.query = nn.Linear(in_dim, query_dim)
        if value_projection:
            self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim), nn.ReLU())
        else:
            self.value = nn.Identity()
        # one output per class, read off that class's bag embedding and the others'
        self.bag_classifier = nn.Conv1d(num_classes, num_classes, kernel_size=in_dim)

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n), y (b,) | None -> dict(logits (b, C), loss_aux, attn (b, n), logits_max (b, C),
        attn_classes (b, n, C)).

        ``attn`` is the critical-instance attention of the predicted class; ``attn_classes``
        holds every class's (the reference code's ``A``).
        """
        mask = check_inputs("DSMIL", feats, mask, in_dim=self.in_dim)
        # stream 1: instance scores, max over the valid patches
        inst = self.instance_classifier(feats)
        inst = inst.masked_fill(~mask[..., None], float("-inf"))
        logits_max, critical = inst.max(dim=1)
        # stream 2: attention of every patch to each class's critical instance
        q = self.query(feats)
        crit_feats = torch.gather(feats, 1, repeat(critical, "b c -> b c d", d=feats.shape[-1]))
        q_crit = self.query(crit_feats)
        sim = einsum(q, q_crit, "b n k, b c k -> b n c") / math.sqrt(q.shape[-1])
        attn = sim.masked_fill(~mask[..., None], float("-inf")).softmax(dim=1)
        bag = einsum(attn, self.value(feats), "b n c, b n d -> b c d")
        logits = rearrange(self.bag_classifier(bag), "b c 1 -> b c")
        loss_aux = self.max_loss_weight * ce_or_zero(logits_max, y)
        pred = logits.argmax(dim=-1)
        attn_pred = torch.gather(attn, 2, repeat(pred, "b -> b n 1", n=attn.shape[1]))
        return output(logits, loss_aux, attn=rearrange(attn_pred, "b n 1 -> b n"), logits_max=logits_max, attn_classes=attn)
