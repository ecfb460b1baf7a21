"""A prompt chunk's attention over the KV cache as one fused Pallas kernel (Triton, for GPUs), flash style.

Each program holds one block of queries of one head and walks the cache's key blocks up to the filled part with an
online softmax, so no score leaves the chip. It reads the heads-first cache in place (jax.nn's cuDNN path takes
[batch, keys, heads, dim] and would transpose a whole layer of the cache for every chunk) and masks by positions,
so left padding and ragged rows need no mask array. The arithmetic is the blockwise path's: scores rounded to the
compute dtype, softmax statistics and the output's sums in fp32.

It serves bf16/fp16 chunks of one layer's cache with a head size that is a power of two (Triton's blocks are);
everything else keeps the portable blockwise loop. `interpret=True` runs the same kernel through Pallas's
interpreter on any backend, which is how the tests check it on a CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.kernels.attention import MASKED  # finite: a query that sees no key gets a mean, not NaN

# Queries and keys per block. 64 x 64 keeps a program's scores and output (head size 128, fp32) in registers.
BLOCK_Q = 64
BLOCK_K = 64
HEAD_DIMS = (16, 32, 64, 128, 256)


def applies(q, k) -> bool:
    """Whether the kernel serves this chunk: several queries, 16-bit q and cache, a power-of-two head size."""
    return (q.shape[1] > 1 and q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
            and q.shape[-1] in HEAD_DIMS)


def _kernel(kv_len_ref, q_ref, q_pos_ref, k_ref, v_ref, kv_pos_ref, o_ref, *, block_k: int, slots: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    dtype = q_ref.dtype
    q = q_ref[...]  # [block_q, d]
    q_pos = q_pos_ref[...]  # [block_q]
    # The divisor as the compute dtype holds it, as where the portable path divides its bf16 scores by sqrt(d).
    root_d = float(np.asarray(math.sqrt(q.shape[-1]), dtype))

    def body(j, carry):
        running_max, total, acc = carry
        keys = pl.ds(j * block_k, block_k)
        inside = j * block_k + jnp.arange(block_k) < slots  # the last block may run past the cache's end
        k = plgpu.load(k_ref.at[keys, :], mask=inside[:, None], other=0)
        v = plgpu.load(v_ref.at[keys, :], mask=inside[:, None], other=0)
        kv_pos = plgpu.load(kv_pos_ref.at[keys], mask=inside, other=-1)
        # As Meta's: the product rounded to the compute dtype, scaled there, then fp32 for the softmax. Triton
        # divides only in fp32, so the quotient is rounded back to the compute dtype by hand.
        scores = plgpu.dot(q, k, trans_b=True).astype(dtype).astype(jnp.float32)
        scores = (scores / root_d).astype(dtype).astype(jnp.float32)
        seen = (kv_pos[None, :] >= 0) & (kv_pos[None, :] <= q_pos[:, None])
        scores = jnp.where(seen, scores, MASKED)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        rescale = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[:, None])
        acc = acc * rescale[:, None] + plgpu.dot(probs.astype(dtype), v)
        return new_max, total * rescale + probs.sum(axis=-1), acc

    block_q, d = q.shape
    init = (jnp.full((block_q,), MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, d), jnp.float32))
    n_blocks = (kv_len_ref[0] + block_k - 1) // block_k
    _, total, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def attention(q, k, v, q_positions, kv_positions, kv_len, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
              interpret: bool = False):
    """q [b, t, h, d]; k, v [b, g, s, d] (one layer of the cache, heads first); q_positions [b, t]; kv_positions
    [b, s]; kv_len: a scalar, the slots that may hold keys (later ones are not read). Returns [b, t, h, d]."""
    # Imported here: only a chunk that takes the kernel needs Pallas.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, t, h, d = q.shape
    g, slots = k.shape[1], k.shape[2]
    rep = h // g
    block_q = min(block_q, max(16, pl.next_power_of_2(t)))  # Triton's dots take blocks of 16 or more
    pad = -t % block_q  # padding queries (position -1) fill the last block; their rows are dropped
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_positions = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    kv_len = jnp.reshape(jnp.minimum(kv_len, slots), (1,)).astype(jnp.int32)
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, slots=slots),
        grid=((t + pad) // block_q, b, h),
        in_specs=[
            pl.BlockSpec((1,), lambda i, r, n: (0,)),
            pl.BlockSpec((None, block_q, None, d), lambda i, r, n: (r, i, n, 0)),
            pl.BlockSpec((None, block_q), lambda i, r, n: (r, i)),
            # Query head n reads KV head n // rep: grouped queries share the cache without a repeated copy.
            pl.BlockSpec((None, None, slots, d), lambda i, r, n: (r, n // rep, 0, 0)),
            pl.BlockSpec((None, None, slots, d), lambda i, r, n: (r, n // rep, 0, 0)),
            pl.BlockSpec((None, slots), lambda i, r, n: (r, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, d), lambda i, r, n: (r, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2),
        interpret=interpret,
        name="chunk_attention",
    )(kv_len, q, q_positions, k, v, kv_positions.astype(jnp.int32))
    return out[:, :t]
