"""Our model folder -> a Hugging Face LlamaForCausalLM folder, streamed.

    config.json, generation_config.json            from LlamaConfig and the tokenizer's bos / stop ids
    model-NNNNN-of-NNNNN.safetensors + index        Meta's tensors under HF's names, wq/wk rows permuted for HF's
                                                    rotate-half RoPE
    tokenizer.json, tokenizer_config.json           (hf_tokenizer) with our chat layout as the chat template

Weights are read from Orbax one tensor (or one block of embedding rows) at a time, by slicing the stored stacked
arrays with TensorStore, and written straight into their safetensors file: memory is about one stored chunk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llama_jax import checkpoint as ckpt
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.convert.errors import ConvertError, one_line
from llama_jax.convert.hf_source import HF_TOP_NAMES, hf_name, permute_to_hf
from llama_jax.convert.hf_tokenizer import write_hf_tokenizer
from llama_jax.convert.lazy_writer import _return_freed_memory
from llama_jax.convert.progress import progress_bar
from llama_jax.convert.safetensors_writer import TensorSpec, write_sharded
from llama_jax.convert.staging import check_output, staging_dir
from llama_jax.meta_weights import LAYER_WEIGHTS, LayerWeight, meta_shape
from llama_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer

DEFAULT_SHARD_BYTES = 5 * 10**9


class OrbaxSlices:
    """Slices of the arrays of an Orbax params folder, read with TensorStore without loading whole arrays.

    Orbax compresses each chunk as a whole, and a chunk can be the whole stacked array (a single-device save), so
    the array being read is opened with a cache that holds one chunk: slices read one after another decode each
    chunk once. Only the array last read stays open, so memory is one chunk (one layer after an import, whose
    chunks are layers).
    """

    def __init__(self, params_dir: Path):
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

        try:
            meta = json.loads((params_dir / "_METADATA").read_text())
        except (OSError, ValueError) as e:
            raise ConvertError(f"{params_dir / '_METADATA'}: unreadable ({one_line(e, 80)}); expected Orbax's "
                               "checkpoint metadata") from None
        self._ts_utils, self._dir = ts_utils, str(params_dir.absolute())
        self._zarr3, self._ocdbt = bool(meta.get("use_zarr3")), bool(meta.get("use_ocdbt", True))
        self._context = ts_utils.get_ts_context(use_ocdbt=self._ocdbt)
        self._keys: tuple[str, ...] | None = None
        self._store: Any = None

    def _open(self, keys: tuple[str, ...], cache_bytes: int = 0):
        import tensorstore as ts

        spec = self._ts_utils.ArrayReadSpec(self._dir, ".".join(keys), use_zarr3=self._zarr3, use_ocdbt=self._ocdbt)
        context = ts.Context(ts.Context.Spec({"cache_pool": {"total_bytes_limit": cache_bytes}}), self._context)
        return ts.open(spec.json, context=context).result()

    def read(self, keys: tuple[str, ...], index) -> np.ndarray:
        if keys != self._keys:
            self._keys, self._store = None, None  # the previous array's cache goes before the next one's fills
            store = self._open(keys)
            chunk_bytes = math.prod(store.chunk_layout.read_chunk.shape) * store.dtype.numpy_dtype.itemsize
            self._keys, self._store = keys, self._open(keys, chunk_bytes + (1 << 20))
        return np.asarray(self._store[index].read().result())

    def dtype(self, keys: tuple[str, ...]) -> np.dtype:
        return np.dtype(self._open(keys).dtype.numpy_dtype)


def hf_config_json(config: LlamaConfig, dtype: np.dtype, bos: int, stops: list[int]) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM (the legacy rope_theta / rope_scaling spelling that every
    transformers release reads)."""
    rope_scaling = None
    if config.use_scaled_rope:
        s = config.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_seq_len}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True, "bos_token_id": bos, "eos_token_id": stops, "torch_dtype": str(dtype),
    }


def _layer_tensors(config: LlamaConfig) -> Iterator[tuple[int, LayerWeight]]:
    """(layer, weight) leaf by leaf (every layer's wq, then every layer's wk, ...): with Orbax chunks that span all
    layers, a layer-by-layer order would need every leaf decoded at once."""
    return ((i, w) for w in LAYER_WEIGHTS for i in range(config.n_layers))


