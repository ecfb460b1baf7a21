"""Sharded safetensors files written tensor block by tensor block, with Hugging Face's index.

Every tensor's name, shape and dtype is known before any data is read, so each file's header is written first and
the data streamed after it: memory stays at one block, whatever the shard size (safetensors' own `save_file` needs
a whole shard in memory).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from pathlib import Path
from typing import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

from llama_jax.convert.errors import ConvertError

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / a byte count -> bytes (decimal units as in HF's --max-shard-size)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    size = int(float(match[1]) * _UNITS[(match[2] or "").upper()]) if match else 0
    if size <= 0:
        raise ConvertError(f"--max-shard-size {text!r}: expected a positive size such as 5GB, 500MB or 1000000")
    return size


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in order, a new file whenever the next one would pass `max_bytes` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: Sequence[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces so that the data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


def write_sharded(folder: Path, specs: Sequence[TensorSpec], blocks: Iterator[tuple[str, np.ndarray]],
                  max_bytes: int, on_tensor: Callable[[str], None] = lambda name: None) -> list[str]:
    """Writes `specs` as model-NNNNN-of-NNNNN.safetensors + the index; `blocks` yields (name, rows) in spec order,
    each tensor as one or more blocks of whole rows. Returns the file names."""
    for spec in specs:
        if spec.dtype not in _DTYPES:
            raise ConvertError(f"{spec.name}: dtype {spec.dtype} cannot be stored; expected float32, bfloat16 or "
                               "float16")
    plan = plan_shards(specs, max_bytes)
    names = [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    weight_map = {}
    for file_name, shard in zip(names, plan):
        with open(folder / file_name, "wb") as f:
            f.write(_header(shard))
            for spec in shard:
                _write_tensor(f, spec, blocks)
                weight_map[spec.name] = file_name
                on_tensor(spec.name)
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_tensor(f, spec: TensorSpec, blocks: Iterator[tuple[str, np.ndarray]]) -> None:
    written = 0
    while written < spec.nbytes:
        name, block = next(blocks)
        if name != spec.name or block.dtype != spec.dtype or block.shape[1:] != spec.shape[1:]:
            raise ConvertError(f"internal: got {name} {block.shape} {block.dtype} while writing {spec.name} "
                               f"{spec.shape} {spec.dtype}")
        f.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8).data)
        written += block.nbytes
    if written != spec.nbytes:
        raise ConvertError(f"internal: {spec.name} got {written} bytes, expected {spec.nbytes}")
