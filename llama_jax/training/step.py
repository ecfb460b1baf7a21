"""One optimizer step as a pure function: the loss, gradient accumulation, AdamW and its schedule."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from llama_jax.adapters import attach
from llama_jax.config import LlamaConfig
from llama_jax.kernels import Ops
from llama_jax.model import forward
from llama_jax.training.config import TrainConfig


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, tc.steps, tc.lr * tc.min_lr_ratio)


def _decay_mask(params):
    # No weight decay on norm gains: decaying them towards 0 fights the normalisation.
    return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                    mask=_decay_mask))


def loss_sums(params, inputs, targets, loss_mask, segment_ids=None, positions=None, *, config: LlamaConfig,
              ops: Ops | None = None):
    """(sum of masked token cross-entropies, number of counted tokens), both fp32.

    Without segment_ids every row is positions 0..seq-1 attending to all of itself; with them (document masking)
    a token attends only within its document, at the given positions."""
    logits, _ = forward(params, inputs, positions, config=config, ops=ops, segment_ids=segment_ids)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((logz - target_logits) * mask), jnp.sum(mask)


def accumulate_gradients(params, inputs, targets, loss_mask, segment_ids=None, positions=None, *,
                         config: LlamaConfig, param_shardings=None, ops: Ops | None = None,
                         to_model: Callable | None = None):
    """(mean gradient, mean loss, token count) of a [grad_accum, micro, seq] batch (segment_ids and positions:
    document masking, as `loss_sums`). to_model: the model's parameters made from the differentiated `params`
    (LoRA: the frozen base with these adapters attached); default `params` themselves.

    Gradients of token *sums* are accumulated over micro-batches and divided by the token count of the whole
    batch once, so accumulation over 4 micro-batches of B is the same mean as one batch of 4B.
    """
    batch = tuple(x for x in (inputs, targets, loss_mask, segment_ids, positions) if x is not None)
    to_model = to_model or (lambda p: p)
    if inputs.shape[0] == 1:
        # No accumulation: differentiate the mean directly. Saves the zero-filled accumulator and the division
        # of every gradient, each a full pass over parameter-sized memory.
        def mean_loss(p):
            total, count = loss_sums(to_model(p), *(x[0] for x in batch), config=config, ops=ops)
            return total / jnp.maximum(count, 1.0), count

        (loss, count), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        return grads, loss, count

    grad_fn = jax.value_and_grad(lambda p, *b: loss_sums(to_model(p), *b, config=config, ops=ops), has_aux=True)

    def micro(carry, batch):
        grads, loss, count = carry
        (l, n), g = grad_fn(params, *batch)
        return (jax.tree.map(jnp.add, grads, g), loss + l, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    if param_shardings is not None:  # keep the accumulator as sharded as the parameters (FSDP memory)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss_sum, count), _ = jax.lax.scan(micro, init, batch)
    denom = jnp.maximum(count, 1.0)
    return jax.tree.map(lambda g: g / denom, grads), loss_sum / denom, count


def model_params(state: dict[str, Any], lora, dropout_key=None) -> Callable:
    """trained params -> the model's parameters: themselves, or with LoRA the state's frozen base with them as
    adapters (dropping their input with `dropout_key` when training)."""
    if lora is None:
        return lambda params: params
    return lambda adapters: attach(state["base"], adapters, lora, dropout_key)


def train_step_fn(config: LlamaConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                  param_shardings: Any, ops: Ops | None = None, lora=None) -> Callable:
    """(state, inputs, targets, loss_mask[, segment_ids, positions]) -> (state, metrics); batch arrays are
    [grad_accum, micro, seq]; the last two come with document masking.
    ops: the kernels (default: select_ops(config) for this backend, chosen when the step is traced).
    lora: state["params"] are adapters on the frozen state["base"], and only they are differentiated."""

    def step(state, *batch):
        params = state["params"]
        rng, dropout_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        grads, loss, count = accumulate_gradients(params, *batch, config=config, param_shardings=param_shardings,
                                                  ops=ops, to_model=model_params(state, lora, dropout_rng))
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {**state, "params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": jax.random.key_data(rng)}
        # A finite loss says the *old* parameters were fine; the checkpoint holds the new ones. Finite old
        # parameters and finite gradients (a finite norm) give finite AdamW updates, hence finite new parameters:
        # checking the norm spares a pass over every parameter. It is the computation the clipping step makes,
        # so XLA computes it once for both.
        grad_norm = _tree_norm(grads)
        metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm,
                   "lr": schedule(state["step"]), "params_finite": jnp.isfinite(grad_norm)}
        return new_state, metrics

    return step


# What optax.clip_by_global_norm computes: optax.tree.norm, optax.global_norm before optax 0.2.5.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def eval_step_fn(config: LlamaConfig, ops: Ops | None = None, lora=None) -> Callable:
    """(params, base, inputs, targets, loss_mask[, segment_ids, positions]) -> loss_sums of one [1, micro, seq]
    held-out batch; base: a LoRA run's frozen weights (None otherwise)."""

    def step(params, base, *batch):
        params = model_params({"base": base}, lora)(params)
        return loss_sums(params, *(x[0] for x in batch), config=config, ops=ops)

    return step
