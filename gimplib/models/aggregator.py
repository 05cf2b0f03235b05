"""The Nystrom patch aggregator of GiMP (paper Sect. 2.2), TransMIL-style.

``Linear(in_dim -> embed_dim) + ReLU`` on every patch feature (with zero-mean weight rows,
see below), a learnable ``CLS_img`` token in front, ``depth = 2`` pre-norm layers
``x = x + NystromAttention(LayerNorm(x))`` from the ``nystrom-attention`` package, and a
final LayerNorm. The CLS output is ``CLS_img`` (pretraining) / ``CLS_pat`` (fine-tuning).

What a caller can rely on (the measurements behind each point are in the book's
architecture page, section "Measurements behind the models' defaults"):

* Masks: a padding mask is honoured by *compaction* (each padded sample runs alone on its
  valid rows), so padded rows change nothing, exactly; the package's own ``mask`` argument
  does not guarantee that. ``mask=None`` is TransMIL's usage (zero-padded keys).
* In a batched call one sample's output depends slightly on the others (the package's
  pseudo-inverse is initialised from the whole batch); batch size 1 is unaffected.
* Long bags: in eval mode without autograd, sequences longer than ``chunk_size`` run the
  same Nystrom formula in chunks of tokens (equal to float precision, far less memory).
* ``return_attn=True``: per patch, the exact softmax attention of the CLS query over all
  keys of the last layer's input, averaged over heads (computed key-chunk by key-chunk;
  the CLS-to-itself entry is dropped, so a row sums to slightly less than 1; padding gets 0).
* ``center_proj=True`` (default): the input projection uses zero-mean rows
  ``W - W.mean(dim=1)`` (centred weights, Huang et al., ICCV 2017), which keeps its ReLU
  units alive on non-negative features under Adam; same parameters and state-dict keys as
  ``nn.Linear``; ``center_proj=False`` restores ``ReLU(Linear(x))``. Keep the learning rate
  at or below about 1e-3.

Choices the paper leaves open (constructor arguments): ``embed_dim = 512``,
``num_heads = 8`` (head width ``embed_dim // num_heads``), ``num_landmarks = 256``
(TransMIL uses ``embed_dim // 2``), ``pinv_iterations = 6``, the package's depth-wise
residual convolution over values (kernel 33) kept on as in TransMIL, ``dropout = 0.1`` on
the attention output, and no feed-forward block (TransMIL's TransLayer has none;
``ff_mult > 0`` adds one).
"""

from __future__ import annotations

from math import ceil

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from nystrom_attention import NystromAttention
from nystrom_attention.nystrom_attention import moore_penrose_iter_pinv
from torch import Tensor, nn

from gimplib.utils import exists

__all__ = [
    "AggregatorOutput",
    "NystromLayer",
    "PatchAggregator",
    "nystrom_attention_chunked",
    "nystrom_attention_valid",
]


