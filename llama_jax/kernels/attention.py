"""Grouped-query attention implementations. All compute Meta's arithmetic: scores in the compute dtype, softmax in
fp32, and never a repeated copy of K/V in memory.

    einsum      the reference path: any mask, either K/V layout; the plain causal case runs in blocks of queries
    xla         jax.nn.dot_product_attention's XLA lowering
    cudnn       cuDNN's fused flash-attention kernel, for the plain causal case on a GPU in bf16/fp16
    windows     a decode step reads the cache only up to (about) its filled part
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Finite rather than -inf: a query whose keys are all masked (a padding row) then gets a uniform, ignorable
# distribution instead of NaNs that would poison gradients or sampling.
MASKED = -1e30


def position_mask(q_positions, kv_positions):
    """[batch, q_len, kv_len]: a query sees the keys at positions 0..its own; position -1 is padding or empty."""
    kv = kv_positions[:, None, :]
    return (kv >= 0) & (kv <= q_positions[:, :, None])


def plain_causal(q, k, v, kernel: str):
    """Every row 0..t-1, unpadded: the mask-free case that training runs and fused kernels take."""
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if kernel == "xla":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return blocked_causal(q, k, v)


def masked(q, k, v, mask, kernel: str, heads_first: bool):
    # The cache's heads-first layout always takes the einsum path: jax.nn's path would first transpose the cache.
    if kernel in ("xla", "cudnn") and not heads_first:
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])
    return einsum_attention(q, k, v, mask, heads_first)


# Query rows per block of the plain causal einsum path, and the most blocks: small blocks cost more than they save.
CAUSAL_BLOCK = 64
MAX_CAUSAL_BLOCKS = 8


def blocked_causal(q, k, v, segment_ids=None):
    """The plain causal mask in blocks of query rows: block i reads only keys 0..(i+1)·size-1, skipping the masked
    upper triangle, whose probabilities are exact zeros after the softmax, so every row's result is the same.
    segment_ids [batch, t]: also keeps each query inside its own segment (packed documents)."""
    t = q.shape[1]

    def mask(first, rows, keys):
        # Query first + r sees keys 0..first + r: the same for every row, broadcast rather than materialised.
        causal = (jnp.arange(keys)[None, :] <= first + jnp.arange(rows)[:, None])[None]
        if segment_ids is None:
            return causal
        return causal & (segment_ids[:, first:first + rows, None] == segment_ids[:, None, :keys])

    blocks = min(MAX_CAUSAL_BLOCKS, t // CAUSAL_BLOCK)
    if blocks < 2 or t % blocks:
        return einsum_attention(q, k, v, mask(0, t, t), heads_first=False)
    size = t // blocks
    outs = []
    for i in range(blocks):
        keys = (i + 1) * size
        outs.append(einsum_attention(q[:, i * size:keys], k[:, :keys], v[:, :keys], mask(i * size, size, keys),
                                     heads_first=False))
    return jnp.concatenate(outs, axis=1)


def document_causal(q, k, v, segment_ids, kernel: str):
    """Causal attention inside each segment of packed rows. jax.nn's cuDNN path has no segment ids (only per-row
    lengths), so on a GPU both fused choices run jax.nn's XLA lowering with the segment mask; elsewhere the
    blocked einsum path."""
    if kernel in ("xla", "cudnn"):
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation="xla")
    return blocked_causal(q, k, v, segment_ids)


def einsum_attention(q, k, v, mask, heads_first: bool):
    """q [b, t, h, d]; k, v [b, s, g, d] or heads first [b, g, s, d]; mask [b or 1, t, s]."""
    b, t, h, d = q.shape
    kv_heads = k.shape[1 if heads_first else 2]
    rep = h // kv_heads
    # Each kv head serves `rep` query heads. Without sharing (rep 1) the products stay 4-D, which XLA:CPU runs
    # faster than the 5-D form with a unit axis.
    heads = "g" if rep == 1 else "gr"
    if rep > 1:
        q = q.reshape(b, t, kv_heads, rep, d)
    kv = "bgsd" if heads_first else "bsgd"
    # As Meta: scores in the compute dtype, softmax in fp32 (`F.softmax(scores.float(), dim=-1).type_as(xq)`).
    scores = (jnp.einsum(f"bt{heads}d,{kv}->b{heads}ts", q, k) / math.sqrt(d)).astype(jnp.float32)
    scores = jnp.where(mask.reshape(mask.shape[0], *(1,) * len(heads), *mask.shape[1:]), scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"b{heads}ts,{kv}->bt{heads}d", probs, v)
    return out.reshape(b, t, h, d)


def decode_windows(q, k, v, mask, kv_len):
    """A decode step (one query per row) over a heads-first cache, reading only its first n slots, n the smallest
    window that holds all `kv_len` filled slots: windows every 1/8 of the cache up to half of it, then the whole
    cache, each one dot. Slots left out are masked anyway, so the result is the einsum path's over the window.
    k and v may be stored in another dtype than q's: only the window is cast."""
    length = k.shape[2]
    eighth = -(-length // 8)
    windows = list(range(eighth, length // 2 + 1, eighth)) + [length]

    def window(q, k, v, mask, slots):
        k, v = (a[:, :, :slots].astype(q.dtype) for a in (k, v))
        return einsum_attention(q, k, v, mask[..., :slots], heads_first=True)

    if len(windows) == 1:
        return window(q, k, v, mask, length)
    branches = [functools.partial(window, slots=n) for n in windows]
    choice = sum((kv_len > n).astype(jnp.int32) for n in windows[:-1])
    return jax.lax.switch(choice, branches, q, k, v, mask)


def blockwise_attention(q, k, v, q_positions, kv_positions, kv_len, heads_first: bool, block: int, layer=None,
                        row=None, scores_budget: int = 0):
    """The position mask's attention (see `position_mask`) in blocks, flash style, for long prompts and caches:
    at most `block` queries × `block` keys of scores exist at a time, whatever the lengths. An online softmax
    carries each query's running max, sum and output in fp32 across key blocks; scores are computed in the compute
    dtype, as Meta's. Only slots below `kv_len` are read. q [b, t, h, d]; k, v [b, s, g, d] or heads first
    [b, g, s, d], in any dtype (each block is cast to q's); with `layer`, k and v are stacked on a leading layers
    axis and each block is read from that layer in place, where slicing the layer out first would copy it; with
    `row` (a scalar), q's batch of one reads only that row of k and v, in place too (kv_positions: that row's). A query
    that sees no key at all (padding) gets the mean of the values it visited: ignorable, as on the einsum path,
    though not the same numbers. scores_budget: bytes; queries go in blocks small enough that one block's fp32
    scores fit in it (0: blocks of `block` queries)."""
    b, t, h, d = q.shape
    queries = block
    if scores_budget:
        queries = min(block, max(1, scores_budget // (4 * b * h * block)))
    if t <= queries:
        return _key_blocks(q, k, v, q_positions, kv_positions, kv_len, heads_first, block, layer, row)
    # Query blocks one after another, as even as can be; the queries are padded (position -1) to whole blocks.
    n = -(-t // queries)
    size = -(-t // n)
    pad = n * size - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, size, h, d).swapaxes(0, 1)
    pp = jnp.pad(q_positions, ((0, 0), (0, pad)), constant_values=-1).reshape(b, n, size).swapaxes(0, 1)
    out = jax.lax.map(lambda x: _key_blocks(x[0], k, v, x[1], kv_positions, kv_len, heads_first, block, layer, row),
                      (qp, pp))
    return out.swapaxes(0, 1).reshape(b, n * size, h, d)[:, :t]


def _key_blocks(q, k, v, q_positions, kv_positions, kv_len, heads_first: bool, block: int, layer, row):
    b, t, h, d = q.shape
    axis = 2 if heads_first else 1
    shape = k.shape[-4:]
    s, g = shape[axis], shape[3 - axis]
    block = min(block, s)

    def read(a, start):
        """One block of keys (or values) of every row, or of `row`, from `layer`'s array, without copying more."""
        lead = 0 if layer is None else 1
        starts, sizes = [0] * a.ndim, list(a.shape)
        if layer is not None:
            starts[0], sizes[0] = layer, 1
        if row is not None:
            starts[lead], sizes[lead] = row, b
        starts[lead + axis], sizes[lead + axis] = start, block
        out = jax.lax.dynamic_slice(a, starts, sizes)
        return out if layer is None else out[0]

    q = q.reshape(b, t, g, h // g, d)
    kv = "bgsd" if heads_first else "bsgd"
    n_blocks = -(-(s if kv_len is None else kv_len) // block)

    def step(j, carry):
        running_max, total, acc = carry  # [b, g, r, t] twice, [b, g, r, t, d]
        # The last block ends at slot s: its start is pulled back, and slots an earlier block read are masked.
        start = jnp.minimum(j * block, s - block)
        kb, vb = (read(a, start).astype(q.dtype) for a in (k, v))
        pos = jax.lax.dynamic_slice_in_dim(kv_positions, start, block, 1)
        fresh = start + jnp.arange(block) >= j * block
        seen = position_mask(q_positions, pos) & fresh[None, None, :]  # [b, t, block]
        scores = (jnp.einsum(f"btgrd,{kv}->bgrts", q, kb) / math.sqrt(d)).astype(jnp.float32)
        scores = jnp.where(seen[:, None, None], scores, MASKED)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        scale = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        pv = jnp.einsum(f"bgrts,{kv}->bgrtd", probs.astype(q.dtype), vb, preferred_element_type=jnp.float32)
        return new_max, total * scale + probs.sum(axis=-1), acc * scale[..., None] + pv

    stats = jnp.full((b, g, h // g, t), MASKED, jnp.float32)
    init = (stats, jnp.zeros_like(stats), jnp.zeros((b, g, h // g, t, d), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, n_blocks, step, init)
    out = (acc / total[..., None]).astype(q.dtype)  # [b, g, r, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
