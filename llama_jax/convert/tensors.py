"""Torch tensors <-> numpy arrays (bfloat16 via ml_dtypes), and the float dtypes checkpoints are stored in."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np

from llama_jax.convert.errors import ConvertError

# --dtype spellings -> dtype names.
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
               "fp16": "float16", "float16": "float16"}
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}


def import_torch():
    # torch is only needed for .pth/safetensors I/O (the `convert` extra), so it is imported on first use.
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the install
        raise ConvertError("PyTorch is needed to read .pth files: pip install 'llama_jax[convert]'") from None
    return torch


def target_dtype(dtype: str, source_dtype: str) -> str:
    """The dtype name to store for a --dtype value ("auto": that of the checkpoint)."""
    return source_dtype if dtype == "auto" else DTYPE_NAMES[dtype]


def np_dtype(name: str) -> np.dtype:
    return _NP_DTYPES[name]


def dtype_name(t, path: Path) -> str:
    torch = import_torch()
    names = {getattr(torch, name): name for name in _NP_DTYPES}
    if t.dtype not in names:
        raise ConvertError(f"{path}: unsupported tensor dtype {t.dtype}; expected float32, bfloat16 or float16")
    return names[t.dtype]


def _torch_dtype(dtype: np.dtype):
    name = {v: k for k, v in _NP_DTYPES.items()}[np.dtype(dtype)]
    return getattr(import_torch(), name)


def to_numpy(t, dtype: np.dtype | None = None) -> np.ndarray:
    """A torch tensor as a numpy array (bfloat16 via ml_dtypes), cast to `dtype` by torch (exact rounding)."""
    torch = import_torch()
    if dtype is not None:
        t = t.to(_torch_dtype(dtype))
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray):
    torch = import_torch()
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # e.g. a view of a jax array; torch tensors must own writable memory
        a = a.copy()
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
