"""Device mesh, logical-axis rules and multi-host start-up.

Parameters and activations are never placed by hand: the model names its axes ('embed', 'mlp', 'batch', ...)
and `RULES` maps those names onto the mesh axes (data, fsdp, tensor). Changing the parallelism is a change of
mesh shape, not of model code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llama_jax.config import LlamaConfig

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that holds a different slice of the data: plain data parallelism and FSDP
# (which shards parameters over the same devices that see different examples).
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis. Flax assigns each mesh axis at most once per array, in rule order, so an activation
# ('batch', 'length', 'embed') gets batch -> (data, fsdp) and leaves embed unsharded, while a parameter
# ('embed', 'mlp') gets embed -> fsdp, mlp -> tensor: ZeRO-3-style FSDP plus Megatron-style tensor parallelism.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("lora_rank", None),
)


class ShardingError(ValueError):
    """A mesh or batch layout that cannot work on the devices at hand; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the (data, fsdp, tensor) axes; data=-1 takes every device the other two leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, device_count: int) -> "MeshShape":
        for name in ("fsdp", "tensor"):
            if getattr(self, name) < 1:
                raise ShardingError(f"--mesh-{name}={getattr(self, name)}: must be >= 1")
        data = self.data
        if data == -1:
            inner = self.fsdp * self.tensor
            if device_count % inner:
                raise ShardingError(f"--mesh-fsdp x --mesh-tensor = {inner} does not divide the "
                                    f"{device_count} available devices")
            data = device_count // inner
        if data < 1:
            raise ShardingError(f"--mesh-data={self.data}: must be >= 1 (or -1 for all remaining devices)")
        shape = MeshShape(data, self.fsdp, self.tensor)
        if shape.size > device_count:
            raise ShardingError(f"mesh data={shape.data} x fsdp={shape.fsdp} x tensor={shape.tensor} needs "
                                f"{shape.size} devices, only {device_count} available")
        return shape

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_parallelism(self) -> int:
        return self.data * self.fsdp

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


def make_mesh(shape: MeshShape, devices: list | None = None) -> Mesh:
    """A mesh over the first `shape.size` devices (all of them in a multi-process run)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = shape.resolve(len(devices))
    if shape.size < len(devices):
        if jax.process_count() > 1:
            raise ShardingError(f"a multi-process mesh must use every device: data x fsdp x tensor = {shape.size}"
                                f", devices = {len(devices)}")
        devices = devices[: shape.size]
    try:
        # Topology-aware order on GPU/TPU (tensor axis on the fastest links); plain order elsewhere.
        grid = mesh_utils.create_device_mesh(shape.as_tuple(), devices)
    except Exception:  # CPU and odd device counts: any order is as good as another
        grid = np.asarray(devices).reshape(shape.as_tuple())
    # Auto axes: shardings are hints for XLA's propagation (jax.make_mesh would default to Explicit axes).
    return Mesh(grid, MESH_AXES)


def as_auto_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with this project's three axes (any it lacks added with size 1) and Auto axis types, whatever made it:
    e.g. `jax.make_mesh((8,), ("tensor",))`, whose Explicit axes would make every operation state its sharding."""
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ShardingError(f"mesh axes {list(mesh.axis_names)}: expected names among {list(MESH_AXES)}")
    grid = np.asarray(mesh.devices).reshape([mesh.shape.get(a, 1) for a in mesh.axis_names])
    grid = np.moveaxis(grid, [mesh.axis_names.index(a) for a in MESH_AXES if a in mesh.axis_names],
                       range(len(mesh.axis_names)))
    return Mesh(grid.reshape([mesh.shape.get(a, 1) for a in MESH_AXES]), MESH_AXES)


def mesh_shape(mesh: Mesh) -> MeshShape:
    return MeshShape(*(mesh.shape[a] for a in MESH_AXES))


@contextlib.contextmanager
def activate(mesh: Mesh, rules=RULES):
    """Mesh + logical rules for tracing: makes `nn.with_logical_constraint` in the model real constraints."""
    set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    mesh_ctx = set_mesh(mesh) if set_mesh is not None else mesh
    with mesh_ctx, nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(mesh: Mesh, logical: P, shape: tuple[int, ...], rules=RULES) -> NamedSharding:
    """NamedSharding of one array; a dimension that its mesh axes do not divide stays replicated.

    (e.g. 8 kv heads on a 16-way tensor axis: replicating them is what Megatron does too.)
    """
    spec = list(nn.logical_to_mesh_axes(logical, rules))
    spec += [None] * (len(shape) - len(spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        if shape[i] % size:
            spec[i] = None
    return NamedSharding(mesh, P(*spec))


def param_shardings(config: LlamaConfig, mesh: Mesh, rules=RULES) -> Any:
    from llama_jax.model import init_params, param_logical_axes

    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return jax.tree.map(lambda spec, s: logical_to_sharding(mesh, spec, s.shape, rules),
                        param_logical_axes(config), shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Training batches are [grad_accum, micro_batch, seq]: the micro-batch axis is split over (data, fsdp)."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def check_batch(batch_size: int, grad_accum: int, shape: MeshShape) -> int:
    """The micro-batch size, after checking it splits evenly; raises ShardingError naming the flags."""
    if batch_size < 1 or grad_accum < 1:
        raise ShardingError(f"--batch-size={batch_size} and --grad-accum={grad_accum} must be >= 1")
    if batch_size % grad_accum:
        raise ShardingError(f"--batch-size={batch_size} is not divisible by --grad-accum={grad_accum}")
    micro = batch_size // grad_accum
    if micro % shape.batch_parallelism:
        raise ShardingError(f"micro-batch {micro} (--batch-size {batch_size} / --grad-accum {grad_accum}) is not "
                            f"divisible by the data axes data x fsdp = {shape.data} x {shape.fsdp}")
    return micro


# --- multi-host -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Distributed:
    """How this process joins a multi-process run; everything None means a single process."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # let jax detect the cluster (TPU pod slice, SLURM, Open MPI, Kubernetes)

    @classmethod
    def from_env(cls, coordinator=None, num_processes=None, process_id=None, auto=False) -> "Distributed":
        """Flags win over JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
        env = os.environ
        coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
        if num_processes is None and env.get("JAX_NUM_PROCESSES"):
            num_processes = int(env["JAX_NUM_PROCESSES"])
        if process_id is None and env.get("JAX_PROCESS_ID"):
            process_id = int(env["JAX_PROCESS_ID"])
        return cls(coordinator, num_processes, process_id, auto)

    @property
    def enabled(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1

    def validate(self) -> None:
        if self.auto or not self.enabled:
            return
        if not self.coordinator:
            raise ShardingError(f"--num-processes={self.num_processes} needs --coordinator HOST:PORT")
        if self.process_id is None or not 0 <= self.process_id < self.num_processes:
            raise ShardingError(f"--process-id={self.process_id}: expected 0..{self.num_processes - 1}")


def initialize_distributed(dist: Distributed) -> None:
    """Joins the run before anything touches a device; a no-op for a single process."""
    dist.validate()
    if not dist.enabled:
        return
    # CPU processes need a collectives backend to talk to each other (older jax defaults to none);
    # the setting only concerns the CPU client, so it is harmless on GPU/TPU.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if dist.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(dist.coordinator, dist.num_processes, dist.process_id)
