"""The whole-slide inference path as it was before issue 14, kept as the yardstick of
``python -m gimplib.bench slide``: its outputs are what the optimised path must reproduce
(to 1e-5). Not used by the library."""

from __future__ import annotations

from math import ceil

import torch
import torch.nn.functional as F
from einops import rearrange
from nystrom_attention import NystromAttention
from nystrom_attention.nystrom_attention import moore_penrose_iter_pinv
from torch import Tensor, nn

__all__ = ["forward_before"]


@torch.no_grad()
def attention_before(
    attn: NystromAttention, norm: nn.Module, x: Tensor, *, chunk_size: int = 8192, add_to_input: bool = False
) -> Tensor:
    """``attn(norm(x), mask=all True)`` of the package for one sequence, evaluated in chunks.

    Same formula as ``NystromAttention.forward`` (landmarks = masked segment means over the
    left-padded sequence, the package's iterative pseudo-inverse, the depth-wise residual
    convolution over values), but memory grows as O(n * dim) instead of
    O(heads * n * landmarks): nothing of size (heads, n, landmarks) is held at once.

    Args:
        attn: the package module (its weights are used as they are).
        norm: the pre-norm applied to ``x`` first (e.g. a LayerNorm).
        x: (n, dim) one sequence, every row valid.
        chunk_size: tokens per chunk.
        add_to_input: add the output to ``x`` in place (the residual ``x + attn(norm(x))``)
            instead of allocating a new tensor; safe because each chunk of ``x`` is read
            (for its queries) before it is written, and keys/values are computed first.

    Returns:
        (n, dim) attention output, or ``x`` updated in place when ``add_to_input``.
    """
    assert x.ndim == 2, f"expected one sequence (n, dim), got shape {tuple(x.shape)}"
    n = x.shape[0]
    h, m = attn.heads, attn.num_landmarks
    w_q, w_k, w_v = attn.to_qkv.weight.chunk(3, dim=0)
    dh = w_q.shape[0] // h
    seg_len = ceil(n / m)  # tokens per landmark segment
    pad = (m - n % m) % m  # the package pads on the left
    seg = (torch.arange(n, device=x.device) + pad) // seg_len  # landmark index of each token
    neg = -torch.finfo(x.dtype).max

    def project(rows: slice, w: Tensor) -> Tensor:
        return rearrange(F.linear(norm(x[rows]), w), "n (h d) -> h n d", h=h)

    # pass 1: keys and values of all tokens, running sums of queries and keys per landmark
    k = x.new_empty(h, n, dh)
    v = x.new_empty(h, n, dh)
    q_sum = x.new_zeros(h, m, dh)
    k_sum = x.new_zeros(h, m, dh)
    for s in range(0, n, chunk_size):
        rows = slice(s, min(s + chunk_size, n))
        y = norm(x[rows])
        q_c, k_c, v_c = rearrange(F.linear(y, attn.to_qkv.weight), "n (three h d) -> three h n d", three=3, h=h)
        k[:, rows], v[:, rows] = k_c, v_c
        q_sum.index_add_(1, seg[rows], q_c * attn.scale)
        k_sum.index_add_(1, seg[rows], k_c)
    count = torch.bincount(seg, minlength=m).to(x.dtype)
    q_land = q_sum / (count[:, None] + attn.eps)
    k_land = k_sum / (count[:, None] + attn.eps)
    has_tokens = count > 0  # landmarks made only of padding are masked, as in the package

    # landmark kernel and its pseudo-inverse (empty landmark rows are uniform, as in the package)
    sim2 = q_land @ k_land.transpose(-1, -2)
    sim2.masked_fill_(~(has_tokens[:, None] & has_tokens[None, :]), neg)
    attn2_inv = moore_penrose_iter_pinv(sim2.softmax(dim=-1)[None], attn.pinv_iterations)[0]

    # pass 2: softmax(q_land K^T) V with a streaming softmax over key chunks
    run_max = x.new_full((h, m), float("-inf"))
    run_sum = x.new_zeros(h, m)
    acc = x.new_zeros(h, m, dh)
    for s in range(0, n, chunk_size):
        rows = slice(s, min(s + chunk_size, n))
        sim3 = q_land @ k[:, rows].transpose(-1, -2)  # (h, m, c)
        new_max = torch.maximum(run_max, sim3.amax(dim=-1))
        decay = torch.exp(run_max - new_max)
        p = torch.exp(sim3 - new_max[..., None])
        run_sum = run_sum * decay + p.sum(dim=-1)
        acc = acc * decay[..., None] + p @ v[:, rows]
        run_max = new_max
    attn3_v = acc / run_sum[..., None]
    # an all-padding landmark row is uniform over all n + pad positions; padded values are 0
    attn3_v[:, ~has_tokens] = (v.sum(dim=1) / (n + pad))[:, None, :]
    z = attn2_inv @ attn3_v  # (h, m, dh): re-associated A1 (A2^+ (A3 V))

    # pass 3: queries chunk by chunk, plus the depth-wise residual convolution of values
    out = x if add_to_input else x.new_empty(x.shape)
    if attn.residual:
        conv_w = attn.res_conv.weight  # (h, 1, kernel, 1)
        half = conv_w.shape[2] // 2
    for s in range(0, n, chunk_size):
        rows = slice(s, min(s + chunk_size, n))
        q_c = project(rows, w_q) * attn.scale
        sim1 = q_c @ k_land.transpose(-1, -2)
        sim1.masked_fill_(~has_tokens, neg)
        o = sim1.softmax(dim=-1) @ z
        if attn.residual:
            lo, hi = max(rows.start - half, 0), min(rows.stop + half, n)
            window = F.pad(v[:, lo:hi], (0, 0, half - (rows.start - lo), half - (hi - rows.stop)))
            o = o + F.conv2d(window[None], conv_w, groups=h)[0]
        o = attn.to_out(rearrange(o, "h n d -> n (h d)"))
        if add_to_input:
            out[rows] += o
        else:
            out[rows] = o
    return out


