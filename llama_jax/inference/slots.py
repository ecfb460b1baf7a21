"""The compiled side of continuous batching: a cache of S slots, each an independent sequence at its own length
(the cache's per-row index), and two functions over it:

    decode_steps    one token (or a few, while no prompt waits) for every slot: [S, 1] through the model;
                    slots not decoding pass position -1, so nothing they write is ever attended to
    prefill_chunk   C prompt tokens of one slot, run as a batch of one that reads and writes only that slot's row
                    of the cache, in place, so a prompt fills its slot while the other slots keep their state

Every per-request setting (sampling, the slot, its index, its position) is a traced array: the compiled decode
steps serve any mix of requests, and prefill compiles once per chunk bucket (and once more per bucket for a
request that asks for its prompt's log-probabilities).
"""

from __future__ import annotations

import collections
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.kernels import Ops
from llama_jax.kv_cache import KVCache, init_cache
from llama_jax.model import forward
from llama_jax.sampling import sample_slots, token_logprobs

# Incremented at trace time only: tests read it to prove that a mixed load compiles nothing new.
SLOT_TRACE_COUNTS: collections.Counter[str] = collections.Counter()


class SlotSampling(NamedTuple):
    """Per-row sampling settings, each [rows]; want_top: a scalar bool, whether any row wants top candidates."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seeds: jax.Array
    counts: jax.Array  # tokens the row's request has generated so far: the index its next draw is keyed by
    want_top: jax.Array


class Sampled(NamedTuple):
    """Per row: the new id, its log-probability, and the top candidates (zeros unless asked for)."""

    ids: jax.Array
    logprobs: jax.Array
    top_logprobs: jax.Array
    top_ids: jax.Array


def _sample(logits, s: SlotSampling) -> Sampled:
    ids = sample_slots(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seeds=s.seeds,
                       counts=s.counts)
    return Sampled(ids, *token_logprobs(logits, ids, s.want_top))


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def empty_cache(config: LlamaConfig, slots: int, length: int, dtype: str | None = None) -> KVCache:
    return init_cache(config, slots, length, dtype, per_row_index=True)


@partial(jax.jit, static_argnames=("config", "ops", "steps"), donate_argnames=("cache",))
def decode_steps(params, cache: KVCache, tokens, positions, index, sampling: SlotSampling, *, config: LlamaConfig,
                 ops: Ops, steps: int) -> tuple[KVCache, Sampled]:
    """`steps` tokens for every decoding slot, on the device; returns them stacked [steps, S].

    tokens, positions, index: [S]; position -1 for a slot that is not decoding (free, or still prefilling): it
    stays idle, and nothing it writes is ever attended to.
    """
    SLOT_TRACE_COUNTS[f"decode_steps_{steps}"] += 1
    active = (positions >= 0).astype(jnp.int32)

    def step(carry, _):
        cache, tokens, positions, index, counts = carry
        logits, cache = forward(params, tokens[:, None], positions[:, None], cache._replace(index=index),
                                config=config, ops=ops)
        out = _sample(logits[:, 0], sampling._replace(counts=counts))
        carry = (cache, jnp.where(active > 0, out.ids, tokens), jnp.where(active > 0, positions + 1, -1),
                 index + active, counts + active)
        return carry, out

    (cache, *_), out = jax.lax.scan(step, (cache, tokens, positions, index, sampling.counts), None, length=steps)
    return cache, out


@partial(jax.jit, static_argnames=("config", "ops", "all_logits"), donate_argnames=("cache",))
def prefill_chunk(params, cache: KVCache, slot, tokens, positions, targets, index, fresh, sampling: SlotSampling,
                  *, config: LlamaConfig, ops: Ops, all_logits: bool):
    """Writes one chunk of a prompt into `slot` and samples from its last position.

    tokens, positions, targets: [C], the chunk right-aligned (padding first, position -1), so that its last token
    is always at C-1; targets: each token's successor in the prompt, whose log-probabilities `all_logits` returns.
    index: the slot's next free cache slot. fresh: the chunk starts a new request (earlier positions are wiped).
    """
    SLOT_TRACE_COUNTS[f"prefill_chunk_{tokens.shape[0]}{'_logits' if all_logits else ''}"] += 1
    # The chunk reads and writes the slot's row in place (KVCache.row): copying the row out and back cost as much
    # as a short chunk's own compute on a CPU.
    wiped = jnp.where(fresh, -1, jax.lax.dynamic_slice_in_dim(cache.positions, slot, 1, 0))
    view = cache._replace(positions=jax.lax.dynamic_update_slice_in_dim(cache.positions, wiped, slot, 0),
                          index=index, row=slot)
    tokens, positions = tokens[None], positions[None]
    prompt = None
    if all_logits:
        logits, view = forward(params, tokens, positions, view, config=config, ops=ops)
        prompt = token_logprobs(logits[0], targets, jnp.bool_(True))
    else:
        logits, view = forward(params, tokens, positions, view, config=config, ops=ops, last_only=True)
    cache = view._replace(index=cache.index, row=None)
    return cache, _sample(logits[:, -1], sampling), prompt
