"""Meta (and Hugging Face) LLaMA checkpoints -> our Orbax model folder, and back to Meta's layout.

Import is streamed: one layer (or one block of embedding rows) at a time is read from the shards, merged,
mapped to our layout and written straight into its slice of the stacked Orbax arrays, so peak host memory is
about one layer, not the model. How:

* Shards are opened with `torch.load(weights_only=True, mmap=True)` (no code can run; nothing is read until
  touched) and *closed again after every layer*: pages of a mapped file count towards the process's RSS for as
  long as the mapping lives, so keeping the shards open would grow RSS to the checkpoint's size.
* Orbax's StandardCheckpointer wants whole arrays. We hand a PyTreeCheckpointHandler `LazyArray` leaves (shape,
  dtype and a function that produces block k) and a TypeHandler that writes each block into its own slice of the
  TensorStore array, with the write shape set to one block, exactly as Orbax lays out an array sharded over
  devices along that axis. The result is an ordinary Orbax checkpoint (`llama_jax.checkpoint.load_model` reads
  it), with Orbax doing the OCDBT layout, metadata and atomic commit.
* Everything goes to a temporary folder beside the output that is renamed at the end, so an interrupted or
  failed conversion never leaves a half checkpoint under the output name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np

from llama_jax import checkpoint as ckpt
from llama_jax.config import ROPE_SCALING_BY_FAMILY, ConfigError, LlamaConfig, RopeScaling
from llama_jax.meta_weights import LAYER_KEYS, layer_from_meta, params_to_meta


class ConvertError(ValueError):
    """Input that cannot be converted; the message is one line naming the file or flag and what was expected."""


FAMILIES = ("llama2", "llama3", "llama3.1", "llama3.2")
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
               "fp16": "float16", "float16": "float16"}
PARAMS_JSON = "params.json"
CHECKLIST = "checklist.chk"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# How Meta's model-parallel layers split each tensor ([out, in] like torch.nn.Linear): ColumnParallelLinear on
# dim 0, RowParallelLinear on dim 1, norms replicated (None). The token embedding depends on the generation
# (Llama 2 ParallelEmbedding: dim 1; Llama 3 VocabParallelEmbedding: dim 0) and is detected from shapes.
LAYER_SPLIT = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
               "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
               "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None}
# Present in some Llama 2 files (the rotary frequencies Meta's code recomputes anyway): not a parameter.
NON_PARAMETERS = frozenset({"rope.freqs"})


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- checksums -------------------------------------------------------------------------------------------------

def md5sum(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checklist(folder: Path) -> list[str]:
    """Checks every `<md5>  <filename>` line of folder/checklist.chk; returns the names verified (none if absent)."""
    chk = folder / CHECKLIST
    if not chk.is_file():
        return []
    verified = []
    for n, line in enumerate(chk.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", parts[0]):
            raise ConvertError(f"{chk}: line {n} is not '<md5>  <filename>': {line.strip()[:80]!r}")
        expected, name = parts[0].lower(), parts[1].lstrip("*")
        path = folder / name
        if not path.is_file():
            raise ConvertError(f"{path}: listed in {CHECKLIST} but missing")
        got = md5sum(path)
        if got != expected:
            raise ConvertError(f"{path}: md5 {got} does not match {CHECKLIST} ({expected}); the file is corrupt "
                               "or incomplete, download it again")
        verified.append(name)
    return verified


def write_checklist(folder: Path) -> None:
    lines = [f"{md5sum(p)}  {p.name}" for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKLIST]
    (folder / CHECKLIST).write_text("\n".join(lines) + "\n")


# --- torch <-> numpy ---------------------------------------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the install
        raise ConvertError("PyTorch is needed to read .pth files: pip install 'llama_jax[convert]'") from None
    return torch


def _torch_dtype(np_dtype: np.dtype):
    torch = _torch()
    return {np.dtype(np.float32): torch.float32, np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
            np.dtype(np.float16): torch.float16}[np.dtype(np_dtype)]


def to_numpy(t, dtype: np.dtype | None = None) -> np.ndarray:
    """A torch tensor as a numpy array (bfloat16 via ml_dtypes), cast to `dtype` by torch (exact rounding)."""
    torch = _torch()
    if dtype is not None:
        t = t.to(_torch_dtype(dtype))
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray):
    torch = _torch()
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # e.g. a view of a jax array; torch tensors must own writable memory
        a = a.copy()
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype({"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name])


def _dtype_name(t, path: Path) -> str:
    torch = _torch()
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if t.dtype not in names:
        raise ConvertError(f"{path}: unsupported tensor dtype {t.dtype}; expected float32, bfloat16 or float16")
    return names[t.dtype]


# --- output folder -----------------------------------------------------------------------------------------------

def check_output(output: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    if output.exists() and not overwrite:
        raise ConvertError(f"{output}: already exists (pass --overwrite to replace it)")
    for folder in inputs:
        if output.resolve() == Path(folder).resolve():
            raise ConvertError(f"{output}: output folder is the input folder; choose another --output")


@contextlib.contextmanager
def staging_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside `output`, renamed to it only if the body finishes; removed on any failure."""
    output = Path(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the output folder's mode
    try:
        yield tmp
        if output.exists() or output.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(old / output.name)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    except BaseException:
        _remove(tmp)
        raise


def _remove(folder: Path, attempts: int = 50) -> None:
    # A writer thread that is still winding down may recreate a subfolder right after a removal: retry briefly.
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.05)
        if not folder.exists():
            return


