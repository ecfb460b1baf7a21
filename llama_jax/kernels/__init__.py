"""Backend-specific speed behind one seam. The model calls `ops.dense` for every weight product and
`ops.attention` for attention; `select_ops(config)` chooses, once, which kernel serves each on this backend, and
the result is handed to the model. `Ops` names its kernels with strings, so it is hashable: a static jit argument.

    dense        xla (tensordot) | cpu (the same, with a YNNPACK-friendly weight gradient); a PackedWeight leaf
                 always runs the packed CPU decoding kernel (packed_matmul)
    attention    einsum (reference, blocked causal) | xla (jax.nn) | cudnn (fused causal, GPU, bf16/fp16)
    cache        einsum | windows (a decode step reads a cache of windows_min_keys..windows_max_keys slots only
                 up to about its longest row's filled part) | cpu_rows (a C++ kernel where it applies: each row
                 reads only its own filled part; otherwise the windows)
    blockwise    attention over more than `attention_block` keys with positions (long prompts, a CPU's long
                 caches) runs in blocks with an online softmax on every backend, in bounded memory
    chunk        a prompt chunk's blockwise attention over the cache: blockwise (the portable loop above) | pallas
                 (one fused Pallas kernel on a GPU, bf16/fp16) | pallas_interpret (the same kernel through
                 Pallas's interpreter, anywhere: for tests), on one device. LLAMA_JAX_CHUNK_ATTENTION chooses
                 it; default blockwise
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.kernels import attention as attn
from llama_jax.kernels import chunk_attention, decode_attention
from llama_jax.kernels.dense import dense
from llama_jax.kernels.lora import LoraWeight
from llama_jax.kernels.packed_matmul import PackedWeight
from llama_jax.kernels.remat import REMAT_POLICIES

__all__ = ["LoraWeight", "Ops", "PackedWeight", "decode_compiler_options", "default_attention_impl", "select_ops"]

GPU_BACKENDS = ("gpu", "cuda", "rocm")

# A block's scores on a CPU: 4 MiB (8 heads x 256 queries x 512 keys in fp32) stay in cache between the softmax's
# passes over them (docs/design.md).
CPU_SCORES_BUDGET = 4 << 20

# A CPU decode step reads caches up to this long through the decode windows, longer ones blockwise: past a few
# thousand slots the blockwise loop, which stops at the filled part, was faster (docs/design.md).
CPU_WINDOWS_MAX_KEYS = 2048


@dataclasses.dataclass(frozen=True)
class Ops:
    dense_kernel: str = "xla"
    attention_kernel: str = "einsum"
    cache_kernel: str = "einsum"
    # Attention over more keys than this runs blockwise (flash style) in blocks of this many queries and keys.
    attention_block: int = 512
    # Blockwise queries go in blocks whose fp32 scores fit in this many bytes (0: `attention_block` queries). On a
    # CPU a block's scores then stay in cache across the softmax's passes over them.
    scores_budget: int = 0
    chunk_kernel: str = "blockwise"
    # A decode step reads a cache of more than windows_min_keys and at most windows_max_keys (0: any) slots through
    # the windows; a longer one blockwise, a shorter one with one dot over all of it.
    windows_min_keys: int = 0
    windows_max_keys: int = 0

    def dense(self, x, w, n_in: int = 1):
        """x [*batch, *in] times w [*in, *out] (an array, a PackedWeight or a LoraWeight), contracting n_in axes."""
        return dense(x, w, n_in, self.dense_kernel)

    def attention(self, q, k, v, *, q_positions=None, kv_positions=None, kv_len=None, heads_first: bool = False,
                  layer=None, segment_ids=None, row=None):
        """Grouped-query attention; returns [batch, q_len, heads, head_dim].

        q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim], or with heads_first
        [batch, kv_heads, kv_len, head_dim] (the cache's layout). q_positions [batch, q_len] and kv_positions
        [batch, kv_len]: a query sees the keys at positions 0..its own, and position -1 (padding, an empty slot)
        is never seen. Both None: every row is 0..q_len-1, unpadded, the plain causal case. kv_len: how many
        leading slots of k/v can hold keys; the rest need not be read (a scalar, or per row [batch]: one
        bound, the longest row's, serves the batch). k and v may be stored in another dtype
        than q's (the cache's); they are computed with in q's. layer: k and v are a KVCache's per-layer tuples or
        stacked [layers, ...] arrays, of which this layer is read. segment_ids [batch, q_len] (self-attention of
        packed training rows): a query sees the keys of its own segment up to itself; positions then only rotate.
        row: the cache row that q's batch of one attends to (a scalar), where k, v and kv_positions hold every row.
        """
        if segment_ids is not None:
            return attn.document_causal(q, k, v, segment_ids, self.attention_kernel)
        if q_positions is None:
            return attn.plain_causal(q, k, v, self.attention_kernel)
        if isinstance(k, tuple):
            k, v, layer = k[layer], v[layer], None
        if row is not None:
            kv_positions = jax.lax.dynamic_slice_in_dim(kv_positions, row, q.shape[0], 0)
        if (self.cache_kernel == "cpu_rows" and heads_first and kv_len is not None and layer is None and row is None
                and decode_attention.applies(q, k)):
            return decode_attention.attention(q, k, v, q_positions, kv_positions, kv_len)
        if kv_len is not None:
            kv_len = jnp.max(kv_len)  # per-row lengths: the mask keeps each row to its own
        keys = k.shape[-2 if heads_first else -3]
        windows = (self.cache_kernel in ("windows", "cpu_rows") and heads_first and kv_len is not None
                   and q.shape[1] == 1 and self.windows_min_keys < keys <= (self.windows_max_keys or keys))
        if keys > self.attention_block and not windows:
            if (self.chunk_kernel != "blockwise" and heads_first and layer is None and row is None
                    and chunk_attention.applies(q, k)):
                return chunk_attention.attention(q, k, v, q_positions, kv_positions, kv_len,
                                                 interpret=self.chunk_kernel == "pallas_interpret")
            return attn.blockwise_attention(q, k, v, q_positions, kv_positions, kv_len, heads_first,
                                            self.attention_block, layer, row, self.scores_budget)
        if layer is not None:
            k, v = k[layer], v[layer]
        if row is not None:
            k, v = (jax.lax.dynamic_slice_in_dim(a, row, q.shape[0], 0) for a in (k, v))
        mask = attn.position_mask(q_positions, kv_positions)
        if windows:
            return attn.decode_windows(q, k, v, mask, kv_len)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        return attn.masked(q, k, v, mask, self.attention_kernel, heads_first)

    def remat_policy(self, name: str):
        return REMAT_POLICIES[name]


def default_attention_impl(backend: str | None = None) -> str:
    """The fused kernel path on GPU, the plain einsum (reference) path elsewhere."""
    return "dot_product_attention" if (backend or jax.default_backend()) in GPU_BACKENDS else "einsum"


def select_ops(config: LlamaConfig, backend: str | None = None, mesh=None) -> Ops:
    """The kernels for `config` on `backend` (default: JAX's default backend), for a program on `mesh` (default:
    one device)."""
    backend = backend or jax.default_backend()
    cpu = backend == "cpu"
    attention = "einsum"
    if config.attention_impl == "dot_product_attention":
        # cuDNN's flash attention takes bf16/fp16 and head_dim a multiple of 8 up to 128; jax.nn's XLA path any.
        fused = (backend in GPU_BACKENDS and config.compute_dtype in (jnp.bfloat16, jnp.float16)
                 and config.head_dim % 8 == 0 and config.head_dim <= 128)
        attention = "cudnn" if fused else "xla"
    # An FFI or Pallas kernel is one device's code: XLA would gather a sharded cache to run it, so a mesh keeps
    # XLA's ops.
    one_device = mesh is None or mesh.size == 1
    cache = "cpu_rows" if cpu and one_device else "windows"
    chunk = chunk_kernel_choice(backend)
    block = 512 if cpu else 1024  # larger products suit a GPU; neither block size is tuned
    return Ops(dense_kernel="cpu" if cpu else "xla", attention_kernel=attention, cache_kernel=cache,
               attention_block=block, scores_budget=CPU_SCORES_BUDGET if cpu else 0,
               chunk_kernel=chunk if one_device else "blockwise",
               # An accelerator reads a long cache through the windows at any length: each block of the loop would
               # be a loop iteration of a few small kernels, 128 per layer and token over a 128k cache; and a short
               # one in one dot, where a window's switch would cost more than the reads it saves (docs/design.md).
               windows_min_keys=0 if cpu else block, windows_max_keys=CPU_WINDOWS_MAX_KEYS if cpu else 0)


CHUNK_KERNELS = ("blockwise", "pallas", "pallas_interpret")


def chunk_kernel_choice(backend: str) -> str:
    """LLAMA_JAX_CHUNK_ATTENTION, checked; without it the portable loop (docs/design.md says why)."""
    choice = os.environ.get("LLAMA_JAX_CHUNK_ATTENTION", "blockwise")
    if choice not in CHUNK_KERNELS:
        raise ConfigError(f"LLAMA_JAX_CHUNK_ATTENTION={choice!r}; expected one of {CHUNK_KERNELS}")
    if choice == "pallas" and backend not in GPU_BACKENDS:
        raise ConfigError(f"LLAMA_JAX_CHUNK_ATTENTION=pallas compiles for a GPU, and this backend is {backend!r}; "
                          f"pallas_interpret runs the same kernel here")
    return choice


# XLA:CPU hands dots to YNNPACK by default; decoding multiplies a few rows by each weight matrix, where Eigen's GEMM
# (an empty list of YNNPACK fusion types) is faster. A jaxlib without the option compiles without it.
CPU_DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def decode_compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA options for the compiled generation functions on this backend."""
    return dict(CPU_DECODE_COMPILER_OPTIONS) if (backend or jax.default_backend()) == "cpu" else {}
