"""The attention KV cache: preallocated, written in place, one slot per token."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig


class KVCache(NamedTuple):
    """k, v: per layer [batch, kv_heads, max_len, head_dim]. Heads come before slots so that a decode step reads
    each head's keys as one contiguous matrix. The unrolled model keeps a tuple of n_layers such arrays, the
    scanned one a single array stacked on a leading layers axis (which the scan indexes with a traced layer):
    on XLA:CPU a layer's slice of a stacked array is copied before every product that reads it.

    positions: [batch, max_len], the position of the token in each slot; -1 marks an empty or padding slot.
    index: the slot the next token is written to: a scalar shared by every row (ragged prompts are left-padded),
    or per row, shape [batch], where each row is a separate sequence at its own length (continuous batching).
    row: None, or a scalar: the cache row that a batch of one reads and writes (at the scalar `index`), the others
    left as they are; continuous batching prefills one slot this way, in place, without copying its row out.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    positions: jax.Array
    index: jax.Array
    row: jax.Array | None = None

    def layer(self, layer) -> tuple[jax.Array, jax.Array]:
        return self.k[layer], self.v[layer]

    def write(self, layer, k, v) -> "KVCache":
        """Stores k, v ([batch, seq, kv_heads, head_dim]) of `layer` at slots index..index+seq-1."""
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        if isinstance(self.k, tuple):
            def put(per_layer, new):
                updated = _put_rows(per_layer[layer], new.astype(per_layer[layer].dtype), (), self.index, self.row)
                return per_layer[:layer] + (updated,) + per_layer[layer + 1:]
        else:
            def put(stacked, new):
                return _put_rows(stacked, new.astype(stacked.dtype)[None], (layer,), self.index, self.row)
        return self._replace(k=put(self.k, k), v=put(self.v, v))

    def record_positions(self, positions) -> "KVCache":
        """Writes the positions of the tokens about to be stored (slots index..index+seq-1), before any layer
        runs, so that every layer's attention already sees them."""
        positions = positions.astype(jnp.int32)
        if jnp.ndim(self.index) == 0:
            row = 0 if self.row is None else self.row
            return self._replace(positions=jax.lax.dynamic_update_slice(self.positions, positions, (row, self.index)))
        put = jax.vmap(lambda row, new, i: jax.lax.dynamic_update_slice(row, new, (i,)))
        return self._replace(positions=put(self.positions, positions, self.index))

    def advance(self, n) -> "KVCache":
        """n: a count for every row, or per row ([batch]) with a per-row index."""
        return self._replace(index=self.index + n)


def _put_rows(array, new, lead: tuple, index, row=None):
    """array [*lead, batch, kv_heads, len, head_dim] with `new` written from slot `index` (scalar: every row at
    the same slot, or only `row`; [batch]: each row at its own, as one vmapped update)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(array, new, (*lead, 0 if row is None else row, 0, index, 0))
    axis = len(lead)
    one = lambda a, n, i: jax.lax.dynamic_update_slice(a, n, (*lead, 0, i, 0))
    return jax.vmap(one, in_axes=(axis, axis, 0), out_axes=axis)(array, new, index)


# Logical axes: under a mesh's rules (sharding.activate) the cache is sharded with its rows and its KV heads.
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


def cache_bytes(config: LlamaConfig, batch: int, length: int, dtype=None) -> int:
    """Bytes of a cache of `batch` rows of `length` slots: K and V of every layer (in `dtype`, default the compute
    dtype), plus the positions."""
    itemsize = jnp.dtype(dtype or config.compute_dtype).itemsize
    return batch * length * (2 * config.n_layers * config.kv_heads * config.head_dim * itemsize + 4)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None, per_row_index: bool = False) -> KVCache:
    """An empty cache, laid out for `config.scan_layers` (stacked) or the unrolled layers (a tuple); with
    `per_row_index` each row keeps its own write index."""
    shape = (batch, config.kv_heads, max_len, config.head_dim)
    dtype = dtype or config.compute_dtype
    if config.scan_layers:
        k, v = (nn.with_logical_constraint(jnp.zeros((config.n_layers, *shape), dtype), ("layers", *CACHE_AXES))
                for _ in "kv")
    else:
        k, v = (tuple(nn.with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(config.n_layers))
                for _ in "kv")
    positions = nn.with_logical_constraint(jnp.full((batch, max_len), -1, jnp.int32), ("batch", "length"))
    return KVCache(k=k, v=v, positions=positions, index=jnp.zeros((batch,) if per_row_index else (), jnp.int32))
