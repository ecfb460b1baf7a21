"""Model configuration: one frozen dataclass that carries everything Meta's params.json does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp


class ConfigError(ValueError):
    """A configuration that cannot describe a LLaMA model; the message names what is wrong."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency scaling (Meta's `apply_scaling`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


# params.json only says `use_scaled_rope: true`; the factor is a property of the model family. This table is
# the one place that knows it (Meta's llama-models: 8 for Llama 3.1, 32 for the Llama 3.2 1B/3B text models).
ROPE_SCALING_BY_FAMILY: dict[str, RopeScaling] = {
    "llama3.1": RopeScaling(factor=8.0),
    "llama3.2": RopeScaling(factor=32.0),
}

# Llama 3.2's small text models are the only released shapes that use factor 32; they are recognised by `dim`.
_LLAMA32_DIMS = (2048, 3072)

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}

# Fields that config.json files written by earlier versions carry and that no longer describe the model: read and
# ignored. packed_weights was the Generator's in-memory weight layout, always false on disk.
_RETIRED_FIELDS = ("packed_weights",)

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_attention")
ATTENTION_IMPLS = ("einsum", "dot_product_attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Parameters are stored in `param_dtype`; matmuls run in `dtype`. Norms, RoPE and softmax are always fp32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "einsum"

    def __post_init__(self):
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0 or self.vocab_size <= 0:
            raise ConfigError(f"dim, n_layers, n_heads and vocab_size must be positive, got {self._shape()}")
        if self.dim % self.n_heads:
            raise ConfigError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        if self.use_scaled_rope and self.rope_scaling is None:
            object.__setattr__(self, "rope_scaling", default_rope_scaling(self.dim))
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected one of {sorted(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")

    def _shape(self) -> str:
        return f"dim={self.dim} n_layers={self.n_layers} n_heads={self.n_heads} vocab_size={self.vocab_size}"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width, by the rule in Meta's FeedForward."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, h, kv, hd = self.dim, self.hidden_dim, self.kv_heads, self.head_dim
        per_layer = d * self.n_heads * hd * 2 + d * kv * hd * 2 + 3 * d * h + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    # --- serialisation -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlamaConfig":
        data = {k: v for k, v in data.items() if k not in _RETIRED_FIELDS}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> "LlamaConfig":
        return cls.from_dict(read_json_object(path))

    @classmethod
    def from_params_json(cls, path: str | Path, *, vocab_size: int | None = None, family: str | None = None,
                         max_seq_len: int | None = None, **overrides: Any) -> "LlamaConfig":
        """Reads Meta's params.json.

        `vocab_size` is needed for Llama 2, whose params.json says -1 (the tokenizer decides); `family`
        ("llama3.1" / "llama3.2") picks the rope scaling factor where `dim` alone would guess wrong.
        """
        params = read_json_object(path)
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len"}
        fields = {k: v for k, v in params.items() if k in known}
        missing = {"dim", "n_layers", "n_heads"} - set(fields)
        if missing:
            raise ConfigError(f"{path}: params.json lacks {sorted(missing)}")
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        if fields.get("vocab_size", -1) <= 0:
            raise ConfigError(f"{path}: vocab_size is {fields.get('vocab_size')}; pass the tokenizer's vocab size")
        if max_seq_len is not None:
            fields["max_seq_len"] = max_seq_len
        if fields.get("use_scaled_rope"):
            fields["rope_scaling"] = (ROPE_SCALING_BY_FAMILY[_check_family(family)] if family
                                      else default_rope_scaling(fields["dim"]))
        fields.update(overrides)
        return cls(**fields)


def default_rope_scaling(dim: int) -> RopeScaling:
    return ROPE_SCALING_BY_FAMILY["llama3.2" if dim in _LLAMA32_DIMS else "llama3.1"]


def _check_family(family: str) -> str:
    if family not in ROPE_SCALING_BY_FAMILY:
        raise ConfigError(f"unknown model family {family!r}; expected one of {sorted(ROPE_SCALING_BY_FAMILY)}")
    return family


def read_json_object(path: str | Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A JSON object from a model config file (config.json, params.json); bad input raises `error`, one line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found (expected a JSON model config)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# --- named presets (Meta's published params.json values) ----------------------------------------------------

_LLAMA2 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)
_LLAMA3 = dict(vocab_size=128256, multiple_of=1024, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)
_LLAMA31 = dict(_LLAMA3, use_scaled_rope=True, rope_scaling=ROPE_SCALING_BY_FAMILY["llama3.1"], max_seq_len=131072)
_LLAMA32 = dict(_LLAMA3, use_scaled_rope=True, rope_scaling=ROPE_SCALING_BY_FAMILY["llama3.2"], max_seq_len=131072,
                tie_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096),
    "llama3-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3),
    "llama3-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096),
    "llama3.1-8b": dict(_LLAMA31, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3),
    "llama3.1-70b": dict(_LLAMA31, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                         multiple_of=4096),
    "llama3.1-405b": dict(_LLAMA31, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                          multiple_of=4096),
    "llama3.2-1b": dict(_LLAMA32, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
                        multiple_of=256),
    "llama3.2-3b": dict(_LLAMA32, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0,
                        multiple_of=256),
    # Small shapes for tests and the CPU demo; they keep the structure (GQA, Llama 3 rope) of the real ones.
    "tiny-llama2": dict(_LLAMA2, dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=128),
    "tiny-llama3": dict(_LLAMA3, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                        max_seq_len=128),
    # The README's no-download demo: ~1.3M parameters (the vocab comes from the tokenizer trained for it).
    "demo": dict(_LLAMA2, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2000, multiple_of=64,
                 max_seq_len=256),
    "small-100m": dict(_LLAMA2, dim=768, n_layers=12, n_heads=12, multiple_of=256, max_seq_len=1024),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
