"""The train state (params, optimizer state, step, RNG): where each array lives, and its Orbax checkpoints.

A checkpoint is RUN_DIR/<step>/{params, opt_state, train, data}: train holds the step and RNG, data the
position in the data order, so a resumed run continues exactly where the saved one was. With LoRA, `params` are
the adapters, the only trained (and checkpointed) arrays, and the state also carries the frozen `base` weights,
which come from --init-from at every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from llama_jax import sharding as sh
from llama_jax.config import LlamaConfig
from llama_jax.training.config import TrainConfig

ITEMS = ("params", "opt_state", "train", "data")


def trainable_init(config: LlamaConfig, lora, key: jax.Array) -> Any:
    """Fresh trained parameters: the model's, or with LoRA the adapters'."""
    from llama_jax.adapters import init_adapters
    from llama_jax.model import init_params

    return init_params(config, key) if lora is None else init_adapters(config, lora, key)


def _trainable_shardings(config: LlamaConfig, mesh, lora) -> Any:
    if lora is None:
        return sh.param_shardings(config, mesh)
    from llama_jax.adapters import adapter_logical_axes

    shapes = jax.eval_shape(lambda: trainable_init(config, lora, jax.random.key(0)))
    return jax.tree.map(lambda spec, s: sh.logical_to_sharding(mesh, spec, s.shape), adapter_logical_axes(config, lora),
                        shapes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def state_shardings(config: LlamaConfig, optimizer, mesh, lora=None) -> dict[str, Any]:
    params_sh = _trainable_shardings(config, mesh, lora)
    abstract_params = jax.eval_shape(lambda: trainable_init(config, lora, jax.random.key(0)))
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    rep = sh.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, params_sh,
                                   transform_non_params=lambda _: rep)
    out = {"params": params_sh, "opt_state": opt_sh, "step": rep, "rng": rep}
    if lora is not None:
        out["base"] = sh.param_shardings(config, mesh)
    return out


def _fresh_state(params, optimizer, key) -> dict[str, Any]:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(key)}


def abstract_state(config: LlamaConfig, optimizer, shardings, lora=None) -> dict[str, Any]:
    """Shapes, dtypes and shardings of the checkpointed state, without computing it: what a checkpoint restores
    into (a LoRA run's frozen base is not part of it)."""
    shapes = jax.eval_shape(lambda: _fresh_state(trainable_init(config, lora, jax.random.key(0)), optimizer,
                                                 jax.random.key(0)))
    return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes,
                        {k: v for k, v in shardings.items() if k != "base"})


def init_state(config: LlamaConfig, optimizer, shardings, seed: int, params=None, lora=None) -> dict[str, Any]:
    """Fresh state: random parameters (or adapters) from `seed`, or the given (already placed) parameters for
    full fine-tuning."""
    def build(key, params):
        init_key, state_key = jax.random.split(key)
        if params is None:
            params = trainable_init(config, lora, init_key)
        return _fresh_state(params, optimizer, state_key)

    in_sh = (None, None if params is None else shardings["params"])
    trained = {k: v for k, v in shardings.items() if k != "base"}
    return jax.jit(build, in_shardings=in_sh, out_shardings=trained)(jax.random.key(seed), params)


def checkpoint_manager(run_dir: Path, tc: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep, enable_async_checkpointing=tc.async_checkpoint,
                                           create=True)
    return ocp.CheckpointManager(run_dir.absolute(), item_names=ITEMS, options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: dict[str, Any], data_state: dict[str, Any]) -> int:
    step = int(jax.device_get(state["step"]))
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        train=ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
        data=ocp.args.JsonSave(data_state)))
    return step


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, target: dict[str, Any]):
    """(state, data iterator state) of `step`, each array placed as in `target` (see abstract_state)."""
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        train=ocp.args.StandardRestore({"step": target["step"], "rng": target["rng"]}),
        data=ocp.args.JsonRestore()))
    state = {"params": restored["params"], "opt_state": restored["opt_state"],
             "step": restored["train"]["step"], "rng": restored["train"]["rng"]}
    return state, restored["data"]


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a saved checkpoint, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit() and (p / "params").is_dir())
