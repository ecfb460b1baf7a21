"""A base model folder plus a LoRA run's adapters -> an ordinary model folder with base + (alpha/rank)·a·b, written
one stored tensor at a time (every layer of one weight, then the next) so memory stays one tensor, not the model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llama_jax import checkpoint as ckpt
from llama_jax.convert.errors import ConvertError, one_line
from llama_jax.convert.hf_export import OrbaxSlices
from llama_jax.convert.lazy_writer import LazyArray, save_lazy_tree
from llama_jax.convert.progress import progress_bar
from llama_jax.convert.staging import check_output, staging_dir


class Adapted:
    """A LoRA run's adapters, checked against their base, applied to one layer of one weight at a time."""

    def __init__(self, base_dir: Path, run_dir: Path, config):
        from llama_jax.adapters import AdapterError, AdapterInfo, load_adapters

        try:
            info = AdapterInfo.read(run_dir)
            if info is None:
                raise AdapterError(f"--adapter {run_dir}: not a LoRA run folder (no adapter.json)")
            info.check_base(base_dir, run_dir)
            adapters = load_adapters(run_dir, config, info.lora)
        except (AdapterError, ckpt.CheckpointError) as e:
            raise ConvertError(one_line(e, 300)) from None
        self.scale = info.lora.scale
        self.adapters = {(module, name): {k: np.asarray(v) for k, v in ab.items()}
                         for module, targets in adapters["layers"].items() for name, ab in targets.items()}

    def apply(self, path: tuple[str, str], layer: int, value: np.ndarray) -> np.ndarray:
        """Layer `layer` of the weight at `path` (our layout) with its adapters' product added, in fp32."""
        ab = self.adapters.get(path)
        if ab is None:
            return value
        delta = np.tensordot(ab["a"][layer], ab["b"][layer], 1)
        return (value.astype(np.float32) + self.scale * delta).astype(value.dtype)


def merge_adapter(base_dir: str | Path, run_dir: str | Path, output_dir: str | Path, *, overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Writes BASE with RUN_DIR's adapters merged as a model folder (config.json and tokenizer.model: the base's)."""
    base_dir, run_dir, output_dir = Path(base_dir), Path(run_dir), Path(output_dir)
    check_output(output_dir, overwrite, [base_dir, run_dir])
    try:
        config = ckpt.load_config(base_dir)
        params_dir = ckpt.resolve_params_dir(base_dir)
        expected = ckpt.verify_params(params_dir, config)
    except ckpt.CheckpointError as e:
        raise ConvertError(one_line(e, 300)) from None
    adapted, slices = Adapted(base_dir, run_dir, config), OrbaxSlices(params_dir)
    tree = _lazy_tree(expected, config, slices, adapted)
    steps = sum(leaf.n_blocks for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, LazyArray)))
    with staging_dir(output_dir, overwrite) as tmp, progress_bar(progress, steps, "merging") as tick:
        config.save_json(tmp / ckpt.CONFIG_FILE)
        if (base_dir / ckpt.TOKENIZER_FILE).is_file():
            shutil.copyfile(base_dir / ckpt.TOKENIZER_FILE, tmp / ckpt.TOKENIZER_FILE)
        save_lazy_tree(tmp / ckpt.PARAMS_DIR, tree, on_step=tick)
        ckpt.verify_params(tmp / ckpt.PARAMS_DIR, config)  # names and shapes, before the rename
    return output_dir


def _lazy_tree(expected: Any, config, slices: OrbaxSlices, adapted: Adapted) -> dict[str, Any]:
    """Each stored tensor as a LazyArray of its layers (a group of its own, so each is decoded once)."""
    def leaf(keys: tuple[str, ...], spec) -> LazyArray:
        dtype = np.dtype(spec.dtype)
        if keys[0] != "layers":
            return LazyArray(tuple(spec.shape), dtype, 0, 1, lambda _: slices.read(keys, np.s_[:]), ".".join(keys))
        return LazyArray(tuple(spec.shape), dtype, 0, config.n_layers,
                         lambda i: adapted.apply(keys[1:], i, slices.read(keys, i))[None], ".".join(keys))

    return jax.tree_util.tree_map_with_path(lambda path, spec: leaf(tuple(k.key for k in path), spec), expected)
