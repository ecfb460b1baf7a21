"""Meta's checkpoint layout, the common language of every source: tensor names, full shapes and how model
parallelism splits them across consolidated.NN.pth shards."""

from __future__ import annotations

from typing import Any

from llama_jax.config import LlamaConfig
from llama_jax.meta_weights import LAYER_WEIGHTS, meta_shape

PARAMS_JSON = "params.json"

# The token embedding's split depends on the generation (Llama 2 ParallelEmbedding: dim 1; Llama 3
# VocabParallelEmbedding: dim 0) and is detected from shapes; each layer tensor's is in meta_weights' table.
LAYER_SPLIT = {w.meta_key: w.split for w in LAYER_WEIGHTS}


def meta_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    layer = {w.meta_key: meta_shape(w, config) for w in LAYER_WEIGHTS}
    shapes = {"tok_embeddings.weight": (config.vocab_size, config.dim), "norm.weight": (config.dim,)}
    for i in range(config.n_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer.items()})
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, config.dim)
    return shapes


def split_axis(name: str, embedding_axis: int) -> int | None:
    if name == "tok_embeddings.weight":
        return embedding_axis
    if name == "output.weight":
        return 0
    if name == "norm.weight":
        return None
    return LAYER_SPLIT[name.split(".", 2)[2]]


class Source:
    """Reads a checkpoint in Meta's names and [out, in] layout, a piece at a time (all torch tensors)."""

    config: LlamaConfig
    vocab_shards: int  # embedding/output row blocks must not straddle this many equal vocab ranges

    def layer(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    def rows(self, name: str, start: int, stop: int):
        """Rows [start, stop) of `tok_embeddings.weight` or `output.weight` ([vocab, dim])."""
        raise NotImplementedError

    def norm(self):
        raise NotImplementedError
