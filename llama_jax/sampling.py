"""Next-token sampling as pure functions of (logits, PRNG key).

Order of the filters, as in Hugging Face's logits warpers: temperature, then top-k, then top-p over what top-k
kept. Top-p is Meta's `sample_top_p` (llama/generation.py): sort descending, cumulative sum, drop a token when
the mass *before* it already exceeds p, renormalise, sample. Temperature 0 means greedy (argmax).

What changes the shape of the computation (greedy or not, k, top-p on or off) is `SamplingParams.switches`, a
static value compiled in; the temperature and p are traced values, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
    """Sampling settings outside their domain; the message names the setting and its allowed range."""


@dataclasses.dataclass(frozen=True)
class SamplerSwitches:
    """The compiled-in part of a sampler: hashable, a static argument of the generation functions."""

    greedy: bool = True
    top_k: int = 0  # 0 = no top-k filter
    top_p: bool = False  # whether the nucleus filter runs (its p is a traced value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter

    def __post_init__(self):
        if not self.temperature >= 0:  # also rejects NaN
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def switches(self) -> SamplerSwitches:
        """What the compiled sampler depends on; greedy decoding ignores k and p."""
        return SamplerSwitches(greedy=self.greedy, top_k=0 if self.greedy else int(self.top_k),
                               top_p=not self.greedy and self.top_p < 1)


GREEDY = SamplingParams()


def greedy(logits: jax.Array) -> jax.Array:
    """Argmax over the last axis (lowest id on ties, like torch.argmax)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_p_mask(sorted_probs: jax.Array, p) -> jax.Array:
    """True for the tokens nucleus sampling keeps, given probabilities sorted descending on the last axis.

    Keeps the smallest prefix whose mass reaches p (Meta: drop where cumsum - p_i > p).
    """
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    return mass_before <= p


def filtered_probs(logits: jax.Array, *, temperature, top_k: int = 0, top_p=1.0, use_top_p: bool = True):
    """(probs, ids): the renormalised distribution sampling draws from, over candidate ids.

    logits [..., V]. With top_k > 0 the candidates are the k best ids (descending); with top-p only, all ids
    sorted descending; with neither, all ids in vocabulary order. Filtered-out candidates have probability 0.
    """
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        logits, ids = jax.lax.top_k(logits, top_k)
    elif use_top_p:
        ids = jnp.argsort(-logits, axis=-1, stable=True).astype(jnp.int32)
        logits = jnp.take_along_axis(logits, ids, axis=-1)
    else:
        ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), logits.shape)
    probs = jax.nn.softmax(logits, axis=-1)
    if use_top_p:
        probs = jnp.where(top_p_mask(probs, top_p), probs, 0.0)
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    return probs, ids.astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, *, temperature=0.0, top_k: int = 0, top_p=1.0,
           is_greedy: bool | None = None, use_top_p: bool | None = None) -> jax.Array:
    """One token id per row of `logits` [..., V], drawn with `key` (all rows from the one key).

    `is_greedy` / `use_top_p` are the static switches. Leave them None when temperature / top_p are Python
    numbers: they are then derived from the values. Inside jit with traced values, pass them explicitly.
    """
    if is_greedy is None:
        is_greedy = float(temperature) == 0.0
    if is_greedy:
        return greedy(logits)
    if use_top_p is None:
        use_top_p = float(top_p) < 1.0
    probs, ids = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p)
    # log(0) = -inf: filtered candidates can never be drawn.
    choice = jax.random.categorical(key, jnp.log(probs), axis=-1)
    return jnp.take_along_axis(ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def sample_rows(logits: jax.Array, key: jax.Array, step, *, temperature=0.0, top_k: int = 0, top_p=1.0,
                is_greedy: bool | None = None, use_top_p: bool | None = None) -> jax.Array:
    """Samples each row of logits [B, V] with its own key, fold_in(fold_in(key, step), row).

    A row's random stream depends only on (key, step, row index), not on the batch size, so a prompt gets the
    same draw at the same row index whatever else is in the batch. Switches as in `sample`.
    """
    if is_greedy is None:
        is_greedy = float(temperature) == 0.0
    if is_greedy:
        return greedy(logits)
    step_key = jax.random.fold_in(key, step)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(logits.shape[0]))
    draw = lambda row, k: sample(row, k, temperature=temperature, top_k=top_k, top_p=top_p, is_greedy=False,
                                 use_top_p=use_top_p)
    return jax.vmap(draw)(logits, row_keys)


# Top candidates returned with every sampled token (the OpenAI API allows at most 20).
MAX_TOP_LOGPROBS = 20


def sample_slots(logits: jax.Array, *, temperature, top_k, top_p, seeds, counts) -> jax.Array:
    """One id per row of logits [S, V], every setting a traced per-row array ([S]), so that rows with different
    settings share one compiled function: temperature (0 = greedy), top_k (0 = off, a rank mask over the sorted
    logits), top_p (1 = off), and the draw keyed by fold_in(key(seed), count): a request's n-th token depends
    on its seed and n only, not on its row or on the other rows. Filters in `filtered_probs`'s order."""
    greedy_ids = greedy(logits)

    def draw():
        order = jnp.argsort(-logits, axis=-1, stable=True).astype(jnp.int32)
        scaled = jnp.take_along_axis(logits, order, axis=-1) / jnp.maximum(temperature, 1e-6)[:, None]
        rank = jnp.arange(logits.shape[-1])[None, :]
        keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
        probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
        keep &= top_p_mask(probs, top_p[:, None])
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
        choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, scaled, -jnp.inf))
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]

    # The sort is the costly part: an all-greedy batch skips it.
    sampled = jax.lax.cond(jnp.all(temperature == 0), lambda: greedy_ids, draw)
    return jnp.where(temperature == 0, greedy_ids, sampled)


def token_logprobs(logits: jax.Array, ids: jax.Array, want_top) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logprob of ids, top MAX_TOP_LOGPROBS logprobs, their ids) from logits [..., V] before any temperature or
    filtering; the top candidates are computed only when `want_top` (a traced bool) holds, zeros otherwise."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, jnp.maximum(ids, 0)[..., None], axis=-1)[..., 0]
    k = min(MAX_TOP_LOGPROBS, logits.shape[-1])
    empty = lambda: (jnp.zeros((*ids.shape, k), jnp.float32), jnp.zeros((*ids.shape, k), jnp.int32))
    top, top_ids = jax.lax.cond(want_top, lambda: tuple(jax.lax.top_k(logprobs, k)), empty)
    return chosen, top, top_ids.astype(jnp.int32)
