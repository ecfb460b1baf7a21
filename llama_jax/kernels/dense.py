"""Weight products: every matmul of the model is `dense(x, w, n_in)`, x [*batch, *in] times w [*in, *out].

Two kernels serve a plain weight: XLA's dot ("xla") and the same dot with a CPU-friendly weight gradient ("cpu").
A weight's leaf type can ask for more: a `PackedWeight` (packed by the Generator) runs the packed CPU decoding
kernel, which has no gradient; a `LoraWeight` adds its low-rank adapters' product to its base's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from llama_jax.kernels import packed_matmul
from llama_jax.kernels.lora import LoraWeight, lora_dense
from llama_jax.kernels.packed_matmul import PackedWeight


def dense(x, w, n_in: int = 1, kernel: str = "xla"):
    """x times w, contracting the n_in trailing axes of x with the n_in leading axes of w, in x's dtype."""
    if isinstance(w, PackedWeight):
        return _packed_dense(x, w, n_in)
    if isinstance(w, LoraWeight):
        return lora_dense(x, w, n_in, lambda x, base, n_in: dense(x, base, n_in, kernel))
    w = w.astype(x.dtype)
    if kernel == "cpu":
        return _dense_canonical_grads(x, w, n_in)
    return jnp.tensordot(x, w, n_in)


def _packed_dense(x, w: PackedWeight, n_in: int):
    if w.n_in != n_in:
        raise ValueError(f"a weight packed with n_in={w.n_in} multiplied with n_in={n_in}")
    shape = w.strips.shape
    k, n = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    y = packed_matmul.matmul(x.reshape(-1, k), w.strips.reshape(n // packed_matmul.STRIP, k, packed_matmul.STRIP))
    return y.reshape(*x.shape[:x.ndim - n_in], *shape[n_in:])


# On a CPU the weight gradient is computed from an explicitly transposed x: autodiff's form contracts the leading
# (batch) axes of x and of the output gradient, which XLA:CPU's YNNPACK dots do not take, so XLA would transpose
# the larger output gradient and run the product on Eigen instead (docs/design.md).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_canonical_grads(x, w, n_in):
    return jnp.tensordot(x, w, n_in)


def _dense_fwd(x, w, n_in):
    return jnp.tensordot(x, w, n_in), (x, w)


def _dense_bwd(n_in, residuals, dy):
    x, w = residuals
    batch_axes = tuple(range(x.ndim - n_in))
    # Traced outside forward()'s precision scope: state its rule (fp32 compute means fp32 products) here.
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    dx = jnp.tensordot(dy, w, (tuple(range(len(batch_axes), dy.ndim)), tuple(range(n_in, w.ndim))),
                       precision=precision)
    # x as [*in, *batch]; the barrier keeps XLA from folding the transpose back into the product.
    x_t = jax.lax.optimization_barrier(jnp.moveaxis(x, batch_axes, tuple(range(-len(batch_axes), 0))))
    dw = jnp.tensordot(x_t, dy, (tuple(range(n_in, x.ndim)), batch_axes), precision=precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense_canonical_grads.defvjp(_dense_fwd, _dense_bwd)
