"""Meta's state-dict layout (torch Linear: [out, in]) and our parameter tree, mapped through one table.

Pure numpy, one layer at a time, so the converter never needs the whole model in memory.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import numpy as np

from llama_jax.config import LlamaConfig


class LayerWeight(NamedTuple):
    """One tensor of a transformer layer, in every layout that names it."""

    meta_key: str  # Meta's name inside `layers.{i}.`
    hf_key: str  # Hugging Face's name inside `model.layers.{i}.`
    path: tuple[str, str]  # our parameter tree's path inside a layer
    shape: tuple[str, ...]  # our shape, as LlamaConfig attributes
    n_in: int  # input axes of our layout, contracted by model.dense (0: a norm gain)
    split: int | None  # the [out, in] axis Meta's model parallelism splits (0 column-, 1 row-parallel; None: copied)


LAYER_WEIGHTS = (
    LayerWeight("attention.wq.weight", "self_attn.q_proj.weight", ("attention", "wq"),
                ("dim", "n_heads", "head_dim"), 1, 0),
    LayerWeight("attention.wk.weight", "self_attn.k_proj.weight", ("attention", "wk"),
                ("dim", "kv_heads", "head_dim"), 1, 0),
    LayerWeight("attention.wv.weight", "self_attn.v_proj.weight", ("attention", "wv"),
                ("dim", "kv_heads", "head_dim"), 1, 0),
    LayerWeight("attention.wo.weight", "self_attn.o_proj.weight", ("attention", "wo"),
                ("n_heads", "head_dim", "dim"), 2, 1),
    LayerWeight("feed_forward.w1.weight", "mlp.gate_proj.weight", ("feed_forward", "w1"), ("dim", "hidden_dim"), 1, 0),
    LayerWeight("feed_forward.w2.weight", "mlp.down_proj.weight", ("feed_forward", "w2"), ("hidden_dim", "dim"), 1, 1),
    LayerWeight("feed_forward.w3.weight", "mlp.up_proj.weight", ("feed_forward", "w3"), ("dim", "hidden_dim"), 1, 0),
    LayerWeight("attention_norm.weight", "input_layernorm.weight", ("attention_norm", "weight"), ("dim",), 0, None),
    LayerWeight("ffn_norm.weight", "post_attention_layernorm.weight", ("ffn_norm", "weight"), ("dim",), 0, None),
)
LAYER_KEYS = tuple(w.meta_key for w in LAYER_WEIGHTS)
# The output head ([dim, vocab] here, Meta's `output.weight` [vocab, dim]) is the one other weight product.
HEAD_N_IN = 1


def our_shape(weight: LayerWeight, config: LlamaConfig) -> tuple[int, ...]:
    return tuple(getattr(config, name) for name in weight.shape)


def meta_shape(weight: LayerWeight, config: LlamaConfig) -> tuple[int, ...]:
    """[out, in] for a weight, [dim] for a norm."""
    shape = our_shape(weight, config)
    inner = (math.prod(shape[:weight.n_in]),) if weight.n_in else ()
    return (math.prod(shape[weight.n_in:]), *inner)


def layer_from_meta(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
    """One layer's Meta tensors (keys as in LAYER_KEYS) -> our per-layer parameter subtree."""
    layer: dict[str, dict[str, Any]] = {}
    for w in LAYER_WEIGHTS:
        module, name = w.path
        layer.setdefault(module, {})[name] = tensors[w.meta_key].T.reshape(our_shape(w, config))
    return layer


def layer_to_meta(layer: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Inverse of `layer_from_meta`."""
    out = {}
    for w in LAYER_WEIGHTS:
        module, name = w.path
        out[w.meta_key] = np.asarray(layer[module][name]).reshape(meta_shape(w, config)[::-1]).T
    return out


def params_from_meta(state: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
    """A whole (unsharded) Meta state dict -> our stacked parameter tree. Missing `output.weight` = tied."""
    layers = [layer_from_meta({k: state[f"layers.{i}.{k}"] for k in LAYER_KEYS}, config)
              for i in range(config.n_layers)]
    params = {
        "tok_embeddings": state["tok_embeddings.weight"],
        "layers": stack_layers(layers),
        "norm": {"weight": state["norm.weight"]},
    }
    if not config.tie_embeddings:
        params["output"] = state["output.weight"].T
    return params


def params_to_meta(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    state = {"tok_embeddings.weight": np.asarray(params["tok_embeddings"]),
             "norm.weight": np.asarray(params["norm"]["weight"])}
    for i in range(config.n_layers):
        layer = _tree_index(params["layers"], i)
        state.update({f"layers.{i}.{k}": v for k, v in layer_to_meta(layer, config).items()})
    state["output.weight"] = np.asarray(params["tok_embeddings"] if config.tie_embeddings else params["output"].T)
    return state


def stack_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
    first = layers[0]
    if isinstance(first, Mapping):
        return {k: stack_layers([layer[k] for layer in layers]) for k in first}
    return np.stack(layers)


def _tree_index(tree, i):
    if isinstance(tree, Mapping):
        return {k: _tree_index(v, i) for k, v in tree.items()}
    return np.asarray(tree[i])
