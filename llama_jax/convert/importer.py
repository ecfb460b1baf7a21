"""Meta download (or HF safetensors folder) -> our Orbax model folder, streamed.

One layer (or one block of embedding rows) at a time is read from the source, merged, mapped to our layout and
written straight into its slice of the stacked Orbax arrays, so peak host memory is about one layer, not the model.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from llama_jax import checkpoint as ckpt
from llama_jax.config import LlamaConfig
from llama_jax.convert.checklist import verify_checklist
from llama_jax.convert.errors import ConvertError
from llama_jax.convert.hf_source import HFSource
from llama_jax.convert.lazy_writer import LazyArray, save_lazy_tree
from llama_jax.convert.meta_format import PARAMS_JSON, Source
from llama_jax.convert.meta_source import MetaSource, params_json_path
from llama_jax.convert.progress import progress_bar
from llama_jax.convert.staging import check_output, staging_dir
from llama_jax.convert.tensors import DTYPE_NAMES, np_dtype, to_numpy
from llama_jax.meta_weights import layer_from_meta


def lazy_params(source: Source, block_budget: int | None = None) -> Any:
    """The parameter tree of `source` as LazyArrays (layers one at a time, embeddings in row blocks)."""
    from llama_jax.model import init_params

    config = source.config
    dtype = np_dtype(config.param_dtype)
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


class _OneLayerCache:
    """Keeps only the most recently produced layer: layer i is dropped as soon as i + 1 is asked for."""

    def __init__(self, produce: Callable[[int], Any]):
        self._produce, self._index, self._value = produce, None, None

    def get(self, i: int) -> Any:
        if self._index != i:
            self._index, self._value = None, None  # let layer i - 1 go before layer i is built, not after
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
    if fmt == "meta":
        params_json_path(input_dir)  # before the md5 pass over the shards, which can take minutes
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
    description = f"converting {input_dir.name}"
    with staging_dir(output_dir, overwrite) as tmp, progress_bar(progress, steps, description) as tick:
        config.save_json(tmp / ckpt.CONFIG_FILE)
        shutil.copyfile(tokenizer_path, tmp / ckpt.TOKENIZER_FILE)
        save_lazy_tree(tmp / ckpt.PARAMS_DIR, tree, on_step=tick)
        ckpt.verify_params(tmp / ckpt.PARAMS_DIR, config)  # names and shapes, before the rename
    return ConvertResult(output_dir, config, fmt, n_shards, checked)


def describe(result: ConvertResult) -> str:
    c = result.config
    return (f"wrote {result.output} ({result.source_format}, {result.n_shards} shard(s), {c.n_layers} layers, "
            f"dim {c.dim}, vocab {c.vocab_size}, {c.param_dtype}, tied={c.tie_embeddings}"
            + (f", rope scaling x{c.rope_scaling.factor:g}" if c.use_scaled_rope else "")
            + (f"; md5 verified {len(result.checked_files)} file(s)" if result.checked_files else "") + ")")