def _specs(config: LlamaConfig, slices: OrbaxSlices) -> list[TensorSpec]:
    """HF's tensors in the order they are streamed: embedding, layer tensors, norm, head."""
    vocab_rows = (config.vocab_size, config.dim)
    specs = [TensorSpec(HF_TOP_NAMES["tok_embeddings.weight"], vocab_rows, slices.dtype(("tok_embeddings",)))]
    dtypes = {w: slices.dtype(("layers", *w.path)) for w in LAYER_WEIGHTS}
    specs += [TensorSpec(hf_name(f"layers.{i}.{w.meta_key}"), meta_shape(w, config), dtypes[w])
              for i, w in _layer_tensors(config)]
    specs.append(TensorSpec(HF_TOP_NAMES["norm.weight"], (config.dim,), slices.dtype(("norm", "weight"))))
    if not config.tie_embeddings:
        specs.append(TensorSpec(HF_TOP_NAMES["output.weight"], vocab_rows, slices.dtype(("output",))))
    return specs


def _blocks(config: LlamaConfig, slices: OrbaxSlices, adapted=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, block of rows) in `_specs` order; one tensor (or block of embedding rows) at a time; `adapted`
    (convert.merge.Adapted) adds LoRA adapters to the weights they adapt."""
    rows = config.hidden_dim  # embedding and head go in blocks the size of one feed-forward weight
    blocks = [np.s_[start:min(start + rows, config.vocab_size)] for start in range(0, config.vocab_size, rows)]
    for block in blocks:  # TensorStore, unlike numpy, refuses a slice that runs past the end
        yield HF_TOP_NAMES["tok_embeddings.weight"], slices.read(("tok_embeddings",), block)
    heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.kv_heads}
    for i, w in _layer_tensors(config):
        value = slices.read(("layers", *w.path), i)
        if adapted is not None:
            value = adapted.apply(w.path, i, value)
        value = value.reshape(meta_shape(w, config)[::-1]).T  # as layer_to_meta
        if w.meta_key in heads:
            value = permute_to_hf(value, heads[w.meta_key])
        yield hf_name(f"layers.{i}.{w.meta_key}"), value
    yield HF_TOP_NAMES["norm.weight"], slices.read(("norm", "weight"), np.s_[:])
    if not config.tie_embeddings:
        for block in blocks:  # ours is [dim, vocab]: HF's rows are our columns
            yield HF_TOP_NAMES["output.weight"], slices.read(("output",), np.s_[:, block]).T


def _model_tokenizer(path: Path, config: LlamaConfig) -> Tokenizer:
    if not path.is_file():
        raise ConvertError(f"{path}: missing (needed for tokenizer.json and the bos / stop ids)")
    try:
        tok = load_tokenizer(path)
    except TokenizerError as e:
        raise ConvertError(one_line(e, 300)) from None
    if tok.vocab_size > config.vocab_size:
        raise ConvertError(f"{path}: {tok.vocab_size} tokens, more than config.json's vocab_size "
                           f"{config.vocab_size}; expected the model's own tokenizer")
    return tok


def export_hf(model_dir: str | Path, output_dir: str | Path, *, adapter: str | Path | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, progress: bool = True) -> Path:
    """Model folder -> HF folder that `transformers.AutoModelForCausalLM/AutoTokenizer.from_pretrained` load;
    with `adapter` (a LoRA run folder trained on it), the adapters merged in."""
    from llama_jax.convert.merge import Adapted

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    check_output(output_dir, overwrite, [model_dir, *([Path(adapter)] if adapter else [])])
    try:
        config = ckpt.load_config(model_dir)
        params_dir = ckpt.resolve_params_dir(model_dir)
        ckpt.verify_params(params_dir, config)
    except (ckpt.CheckpointError, ConfigError) as e:
        raise ConvertError(one_line(e, 300)) from None
    tok = _model_tokenizer(model_dir / ckpt.TOKENIZER_FILE, config)
    adapted = Adapted(model_dir, Path(adapter), config) if adapter else None
    slices = OrbaxSlices(params_dir)
    specs = _specs(config, slices)
    with staging_dir(output_dir, overwrite) as tmp, progress_bar(progress, len(specs), "exporting") as tick:
        write_hf_tokenizer(tok, tmp, config.max_seq_len)
        stops = sorted(tok.stop_ids)
        hf_config = hf_config_json(config, specs[0].dtype, tok.bos_id, stops)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": stops, "pad_token_id": tok.pad_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

        def written(name: str) -> None:
            _return_freed_memory()  # or glibc keeps each freed tensor's pages and RSS creeps up tensor by tensor
            tick(name)

        write_sharded(tmp, specs, _blocks(config, slices, adapted), max_shard_bytes, on_tensor=written)
    return output_dir
