"""The compiled side of generation: one prefill of left-padded prompts, then the decode loop on the device.

Prompts are left-padded to a common length so that every row writes the same cache slot at each step (the
cache index is shared); padding has position -1 and is never attended to, and each row's positions count from
0 at its first real token. Compiled in (static): the config, the kernels, the sampler's switches and the bucket
sizes. Traced: the prompts, the PRNG key and `SamplingInputs`, so a new temperature does not recompile.
"""

from __future__ import annotations

import collections
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.kernels import Ops
from llama_jax.kv_cache import KVCache, init_cache
from llama_jax.model import forward
from llama_jax.sampling import SamplerSwitches, sample_rows

# Incremented at trace time only: tests read it to prove a second call in the same bucket does not recompile.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

# Stop ids are padded to a fixed length so tokenizers with 1 or 3 stop ids share compiled functions.
MAX_STOP_IDS = 8


class SamplingInputs(NamedTuple):
    """The traced per-call values of sampling and stopping."""

    temperature: jax.Array  # float32 scalar
    top_p: jax.Array  # float32 scalar
    stop_ids: jax.Array  # [MAX_STOP_IDS] int32, padded with -1
    pad_id: jax.Array  # int32 scalar: written after a row stopped


class DecodeState(NamedTuple):
    """Everything the decode loop carries, on the device."""

    cache: KVCache
    tokens: jax.Array  # [B, N] new ids; pad after a row stopped
    last: jax.Array  # [B] the latest id, the next step's input
    position: jax.Array  # [B] position of `last`
    done: jax.Array  # [B] bool: the row produced a stop id (or is batch padding)
    step: jax.Array  # scalar: how many columns of `tokens` are filled
    key: jax.Array


def _finished(tokens, stop_ids):
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def _sample(logits, key, step, switches: SamplerSwitches, inputs: SamplingInputs):
    return sample_rows(logits, key, step, temperature=inputs.temperature, top_k=switches.top_k,
                       top_p=inputs.top_p, is_greedy=switches.greedy, use_top_p=switches.top_p)


def prefill_logits(params, tokens, positions, cache: KVCache, *, config: LlamaConfig, ops: Ops, chunk: int):
    """The prompts into `cache`, `chunk` tokens at a time against the growing cache, so that attention's memory
    is bounded by the chunk, not the prompt (a prompt of at most `chunk` tokens is one piece); returns the last
    position's logits [B, 1, vocab] and the cache."""
    prompt_len = tokens.shape[1]
    # Whole chunks first, then the tail (1..chunk tokens), of which only the last token's logits are computed.
    head = (prompt_len - 1) // chunk * chunk

    def run_chunk(i, cache):
        piece = (jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, 1) for a in (tokens, positions))
        return forward(params, *piece, cache, config=config, ops=ops)[1]

    if head:
        cache = jax.lax.fori_loop(0, head // chunk, run_chunk, cache)
    return forward(params, tokens[:, head:], positions[:, head:], cache, config=config, ops=ops, last_only=True)


@partial(jax.jit, static_argnames=("config", "ops", "switches", "cache_len", "new_bucket", "chunk", "kv_dtype"))
def prefill(params, tokens, positions, active, key, inputs: SamplingInputs, *, config: LlamaConfig, ops: Ops,
            switches: SamplerSwitches, cache_len: int, new_bucket: int, chunk: int, kv_dtype=None) -> DecodeState:
    """Fills a fresh cache (of `kv_dtype`, default the compute dtype) with the prompts and samples each row's
    first new token.

    tokens, positions: [B, P] left-padded (position -1 = padding); active: [B] False for batch-padding rows.
    """
    TRACE_COUNTS["prefill"] += 1
    batch = tokens.shape[0]
    cache = init_cache(config, batch, cache_len, kv_dtype)
    logits, cache = prefill_logits(params, tokens, positions, cache, config=config, ops=ops, chunk=chunk)
    first = jnp.where(active, _sample(logits[:, 0], key, 0, switches, inputs), inputs.pad_id)
    # Replicated on a mesh: every process reads the new ids back.
    out = nn.with_logical_constraint(jnp.full((batch, new_bucket), inputs.pad_id, jnp.int32), (None, None))
    out = out.at[:, 0].set(first)
    return DecodeState(cache=cache, tokens=out, last=first, position=positions[:, -1] + 1,
                       done=~active | _finished(first, inputs.stop_ids), step=jnp.ones((), jnp.int32), key=key)


@partial(jax.jit, static_argnames=("config", "ops", "switches"), donate_argnames=("state",))
def decode(params, state: DecodeState, until, inputs: SamplingInputs, *, config: LlamaConfig, ops: Ops,
           switches: SamplerSwitches) -> DecodeState:
    """Runs decode steps on the device until `until` columns are filled or every row has stopped."""
    TRACE_COUNTS["decode"] += 1

    def cond(s: DecodeState):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeState):
        positions = jnp.where(s.done, -1, s.position)  # stopped rows stop being attended to
        logits, cache = forward(params, s.last[:, None], positions[:, None], s.cache, config=config, ops=ops)
        nxt = jnp.where(s.done, inputs.pad_id, _sample(logits[:, 0], s.key, s.step, switches, inputs))
        tokens = jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (0, s.step))
        return DecodeState(cache=cache, tokens=tokens, last=nxt, position=s.position + 1,
                           done=s.done | _finished(nxt, inputs.stop_ids), step=s.step + 1, key=s.key)

    return jax.lax.while_loop(cond, body, state)
