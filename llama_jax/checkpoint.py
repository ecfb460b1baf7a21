"""The on-disk model folder that the converter and the trainer write and generation loads.

    MODEL_DIR/
      config.json        LlamaConfig.to_dict()
      tokenizer.model    a copy of the tokenizer file (SentencePiece or tiktoken ranks)
      params/            Orbax (StandardCheckpointer) tree shaped like `init_params`, layers stacked

A training run folder (Orbax CheckpointManager: RUN_DIR/<step>/params, RUN_DIR/<step>/...) is accepted too:
`resolve_params_dir` picks its latest step's `params` item, and config.json / tokenizer.model sit in RUN_DIR.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.config import LlamaConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A model folder that is missing a part or does not match its config; the message names the path."""


def save_model(model_dir: str | Path, params: Any, config: LlamaConfig, tokenizer_path: str | Path | None) -> None:
    """Writes a complete model folder. The caller owns atomicity (write to a temp dir, then rename)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config.save_json(model_dir / CONFIG_FILE)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, model_dir / TOKENIZER_FILE)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((model_dir / PARAMS_DIR).absolute(), params)
    checkpointer.wait_until_finished()


def resolve_params_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: checkpoint folder not found")
    if (model_dir / PARAMS_DIR).is_dir():
        return model_dir / PARAMS_DIR
    steps = sorted((int(p.name), p) for p in model_dir.iterdir() if p.name.isdigit() and (p / PARAMS_DIR).is_dir())
    if not steps:
        raise CheckpointError(f"{model_dir}: no '{PARAMS_DIR}/' folder and no training steps with one inside")
    return steps[-1][1] / PARAMS_DIR


def load_config(model_dir: str | Path) -> LlamaConfig:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected the model's config.json)")
    return LlamaConfig.load_json(path)


def load_params(model_dir: str | Path, config: LlamaConfig, shardings: Any = None) -> Any:
    """Restores the parameter tree, cast to `config.param_dtype`; `shardings` places it on a mesh."""
    params_dir = resolve_params_dir(model_dir).absolute()
    expected = verify_params(params_dir, config)
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), expected)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), expected, shardings)
    return restore_tree(params_dir, target)


def restore_tree(params_dir: Path, target: Any) -> Any:
    """An Orbax tree restored into `target`'s shapes, dtypes and shardings."""
    with _quiet_step_metadata():
        return ocp.StandardCheckpointer().restore(Path(params_dir).absolute(), target)


def load_param_leaves(model_dir: str | Path, config: LlamaConfig, shardings: Any) -> Iterator[tuple[tuple, Any]]:
    """(path, array) for one parameter at a time, placed by `shardings` (a tree like `init_params`'), read with
    Orbax's partial restore: a caller that re-lays each leaf out before asking for the next never holds two
    copies of the model."""
    params_dir = resolve_params_dir(model_dir).absolute()
    expected = verify_params(params_dir, config)
    checkpointer = ocp.PyTreeCheckpointer()
    for (path, spec), sharding in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(shardings)):
        keys = tuple(k.key for k in path)
        target = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)
        root = node = {}
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = target
        args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
                            root)
        with _quiet_step_metadata():
            tree = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
                item=root, restore_args=args, partial_restore=True))
        for k in keys:
            tree = tree[k]
        yield keys, tree


def verify_params(params_dir: Path, config: LlamaConfig) -> Any:
    """Checks the stored names and shapes (Orbax metadata only, no data read); returns the expected tree."""
    from llama_jax.model import init_params  # local: keeps this module importable without building a model

    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    with _quiet_step_metadata():
        stored = ocp.StandardCheckpointer().metadata(Path(params_dir).absolute()).item_metadata.tree
    _check_shapes(params_dir, stored, expected)
    return expected


def _check_shapes(params_dir: Path, stored: Any, expected: Any) -> None:
    flat_expected = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    if set(flat_expected) != set(flat_stored):
        diff = sorted(set(flat_expected) ^ set(flat_stored))
        raise CheckpointError(f"{params_dir}: parameter names differ from config.json: {diff[:4]}")
    for name, spec in flat_expected.items():
        if tuple(flat_stored[name].shape) != tuple(spec.shape):
            raise CheckpointError(f"{params_dir}: {name} has shape {tuple(flat_stored[name].shape)}, "
                                  f"config.json implies {tuple(spec.shape)}")


@contextlib.contextmanager
def _quiet_step_metadata():
    """A CheckpointManager keeps _CHECKPOINT_METADATA one level above an item, so Orbax warns that the item's
    own is missing whenever a training run's params are read directly; nothing is wrong, so hide that line."""

    def drop(record: logging.LogRecord) -> bool:
        return "_CHECKPOINT_METADATA" not in record.getMessage()

    logger = logging.getLogger("absl")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_model(model_dir: str | Path, shardings: Any = None, **config_overrides: Any):
    """(params, config, tokenizer_path) from a model folder or a training run folder."""
    config = load_config(model_dir)
    if config_overrides:
        config = config.replace(**config_overrides)
    tokenizer_path = Path(model_dir) / TOKENIZER_FILE
    return load_params(model_dir, config, shardings), config, tokenizer_path


def as_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
