"""LoRA adapters on the weight products: made, attached to a base model's parameters, merged into them.

Adapters live in their own small tree, shaped like the parameters they adapt,
`{"layers": {"attention": {"wq": {"a": [L, dim, rank], "b": [L, rank, heads, head_dim]}}}}`, so that training can
differentiate and checkpoint that tree alone. `attach` wraps each adapted weight in a `LoraWeight` leaf, which the
model multiplies as base + (alpha / rank)·a·b without forming the sum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llama_jax import checkpoint as ckpt
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.kernels import LoraWeight
from llama_jax.meta_weights import LAYER_WEIGHTS
from llama_jax.model import param_logical_axes

# A run folder whose checkpoints hold adapters says which base model they adapt in this file.
ADAPTER_FILE = "adapter.json"

# The weight products LoRA can adapt, by our name, with their path inside a layer and input axes.
TARGETS = {w.path[1]: w for w in LAYER_WEIGHTS if w.n_in}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"--lora-rank={self.rank}: must be >= 1")
        if not self.alpha > 0:
            raise ConfigError(f"--lora-alpha={self.alpha}: must be > 0")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"--lora-targets {','.join(self.targets)}: expected names among {','.join(TARGETS)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout={self.dropout}: expected 0 <= p < 1")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_adapters(config: LlamaConfig, lora: LoraConfig, key: jax.Array) -> dict[str, Any]:
    """a uniform in ±1/sqrt(fan_in) (peft's default), b zero: the adapted model starts as the base model."""
    shapes = _shapes(config, lora)
    tree: dict[str, Any] = {}
    for (target, (a_shape, b_shape)), k in zip(shapes.items(), jax.random.split(key, len(shapes))):
        fan_in = math.prod(a_shape[1:-1])
        module = TARGETS[target].path[0]
        tree.setdefault(module, {})[target] = {
            "a": jax.random.uniform(k, a_shape, jnp.float32, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in)),
            "b": jnp.zeros(b_shape, jnp.float32)}
    return {"layers": tree}


def adapter_logical_axes(config: LlamaConfig, lora: LoraConfig) -> dict[str, Any]:
    """PartitionSpecs shaped like `init_adapters`: a keeps its weight's input axes, b its output axes, and the rank
    axis is replicated, so a mesh shards adapters the way it shards their weights."""
    axes = param_logical_axes(config)["layers"]
    tree: dict[str, Any] = {}
    for target in lora.targets:
        module, name = TARGETS[target].path
        spec, n_in = tuple(axes[module][name]), TARGETS[target].n_in
        tree.setdefault(module, {})[target] = {"a": P(*spec[:1 + n_in], "lora_rank"),
                                               "b": P(spec[0], "lora_rank", *spec[1 + n_in:])}
    return {"layers": tree}


def attach(params: dict[str, Any], adapters: dict[str, Any], lora: LoraConfig,
           dropout_key: jax.Array | None = None) -> dict[str, Any]:
    """params with each adapted weight replaced by LoraWeight(base, a, b); with `dropout_key` (training) and
    lora.dropout > 0, each adapted product drops its input with a key of its own per layer."""
    layers = {module: dict(sub) for module, sub in params["layers"].items()}
    for i, (module, targets) in enumerate(adapters["layers"].items()):
        for j, (name, ab) in enumerate(targets.items()):
            key = None
            if dropout_key is not None and lora.dropout:
                key = jax.random.split(jax.random.fold_in(dropout_key, 16 * i + j), ab["a"].shape[0])
            layers[module][name] = LoraWeight(layers[module][name], ab["a"], ab["b"], scale=lora.scale, key=key,
                                              dropout=lora.dropout)
    return {**params, "layers": layers}


def merge(params: dict[str, Any], adapters: dict[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """An ordinary parameter tree: base + scale·a·b for each adapted weight, summed in fp32, stored in the base's
    dtype."""
    layers = {module: dict(sub) for module, sub in params["layers"].items()}
    for module, targets in adapters["layers"].items():
        for name, ab in targets.items():
            base = layers[module][name]
            layers[module][name] = (base.astype(jnp.float32) + lora.scale * _delta(ab)).astype(base.dtype)
    return {**params, "layers": layers}


def _delta(ab: dict[str, jax.Array]) -> jax.Array:
    """a·b per layer: [L, *in, rank] x [L, rank, *out] -> [L, *in, *out]."""
    return jax.vmap(lambda a, b: jnp.tensordot(a, b, 1), in_axes=(0, 0))(ab["a"], ab["b"])


def _shapes(config: LlamaConfig, lora: LoraConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    out = {}
    for target in lora.targets:
        w = TARGETS[target]
        shape = tuple(getattr(config, name) for name in w.shape)
        out[target] = ((config.n_layers, *shape[:w.n_in], lora.rank), (config.n_layers, lora.rank, *shape[w.n_in:]))
    return out


class AdapterError(ValueError):
    """Adapters that cannot be used with the model at hand; the one-line message names the folders."""


def base_identity(model_dir: str | Path) -> str:
    """A fingerprint of a model folder: its config.json, and the names, sizes and (small) metadata files of its
    stored parameters. A copy of the folder has the same fingerprint; another save, or another model, does not."""
    params_dir = ckpt.resolve_params_dir(model_dir)
    digest = hashlib.sha256((Path(model_dir) / ckpt.CONFIG_FILE).read_bytes())
    for f in sorted(p for p in params_dir.rglob("*") if p.is_file()):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(params_dir)}:{size}".encode())
        if size <= 1 << 16:
            digest.update(f.read_bytes())
    return digest.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What adapter.json records: the base model folder, its fingerprint, and the LoRA settings."""

    base: str
    base_identity: str
    lora: LoraConfig

    def save(self, run_dir: str | Path) -> None:
        data = {"base": self.base, "base_identity": self.base_identity,
                "lora": {**dataclasses.asdict(self.lora), "targets": list(self.lora.targets)}}
        path = Path(run_dir) / ADAPTER_FILE
        tmp = path.with_name(f".{ADAPTER_FILE}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def read(cls, run_dir: str | Path) -> "AdapterInfo | None":
        """The adapter run's record, or None for a folder that holds no adapters."""
        path = Path(run_dir) / ADAPTER_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            lora = LoraConfig(**{**data["lora"], "targets": tuple(data["lora"]["targets"])})
            return cls(str(data["base"]), str(data["base_identity"]), lora)
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterError(f"{path}: not an adapter record ({e})") from None

    def check_base(self, base_dir: str | Path, run_dir: str | Path) -> None:
        """Raises AdapterError unless `base_dir` is the model the adapters were trained on."""
        if not (Path(base_dir) / ckpt.CONFIG_FILE).is_file():
            raise AdapterError(f"{run_dir}: its base model {base_dir} is not a model folder (config.json missing)")
        found = base_identity(base_dir)
        if found != self.base_identity:
            raise AdapterError(f"{run_dir}: adapters were trained on {self.base} (fingerprint {self.base_identity});"
                               f" {base_dir} is another model (fingerprint {found})")


def load_adapters(run_dir: str | Path, config: LlamaConfig, lora: LoraConfig) -> dict[str, Any]:
    """The latest step's adapters of a run folder."""
    expected = jax.eval_shape(lambda: init_adapters(config, lora, jax.random.key(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), expected)
    return ckpt.restore_tree(ckpt.resolve_params_dir(run_dir), target)
