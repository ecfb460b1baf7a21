"""Orbax checkpoints written one block at a time from arrays that never exist whole in memory.

Orbax's StandardCheckpointer wants whole arrays. We hand a PyTreeCheckpointHandler `LazyArray` leaves (shape, dtype
and a function that produces block k) and a TypeHandler that writes each block into its own slice of the
TensorStore array, with the write shape set to one block, exactly as Orbax lays out an array sharded over devices
along that axis. The result is an ordinary Orbax checkpoint (`llama_jax.checkpoint.load_model` reads it), with
Orbax doing the OCDBT layout, metadata and atomic commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llama_jax.convert.errors import ConvertError

_CANCELLED = "conversion cancelled"
_malloc_trim = None


@dataclasses.dataclass(frozen=True, eq=False)
class LazyArray:
    """An array that exists only as `n_blocks` equal blocks along `axis`, produced on demand by `read(k)`.

    Leaves of one `group` are written in lock step (block k of each, then k + 1), so a group whose leaves share
    a source (all tensors of one layer) needs that source once per step; groups are written one after another.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int
    n_blocks: int
    read: Callable[[int], np.ndarray]
    group: str
    release: Callable[[], None] | None = None  # called once the whole group is written (frees shared caches)

    @property
    def block_shape(self) -> tuple[int, ...]:
        shape = list(self.shape)
        shape[self.axis] //= self.n_blocks
        return tuple(shape)

    def block_index(self, k: int) -> tuple[slice, ...]:
        n = self.block_shape[self.axis]
        index = [slice(None)] * len(self.shape)
        index[self.axis] = slice(k * n, (k + 1) * n)
        return tuple(index)


def _lazy_handler_class():
    # Orbax internals are imported lazily so that `--help` and error paths stay fast.
    import tensorstore as ts
    from orbax.checkpoint._src.futures import future
    from orbax.checkpoint._src.serialization import ocdbt_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    from orbax.checkpoint._src.serialization import type_handlers

    class LazyArrayHandler(type_handlers.NumpyHandler):
        """Writes LazyArray leaves block by block; on disk they are plain numpy-array entries."""

        def __init__(self, on_step: Callable[[str], None]):
            super().__init__()
            self._on_step = on_step
            self.cancelled = threading.Event()

        async def _write(self, values, infos, args):
            stores = []
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                spec = ts_utils.build_array_write_spec(
                    info=info, arg=arg, global_shape=value.shape, local_shape=value.block_shape,
                    dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
                    process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
                stores.append(await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context))
            groups: dict[str, list[int]] = {}
            for i, value in enumerate(values):
                groups.setdefault(value.group, []).append(i)
            for group, members in groups.items():
                for k in range(values[members[0]].n_blocks):
                    if self.cancelled.is_set():
                        raise ConvertError(_CANCELLED)
                    writes = []
                    for i in members:
                        block = values[i].read(k)
                        if block.shape != values[i].block_shape or block.dtype != values[i].dtype:
                            raise ConvertError(f"internal: block {k} of {infos[i].name} is {block.shape} "
                                               f"{block.dtype}, expected {values[i].block_shape} {values[i].dtype}")
                        # The block stays untouched until its write is committed (awaited below), so TensorStore
                        # may encode straight from it instead of taking a copy first.
                        writes.append(stores[i][values[i].block_index(k)].write(
                            block, can_reference_source_data_indefinitely=True))
                        del block
                    await asyncio.gather(*writes)
                    del writes
                    _return_freed_memory()
                    self._on_step(group)
                for i in members:
                    if values[i].release is not None:
                        values[i].release()

        async def serialize(self, values, infos, args=None):
            from orbax.checkpoint import SaveArgs

            args = args or [SaveArgs()] * len(values)
            return [future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args),
                                                                 name="lazy_array_handler")]

    return LazyArrayHandler


def _return_freed_memory() -> None:
    """Hands freed heap pages back to the OS (glibc keeps them otherwise, and RSS creeps up layer by layer)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def save_lazy_tree(params_dir: Path, tree: Any, on_step: Callable[[str], None] = lambda group: None) -> None:
    """Saves a tree of numpy arrays and LazyArrays as an Orbax PyTree checkpoint at `params_dir`."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import type_handler_registry as registry_lib

    handler = _lazy_handler_class()(on_step)
    registry = registry_lib.create_type_handler_registry(*registry_lib._DEFAULT_TYPE_HANDLERS, (LazyArray, handler))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    # Orbax writes from background threads. Run the save in a thread of our own so that Ctrl-C (delivered to the
    # main thread) can stop the writer at the next block and wait for it; otherwise it would go on writing into
    # the staging folder after the caller has removed it.
    failure: list[BaseException] = []
    done = threading.Event()

    def save() -> None:
        try:
            checkpointer.save(Path(params_dir).absolute(), args=ocp.args.PyTreeSave(tree))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
            failure.append(e)
        finally:
            done.set()

    before = set(threading.enumerate())
    threading.Thread(target=save, name="llama_jax-convert-save", daemon=True).start()
    # An Event, not Thread.join: a join interrupted by Ctrl-C can leave is_alive() False while the thread runs.
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        logging.getLogger("absl").addFilter(_drop_cancellation_logs)  # Orbax logs each thread's exception
        handler.cancelled.set()
        while not done.wait(0.2):
            pass
        _join_new_threads(before)
        raise
    if failure:
        _join_new_threads(before)
        raise failure[0]


def _drop_cancellation_logs(record: logging.LogRecord) -> bool:
    return _CANCELLED not in record.getMessage()


def _join_new_threads(before: set[threading.Thread], timeout: float = 10.0) -> None:
    """After a failed save, waits (bounded) for Orbax's remaining writer threads, which would otherwise keep
    writing into a staging folder that the caller is about to delete."""
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - before:
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))

