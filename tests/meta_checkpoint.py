"""Random-weight checkpoints in Meta's exact on-disk format, written with torch.

For n model-parallel shards Meta's code (fairscale layers) holds, in every consolidated.NN.pth:
  ColumnParallelLinear wq/wk/wv/w1/w3 and output   [out, in] -> rows    i*out/n .. (i+1)*out/n
  RowParallelLinear    wo/w2                       [out, in] -> columns i*in/n  .. (i+1)*in/n
  Llama 2 ParallelEmbedding      tok_embeddings [V, D] -> columns (split on D)
  Llama 3 VocabParallelEmbedding tok_embeddings [V, D] -> rows    (split on V)
  norms (and Llama 2's rope.freqs) replicated.
Each piece is its own contiguous tensor (torch.save of a view would store the whole base storage).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from llama_jax.config import LlamaConfig

COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
          "feed_forward.w3.weight")
ROW = ("attention.wo.weight", "feed_forward.w2.weight")

LLAMA2_EMBEDDING_AXIS = 1
LLAMA3_EMBEDDING_AXIS = 0


def split_axis(name: str, embedding_axis: int) -> int | None:
    if name == "tok_embeddings.weight":
        return embedding_axis
    if name == "output.weight":
        return 0
    if name.endswith(COLUMN):
        return 0
    if name.endswith(ROW):
        return 1
    return None  # norms, rope.freqs


def shard_state(state: dict[str, torch.Tensor], n: int, embedding_axis: int) -> list[dict[str, torch.Tensor]]:
    shards = [{} for _ in range(n)]
    for name, tensor in state.items():
        axis = split_axis(name, embedding_axis)
        pieces = [tensor] * n if axis is None else torch.chunk(tensor, n, dim=axis)
        assert axis is None or all(p.shape[axis] * n == tensor.shape[axis] for p in pieces), (name, n)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone().contiguous()
    return shards


def meta_params_json(config: LlamaConfig, *, llama2_vocab: bool = False) -> dict:
    """params.json as Meta writes it; Llama 2's says vocab_size -1 (the tokenizer decides)."""
    out = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads}
    if config.n_kv_heads is not None:
        out["n_kv_heads"] = config.n_kv_heads
    out.update(vocab_size=-1 if llama2_vocab else config.vocab_size, multiple_of=config.multiple_of)
    if config.ffn_dim_multiplier is not None:
        out["ffn_dim_multiplier"] = config.ffn_dim_multiplier
    out.update(norm_eps=config.norm_eps, rope_theta=config.rope_theta)
    if config.use_scaled_rope:
        out["use_scaled_rope"] = True
    return out


def rope_freqs(config: LlamaConfig) -> torch.Tensor:
    hd = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_meta_checkpoint(folder: Path, state: dict[str, torch.Tensor], config: LlamaConfig, *, n_shards: int,
                          embedding_axis: int, with_rope_freqs: bool = False, llama2_vocab: bool = False,
                          dtype: torch.dtype | None = None, tokenizer: bytes | None = b"dummy tokenizer\n",
                          checklist: bool = True) -> Path:
    """Writes consolidated.NN.pth, params.json, tokenizer.model and checklist.chk like Meta's download."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None else v) for k, v in state.items()}
    if with_rope_freqs:
        state = {**state, "rope.freqs": rope_freqs(config).to(state["norm.weight"].dtype)}
    for i, shard in enumerate(shard_state(state, n_shards, embedding_axis)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps(meta_params_json(config, llama2_vocab=llama2_vocab)))
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer)
    if checklist:
        names = [f"consolidated.{i:02d}.pth" for i in range(n_shards)] + ["params.json"]
        (folder / "checklist.chk").write_text("".join(f"{md5(folder / n)}  {n}\n" for n in names))
    return folder


def read_meta_checkpoint(folder: Path) -> list[dict[str, torch.Tensor]]:
    shards = sorted(Path(folder).glob("consolidated.*.pth"))
    return [torch.load(p, map_location="cpu", weights_only=True) for p in shards]


def merge_shards(shards: list[dict[str, torch.Tensor]], embedding_axis: int) -> dict[str, torch.Tensor]:
    """Reference merge, independent of llama_jax.convert: the inverse of `shard_state`."""
    merged = {}
    for name in shards[0]:
        axis = split_axis(name, embedding_axis)
        merged[name] = shards[0][name] if axis is None else torch.cat([s[name] for s in shards], dim=axis)
    return merged
