"""A Hugging Face LlamaForCausalLM folder (config.json + model*.safetensors) read as Meta's names and layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling
from llama_jax.convert.errors import ConvertError, one_line, read_json
from llama_jax.convert.meta_format import Source, meta_shapes
from llama_jax.convert.tensors import target_dtype
from llama_jax.meta_weights import LAYER_KEYS, LAYER_WEIGHTS

HF_LAYER_NAMES = {w.meta_key: w.hf_key for w in LAYER_WEIGHTS}
HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


def hf_name(meta_name: str) -> str:
    """Meta's tensor name -> Hugging Face's."""
    if meta_name in HF_TOP_NAMES:
        return HF_TOP_NAMES[meta_name]
    _, i, key = meta_name.split(".", 2)
    return f"model.layers.{i}.{HF_LAYER_NAMES[key]}"


def permute_to_hf(w, n_heads: int):
    """Meta's wq/wk rows (interleaved rotary pairs) -> HF's (each head's first halves, then its second halves)."""
    out_features, in_features = w.shape
    return (w.reshape(n_heads, out_features // n_heads // 2, 2, in_features).swapaxes(1, 2)
            .reshape(out_features, in_features))


def unpermute_from_hf(w, n_heads: int):
    """Undoes HF's conversion permutation of wq/wk (rotate-half order -> Meta's interleaved pairs)."""
    out_features, in_features = w.shape
    return (w.reshape(n_heads, 2, out_features // n_heads // 2, in_features).transpose(1, 2)
            .reshape(out_features, in_features))


def _ffn_shape(dim: int, hidden: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's FeedForward rule give `hidden`."""
    base = int(2 * (4 * dim) / 3)
    candidates = [(m, f) for m in (4096, 1024, 256, 128, 64, 32) for f in (None, 1.0, 1.2, 1.3, 1.5, 2.0)]
    candidates += [(1, hidden / base), (1, (hidden + 0.5) / base)]
    for multiple_of, mult in candidates:
        h = int(mult * base) if mult is not None else base
        if multiple_of * ((h + multiple_of - 1) // multiple_of) == hidden:
            return multiple_of, mult
    raise ConvertError(f"intermediate_size={hidden} cannot be expressed with Meta's FeedForward rule for dim={dim}")


def config_from_hf(path: Path, *, dtype: str, source_dtype: str, max_seq_len: int | None) -> LlamaConfig:
    c = read_json(path)
    if c.get("model_type") not in ("llama", None):
        raise ConvertError(f"{path}: model_type={c.get('model_type')!r}; only 'llama' checkpoints can be imported")
    try:
        dim, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        layers, vocab, hidden = int(c["num_hidden_layers"]), int(c["vocab_size"]), int(c["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{path}: missing or invalid field {e} (expected a Hugging Face LlamaConfig)") from None
    if c.get("head_dim") not in (None, dim // heads):
        raise ConvertError(f"{path}: head_dim={c['head_dim']} != hidden_size/num_attention_heads; not supported")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConvertError(f"{path}: attention_bias/mlp_bias are not part of LLaMA; not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{path}: hidden_act={c['hidden_act']!r}; LLaMA uses silu")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    fields: dict[str, Any] = {}
    if rope_type == "llama3":
        fields.update(use_scaled_rope=True, rope_scaling=RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_seq_len=int(rope["original_max_position_embeddings"])))
    elif rope_type != "default":
        raise ConvertError(f"{path}: rope type {rope_type!r} is not supported (expected default or llama3)")
    multiple_of, mult = _ffn_shape(dim, hidden)
    target = target_dtype(dtype, source_dtype)
    try:
        return LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=c.get("num_key_value_heads"),
                           vocab_size=vocab, multiple_of=multiple_of, ffn_dim_multiplier=mult,
                           norm_eps=float(c.get("rms_norm_eps", 1e-5)), rope_theta=theta,
                           max_seq_len=max_seq_len or int(c.get("max_position_embeddings", 2048)),
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                           param_dtype=target, dtype=target, **fields)
    except ConfigError as e:
        raise ConvertError(f"{path}: {one_line(e)}") from None


class HFSource(Source):
    def __init__(self, folder: Path, *, dtype: str = "auto", max_seq_len: int | None = None):
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ConvertError(f"{config_path}: missing (expected a Hugging Face config.json)")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: not a safetensors index ({one_line(e, 80)})") from None
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ConvertError(f"{folder}: no model*.safetensors files")
            self.files = {}
            for f in files:
                with self._open_file(f) as st:
                    self.files.update({name: f for name in st.keys()})
        shapes, dtypes = {}, set()
        for f in sorted(set(self.files.values())):
            if not f.is_file():
                raise ConvertError(f"{f}: listed in the safetensors index but missing")
            with self._open_file(f) as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    shapes[name] = tuple(sl.get_shape())
                    dtypes.add(sl.get_dtype())
        source_dtype = "bfloat16" if "BF16" in dtypes else "float16" if "F16" in dtypes else "float32"
        self.config = config_from_hf(config_path, dtype=dtype, source_dtype=source_dtype, max_seq_len=max_seq_len)
        self.vocab_shards = 1
        for meta_name, full in meta_shapes(self.config).items():
            name = hf_name(meta_name)
            if name not in shapes:
                if meta_name == "output.weight":
                    raise ConvertError(f"{folder}: lm_head.weight missing but config.json has tie_word_embeddings="
                                       "false")
                raise ConvertError(f"{folder}: tensor {name} missing from the safetensors files")
            if shapes[name] != full:
                raise ConvertError(f"{self.files[name]}: {name} has shape {shapes[name]}, config.json implies {full}")

    def _open_file(self, path: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:
            raise ConvertError(f"{path}: cannot read safetensors file (truncated or corrupt?): {one_line(e)}") \
                from None

    def _get(self, meta_name: str, rows: slice | None = None):
        name = hf_name(meta_name)
        with self._open_file(self.files[name]) as st:
            return st.get_slice(name)[rows].clone() if rows is not None else st.get_tensor(name)

    def layer(self, i: int) -> dict[str, Any]:
        out = {key: self._get(f"layers.{i}.{key}") for key in LAYER_KEYS}
        out["attention.wq.weight"] = unpermute_from_hf(out["attention.wq.weight"], self.config.n_heads)
        out["attention.wk.weight"] = unpermute_from_hf(out["attention.wk.weight"], self.config.kv_heads)
        return out

    def rows(self, name: str, start: int, stop: int):
        if name == "output.weight" and self.config.tie_embeddings:
            name = "tok_embeddings.weight"
        return self._get(name, slice(start, stop))

    def norm(self):
        return self._get("norm.weight")

