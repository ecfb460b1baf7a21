"""A CPU matmul for decoding: x [M, K] @ W [K, N] with W packed once as [N/8, K, 8] (packed_matmul.cc).

A decode step multiplies a few rows by every weight matrix, so its speed is the rate at which the weights are
read, and XLA:CPU's GEMM reads W [K, N] in short pieces of a different page for each k, well below the rate of a
plain read; packed strips are read at nearly that rate (docs/design.md). The kernel is C++ behind XLA's FFI,
built on first use for this CPU (kernels/cpu_ffi.py); without a compiler, decoding keeps XLA's dot.

    if packed_matmul.available():
        p = pack(w)                         # same shape and dtype as w, contents in strips
        y = matmul(x, p.reshape(N // 8, K, 8))
        leaf = PackedWeight(p, n_in=1)      # how a parameter tree carries it: model.dense then runs the kernel

LLAMA_JAX_PACKED_MATMUL=0 turns it off.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from llama_jax.kernels import cpu_ffi

STRIP = 8  # columns per strip: one 256-bit vector of fp32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight held as `pack(w, n_in, n_lead)`: the array keeps w's shape (so Flax's parameter shape checks and
    the tree's structure hold), and its type tells `dense` to run the kernel. Inference only: no gradient."""

    strips: jax.Array
    n_in: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def shape(self):
        return self.strips.shape

    @property
    def dtype(self):
        return self.strips.dtype


# Raised by load() where the kernel cannot be built or loaded; the message says why.
PackedMatmulUnavailable = cpu_ffi.KernelUnavailable

KERNEL = cpu_ffi.CpuKernel("packed_matmul.cc", "llama_jax_packed_matmul_f32", "LlamaJaxPackedMatmulF32",
                           switch="LLAMA_JAX_PACKED_MATMUL", fallback="decoding uses XLA's dot")


def available() -> bool:
    """True when the kernel is built (now, if it was not yet) and registered for this process's CPU backend."""
    return KERNEL.available()


def load() -> None:
    """Builds and registers the kernel once per process; raises PackedMatmulUnavailable (the same every time)."""
    KERNEL.load()


def pack(w: jax.Array, n_in: int = 1, n_lead: int = 0) -> jax.Array:
    """w [*lead, *in, *out] with its (K, N) = (prod in, prod out) matrix laid out as [N/8, K, 8] strips, in an
    array of w's own shape, so that parameter trees keep their structure. n_lead leading axes (stacked
    layers) are packed independently."""
    lead, inner = w.shape[:n_lead], w.shape[n_lead:]
    k, n = math.prod(inner[:n_in]), math.prod(inner[n_in:])
    if n % STRIP:
        raise ValueError(f"pack: the output width {n} of a {w.shape} weight is not a multiple of {STRIP}")
    strips = w.reshape(*lead, k, n // STRIP, STRIP).swapaxes(-3, -2)
    return strips.reshape(w.shape)


def matmul(x: jax.Array, packed: jax.Array) -> jax.Array:
    """x [M, K] (fp32) @ the matrix packed as [N/8, K, 8] -> [M, N] fp32. Call `load()` (or `available()`) first."""
    m, k = x.shape
    strips, k_packed, width = packed.shape
    if k != k_packed or width != STRIP or x.dtype != jnp.float32 or packed.dtype != jnp.float32:
        raise ValueError(f"packed_matmul.matmul: x {x.dtype}{list(x.shape)} and packed {packed.dtype}"
                         f"{list(packed.shape)}; expected float32 [M, K] and [N/{STRIP}, K, {STRIP}]")
    out = jax.ShapeDtypeStruct((m, strips * STRIP), jnp.float32)
    return jax.ffi.ffi_call(KERNEL.target, out)(x, packed)

