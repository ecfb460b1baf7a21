"""LLaMA 2 / 3 in Flax Linen, numerically following Meta's reference model.py.

Parameter names mirror Meta's state dict (tok_embeddings, layers.attention.wq, feed_forward.w1, ...), with
the layers stacked on a leading axis so they run under `nn.scan`. Every parameter carries logical axis names
(embed, q_heads, kv_heads, head_dim, mlp, vocab, layers); sharding rules map them onto a mesh.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import packed_matmul
from llama_jax.config import LlamaConfig

Params = Any
# Finite rather than -inf: a query whose keys are all masked (a padding row) then gets a uniform, ignorable
# distribution instead of NaNs that would poison gradients or sampling.
_MASKED = -1e30


class KVCache(NamedTuple):
    """Preallocated attention cache.

    k, v: per layer [batch, kv_heads, max_len, head_dim] (heads before slots, so a decode step's attention reads
    each head's keys as one contiguous matrix); a tuple of n_layers such arrays for the unrolled model, one array
    stacked on a leading layers axis when the layers run under `nn.scan` (which indexes them with a traced layer).
    Separate arrays matter on XLA:CPU: a layer's slice of a stacked array is copied before every product that
    reads it, which made decoding at batch 8 several times slower. positions: [batch, max_len], -1 marks an
    empty or padding slot; index: the slot the next token is written to (the same for every row: ragged prompts
    are left-padded so rows stay aligned).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    positions: jax.Array
    index: jax.Array

    def layer(self, layer) -> tuple[jax.Array, jax.Array]:
        return self.k[layer], self.v[layer]

    def write(self, layer, k, v) -> "KVCache":
        """Stores k, v ([batch, kv_heads, seq, head_dim]) of `layer` at slots index..index+seq-1."""
        if isinstance(self.k, tuple):
            def put(per_layer, new):
                updated = jax.lax.dynamic_update_slice(per_layer[layer], new.astype(per_layer[layer].dtype),
                                                       (0, 0, self.index, 0))
                return per_layer[:layer] + (updated,) + per_layer[layer + 1:]
        else:
            def put(stacked, new):
                return jax.lax.dynamic_update_slice(stacked, new.astype(stacked.dtype)[None],
                                                    (layer, 0, 0, self.index, 0))
        return self._replace(k=put(self.k, k), v=put(self.v, v))


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache, laid out for `config.scan_layers` (stacked) or the unrolled layers (a tuple)."""
    shape = (batch, config.kv_heads, max_len, config.head_dim)
    dtype = dtype or config.compute_dtype
    if config.scan_layers:
        k, v = jnp.zeros((config.n_layers, *shape), dtype), jnp.zeros((config.n_layers, *shape), dtype)
    else:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return KVCache(k=k, v=v, positions=jnp.full((batch, max_len), -1, jnp.int32), index=jnp.zeros((), jnp.int32))


# --- building blocks -----------------------------------------------------------------------------------------

def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, init, config: LlamaConfig):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, config.weight_dtype)


class RMSNorm(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        weight = _param(self, "weight", (x.shape[-1],), ("norm",), nn.initializers.ones, self.config)
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


def dense(x, w, n_in: int = 1, packed: bool = False):
    """x [*batch, *in] times w [*in, *out], contracting the n_in trailing axes of x: every weight product.

    packed: w holds packed_matmul.pack(w, n_in) (config.packed_weights, set by the Generator on a CPU), and the
    product runs in that kernel: inference only, it has no gradient.

    On a CPU the weight gradient is computed from an explicitly transposed x. Autodiff's form contracts the
    leading (batch) axes of x and of the output gradient, which XLA:CPU's YNNPACK dots do not take: XLA then
    transposes the larger output gradient and runs the product on Eigen: the forward + backward pass of
    small-100m (2 x 256 tokens) took about 3.5 s against 2.9 s.
    """
    if packed:
        k, n = math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])
        y = packed_matmul.matmul(x.reshape(-1, k), w.reshape(n // packed_matmul.STRIP, k, packed_matmul.STRIP))
        return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:])
    if jax.default_backend() == "cpu":
        return _dense_canonical_grads(x, w, n_in)
    return jnp.tensordot(x, w, n_in)


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


def default_attention_impl(backend: str | None = None) -> str:
    """The fused kernel path on GPU, the plain einsum (reference) path elsewhere."""
    backend = backend or jax.default_backend()
    return "dot_product_attention" if backend in ("gpu", "cuda", "rocm") else "einsum"


def _fused_kernel_applies(q, mask) -> bool:
    """cuDNN's flash attention: on a GPU, in bf16/fp16, head_dim a multiple of 8 up to 128 (what it supports),
    for the plain causal mask (no padding, no cache)."""
    head_dim = q.shape[-1]
    return (mask is None and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
            and jax.default_backend() == "gpu")


def attention(q, k, v, mask, impl: str = "einsum", heads_first: bool = False, filled=None):
    """Grouped-query attention without materialising repeated K/V.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim], or with heads_first
    [batch, kv_heads, kv_len, head_dim] (the cache's layout); mask: [batch, q_len, kv_len], or None for the
    plain causal mask of a full sequence (query i sees keys 0..i). filled: with the cache, how many of its
    slots are in use (every later slot is masked out).
    """
    # The cache's heads-first layout always takes the einsum path: jax.nn's non-fused path builds the same
    # products, and would first transpose the cache to its [batch, len, heads, dim] layout.
    if impl == "dot_product_attention" and not heads_first:
        if _fused_kernel_applies(q, mask):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        # jax.nn's own XLA lowering (what implementation=None picks): any mask, any dtype, any backend.
        if mask is None:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])
    if mask is None:
        return _causal_attention(q, k, v)
    if heads_first and filled is not None and q.shape[1] == 1 and jax.default_backend() == "cpu":
        return _decode_attention_windows(q, k, v, mask, filled)
    return _einsum_attention(q, k, v, mask, heads_first)


def _decode_attention_windows(q, k, v, mask, filled):
    """A decode step on a CPU reads only the cache's first n slots, n the smallest window that holds every
    filled slot: windows every 1/8 of the cache up to half of it, then the whole cache.

    The product runs elementwise (XLA fuses the window's slice into it, where a dot would first copy the
    slice out); beyond half the cache that is slower than the dot over the whole cache. Every slot left out
    is masked, so each result is unchanged. Attention of small-100m's 12 layers at batch 8 over a 272-slot
    cache, averaged over fills from 20 to 260 slots: 9.0 ms instead of 12.2 ms (throwaway script, XLA:CPU,
    2 cores).
    """
    length = k.shape[2]
    eighth = -(-length // 8)
    windows = list(range(eighth, length // 2 + 1, eighth))
    if not windows:
        return _einsum_attention(q, k, v, mask, heads_first=True)
    branches = [functools.partial(_elementwise_attention, slots=n) for n in windows]
    branches.append(functools.partial(_einsum_attention, heads_first=True))
    choice = sum((filled > n).astype(jnp.int32) for n in windows)
    return jax.lax.switch(choice, branches, q, k, v, mask)


def _elementwise_attention(q, k, v, mask, slots: int):
    """One query row per sequence against the first `slots` of a heads-first cache, as multiply-and-sum
    fusions. Products accumulate in fp32 and are rounded to the compute dtype where a dot's output would be."""
    b, _, h, d = q.shape
    kv_heads = k.shape[1]
    k, v, mask = k[:, :, :slots], v[:, :, :slots], mask[:, 0, :slots]
    q = q.reshape(b, kv_heads, h // kv_heads, 1, d).astype(jnp.float32)  # [b, g, r, 1, d]
    scores = jnp.sum(q * k[:, :, None].astype(jnp.float32), axis=-1).astype(v.dtype)  # [b, g, r, slots]
    scores = (scores / math.sqrt(d)).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.sum(probs[..., None].astype(jnp.float32) * v[:, :, None].astype(jnp.float32), axis=3)
    return out.astype(v.dtype).reshape(b, 1, h, d)


# Query rows per block of the einsum path's plain causal attention (training and evaluation).
_CAUSAL_BLOCK = 64


def _causal_attention(q, k, v):
    """The plain causal mask in blocks of query rows: block i reads only keys 0..(i+1)·size-1, skipping the
    masked upper triangle, whose scores are exact zeros after the softmax, so every row's result is the same.
    Forward + backward of small-100m's attention (2 x 256 tokens, XLA:CPU) took 0.17 s instead of 0.28 s with
    4 blocks; 8 blocks of 32 rows were slower again, hence at most 8 blocks of at least 64 rows."""
    t = q.shape[1]
    blocks = min(8, t // _CAUSAL_BLOCK)
    if blocks < 2 or t % blocks:
        return _einsum_attention(q, k, v, jnp.tril(jnp.ones((t, t), bool))[None], heads_first=False)
    size = t // blocks
    outs = []
    for i in range(blocks):
        keys = (i + 1) * size
        # Query i·size + r sees keys 0..i·size + r: the same for every row, broadcast rather than materialised.
        mask = (jnp.arange(keys)[None, :] <= i * size + jnp.arange(size)[:, None])[None]
        outs.append(_einsum_attention(q[:, i * size:keys], k[:, :keys], v[:, :keys], mask, heads_first=False))
    return jnp.concatenate(outs, axis=1)


def _einsum_attention(q, k, v, mask, heads_first: bool):
    b, t, h, d = q.shape
    kv_heads = k.shape[1 if heads_first else 2]
    rep = h // kv_heads
    # Each kv head serves `rep` query heads. Without sharing (rep 1) the products stay 4-D: XLA:CPU ran the
    # 5-D form with its unit axis 1.8x slower in the forward pass (small-100m's attention, 2 x 256 tokens).
    heads = "g" if rep == 1 else "gr"
    if rep > 1:
        q = q.reshape(b, t, kv_heads, rep, d)
    kv = "bgsd" if heads_first else "bsgd"
    # As Meta: scores in the compute dtype, softmax in fp32 (`F.softmax(scores.float(), dim=-1).type_as(xq)`).
    scores = (jnp.einsum(f"bt{heads}d,{kv}->b{heads}ts", q, k) / math.sqrt(d)).astype(jnp.float32)
    scores = jnp.where(mask.reshape(mask.shape[0], *(1,) * len(heads), *mask.shape[1:]), scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"b{heads}ts,{kv}->bt{heads}d", probs, v)
    return out.reshape(b, t, h, d)


class Attention(nn.Module):
    config: LlamaConfig
    # Every row's positions are 0..seq-1 and there is no cache: the plain causal mask, which fused kernels take
    # without a mask array.
    plain_causal: bool = False

    @nn.compact
    def __call__(self, x, positions, layer, cache: KVCache | None):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        dt = cfg.compute_dtype
        wq = _param(self, "wq", (cfg.dim, cfg.n_heads, cfg.head_dim), ("embed", "q_heads", "head_dim"), init, cfg)
        wk = _param(self, "wk", (cfg.dim, cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), init, cfg)
        wv = _param(self, "wv", (cfg.dim, cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), init, cfg)
        wo = _param(self, "wo", (cfg.n_heads, cfg.head_dim, cfg.dim), ("q_heads", "head_dim", "embed"), init, cfg)

        packed = cfg.packed_weights
        q, k, v = (dense(x, w.astype(dt), packed=packed) for w in (wq, wk, wv))
        freqs = rope_frequencies(cfg)
        q, k = apply_rope(q, positions, freqs), apply_rope(k, positions, freqs)
        q = nn.with_logical_constraint(q, ("batch", "length", "q_heads", "head_dim"))

        t = x.shape[1]
        if cache is None:
            key_positions = positions
            query_slots = jnp.arange(t)
        else:
            cache = cache.write(layer, k.swapaxes(1, 2), v.swapaxes(1, 2))
            k, v = (a.astype(dt) for a in cache.layer(layer))
            key_positions = cache.positions  # already holds this call's positions (see Llama.__call__)
            query_slots = cache.index + jnp.arange(t)
        if self.plain_causal:
            mask = None
        else:
            key_slots = jnp.arange(key_positions.shape[1])
            # Causal in slot order, and never attend to empty or padding slots (position -1).
            mask = (key_slots[None, None, :] <= query_slots[None, :, None]) & (key_positions[:, None, :] >= 0)
        out = attention(q, k, v, mask, cfg.attention_impl, heads_first=cache is not None,
                        filled=None if cache is None else cache.index + t)
        return dense(out, wo.astype(dt), n_in=2, packed=packed), cache


class FeedForward(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        dt = cfg.compute_dtype
        w1 = _param(self, "w1", (cfg.dim, cfg.hidden_dim), ("embed", "mlp"), init, cfg)
        w3 = _param(self, "w3", (cfg.dim, cfg.hidden_dim), ("embed", "mlp"), init, cfg)
        w2 = _param(self, "w2", (cfg.hidden_dim, cfg.dim), ("mlp", "embed"), init, cfg)
        packed = cfg.packed_weights
        gate = jax.nn.silu(dense(x, w1.astype(dt), packed=packed)) * dense(x, w3.astype(dt), packed=packed)
        gate = nn.with_logical_constraint(gate, ("batch", "length", "mlp"))
        return dense(gate, w2.astype(dt), packed=packed)


class Block(nn.Module):
    """Pre-norm transformer layer. Signature fits `nn.scan`: (carry, layer_index) -> (carry, None)."""

    config: LlamaConfig
    plain_causal: bool = False

    @nn.compact
    def __call__(self, carry, layer, positions):
        x, cache = carry
        h, cache = Attention(self.config, self.plain_causal, name="attention")(
            RMSNorm(self.config, name="attention_norm")(x), positions, layer, cache)
        x = x + h
        x = x + FeedForward(self.config, name="feed_forward")(RMSNorm(self.config, name="ffn_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, cache), None


def _save_dots_and_fused_attention(prim, *avals, **params) -> bool:
    """dots_no_batch, plus the output and softmax statistics of cuDNN's attention forward pass: a custom call,
    which no dots policy saves, so that kernel would otherwise run again in the backward pass. Costs one more
    activation of `dim` values per token and layer (4 MiB per 1k tokens and layer for a bf16 1B model).
    Elsewhere (the einsum path, a CPU) it is dots_no_batch. The primitive's name is JAX's own, not public API:
    a GPU test checks that the policy still keeps the kernel from running twice."""
    return (prim.name == "dot_product_attention_fwd_wrapper"
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "dots_attention": _save_dots_and_fused_attention,
}


class Llama(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache: KVCache | None = None):
        cfg = self.config
        plain_causal = positions is None and cache is None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        embedding = _param(self, "tok_embeddings", (cfg.vocab_size, cfg.dim), ("vocab", "embed"),
                           nn.initializers.normal(0.02), cfg)
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if cache is not None:
            cache = cache._replace(positions=jax.lax.dynamic_update_slice(
                cache.positions, positions.astype(jnp.int32), (0, cache.index)))

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        carry = (x, cache)
        if cfg.scan_layers:
            layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(0, nn.broadcast), length=cfg.n_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})(cfg, plain_causal, name="layers")
            carry, _ = layers(carry, jnp.arange(cfg.n_layers), positions)
        else:
            for i in range(cfg.n_layers):
                carry, _ = block(cfg, plain_causal, name=f"layers_{i}")(carry, i, positions)
        x, cache = carry

        x = RMSNorm(cfg, name="norm")(x)
        if cfg.tie_embeddings:
            head = embedding.T
        else:
            head = _param(self, "output", (cfg.dim, cfg.vocab_size), ("embed", "vocab"),
                          nn.initializers.normal(0.02), cfg)
        # Meta's `self.output(h).float()`: the product in the compute dtype, then fp32. Training reads these
        # logits several times (logsumexp, its gradient): bf16 halves that traffic, and the backward products
        # stay bf16 x bf16, where an fp32 cotangent would make them fp32 matmuls on a GPU.
        logits = dense(x, head.astype(cfg.compute_dtype), packed=packed_head(cfg)).astype(jnp.float32)
        if cache is not None:
            cache = cache._replace(index=cache.index + tokens.shape[1])
        return logits, cache


def packed_head(config: LlamaConfig) -> bool:
    """With packed_weights, whether the output head is packed too: not when tied (the embedding's transpose,
    which the token lookup reads unpacked), nor for a vocabulary that is not a multiple of the strip width."""
    return (config.packed_weights and not config.tie_embeddings
            and config.vocab_size % packed_matmul.STRIP == 0)


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
            *, config: LlamaConfig):
    """Logits [batch, seq, vocab] in fp32 and the updated cache (None when no cache was given).

    tokens, positions: int [batch, seq]; a position of -1 marks a padding token that nothing attends to.
    positions=None (no cache) means 0..seq-1 in every row, unpadded: training's case, where attention needs no
    mask array and a GPU runs cuDNN's fused causal kernel (attention_impl="dot_product_attention", bf16).
    """
    if positions is None and cache is not None:
        raise ValueError("forward: positions are required with a cache (they say where the tokens go)")
    if not config.scan_layers and "layers" in params:
        params = unstack_layers(params, config.n_layers)
    # fp32 compute means Meta's fp32 arithmetic. On NVIDIA GPUs XLA otherwise rounds fp32 matmul inputs to TF32
    # (1e-3 relative error on an H100; torch's matmuls do not).
    fp32 = config.compute_dtype == jnp.float32
    with jax.default_matmul_precision("highest") if fp32 else contextlib.nullcontext():
        return Llama(config).apply({"params": params}, tokens, positions, cache)