def cls_attention_before(layer: nn.Module, x: Tensor, chunk_size: int) -> Tensor:
    """Exact softmax attention of the CLS query (row 0) over all keys of ``layer``'s input.

    Args:
        layer: the layer whose attention is read.
        x: (b, n + 1, dim) the layer's input, CLS first, every row valid.
        chunk_size: keys per chunk.

    Returns:
        (b, n) head-averaged attention of CLS over the patches (CLS-to-itself dropped).
    """
    attn = layer.attn
    h = attn.heads
    w_q, w_k, _ = attn.to_qkv.weight.chunk(3, dim=0)
    q = rearrange(F.linear(layer.norm(x[:, :1]), w_q), "b 1 (h d) -> b h d", h=h) * attn.scale
    logits = []
    for s in range(0, x.shape[1], chunk_size):
        k = rearrange(F.linear(layer.norm(x[:, s : s + chunk_size]), w_k), "b n (h d) -> b h n d", h=h)
        logits.append(torch.einsum("b h d, b h n d -> b h n", q, k))
    return torch.cat(logits, dim=-1).softmax(dim=-1).mean(dim=1)[:, 1:]


@torch.no_grad()
def forward_before(model: nn.Module, feats: Tensor, return_attn: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """CLS (d,), tokens (n, d) and CLS attention (n,) of one bag (1, n, in_dim) through a
    :class:`gimplib.models.PatchAggregator`'s weights, the way the chunked path computed them
    before issue 14 (keys and queries of every token projected, CLS attention from keys)."""
    step = model.chunk_size
    n = feats.shape[1]
    seq = feats.new_empty(n + 1, model.embed_dim)
    seq[0] = model.cls_token
    for s in range(0, n, step):
        seq[1 + s : 1 + s + step] = model.embed(feats[:, s : s + step])[0]
    attn = None
    for j, layer in enumerate(model.layers):
        if return_attn and j == len(model.layers) - 1:
            attn = cls_attention_before(layer, seq[None], step)[0]
        attention_before(layer.attn, layer.norm, seq, chunk_size=step, add_to_input=True)
        if layer.ff is not None:
            for s in range(0, n + 1, step):
                seq[s : s + step] += layer.ff(seq[s : s + step])
    for s in range(0, n + 1, step):
        seq[s : s + step] = model.norm(seq[s : s + step])
    return seq[0], seq[1:], attn