def _row_index(which: Tensor) -> Tensor:
    """Flat row numbers of the True entries of a (b, n) bool mask, in row-major order."""
    return which.reshape(-1).nonzero().squeeze(1)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[which]`` for a (b, n, d) ``x``, given ``index = _row_index(which)``: a row gather.

    The same rows in the same order as boolean indexing, which PyTorch runs as a masked
    select over every value (about 60 ms per pretraining step at paper shapes on 2 CPU
    threads); gathering whole rows by index is a copy, and its backward an index add.
    """
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


class AggregatorOutput:
    """What :class:`PatchAggregator` returns.

    Attributes:
        cls: (b, embed_dim) the CLS output (``CLS_img`` / ``CLS_pat``).
        tokens: (b, n, embed_dim) patch outputs (zeros at padded positions, and, when
            :meth:`PatchAggregator.encode` was given ``need``, wherever ``need`` is False).
        attn: (b, n) CLS attention over patches, or None when not requested.
        needed: (k, embed_dim) the outputs at the k positions where ``need`` is True, in
            row-major order (``tokens[need]``), or None without ``need``. When only those
            rows were computed, ``tokens`` is built from them on first access, so a caller
            that reads ``needed`` alone (MPM's loss) never scatters them into a (b, n) tensor
            only to gather them back.
    """

    def __init__(
        self,
        cls: Tensor,
        tokens: Tensor | None = None,
        attn: Tensor | None = None,
        *,
        needed: Tensor | None = None,
        need: Tensor | None = None,
    ) -> None:
        assert exists(tokens) or (exists(needed) and exists(need)), "tokens, or needed with need"
        self.cls, self.attn, self.needed = cls, attn, needed
        self._tokens, self._need = tokens, need

    @property
    def tokens(self) -> Tensor:
        if self._tokens is None:  # rows back in place by index (a masked scatter's backward is slow)
            (b, n), d = self._need.shape, self.needed.shape[-1]
            index = _row_index(self._need)
            self._tokens = self.needed.new_zeros(b * n, d).index_copy(0, index, self.needed).view(b, n, d)
        return self._tokens


class NystromLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))`` (plus an optional pre-norm feed-forward block).

    Args:
        dim: token width.
        num_heads: attention heads; head width is ``dim // num_heads``.
        num_landmarks: Nystrom landmarks.
        pinv_iterations: iterations of the Moore-Penrose pseudo-inverse.
        dropout: dropout on the attention output.
        ff_mult: width multiplier of a feed-forward block; 0 for none (TransMIL).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        ff_mult: int = 0,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim=dim,
            dim_head=dim // num_heads,
            heads=num_heads,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            residual=True,
            dropout=dropout,
        )
        self.ff = (
            nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * ff_mult, dim)
            )
            if ff_mult
            else None
        )

    def forward(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """(b, n, dim) tokens, all valid -> (b, n, dim), or (b, r, dim) at ``rows`` (b, r) only."""
        attn = nystrom_attention_valid(self.attn, self.norm(x), rows)
        x = (x if rows is None else x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))) + attn
        if exists(self.ff):
            x = x + self.ff(x)
        return x

    @torch.no_grad()
    def forward_chunked_(self, x: Tensor, chunk_size: int) -> Tensor:
        """In-place, chunked, no-autograd version of :meth:`forward` for one long sequence (n, dim)."""
        n = x.shape[0]
        nystrom_attention_chunked(self.attn, self.norm, x, chunk_size=chunk_size, add_to_input=True)
        if exists(self.ff):
            for s in range(0, n, chunk_size):
                x[s : s + chunk_size] += self.ff(x[s : s + chunk_size])
        return x


def nystrom_attention_valid(attn: NystromAttention, x: Tensor, rows: Tensor | None = None) -> Tensor:
    """``attn(x, mask=all True)`` of the package, computed without its wasted work.

    The same formula as ``NystromAttention.forward`` with an all-True mask (left padding to a
    multiple of the landmarks, landmarks as masked segment means, landmarks made only of
    padding masked, the package's iterative pseudo-inverse with its batch-wide scale, the
    depth-wise residual convolution over values), autograd-friendly, but: no padded rows are
    projected, no (b, h, n, landmarks) mask is filled, the product is re-associated as
    ``A1 (A2^+ (A3 V))`` so the (n, landmarks) x (landmarks, landmarks) product is never
    formed, ``A3 V`` and ``A1 Z`` run as fused attention kernels
    (``F.scaled_dot_product_attention``: their score matrices are never stored, the backward
    recomputes them), and the residual convolution is exact block-Toeplitz matrix products
    (issue 14; equal to the package's forward in float64 for outputs and every gradient,
    tested). The output dropout draws its keep-mask from a uniform draw
    (:func:`_dropout`): the package's distribution, another random stream.

    Args:
        attn: the package module (its weights and settings are used as they are).
        x: (b, n, dim) tokens (already normalised), every row valid.
        rows: (b, r) long, the only rows whose output is wanted (None: all); every token
            still serves as key, value and landmark, only the queries are cut.

    Returns:
        (b, n, dim) attention output (after ``attn.to_out``, dropout included), or
        (b, r, dim) at ``rows``.
    """
    assert x.ndim == 3, f"expected tokens (b, n, dim), got shape {tuple(x.shape)}"
    b, n, _ = x.shape
    h, m = attn.heads, attn.num_landmarks
    seg_len = ceil(n / m)  # tokens per landmark segment
    pad = m * seg_len - n  # the package pads on the left (0 when n % m == 0)
    empty = pad // seg_len  # leading landmarks made only of padding
    first = seg_len - pad % seg_len  # real tokens in the first non-empty segment

    # landmarks: segment means of the tokens, projected (the projection is linear, so this
    # is the package's mean of projected queries / keys, without a padded copy)
    x_sum = torch.cat([x[:, :first].sum(1, keepdim=True), reduce(x[:, first:], "b (m l) d -> b m d", "sum", l=seg_len)], 1)
    count = torch.full((m - empty, 1), float(seg_len), dtype=x.dtype, device=x.device)
    count[0] = first
    x_land = x_sum / (count + attn.eps)
    w_q, w_k, w_v = attn.to_qkv.weight.chunk(3, dim=0)
    q_land = rearrange(F.linear(x_land, w_q), "b m (h d) -> b h m d", h=h) * attn.scale
    k_land = rearrange(F.linear(x_land, w_k), "b m (h d) -> b h m d", h=h)

    # queries, keys and values as (b, h, n, dh) views of three (b, n, h * dh) products: the
    # attention kernels read (and write their gradients in) that layout, so neither
    # direction copies them into head-major order, as one qkv product split by head would
    x_q = x if rows is None else x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
    q, k, v = (rearrange(F.linear(t, w), "b n (h d) -> b h n d", h=h) for t, w in ((x_q, w_q), (x, w_k), (x, w_v)))
    # landmark kernel; a landmark made only of padding has a uniform row and a zero column
    attn2 = (q_land @ k_land.transpose(-1, -2)).softmax(dim=-1)
    # A3 V and A1 Z are softmax(Q K^T) V products: fused attention kernels compute them
    # without storing the (landmarks, n) and (n, landmarks) score matrices (issue 14)
    attn3_v = F.scaled_dot_product_attention(q_land, k, v, scale=1.0)  # (b, h, m - empty, dh)
    if empty:
        attn2 = torch.cat(
            [attn2.new_full((b, h, empty, m), 1.0 / m), F.pad(attn2, (empty, 0))], dim=2
        )
        # its A3 row is uniform over all n + pad keys, whose padded values are 0
        uniform_v = (v.sum(dim=2, keepdim=True) / (n + pad)).expand(b, h, empty, v.shape[-1])
        attn3_v = torch.cat([uniform_v, attn3_v], dim=2)
    attn2_inv = moore_penrose_iter_pinv(attn2, attn.pinv_iterations)
    z = attn2_inv[:, :, empty:] @ attn3_v  # rows of the landmarks the queries can see

    out = F.scaled_dot_product_attention(q, k_land, z, scale=attn.scale)
    if attn.residual:
        conv = _residual_conv(attn.res_conv.weight, v)
        if rows is not None:
            conv = conv.gather(2, repeat(rows, "b r -> b h r d", h=h, d=conv.shape[-1]))
        out = out + conv
    linear, dropout = attn.to_out
    return _dropout(linear(rearrange(out, "b h n d -> b n (h d)")), dropout)


def _dropout(x: Tensor, module: nn.Dropout) -> Tensor:
    """``module(x)`` (inverted dropout: zero with probability p, scale the rest by 1 / (1 - p)),
    with the keep-mask drawn as ``uniform >= p``: the same distribution as ``nn.Dropout``'s
    Bernoulli draw (a different random stream), at half its cost on CPU (issue 14)."""
    p = module.p
    if not module.training or p == 0:
        return x
    if p >= 1:
        return x * 0
    return x * (torch.rand_like(x) >= p).to(x.dtype).mul_(1 / (1 - p))


def _residual_conv(weight: Tensor, v: Tensor) -> Tensor:
    """The package's depth-wise residual convolution of values, as block-Toeplitz matmuls.

    ``res_conv`` is a ``Conv2d(h, h, (kernel, 1), groups=h, padding=kernel // 2)`` over
    (b, h, n, dh) values. PyTorch's CPU (oneDNN) gradient of that Conv2d's weight is off by
    up to 10 % relative at some lengths (measured: n = 61, 6001, 6016; right at 6144, the
    package's padded length at paper shapes), and its Conv1d form is slow in backward. Here
    the sequence is cut into blocks of ``block`` rows and each block of output is one
    (block, 2 block) Toeplitz matrix of its head's kernel times the block's rows and the next
    block's (:class:`_ResidualConv`): exact, and about ``2 block / kernel`` (1.9) times the
    convolution's multiply-adds.

    Args:
        weight: (h, 1, kernel, 1) ``res_conv.weight``.
        v: (b, h, n, dh) values (any strides).

    Returns:
        (b, h, n, dh) the convolved values (a permuted view of a (h, n, b, dh) buffer).
    """
    return _ResidualConv.apply(weight, v)


class _ResidualConv(torch.autograd.Function):
    """The residual convolution's forward and backward on one buffer of blocks.

    Every head's zero-padded sequence is cut into ``nbh`` blocks of ``block`` rows, with the
    batch and head width side by side as columns, and the heads' blocks laid end to end in
    one (h * nbh + 1, block, b * dh) buffer, so that "a block and the next one" is a single
    overlapping strided view (no halo is copied) and one batched matmul covers every head and
    sample. A head's last block reads into the next head's first one; its outputs lie past
    the sequence and are dropped (their gradient is 0), which is why each head has one block
    more than its outputs need. The backward computes the values' and the kernel's gradients
    from the same buffer.
    """

    @staticmethod
    def _layout(weight: Tensor, v: Tensor) -> tuple[int, int, int]:
        kernel = weight.shape[2]
        block = max(32, kernel - 1)  # a block and the next one hold every row an output needs
        return kernel, block, ceil(v.shape[2] / block) + 1

    @staticmethod
    def _halo(buf: Tensor, block: int) -> Tensor:
        """(h * nbh, 2 block, b * dh) overlapping view: each block with the next one."""
        return buf.as_strided((buf.shape[0] - 1, 2 * block, buf.shape[2]), (buf.stride(0), buf.stride(1), 1))

    @staticmethod
    def forward(ctx, weight: Tensor, v: Tensor) -> Tensor:
        b, h, n, dh = v.shape
        kernel, block, nbh = _ResidualConv._layout(weight, v)
        half = kernel // 2
        buf = v.new_empty(h * nbh + 1, block, b * dh)
        seqs = buf[:-1].view(h, nbh * block, b, dh)
        seqs[:, :half] = 0
        seqs[:, half : half + n] = v.permute(1, 2, 0, 3)
        seqs[:, half + n :] = 0
        buf[-1] = 0
        offset = torch.arange(2 * block, device=v.device)[None] - torch.arange(block, device=v.device)[:, None]
        inside = (offset >= 0) & (offset < kernel)
        toeplitz = (weight[:, 0, :, 0][:, offset.clamp(0, kernel - 1)] * inside).to(v.dtype)  # (h, block, 2 block)
        toeplitz = toeplitz[:, None].expand(h, nbh, block, 2 * block).reshape(h * nbh, block, 2 * block)
        out = torch.bmm(toeplitz, _ResidualConv._halo(buf, block))
        ctx.save_for_backward(buf, toeplitz)
        ctx.sizes, ctx.kernel = (b, h, n, dh), kernel
        return out.view(h, nbh * block, b, dh)[:, :n].permute(2, 0, 1, 3)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        buf, toeplitz = ctx.saved_tensors
        b, h, n, dh = ctx.sizes
        block = buf.shape[1]
        nbh = (buf.shape[0] - 1) // h
        kernel = ctx.kernel
        g = grad.new_empty(h * nbh, block, b * dh)
        g_seqs = g.view(h, nbh * block, b, dh)
        g_seqs[:, :n] = grad.permute(1, 2, 0, 3)
        g_seqs[:, n:] = 0
        grad_weight = grad_v = None
        if ctx.needs_input_grad[1]:
            g_halo = torch.bmm(toeplitz.transpose(1, 2), g)  # (h * nbh, 2 block, b * dh)
            g_buf = g_halo.new_empty(buf.shape)
            g_buf[:-1] = g_halo[:, :block]
            g_buf[-1] = 0
            g_buf[1:] += g_halo[:, block:]
            half = kernel // 2
            grad_v = g_buf[:-1].view(h, nbh * block, b, dh)[:, half : half + n].permute(2, 0, 1, 3)
        if ctx.needs_input_grad[0]:
            g_toeplitz = torch.bmm(g, _ResidualConv._halo(buf, block).transpose(1, 2)).view(h, nbh, block, 2 * block).sum(1)
            index = torch.arange(block, device=g.device)[:, None] + torch.arange(kernel, device=g.device)[None]
            grad_weight = g_toeplitz.gather(2, index.expand(h, block, kernel)).sum(1).view(h, 1, kernel, 1)
        return grad_weight, grad_v


@torch.no_grad()
def nystrom_attention_chunked(
    attn: NystromAttention,
    norm: nn.Module,
    x: Tensor,
    *,
    chunk_size: int = 8192,
    add_to_input: bool = False,
) -> Tensor:
    """``attn(norm(x), mask=all True)`` of the package for one sequence, evaluated in chunks.

    Same formula as ``NystromAttention.forward`` (landmarks = masked segment means over the
    left-padded sequence, the package's iterative pseudo-inverse, the depth-wise residual
    convolution over values), but memory grows as O(n * dim) instead of
    O(heads * n * landmarks): nothing of size (heads, n, landmarks) is held at once, and of
    the projections only the values are kept for the whole sequence. Every projection is
    computed once: landmarks come from segment means of ``norm(x)`` (the projection is
    linear), keys are used chunk by chunk as they are made.

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
    w_kv = attn.to_qkv.weight[w_q.shape[0] :]
    dh = w_q.shape[0] // h
    seg_len = ceil(n / m)  # tokens per landmark segment
    pad = (m - n % m) % m  # the package pads on the left
    seg = (torch.arange(n, device=x.device) + pad) // seg_len  # landmark index of each token
    neg = -torch.finfo(x.dtype).max

    # pass 1: landmarks from segment sums of norm(x) (no projection of the tokens yet)
    y_sum = x.new_zeros(m, x.shape[1])
    for s in range(0, n, chunk_size):
        rows = slice(s, min(s + chunk_size, n))
        y_sum.index_add_(0, seg[rows], norm(x[rows]))
    count = torch.bincount(seg, minlength=m).to(x.dtype)
    y_land = y_sum / (count[:, None] + attn.eps)
    q_land = rearrange(F.linear(y_land, w_q), "m (h d) -> h m d", h=h) * attn.scale
    k_land = rearrange(F.linear(y_land, w_k), "m (h d) -> h m d", h=h)
    has_tokens = count > 0  # landmarks made only of padding are masked, as in the package

    # landmark kernel and its pseudo-inverse (empty landmark rows are uniform, as in the package)
    sim2 = q_land @ k_land.transpose(-1, -2)
    sim2.masked_fill_(~(has_tokens[:, None] & has_tokens[None, :]), neg)
    attn2_inv = moore_penrose_iter_pinv(sim2.softmax(dim=-1)[None], attn.pinv_iterations)[0]

    # pass 2: keys and values chunk by chunk; softmax(q_land K^T) V with a streaming softmax
    v = x.new_empty(h, n, dh)
    run_max = x.new_full((h, m), float("-inf"))
    run_sum = x.new_zeros(h, m)
    acc = x.new_zeros(h, m, dh)
    for s in range(0, n, chunk_size):
        rows = slice(s, min(s + chunk_size, n))
        k_c, v_c = rearrange(F.linear(norm(x[rows]), w_kv), "n (two h d) -> two h n d", two=2, h=h)
        v[:, rows] = v_c
        sim3 = q_land @ k_c.transpose(-1, -2)  # (h, m, c)
        new_max = torch.maximum(run_max, sim3.amax(dim=-1))
        decay = torch.exp(run_max - new_max)
        p = sim3.sub_(new_max[..., None]).exp_()
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
    k_land_t = k_land.transpose(-1, -2).contiguous()
    all_landmarks = bool(has_tokens.all())  # then there is nothing to mask (e.g. 148,570 tokens)
    for s in range(0, n, chunk_size):
        rows = slice(s, min(s + chunk_size, n))
        q_c = rearrange(F.linear(norm(x[rows]), w_q), "n (h d) -> h n d", h=h) * attn.scale
        sim1 = q_c @ k_land_t
        if not all_landmarks:
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


def _cls_attention(layer: NystromLayer, x: Tensor, chunk_size: int) -> Tensor:
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
    # q . (W_k y) = (W_k^T q) . y per head: the keys of all tokens are never formed
    u = torch.einsum("b h d, h d c -> b h c", q, rearrange(w_k, "(h d) c -> h d c", h=h))
    logits = []
    for s in range(0, x.shape[1], chunk_size):
        logits.append(torch.einsum("b h c, b n c -> b h n", u, layer.norm(x[:, s : s + chunk_size])))
    return torch.cat(logits, dim=-1).softmax(dim=-1).mean(dim=1)[:, 1:]


class PatchAggregator(nn.Module):
    """Nystrom-attention MIL aggregator with a CLS token (GiMP Sect. 2.2). See the module docstring.

    Args:
        in_dim: patch feature width (1024 for CLAM's ResNet50-trunc features).
        embed_dim: token width ``d``.
        depth: Nystrom layers.
        num_heads: attention heads.
        num_landmarks: Nystrom landmarks.
        pinv_iterations: pseudo-inverse iterations.
        dropout: dropout on the attention outputs.
        ff_mult: feed-forward width multiplier per layer; 0 (default) for none, as TransMIL.
        chunk_size: in eval mode without autograd, sequences longer than this run through
            the chunked evaluation (and attention maps are computed in chunks of this size).
        center_proj: give the input projection zero-mean rows (see the module docstring);
            False for the plain ``ReLU(Linear(x))``.
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        embed_dim: int = 512,
        depth: int = 2,
        num_heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        ff_mult: int = 0,
        chunk_size: int = 2048,
        center_proj: bool = True,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.center_proj = center_proj
        self.embed_dim = embed_dim
        self.chunk_size = chunk_size
        self.proj = nn.Linear(in_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(embed_dim) * 0.02)
        self.layers = nn.ModuleList(
            [
                NystromLayer(
                    dim=embed_dim,
                    num_heads=num_heads,
                    num_landmarks=num_landmarks,
                    pinv_iterations=pinv_iterations,
                    dropout=dropout,
                    ff_mult=ff_mult,
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)

    def embed(self, feats: Tensor) -> Tensor:
        """Input projection: (b, n, in_dim) -> (b, n, embed_dim), ``ReLU(Linear(feats))``.

        With ``center_proj`` the weight rows are centred first (``W - W.mean(dim=1)``), i.e.
        ``ReLU(W (x - mean(x)) + b)`` with ``mean(x)`` each patch's mean over its features.
        """
        assert feats.ndim == 3 and feats.shape[-1] == self.in_dim, (
            f"feats must be (b, n, {self.in_dim}), got shape {tuple(feats.shape)}"
        )
        weight = self.proj.weight
        if self.center_proj:
            weight = weight - weight.mean(dim=1, keepdim=True)
        return F.relu(F.linear(feats, weight, self.proj.bias))

    def forward(self, feats: Tensor, mask: Tensor | None = None, return_attn: bool = False) -> AggregatorOutput:
        """Aggregate bags of patch features.

        Args:
            feats: (b, n, in_dim) patch features.
            mask: (b, n) bool, True for valid patches; None when all are valid.
            return_attn: also return the CLS attention over patches (see module docstring).

        Returns:
            :class:`AggregatorOutput` with ``cls`` (b, d), ``tokens`` (b, n, d), ``attn`` (b, n) | None.
        """
        assert feats.ndim == 3 and feats.shape[-1] == self.in_dim, (
            f"feats must be (b, n, {self.in_dim}), got shape {tuple(feats.shape)}"
        )
        if self._chunked(feats.shape[1]) and (not exists(mask) or bool(mask.all())):
            # project chunk by chunk straight into the sequence buffer: no full-size copies
            return self._run_chunked(feats, return_attn, embedded=False)
        return self.encode(self.embed(feats), mask, return_attn=return_attn)

    def _chunked(self, n: int) -> bool:
        return not self.training and not torch.is_grad_enabled() and n + 1 > self.chunk_size

    def encode(
        self, x: Tensor, mask: Tensor | None = None, return_attn: bool = False, need: Tensor | None = None
    ) -> AggregatorOutput:
        """Run CLS + Nystrom layers on already projected tokens (what MPM uses after masking).

        Args:
            x: (b, n, embed_dim) projected patch tokens.
            mask: (b, n) bool, True for valid tokens; None when all are valid.
            return_attn: also return the CLS attention over patches.
            need: (b, n) bool, the only tokens whose output is wanted (MPM: the masked
                ones); the last layer then runs its queries on those rows and CLS only, and
                ``tokens`` is 0 elsewhere (None: every token). Skipped when the samples of
                a call need different numbers of rows.

        Returns:
            :class:`AggregatorOutput`.
        """
        assert x.ndim == 3 and x.shape[-1] == self.embed_dim, (
            f"tokens must be (b, n, {self.embed_dim}), got shape {tuple(x.shape)}"
        )
        b, n, _ = x.shape
        if exists(mask):
            assert mask.shape == (b, n) and mask.dtype == torch.bool, (
                f"mask must be bool (b, n) = {(b, n)}, got {mask.dtype} {tuple(mask.shape)}"
            )
            if not mask.any(dim=1).all():
                empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
                raise ValueError(f"mask has no valid patch for batch item(s) {empty}")
        if exists(need):
            assert need.shape == (b, n) and need.dtype == torch.bool, (
                f"need must be bool (b, n) = {(b, n)}, got {need.dtype} {tuple(need.shape)}"
            )
        if not exists(mask) or bool(mask.all()):
            return self._run(x, return_attn, need)

        # compaction: every padded sample runs alone on its valid rows
        cls = x.new_empty(b, self.embed_dim)
        tokens = x.new_zeros(b, n, self.embed_dim)
        attn = x.new_zeros(b, n) if return_attn else None
        for i in range(b):
            out = self._run(x[i : i + 1, mask[i]], return_attn, need[i : i + 1, mask[i]] if exists(need) else None)
            cls[i] = out.cls[0]
            tokens[i, mask[i]] = out.tokens[0]
            if return_attn:
                attn[i, mask[i]] = out.attn[0]
        needed = _rows(tokens, _row_index(need)) if exists(need) else None
        return AggregatorOutput(cls=cls, tokens=tokens, attn=attn, needed=needed)

    def _run(self, x: Tensor, return_attn: bool, need: Tensor | None = None) -> AggregatorOutput:
        """All rows valid: prepend CLS, run the layers (chunked when long and autograd-free)."""
        b, n, _ = x.shape
        if self._chunked(n):
            return self._run_chunked(x, return_attn, embedded=True)
        rows = None
        if exists(need):
            counts = need.sum(dim=1)
            if bool((counts == counts[0]).all()):  # the last layer's queries: CLS + the needed rows
                rows = torch.cat([need.new_zeros(b, 1, dtype=torch.long), need.nonzero()[:, 1].view(b, -1) + 1], dim=1)
        attn = None
        x = torch.cat([repeat(self.cls_token, "d -> b 1 d", b=b).to(x.dtype), x], dim=1)
        for j, layer in enumerate(self.layers):
            last = j == len(self.layers) - 1
            if return_attn and last:
                attn = _cls_attention(layer, x, self.chunk_size)
            x = layer(x, rows if last else None)
        x = self.norm(x)
        if rows is None:
            needed = _rows(x[:, 1:], _row_index(need)) if exists(need) else None
            return AggregatorOutput(cls=x[:, 0], tokens=x[:, 1:], attn=attn, needed=needed)
        return AggregatorOutput(cls=x[:, 0], attn=attn, needed=x[:, 1:].reshape(-1, x.shape[-1]), need=need)

    @torch.no_grad()
    def _run_chunked(self, x: Tensor, return_attn: bool, embedded: bool) -> AggregatorOutput:
        """Chunked inference, one sample at a time, on one (n + 1, d) buffer updated in place.

        ``x`` is (b, n, embed_dim) tokens when ``embedded`` else (b, n, in_dim) features.
        """
        b, n, _ = x.shape
        step = self.chunk_size
        cls, tokens, attn = [], [], []
        for i in range(b):
            seq = x.new_empty(n + 1, self.embed_dim)
            seq[0] = self.cls_token
            for s in range(0, n, step):
                seq[1 + s : 1 + s + step] = x[i, s : s + step] if embedded else self.embed(x[i : i + 1, s : s + step])[0]
            for j, layer in enumerate(self.layers):
                if return_attn and j == len(self.layers) - 1:
                    attn.append(_cls_attention(layer, seq[None], step)[0])
                layer.forward_chunked_(seq, step)
            for s in range(0, n + 1, step):
                seq[s : s + step] = self.norm(seq[s : s + step])
            cls.append(seq[0])
            tokens.append(seq[1:])
        if b == 1:  # views of the buffer, no copy
            return AggregatorOutput(cls=cls[0][None], tokens=tokens[0][None], attn=attn[0][None] if return_attn else None)
        return AggregatorOutput(
            cls=torch.stack(cls), tokens=torch.stack(tokens), attn=torch.stack(attn) if return_attn else None
        )
