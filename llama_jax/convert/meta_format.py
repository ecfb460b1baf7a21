"""Meta's checkpoint layout, the common language of every source: tensor names, full shapes and how model
parallelism splits them across consolidated.NN.pth shards."""

from __future__ import annotations

from typing import Any

from llama_jax.config import LlamaConfig

PARAMS_JSON = "params.json"

# How Meta's model-parallel layers split each tensor ([out, in] like torch.nn.Linear): ColumnParallelLinear on
# dim 0, RowParallelLinear on dim 1, norms replicated (None). The token embedding depends on the generation
# (Llama 2 ParallelEmbedding: dim 1; Llama 3 VocabParallelEmbedding: dim 0) and is detected from shapes.
LAYER_SPLIT = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
               "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
               "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None}


def meta_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, hd, f = config.dim, config.head_dim, config.hidden_dim
    layer = {"attention.wq.weight": (config.n_heads * hd, d), "attention.wk.weight": (config.kv_heads * hd, d),
             "attention.wv.weight": (config.kv_heads * hd, d), "attention.wo.weight": (d, config.n_heads * hd),
             "feed_forward.w1.weight": (f, d), "feed_forward.w3.weight": (f, d), "feed_forward.w2.weight": (d, f),
             "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    shapes = {"tok_embeddings.weight": (config.vocab_size, d), "norm.weight": (d,)}
    for i in range(config.n_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer.items()})
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
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
