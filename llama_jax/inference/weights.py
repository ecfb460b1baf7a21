"""The decoding layout of the parameters, made one leaf at a time from the stored (stacked) layout:

- on a mesh, KV heads repeated until the tensor axis divides them, so each device holds only the KV heads its
  own query heads read (never all of them), then every leaf placed in its shards;
- on a CPU, the weight products' matrices packed for the packed_matmul kernel (PackedWeight leaves);
- layers unstacked for the unrolled model (`scan_layers=False`).

`load_decoding_params` reads a checkpoint leaf by leaf into that layout, so no host or device ever holds a
second copy of the model; `decoding_params` does the same for parameters already in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llama_jax import checkpoint as ckpt
from llama_jax import sharding as sh
from llama_jax.config import LlamaConfig
from llama_jax.kernels import LoraWeight, PackedWeight, packed_matmul
from llama_jax.meta_weights import HEAD_N_IN, LAYER_WEIGHTS
from llama_jax.model import param_logical_axes

_N_IN = {w.path: w.n_in for w in LAYER_WEIGHTS if w.n_in}
_KV_WEIGHTS = (("attention", "wk"), ("attention", "wv"))


def why_not_packed(config: LlamaConfig, mesh: Mesh | None = None) -> str | None:
    """Why the packed kernel cannot serve this model here, or None when it can."""
    if mesh is not None and mesh.size > 1:
        return "packed weights are laid out for one CPU device, not for a mesh"
    if jax.default_backend() != "cpu":
        return f"the kernel is for CPUs and JAX runs on {jax.default_backend()}"
    if config.compute_dtype != jnp.float32 or config.weight_dtype != jnp.float32:
        return f"the kernel is fp32 and the model is dtype={config.dtype}, param_dtype={config.param_dtype}"
    # The output head's width (the vocabulary) is not checked: a head that does not fit stays unpacked.
    widths = (config.n_heads * config.head_dim, config.kv_heads * config.head_dim, config.hidden_dim, config.dim)
    if any(w % packed_matmul.STRIP for w in widths):
        return f"a weight's output width in {widths} is not a multiple of {packed_matmul.STRIP}"
    try:
        packed_matmul.load()
    except packed_matmul.PackedMatmulUnavailable as e:
        return str(e)
    return None


def is_packed(params: Any) -> bool:
    return any(isinstance(leaf, PackedWeight)
               for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, PackedWeight)))


def tensor_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["tensor"]


def decoding_config(config: LlamaConfig, mesh: Mesh | None, scan_layers: bool) -> LlamaConfig:
    """The config the compiled functions run: no remat, the layer layout asked for, and as many KV heads as the
    tensor axis needs (lcm(kv_heads, tensor); each repeated KV head serves the same query heads as before)."""
    kv = math.lcm(config.kv_heads, tensor_size(mesh)) if config.kv_heads % tensor_size(mesh) else config.kv_heads
    return config.replace(remat_policy="none", scan_layers=scan_layers,
                          n_kv_heads=None if kv == config.n_heads else kv)


@partial(jax.jit, static_argnames=("n_in", "n_lead"))
def _pack(w, n_in: int, n_lead: int) -> PackedWeight:
    return PackedWeight(packed_matmul.pack(w, n_in, n_lead), n_in=n_in)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a stored leaf ([layers, ...] for a layer's tensor) becomes its decoding form."""

    stored: LlamaConfig  # the checkpoint's config
    config: LlamaConfig  # decoding_config(stored, mesh, ...)
    mesh: Mesh | None
    packed: bool

    def stored_shardings(self) -> Any:
        """Where to read each stored leaf: its final shards, except KV weights whose heads the tensor axis does not
        divide (read whole, once, then repeated into shards)."""
        if self.mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda _: one, _logical_axes(self.stored), is_leaf=_is_spec)
        return sh.param_shardings(self.stored, self.mesh)

    def leaf(self, path: tuple, value) -> Any:
        """The decoding form of one stored leaf (an array, or a LoraWeight over one): an array, a PackedWeight, a
        LoraWeight, or a tuple of per-layer ones. A LoraWeight's base is laid out like any weight; its adapters
        follow it (b's KV heads repeated with the base's), and stay unmerged."""
        in_layers = path[0] == "layers"
        key = path[1:] if in_layers else path
        if key in _KV_WEIGHTS and self.config.kv_heads != self.stored.kv_heads:
            repeat = partial(jnp.repeat, repeats=self.config.kv_heads // self.stored.kv_heads, axis=-2)
            value = (dataclasses.replace(value, base=repeat(value.base), b=repeat(value.b))
                     if isinstance(value, LoraWeight) else repeat(value))
        if self.mesh is not None:
            if isinstance(value, LoraWeight):
                raise ValueError("unmerged adapters run on one device; on a mesh, merge them first "
                                 "(convert_weights.py --adapter)")
            value = jax.device_put(value, self._sharding(path, value.shape))
        if self.packed and (key in _N_IN or (key == ("output",) and value.shape[-1] % packed_matmul.STRIP == 0)):
            pack = partial(_pack, n_in=_N_IN.get(key, HEAD_N_IN), n_lead=int(in_layers))
            value = dataclasses.replace(value, base=pack(value.base)) if isinstance(value, LoraWeight) else pack(value)
        if not in_layers or self.config.scan_layers:
            return value
        return tuple(jax.tree.map(lambda a, i=i: a[i], value) for i in range(self.config.n_layers))

    def _sharding(self, path: tuple, shape: tuple) -> NamedSharding:
        spec = _get(_logical_axes(self.config), path)
        return sh.logical_to_sharding(self.mesh, spec, shape)

    def assemble(self, leaves: dict[tuple, Any]) -> dict[str, Any]:
        """The parameter tree of the decoding forms, per-layer tuples spread over layers_0 ... layers_{n-1}."""
        tree: dict[str, Any] = {}
        for path, value in leaves.items():
            if isinstance(value, tuple):
                for i, layer_value in enumerate(value):
                    _put(tree, (f"layers_{i}", *path[1:]), layer_value)
            else:
                _put(tree, path, value)
        return tree


def decoding_params(params: Mapping[str, Any], layout: Layout) -> dict[str, Any]:
    """Parameters in memory (layers stacked, as checkpoints store them) in their decoding layout."""
    flat = {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_lora)}
    if not all(path[0] != "layers" or len(path) == 3 for path in flat) or not any(p[0] == "layers" for p in flat):
        raise ValueError("decoding_params takes stacked layers (params['layers']), as init_params and checkpoints "
                         "lay them out")
    return layout.assemble({path: layout.leaf(path, leaf) for path, leaf in flat.items()})


def load_decoding_params(model_dir: str | Path, layout: Layout, adapters: Mapping[str, Any] | None = None,
                         lora=None) -> dict[str, Any]:
    """A checkpoint's parameters read straight into their decoding layout, one leaf at a time; `adapters` (and
    their LoraConfig) are attached to the weights they adapt as they are read."""
    leaves = {}
    for path, value in ckpt.load_param_leaves(model_dir, layout.stored, layout.stored_shardings()):
        ab = _find(adapters, path)
        leaves[path] = layout.leaf(path, value if ab is None else LoraWeight(value, ab["a"], ab["b"], lora.scale))
        if leaves[path] is not value:
            value.delete()  # the stored form is no longer needed: at most one leaf is ever held twice
    return layout.assemble(leaves)


@functools.cache
def _logical_axes(config: LlamaConfig) -> Any:
    return param_logical_axes(config)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _find(tree, path):
    """The subtree at `path`, or None where there is none."""
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _is_lora(x) -> bool:
    return isinstance(x, LoraWeight)


def _put(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
