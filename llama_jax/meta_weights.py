"""Mapping between Meta's state-dict layout (torch Linear: [out, in]) and our parameter tree.

Pure numpy, one layer at a time, so the converter never needs the whole model in memory.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from llama_jax.config import LlamaConfig

LAYER_KEYS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
              "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
              "attention_norm.weight", "ffn_norm.weight")


def layer_from_meta(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
    """One layer's Meta tensors (keys as in LAYER_KEYS) -> our per-layer parameter subtree."""
    d, hd, h, kv = config.dim, config.head_dim, config.n_heads, config.kv_heads
    t = tensors
    return {
        "attention": {
            "wq": t["attention.wq.weight"].T.reshape(d, h, hd),
            "wk": t["attention.wk.weight"].T.reshape(d, kv, hd),
            "wv": t["attention.wv.weight"].T.reshape(d, kv, hd),
            "wo": t["attention.wo.weight"].T.reshape(h, hd, d),
        },
        "feed_forward": {
            "w1": t["feed_forward.w1.weight"].T,
            "w2": t["feed_forward.w2.weight"].T,
            "w3": t["feed_forward.w3.weight"].T,
        },
        "attention_norm": {"weight": t["attention_norm.weight"]},
        "ffn_norm": {"weight": t["ffn_norm.weight"]},
    }


def layer_to_meta(layer: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Inverse of `layer_from_meta`."""
    d = config.dim
    att, ff = layer["attention"], layer["feed_forward"]
    return {
        "attention.wq.weight": np.asarray(att["wq"]).reshape(d, -1).T,
        "attention.wk.weight": np.asarray(att["wk"]).reshape(d, -1).T,
        "attention.wv.weight": np.asarray(att["wv"]).reshape(d, -1).T,
        "attention.wo.weight": np.asarray(att["wo"]).reshape(-1, d).T,
        "feed_forward.w1.weight": np.asarray(ff["w1"]).T,
        "feed_forward.w2.weight": np.asarray(ff["w2"]).T,
        "feed_forward.w3.weight": np.asarray(ff["w3"]).T,
        "attention_norm.weight": np.asarray(layer["attention_norm"]["weight"]),
        "ffn_norm.weight": np.asarray(layer["ffn_norm"]["weight"]),
    }


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
