"""The decoding layout of the parameters: layers unrolled (or kept stacked), and, on a CPU, the weight products'
matrices packed for the packed_matmul kernel, as PackedWeight leaves that `dense` recognises."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.kernels import PackedWeight, packed_matmul
from llama_jax.meta_weights import HEAD_N_IN, LAYER_WEIGHTS
from llama_jax.model import unstack_layers


def why_not_packed(config: LlamaConfig) -> str | None:
    """Why the packed kernel cannot serve this model here, or None when it can."""
    if jax.default_backend() != "cpu":
        return f"the kernel is for CPUs and JAX runs on {jax.default_backend()}"
    if config.compute_dtype != jnp.float32 or config.weight_dtype != jnp.float32:
        return f"the kernel is fp32 and the model is dtype={config.dtype}, param_dtype={config.param_dtype}"
    # The output head's width (the vocabulary) is not checked: a head that does not fit stays unpacked.
    widths = (config.n_heads * config.head_dim, config.kv_heads * config.head_dim, config.hidden_dim, config.dim)
    if any(w % packed_matmul.STRIP for w in widths):
        return f"a weight's output width in {widths} is not a multiple of {packed_matmul.STRIP}"
    try:
        packed_matmul.load()
    except packed_matmul.PackedMatmulUnavailable as e:
        return str(e)
    return None


def is_packed(params: Any) -> bool:
    return any(isinstance(leaf, PackedWeight)
               for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, PackedWeight)))


@partial(jax.jit, static_argnums=(1, 2))
def _pack(w, n_in: int, n_lead: int) -> PackedWeight:
    return PackedWeight(packed_matmul.pack(w, n_in, n_lead), n_in=n_in)


def pack_weights(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, Any]:
    """params (layers stacked or unrolled) with every weight product's matrix packed. The head stays as it is when
    tied (the token lookup reads the same matrix unpacked) or when the vocabulary is not a multiple of the strip
    width."""
    packed = dict(params)
    for key, layer in params.items():
        if key == "layers" or key.startswith("layers_"):
            layer = {module: dict(sub) for module, sub in layer.items()}
            for w in LAYER_WEIGHTS:
                if w.n_in:
                    module, name = w.path
                    layer[module][name] = _pack(layer[module][name], w.n_in, int(key == "layers"))
            packed[key] = layer
    if "output" in params and config.vocab_size % packed_matmul.STRIP == 0:
        packed["output"] = _pack(params["output"], HEAD_N_IN, 0)
    return packed


def decoding_params(params: Mapping[str, Any], config: LlamaConfig, *, packed: bool) -> dict[str, Any]:
    """`params` laid out for `config.scan_layers` (stacked, as checkpoints store them, or unrolled), packed if asked."""
    if packed:
        params = pack_weights(params, config)
    return unstack_layers(params, config.n_layers) if not config.scan_layers and "layers" in params else params
