"""LLaMA 2 / 3 in Flax Linen, numerically following Meta's reference model.py.

Parameter names mirror Meta's state dict (tok_embeddings, layers.attention.wq, feed_forward.w1, ...), with the
layers stacked on a leading axis so they run under `nn.scan`. Every parameter carries logical axis names (embed,
q_heads, kv_heads, head_dim, mlp, vocab, layers) that sharding rules map onto a mesh. Every weight product is
`ops.dense` and attention is `ops.attention`: llama_jax.kernels chooses, once, what runs them on each backend.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.kernels import Ops, select_ops
from llama_jax.kv_cache import KVCache, init_cache

__all__ = ["KVCache", "Llama", "forward", "init_cache", "init_params", "param_logical_axes", "rope_frequencies",
           "unstack_layers"]

Params = Any


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, config: LlamaConfig,
           init=nn.initializers.normal(0.02)):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, config.weight_dtype)


class RMSNorm(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        weight = _param(self, "weight", (x.shape[-1],), ("norm",), self.config, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
        # Meta: `self._norm(x.float()).type_as(x) * self.weight`.
        return normed.astype(x.dtype) * weight.astype(x.dtype)


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies of Meta's `precompute_freqs_cis`, with Llama 3.1 scaling where configured."""
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2)[: dim // 2].astype(np.float32) / dim))
    scaling = config.rope_scaling if config.use_scaled_rope else None
    if scaling is None:
        return freqs.astype(np.float32)
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    freqs = freqs.astype(np.float64)
    wavelen = 2 * math.pi / freqs
    smooth = ((scaling.original_max_seq_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = np.where(wavelen < high_wavelen, freqs, np.where(wavelen > low_wavelen, freqs / scaling.factor, blended))
    return scaled.astype(np.float32)


def apply_rope(x, positions, freqs):
    """Rotates interleaved pairs (x[2i], x[2i+1]) by position * freq, as Meta's complex multiply does.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq].
    """
    angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(freqs)[None, None, :]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


class Attention(nn.Module):
    config: LlamaConfig
    ops: Ops

    @nn.compact
    def __call__(self, x, positions, layer, cache: KVCache | None, segment_ids=None):
        """positions None: every row is 0..seq-1, unpadded, and there is no cache (training). segment_ids: packed
        documents (training): attention stays inside each, and `positions` restart where one starts."""
        cfg, ops = self.config, self.ops
        wq = _param(self, "wq", (cfg.dim, cfg.n_heads, cfg.head_dim), ("embed", "q_heads", "head_dim"), cfg)
        wk = _param(self, "wk", (cfg.dim, cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg)
        wv = _param(self, "wv", (cfg.dim, cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg)
        wo = _param(self, "wo", (cfg.n_heads, cfg.head_dim, cfg.dim), ("q_heads", "head_dim", "embed"), cfg)

        q, k, v = ops.dense(x, wq), ops.dense(x, wk), ops.dense(x, wv)
        rope_positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]) if positions is None else positions
        freqs = rope_frequencies(cfg)
        q, k = apply_rope(q, rope_positions, freqs), apply_rope(k, rope_positions, freqs)
        q = nn.with_logical_constraint(q, ("batch", "length", "q_heads", "head_dim"))

        if cache is None:
            out = ops.attention(q, k, v, q_positions=positions, kv_positions=positions, segment_ids=segment_ids)
        else:
            cache = cache.write(layer, k, v)
            out = ops.attention(q, cache.k, cache.v, q_positions=positions, kv_positions=cache.positions,
                                kv_len=cache.index + x.shape[1], heads_first=True, layer=layer, row=cache.row)
        return ops.dense(out, wo, n_in=2), cache


class FeedForward(nn.Module):
    config: LlamaConfig
    ops: Ops

    @nn.compact
    def __call__(self, x):
        cfg, ops = self.config, self.ops
        w1 = _param(self, "w1", (cfg.dim, cfg.hidden_dim), ("embed", "mlp"), cfg)
        w3 = _param(self, "w3", (cfg.dim, cfg.hidden_dim), ("embed", "mlp"), cfg)
        w2 = _param(self, "w2", (cfg.hidden_dim, cfg.dim), ("mlp", "embed"), cfg)
        gate = jax.nn.silu(ops.dense(x, w1)) * ops.dense(x, w3)
        gate = nn.with_logical_constraint(gate, ("batch", "length", "mlp"))
        return ops.dense(gate, w2)


class Block(nn.Module):
    """Pre-norm transformer layer. Signature fits `nn.scan`: (carry, layer_index) -> (carry, None)."""

    config: LlamaConfig
    ops: Ops

    @nn.compact
    def __call__(self, carry, layer, positions, segment_ids=None):
        x, cache = carry
        h, cache = Attention(self.config, self.ops, name="attention")(
            RMSNorm(self.config, name="attention_norm")(x), positions, layer, cache, segment_ids)
        x = x + h
        x = x + FeedForward(self.config, self.ops, name="feed_forward")(RMSNorm(self.config, name="ffn_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, cache), None


class Llama(nn.Module):
    config: LlamaConfig
    ops: Ops = Ops()

    @nn.compact
    def __call__(self, tokens, positions=None, cache: KVCache | None = None, last_only: bool = False,
                 segment_ids=None):
        cfg, ops = self.config, self.ops
        embedding = _param(self, "tok_embeddings", (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg)
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if cache is not None:
            cache = cache.record_positions(positions)

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=ops.remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})(cfg, ops, name="layers")
            (x, cache), _ = layers((x, cache), jnp.arange(cfg.n_layers), positions, segment_ids)
        else:
            for i in range(cfg.n_layers):
                (x, cache), _ = block(cfg, ops, name=f"layers_{i}")((x, cache), i, positions, segment_ids)

        if last_only:  # generation needs the last position's logits only: no [batch, seq, vocab] product
            x = x[:, -1:]
        x = RMSNorm(cfg, name="norm")(x)
        head = embedding.T if cfg.tie_embeddings else _param(self, "output", (cfg.dim, cfg.vocab_size),
                                                            ("embed", "vocab"), cfg)
        # Meta's `self.output(h).float()`: the product in the compute dtype, then fp32. Training reads these
        # logits several times (logsumexp, its gradient): bf16 halves that traffic, and the backward products
        # stay bf16 x bf16, where an fp32 cotangent would make them fp32 matmuls on a GPU.
        logits = ops.dense(x, head).astype(jnp.float32)
        return logits, None if cache is None else cache.advance(tokens.shape[1])


# --- functional API ------------------------------------------------------------------------------------------

def _init_variables(config: LlamaConfig, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Llama(config.replace(scan_layers=True)).init(rng, tokens, tokens)


# Module-level jit with the config static: one compilation per config, not one per call.
_jit_init = jax.jit(_init_variables, static_argnums=0)


def init_params(config: LlamaConfig, rng: jax.Array) -> Params:
    """Random parameters with layers stacked on axis 0 (the layout checkpoints use, whatever `scan_layers`)."""
    return nn.unbox(_jit_init(config, rng)["params"])


def param_logical_axes(config: LlamaConfig) -> Params:
    """Logical axis names of every parameter, as a pytree of PartitionSpecs shaped like `init_params`."""
    abstract = jax.eval_shape(functools.partial(_init_variables, config), jax.random.key(0))
    return nn.get_partition_spec(abstract["params"])


def unstack_layers(params: Params, n_layers: int) -> Params:
    """Stacked `layers` -> `layers_0 … layers_{n-1}`, the layout of the unrolled (scan_layers=False) model."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(n_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda p, i=i: p[i], stacked)
    return params


def forward(params: Params, tokens: jax.Array, positions: jax.Array | None = None, cache: KVCache | None = None,
            *, config: LlamaConfig, ops: Ops | None = None, last_only: bool = False,
            segment_ids: jax.Array | None = None):
    """Logits [batch, seq, vocab] in fp32 (seq 1 with last_only) and the updated cache (None without a cache).

    tokens, positions: int [batch, seq]; a position of -1 marks a padding token that nothing attends to.
    positions=None (no cache) means 0..seq-1 in every row, unpadded: training's case, where attention needs no
    mask array and a fused kernel may run it. ops: the kernels (default: `select_ops(config)` for this backend).
    segment_ids int [batch, seq] (training, no cache): packed documents; a token attends only to earlier tokens of
    its own segment, and `positions` (required with them) restart at 0 where a document starts.
    """
    if positions is None and cache is not None:
        raise ValueError("forward: positions are required with a cache (they say where the tokens go)")
    if segment_ids is not None and (positions is None or cache is not None):
        raise ValueError("forward: segment_ids need positions and no cache (packed training rows)")
    if not config.scan_layers and "layers" in params:
        params = unstack_layers(params, config.n_layers)
    ops = ops or select_ops(config)
    # fp32 compute means Meta's fp32 arithmetic. On NVIDIA GPUs XLA otherwise rounds fp32 matmul inputs to TF32.
    fp32 = config.compute_dtype == jnp.float32
    with jax.default_matmul_precision("highest") if fp32 else contextlib.nullcontext():
        return Llama(config, ops).apply({"params": params}, tokens, positions, cache, last_only, segment_ids)