# --- streaming Orbax writer --------------------------------------------------------------------------------------

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


_malloc_trim = None
_CANCELLED = "conversion cancelled"


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


class _OneLayerCache:
    """Keeps only the most recently produced layer: layer i is dropped as soon as i + 1 is asked for."""

    def __init__(self, produce: Callable[[int], Any]):
        self._produce, self._index, self._value = produce, None, None

    def get(self, i: int) -> Any:
        if self._index != i:
            self._index, self._value = None, None
            self._value, self._index = self._produce(i), i
        return self._value

    def clear(self) -> None:
        self._index, self._value = None, None


def _rows_per_block(rows: int, row_bytes: int, budget: int) -> int:
    """The largest divisor of `rows` whose block stays within `budget` bytes (at least one row)."""
    best = 1
    for d in range(1, int(rows**0.5) + 1):
        if rows % d == 0:
            for c in (d, rows // d):
                if c * row_bytes <= budget and c > best:
                    best = c
    return best


# --- sources: where tensors come from --------------------------------------------------------------------------

class Source:
    """Reads a checkpoint in Meta's names and [out, in] layout, a piece at a time (all torch tensors)."""

    config: LlamaConfig
    vocab_shards: int  # embedding/output row blocks must not straddle this many equal vocab ranges

    def layer(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    def rows(self, name: str, start: int, stop: int):
        """Rows [start, stop) of `tok_embeddings.weight` or `output.weight` ([vocab, dim])."""
        raise NotImplementedError

    def norm(self):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class MetaLayout:
    shards: tuple[Path, ...]
    embedding_axis: int  # 1: Llama 2 ParallelEmbedding, 0: Llama 3 VocabParallelEmbedding
    vocab_size: int
    has_output: bool
    source_dtype: str


def find_shards(folder: Path) -> tuple[Path, ...]:
    found = {}
    for p in folder.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise ConvertError(f"{folder}: no consolidated.NN.pth shards found")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ConvertError(f"{folder / f'consolidated.{missing[0]:02d}.pth'}: missing; found shards "
                           f"{', '.join(f'{i:02d}' for i in sorted(found))} (a complete set is 00..NN)")
    return tuple(found[i] for i in range(len(found)))


def load_shard(path: Path) -> dict[str, Any]:
    """One consolidated.NN.pth, memory-mapped; refuses pickles that would need to run code."""
    import pickle

    torch = _torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"{path}: refused: the pickle holds objects other than tensors and loading it could run "
                           f"code ({_one_line(e, 120)})") from None
    except Exception as e:  # torch raises RuntimeError / zipfile / EOF errors for damaged files
        raise ConvertError(f"{path}: cannot read the PyTorch checkpoint (truncated or corrupt?): {_one_line(e)}") \
            from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path}: expected a dict of tensors (Meta's state dict), got {type(state).__name__}")
    return dict(state)


def _meta_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, hd, f = config.dim, config.head_dim, config.hidden_dim
    layer = {"attention.wq.weight": (config.n_heads * hd, d), "attention.wk.weight": (config.kv_heads * hd, d),
             "attention.wv.weight": (config.kv_heads * hd, d), "attention.wo.weight": (d, config.n_heads * hd),
             "feed_forward.w1.weight": (f, d), "feed_forward.w3.weight": (f, d), "feed_forward.w2.weight": (d, f),
             "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    shapes = {"tok_embeddings.weight": (config.vocab_size, d), "norm.weight": (d,)}
    for i in range(config.n_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer.items()})
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    return shapes


def _split_axis(name: str, embedding_axis: int) -> int | None:
    if name == "tok_embeddings.weight":
        return embedding_axis
    if name == "output.weight":
        return 0
    if name == "norm.weight":
        return None
    return LAYER_SPLIT[name.split(".", 2)[2]]


def infer_family(params: Mapping[str, Any], family: str | None) -> str:
    if family is not None:
        if family not in FAMILIES:
            raise ConvertError(f"--family {family!r}: expected one of {', '.join(FAMILIES)}")
        return family
    if params.get("use_scaled_rope"):
        return "llama3.2" if params.get("dim") in (2048, 3072) else "llama3.1"
    return "llama3" if float(params.get("rope_theta", 10000.0)) >= 500000 else "llama2"


DEFAULT_MAX_SEQ_LEN = {"llama2": 4096, "llama3": 8192, "llama3.1": 131072, "llama3.2": 131072}


class MetaSource(Source):
    def __init__(self, folder: Path, *, family: str | None = None, dtype: str = "auto",
                 max_seq_len: int | None = None):
        folder = Path(folder)
        params_path = folder / PARAMS_JSON
        if not params_path.is_file():
            raise ConvertError(f"{params_path}: missing (expected Meta's params.json next to consolidated.NN.pth)")
        try:
            params = json.loads(params_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{params_path}: not valid JSON ({_one_line(e, 80)})") from None
        if not isinstance(params, dict):
            raise ConvertError(f"{params_path}: expected a JSON object")
        self.folder, self.params_path = folder, params_path
        self.layout = self._inspect(find_shards(folder), params)
        fam = infer_family(params, family)
        target = self.layout.source_dtype if dtype == "auto" else DTYPE_NAMES[dtype]
        overrides: dict[str, Any] = dict(tie_embeddings=not self.layout.has_output, param_dtype=target, dtype=target)
        try:
            self.config = LlamaConfig.from_params_json(
                params_path, vocab_size=self.layout.vocab_size,
                family=fam if fam in ROPE_SCALING_BY_FAMILY else None,
                max_seq_len=max_seq_len or params.get("max_seq_len") or DEFAULT_MAX_SEQ_LEN[fam], **overrides)
        except (ConfigError, TypeError) as e:
            raise ConvertError(f"{params_path}: {_one_line(e)}") from None
        self.family = fam
        # output.weight is always split on vocab, so row blocks stay within one shard's vocab range.
        self.vocab_shards = len(self.layout.shards)
        self._check_shapes()

    # Validation reads only the pickles (names and shapes) and the small replicated norms.
    def _inspect(self, shards: tuple[Path, ...], params: dict) -> MetaLayout:
        n = len(shards)
        with self._open(shards) as states:
            names0 = set(states[0]) - NON_PARAMETERS
            for path, state in zip(shards[1:], states[1:]):
                names = set(state) - NON_PARAMETERS
                if names != names0:
                    diff = sorted(names ^ names0)[:3]
                    raise ConvertError(f"{path}: tensor names differ from {shards[0].name} (e.g. {diff}); the shards "
                                       "are not one checkpoint")
            if "tok_embeddings.weight" not in names0:
                raise ConvertError(f"{shards[0]}: no tok_embeddings.weight; not a Meta LLaMA checkpoint")
            emb = states[0]["tok_embeddings.weight"]
            dim = params.get("dim")
            if emb.ndim != 2 or not isinstance(dim, int):
                raise ConvertError(f"{shards[0]}: tok_embeddings.weight has shape {tuple(emb.shape)}, "
                                   f"params.json dim={dim!r}")
            rows, cols = emb.shape
            if n == 1 or cols == dim:
                axis, vocab = 0, rows * n
            elif cols * n == dim:
                axis, vocab = 1, rows
            else:
                raise ConvertError(f"{shards[0]}: tok_embeddings.weight has shape {tuple(emb.shape)}, which fits "
                                   f"neither dim={dim} nor dim/{n} shards; is the shard count right?")
            if cols != dim and n == 1:
                raise ConvertError(f"{shards[0]}: tok_embeddings.weight has shape {tuple(emb.shape)}, params.json "
                                   f"dim={dim} (files missing? only 1 shard found)")
            declared = params.get("vocab_size", -1)
            if isinstance(declared, int) and declared > 0 and declared != vocab:
                raise ConvertError(f"{shards[0]}: tok_embeddings.weight implies vocab_size={vocab} over {n} shard(s), "
                                   f"params.json says {declared}")
            for path, state in zip(shards, states):
                for name in sorted(names0):
                    if name.endswith("norm.weight"):
                        if not _equal(state[name], states[0][name]):
                            raise ConvertError(f"{path}: {name} differs from {shards[0].name}; norms are replicated "
                                               "in every shard, so these shards do not belong together")
            self._shapes = {p: {k: tuple(v.shape) for k, v in s.items() if k not in NON_PARAMETERS}
                            for p, s in zip(shards, states)}
            source_dtype = _dtype_name(emb, shards[0])
        return MetaLayout(shards, axis, vocab, "output.weight" in names0, source_dtype)

    def _check_shapes(self) -> None:
        n, shards = len(self.layout.shards), self.layout.shards
        expected = _meta_shapes(self.config)
        found = self._shapes[shards[0]]
        missing = [name for name in expected if name not in found]
        if missing:
            raise ConvertError(f"{shards[0]}: missing tensor {missing[0]} (params.json: n_layers="
                               f"{self.config.n_layers})")
        extra = sorted(set(found) - set(expected), key=_natural)
        if extra:
            raise ConvertError(f"{shards[0]}: unexpected tensor {extra[0]} for params.json "
                               f"(n_layers={self.config.n_layers})")
        for path in shards:
            for name, full in expected.items():
                axis = _split_axis(name, self.layout.embedding_axis)
                want = list(full)
                if axis is not None:
                    if full[axis] % n:
                        raise ConvertError(f"{path}: {name} has {full[axis]} along dim {axis}, not divisible by "
                                           f"{n} shards")
                    want[axis] //= n
                got = self._shapes[path][name]
                if got != tuple(want):
                    raise ConvertError(f"{path}: {name} has shape {got}, params.json implies {tuple(want)} per shard "
                                       f"with {n} shard(s) (full shape {full}); wrong params.json or missing shards?")
        del self._shapes

    @staticmethod
    @contextlib.contextmanager
    def _open(paths: Sequence[Path]):
        states = [load_shard(p) for p in paths]
        try:
            yield states
        finally:
            # Drop the tensors so the mappings are unmapped and their pages stop counting towards our RSS.
            states.clear()

    def layer(self, i: int) -> dict[str, Any]:
        torch = _torch()
        out = {}
        with self._open(self.layout.shards) as states:
            for key, axis in LAYER_SPLIT.items():
                pieces = [s[f"layers.{i}.{key}"] for s in states]
                out[key] = pieces[0].clone() if axis is None else torch.cat(pieces, dim=axis)
                del pieces
        return out

    def rows(self, name: str, start: int, stop: int):
        torch = _torch()
        shards = self.layout.shards
        if _split_axis(name, self.layout.embedding_axis) == 1:
            with self._open(shards) as states:
                return torch.cat([s[name][start:stop] for s in states], dim=1)
        per = self.config.vocab_size // len(shards)
        k = start // per
        with self._open([shards[k]]) as (state,):
            return state[name][start - k * per: stop - k * per].clone()

    def norm(self):
        with self._open(self.layout.shards[:1]) as (state,):
            return state["norm.weight"].clone()


def _equal(a, b) -> bool:
    torch = _torch()
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --- Hugging Face safetensors ----------------------------------------------------------------------------------

HF_LAYER_NAMES = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
                  "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
                  "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
                  "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
                  "ffn_norm.weight": "post_attention_layernorm.weight"}
HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


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
    try:
        c = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({_one_line(e, 80)})") from None
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
    target = source_dtype if dtype == "auto" else DTYPE_NAMES[dtype]
    try:
        return LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=c.get("num_key_value_heads"),
                           vocab_size=vocab, multiple_of=multiple_of, ffn_dim_multiplier=mult,
                           norm_eps=float(c.get("rms_norm_eps", 1e-5)), rope_theta=theta,
                           max_seq_len=max_seq_len or int(c.get("max_position_embeddings", 2048)),
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                           param_dtype=target, dtype=target, **fields)
    except ConfigError as e:
        raise ConvertError(f"{path}: {_one_line(e)}") from None


