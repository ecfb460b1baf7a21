"""One decode step's attention on a CPU, in C++ behind XLA's FFI (decode_attention.cc): each row's query reads
only the filled part of its own row of the KV cache, so a step costs what the sequences hold, where XLA's ops
read every slot (or, with windows, every row up to the longest). fp32 only; built on first use for this CPU
(kernels/cpu_ffi.py), and without a compiler decode steps keep the XLA windows. LLAMA_JAX_DECODE_ATTENTION=0
turns it off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.kernels import cpu_ffi

KERNEL = cpu_ffi.CpuKernel("decode_attention.cc", "llama_jax_decode_attention_f32", "LlamaJaxDecodeAttentionF32",
                           switch="LLAMA_JAX_DECODE_ATTENTION", fallback="decode steps use XLA's decode windows")


def applies(q, k) -> bool:
    """Whether the kernel serves this decode step: one fp32 query per row, an fp32 cache, the kernel built."""
    return q.shape[1] == 1 and q.dtype == k.dtype == jnp.float32 and KERNEL.available()


def attention(q, k, v, q_positions, kv_positions, kv_len):
    """q [b, 1, h, d]; k, v [b, g, s, d] (the cache's heads-first layout); q_positions [b, 1]; kv_positions [b, s];
    kv_len: the slots each row may hold keys in, a scalar or per row [b]. Returns [b, 1, h, d]; a row whose query
    sees no key (an idle slot) gets zeros."""
    b, _, h, d = q.shape
    out = jax.ffi.ffi_call(KERNEL.target, jax.ShapeDtypeStruct((b, h, d), jnp.float32))(
        q[:, 0], k, v, q_positions[:, 0].astype(jnp.int32), kv_positions.astype(jnp.int32),
        jnp.broadcast_to(kv_len, (b,)).astype(jnp.int32))
    return out[:, None]
