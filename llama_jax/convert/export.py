"""Our model folder -> Meta's layout: consolidated.NN.pth + params.json + tokenizer.model + checklist.chk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llama_jax import checkpoint as ckpt
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.convert.checklist import write_checklist
from llama_jax.convert.errors import ConvertError, one_line
from llama_jax.convert.meta_format import PARAMS_JSON, split_axis
from llama_jax.convert.progress import progress_bar
from llama_jax.convert.staging import check_output, staging_dir
from llama_jax.convert.tensors import import_torch, to_torch
from llama_jax.meta_weights import LAYER_KEYS, params_to_meta


def default_embedding_axis(config: LlamaConfig) -> int:
    """Llama 3 models (theta 500k) use VocabParallelEmbedding (dim 0), Llama 2 ParallelEmbedding (dim 1)."""
    return 0 if config.rope_theta >= 500000 else 1


def params_json_for(config: LlamaConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads}
    if config.n_kv_heads is not None:
        out["n_kv_heads"] = config.n_kv_heads
    out.update(vocab_size=config.vocab_size, multiple_of=config.multiple_of)
    if config.ffn_dim_multiplier is not None:
        out["ffn_dim_multiplier"] = config.ffn_dim_multiplier
    out.update(norm_eps=config.norm_eps, rope_theta=config.rope_theta)
    if config.use_scaled_rope:
        out["use_scaled_rope"] = True
    return out


def export_meta(model_dir: str | Path, output_dir: str | Path, *, shards: int = 1,
                embedding_split: str = "auto", overwrite: bool = False, progress: bool = True) -> Path:
    """Model folder -> consolidated.NN.pth + params.json + tokenizer.model + checklist.chk.

    `output.weight` is always written (Meta's reference model has no weight tying). The whole model is loaded;
    torch.save needs each shard's full dict in memory anyway.
    """
    torch = import_torch()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if shards < 1:
        raise ConvertError(f"--shards {shards}: expected a positive number")
    check_output(output_dir, overwrite, [model_dir])
    try:
        params, config, tokenizer_path = ckpt.load_model(model_dir)
    except (ckpt.CheckpointError, ConfigError) as e:
        raise ConvertError(one_line(e, 300)) from None
    axis = {"auto": default_embedding_axis(config), "vocab": 0, "dim": 1}.get(embedding_split)
    if axis is None:
        raise ConvertError(f"--embedding-split {embedding_split!r}: expected auto, vocab or dim")
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.kv_heads, "hidden_dim": config.hidden_dim}
    if axis == 1:  # the embedding split on dim; output.weight is always split on vocab
        sizes["dim"] = config.dim
    sizes["vocab_size"] = config.vocab_size
    for what, size in sizes.items():
        if size % shards:
            raise ConvertError(f"--shards {shards}: does not divide {what}={size}")
    unordered = params_to_meta(ckpt.as_numpy(params), config)
    del params
    # Meta's key order (that of the torch module's state_dict): embedding, layers in order, norm, head.
    order = (["tok_embeddings.weight"] + [f"layers.{i}.{k}" for i in range(config.n_layers) for k in LAYER_KEYS]
             + ["norm.weight", "output.weight"])
    state = {k: unordered.pop(k) for k in order}
    with staging_dir(output_dir, overwrite) as tmp, progress_bar(progress, shards, "exporting") as tick:
        for s in range(shards):
            shard = {}
            for name, value in state.items():
                split = split_axis(name, axis)
                if split is not None:
                    n = value.shape[split] // shards
                    value = value[(slice(None),) * split + (slice(s * n, (s + 1) * n),)]
                shard[name] = to_torch(value).clone()
            torch.save(shard, tmp / f"consolidated.{s:02d}.pth")
            del shard
            tick("shards")
        (tmp / PARAMS_JSON).write_text(json.dumps(params_json_for(config), indent=2) + "\n")
        if tokenizer_path.is_file():
            shutil.copyfile(tokenizer_path, tmp / ckpt.TOKENIZER_FILE)
        write_checklist(tmp)
    return output_dir