class HFSource(Source):
    def __init__(self, folder: Path, *, dtype: str = "auto", max_seq_len: int | None = None):
        folder = Path(folder)
        self.folder = folder
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ConvertError(f"{config_path}: missing (expected a Hugging Face config.json)")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: not a safetensors index ({_one_line(e, 80)})") from None
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
        self.family = None
        for meta_name, full in _meta_shapes(self.config).items():
            name = self._hf_name(meta_name)
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
            raise ConvertError(f"{path}: cannot read safetensors file (truncated or corrupt?): {_one_line(e)}") \
                from None

    @staticmethod
    def _hf_name(meta_name: str) -> str:
        if meta_name in HF_TOP_NAMES:
            return HF_TOP_NAMES[meta_name]
        _, i, key = meta_name.split(".", 2)
        return f"model.layers.{i}.{HF_LAYER_NAMES[key]}"

    def _get(self, meta_name: str, rows: slice | None = None):
        name = self._hf_name(meta_name)
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


# --- import ------------------------------------------------------------------------------------------------------

def lazy_params(source: Source, block_budget: int | None = None) -> Any:
    """The parameter tree of `source` as LazyArrays (layers one at a time, embeddings in row blocks)."""
    from llama_jax.model import init_params

    config = source.config
    dtype = _np_dtype(config.param_dtype)
    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    layer_cache = _OneLayerCache(lambda i: layer_from_meta(
        {k: to_numpy(v, dtype) for k, v in source.layer(i).items()}, config))

    def layer_leaf(path, spec):
        keys = [p.key for p in path]

        def read(i):
            value = layer_cache.get(i)
            for k in keys:
                value = value[k]
            return value[None]

        return LazyArray(tuple(spec.shape), dtype, 0, config.n_layers, read, "layers", layer_cache.clear)

    layers = jax.tree_util.tree_map_with_path(layer_leaf, expected["layers"])

    layer_bytes = sum(np.prod(s.shape) // config.n_layers for s in jax.tree.leaves(expected["layers"])) * dtype.itemsize
    budget = block_budget or max(int(layer_bytes), 1 << 20)
    vocab_rows = config.vocab_size // source.vocab_shards
    rows = _rows_per_block(vocab_rows, config.dim * dtype.itemsize, budget)
    n_blocks = config.vocab_size // rows

    def embedding_rows(name, k):
        return to_numpy(source.rows(name, k * rows, (k + 1) * rows), dtype)

    tree = {
        "tok_embeddings": LazyArray((config.vocab_size, config.dim), dtype, 0, n_blocks,
                                    lambda k: embedding_rows("tok_embeddings.weight", k), "tok_embeddings"),
        "layers": layers,
        "norm": {"weight": to_numpy(source.norm(), dtype)},
    }
    if not config.tie_embeddings:
        tree["output"] = LazyArray((config.dim, config.vocab_size), dtype, 1, n_blocks,
                                   lambda k: embedding_rows("output.weight", k).T, "output")
    if jax.tree.structure(tree) != jax.tree.structure(expected):
        raise ConvertError(f"internal: converted tree {jax.tree.structure(tree)} differs from the model's")
    return tree


def find_tokenizer(folder: Path, tokenizer: Path | None) -> Path:
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise ConvertError(f"{tokenizer}: --tokenizer file not found")
        return Path(tokenizer)
    for candidate in (folder / ckpt.TOKENIZER_FILE, folder / "original" / ckpt.TOKENIZER_FILE,
                      folder.parent / ckpt.TOKENIZER_FILE):
        if candidate.is_file():
            return candidate
    raise ConvertError(f"{folder}: no tokenizer.model here, in original/ or in the parent folder; pass --tokenizer")


def detect_format(folder: Path) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: input folder not found")
    if (folder / PARAMS_JSON).is_file() or any(folder.glob("consolidated.*.pth")):
        return "meta"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "hf"
    raise ConvertError(f"{folder / PARAMS_JSON}: missing (expected Meta's params.json + consolidated.NN.pth, or a "
                       "Hugging Face config.json + model*.safetensors)")


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    output: Path
    config: LlamaConfig
    source_format: str
    n_shards: int
    checked_files: tuple[str, ...]


def convert(input_dir: str | Path, output_dir: str | Path, *, dtype: str = "auto", family: str | None = None,
            max_seq_len: int | None = None, tokenizer: str | Path | None = None, overwrite: bool = False,
            verify: bool = True, source_format: str = "auto", progress: bool = True,
            block_budget: int | None = None) -> ConvertResult:
    """Meta download (or HF safetensors folder) -> Orbax model folder that `checkpoint.load_model` reads."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ConvertError(f"--dtype {dtype!r}: expected auto or one of {', '.join(DTYPE_NAMES)}")
    fmt = detect_format(input_dir) if source_format == "auto" else source_format
    check_output(output_dir, overwrite, [input_dir])
    if fmt == "meta" and not (input_dir / PARAMS_JSON).is_file():
        raise ConvertError(f"{input_dir / PARAMS_JSON}: missing (expected Meta's params.json next to "
                           "consolidated.NN.pth)")
    tokenizer_path = find_tokenizer(input_dir, Path(tokenizer) if tokenizer else None)
    checked = tuple(verify_checklist(input_dir)) if verify and fmt == "meta" else ()
    if fmt == "meta":
        source: Source = MetaSource(input_dir, family=family, dtype=dtype, max_seq_len=max_seq_len)
        n_shards = len(source.layout.shards)
    elif fmt == "hf":
        source = HFSource(input_dir, dtype=dtype, max_seq_len=max_seq_len)
        n_shards = len(set(source.files.values()))
    else:
        raise ConvertError(f"--format {source_format!r}: expected auto, meta or hf")
    config = source.config
    tree = lazy_params(source, block_budget)
    steps = sum(v.n_blocks for v in {v.group: v for v in jax.tree.leaves(tree) if isinstance(v, LazyArray)}.values())
    with staging_dir(output_dir, overwrite) as tmp, _progress(progress, steps, f"converting {input_dir.name}") as tick:
        config.save_json(tmp / ckpt.CONFIG_FILE)
        shutil.copyfile(tokenizer_path, tmp / ckpt.TOKENIZER_FILE)
        save_lazy_tree(tmp / ckpt.PARAMS_DIR, tree, on_step=tick)
        ckpt.verify_params(tmp / ckpt.PARAMS_DIR, config)  # names and shapes, before the rename
    return ConvertResult(output_dir, config, fmt, n_shards, checked)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, description: str):
    if not enabled:
        yield lambda group: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda group: bar.update(task, advance=1, description=f"{description}: {group}")


# --- export back to Meta's layout --------------------------------------------------------------------------------

def default_embedding_axis(config: LlamaConfig) -> int:
    """Llama 3 models (theta 500k) use VocabParallelEmbedding (dim 0), Llama 2 ParallelEmbedding (dim 1)."""
    return 0 if config.rope_theta >= 500000 else 1


def params_json_for(config: LlamaConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads}
    if config.n_kv_heads is not None:
        out["n_kv_heads"] = config.n_kv_heads
    out.update(vocab_size=config.vocab_size, multiple_of=config.multiple_of)
    if config.ffn_dim_multiplier is not None:
        out["ffn_dim_multiplier"] = config.ffn_dim_multiplier
    out.update(norm_eps=config.norm_eps, rope_theta=config.rope_theta)
    if config.use_scaled_rope:
        out["use_scaled_rope"] = True
    return out


def export_meta(model_dir: str | Path, output_dir: str | Path, *, shards: int = 1,
                embedding_split: str = "auto", overwrite: bool = False, progress: bool = True) -> Path:
    """Model folder -> consolidated.NN.pth + params.json + tokenizer.model + checklist.chk.

    `output.weight` is always written (Meta's reference model has no weight tying). The whole model is loaded;
    torch.save needs each shard's full dict in memory anyway.
    """
    torch = _torch()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if shards < 1:
        raise ConvertError(f"--shards {shards}: expected a positive number")
    check_output(output_dir, overwrite, [model_dir])
    try:
        params, config, tokenizer_path = ckpt.load_model(model_dir)
    except (ckpt.CheckpointError, ConfigError) as e:
        raise ConvertError(_one_line(e, 300)) from None
    axis = {"auto": default_embedding_axis(config), "vocab": 0, "dim": 1}.get(embedding_split)
    if axis is None:
        raise ConvertError(f"--embedding-split {embedding_split!r}: expected auto, vocab or dim")
    for what, size in (("n_heads", config.n_heads), ("n_kv_heads", config.kv_heads),
                       ("hidden_dim", config.hidden_dim), ("dim" if axis else "vocab_size",
                                                           config.dim if axis else config.vocab_size),
                       ("vocab_size", config.vocab_size)):
        if size % shards:
            raise ConvertError(f"--shards {shards}: does not divide {what}={size}")
    unordered = params_to_meta(ckpt.as_numpy(params), config)
    del params
    # Meta's key order (that of the torch module's state_dict): embedding, layers in order, norm, head.
    order = (["tok_embeddings.weight"] + [f"layers.{i}.{k}" for i in range(config.n_layers) for k in LAYER_KEYS]
             + ["norm.weight", "output.weight"])
    state = {k: unordered.pop(k) for k in order}
    with staging_dir(output_dir, overwrite) as tmp, _progress(progress, shards, "exporting") as tick:
        for s in range(shards):
            shard = {}
            for name, value in state.items():
                split = _split_axis(name, axis)
                if split is not None:
                    n = value.shape[split] // shards
                    value = value[(slice(None),) * split + (slice(s * n, (s + 1) * n),)]
                shard[name] = to_torch(value).clone()
            torch.save(shard, tmp / f"consolidated.{s:02d}.pth")
            del shard
            tick("shards")
        (tmp / PARAMS_JSON).write_text(json.dumps(params_json_for(config), indent=2) + "\n")
        if tokenizer_path.is_file():
            shutil.copyfile(tokenizer_path, tmp / ckpt.TOKENIZER_FILE)
        write_checklist(tmp)
    return output_dir


def describe(result: ConvertResult) -> str:
    c = result.config
    return (f"wrote {result.output} ({result.source_format}, {result.n_shards} shard(s), {c.n_layers} layers, "
            f"dim {c.dim}, vocab {c.vocab_size}, {c.param_dtype}, tied={c.tie_embeddings}"
            + (f", rope scaling x{c.rope_scaling.factor:g}" if c.use_scaled_rope else "")
            + (f"; md5 verified {len(result.checked_files)} file(s)" if result.checked_files else "") + ")")


__all__ = ["ConvertError", "ConvertResult", "LazyArray", "MetaSource", "HFSource", "convert", "export_meta",
           "verify_checklist", "find_shards", "load_shard", "save_lazy_tree", "unpermute_from_hf", "describe"]
