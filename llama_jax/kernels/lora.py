"""A weight with low-rank adapters (LoRA): base [*in, *out] frozen, a [*in, rank], b [rank, *out].

x·W' = x·base + scale·(x·a)·b, with scale = alpha / rank, computed without forming base + scale·a·b: the adapter
path costs rank/out of the base product, and the base stays as it is stored (bf16, say) while a and b train in fp32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    # Training's LoRA dropout on the adapters' input: a PRNG key per call (stacked per layer like the weights).
    key: jax.Array | None = None
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype


def lora_dense(x, w: LoraWeight, n_in: int, base_product):
    """base_product(x, base, n_in) plus the adapters' product, both in x's dtype."""
    x_in = x
    if w.dropout and w.key is not None:
        keep = jax.random.bernoulli(w.key, 1.0 - w.dropout, x.shape)
        x_in = jnp.where(keep, x / (1.0 - w.dropout), 0).astype(x.dtype)
    low = jnp.tensordot(x_in, w.a.astype(x.dtype), n_in)  # [*batch, rank]
    return base_product(x, w.base, n_in) + (w.scale * jnp.tensordot(low, w.b.astype(x.dtype), 1)).astype(x.dtype)
