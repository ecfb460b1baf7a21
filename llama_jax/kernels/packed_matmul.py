"""A CPU matmul for decoding: x [M, K] @ W [K, N] with W packed once as [N/8, K, 8] (packed_matmul.cc).

A decode step multiplies a few rows by every weight matrix, so its speed is the rate at which the weights are
read, and XLA:CPU's GEMM reads W [K, N] in short pieces of a different page for each k, well below the rate of a
plain read; packed strips are read at nearly that rate (docs/design.md). The kernel is C++ behind XLA's FFI, compiled on first use with the machine's C++
compiler for its own CPU (-march=native) and cached; without a compiler, decoding keeps XLA's dot.

    if packed_matmul.available():
        p = pack(w)                         # same shape and dtype as w, contents in strips
        y = matmul(x, p.reshape(N // 8, K, 8))
        leaf = PackedWeight(p, n_in=1)      # how a parameter tree carries it: model.dense then runs the kernel

LLAMA_JAX_PACKED_MATMUL=0 turns it off; LLAMA_JAX_CACHE_DIR moves the build cache (default ~/.cache/llama_jax).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

STRIP = 8  # columns per strip: one 256-bit vector of fp32
_SOURCE = Path(__file__).with_name("packed_matmul.cc")
_TARGET = "llama_jax_packed_matmul_f32"
_SYMBOL = "LlamaJaxPackedMatmulF32"
_FLAGS = ("-O3", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")

log = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight held as `pack(w, n_in, n_lead)`: the array keeps w's shape (so Flax's parameter shape checks and
    the tree's structure hold), and its type tells `dense` to run the kernel. Inference only: no gradient."""

    strips: jax.Array
    n_in: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def shape(self):
        return self.strips.shape

    @property
    def dtype(self):
        return self.strips.dtype


class PackedMatmulUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


def available() -> bool:
    """True when the kernel is built (now, if it was not yet) and registered for this process's CPU backend."""
    try:
        load()
    except PackedMatmulUnavailable:
        return False
    return True


def load() -> None:
    """Builds (once per machine, source and jaxlib) and registers the FFI target; raises PackedMatmulUnavailable,
    the same one on every later call (the build is tried once per process, and a failure logged once)."""
    global _load_error
    if _load_error is None:
        try:
            _register()
            _load_error = False
        except PackedMatmulUnavailable as e:
            _load_error = e
            if not _switched_off():  # a choice is not worth a warning
                log.warning("packed CPU matmul unavailable (%s); decoding uses XLA's dot", e)
    if _load_error:
        raise PackedMatmulUnavailable(str(_load_error)) from None


_load_error: PackedMatmulUnavailable | bool | None = None  # None: not tried yet; False: registered


def _switched_off() -> bool:
    return os.environ.get("LLAMA_JAX_PACKED_MATMUL", "1") == "0"


def _register() -> None:
    if _switched_off():
        raise PackedMatmulUnavailable("LLAMA_JAX_PACKED_MATMUL=0")
    try:
        library = _build()
        handler = getattr(ctypes.cdll.LoadLibrary(str(library)), _SYMBOL)
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    except PackedMatmulUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - whatever goes wrong, decoding goes on with XLA's dot
        raise PackedMatmulUnavailable(f"{type(e).__name__}: {e}") from None


def _build() -> Path:
    compiler = shlex.split(os.environ.get("CXX", "")) or [
        next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), "")]
    if not compiler[0]:
        raise PackedMatmulUnavailable("no C++ compiler (set CXX or install g++/clang++)")
    compiler_path = shutil.which(compiler[0])
    if not compiler_path:
        raise PackedMatmulUnavailable(f"C++ compiler {compiler[0]!r} not found")
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
    cache = Path(os.environ.get("LLAMA_JAX_CACHE_DIR") or Path.home() / ".cache" / "llama_jax")
    # -march=native builds for this CPU, so the CPU is part of the key (a home directory may be shared).
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), compiler_path.encode(), version.encode(),
                                     " ".join(_FLAGS).encode(), jaxlib.__version__.encode(),
                                     platform.machine().encode(), _cpu_signature()])).hexdigest()[:16]
    library = cache / f"packed_matmul-{key}.so"
    if library.exists():
        return library
    tmp = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        error = ""
        # Without -march=native (a compiler that lacks it) the vectors fall back to the baseline ISA.
        for arch in (["-march=native"], []):
            cmd = [*compiler, *_FLAGS, *arch, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(tmp, library)  # atomic: concurrent builders each publish a whole file
                return library
            error = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise PackedMatmulUnavailable(f"{' '.join(compiler)} failed to build {_SOURCE.name}: {error}")
    except OSError as e:
        raise PackedMatmulUnavailable(f"cannot build in {cache}: {e}") from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def _cpu_signature() -> bytes:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "").encode()


def pack(w: jax.Array, n_in: int = 1, n_lead: int = 0) -> jax.Array:
    """w [*lead, *in, *out] with its (K, N) = (prod in, prod out) matrix laid out as [N/8, K, 8] strips, in an
    array of w's own shape, so that parameter trees keep their structure. n_lead leading axes (stacked
    layers) are packed independently."""
    lead, inner = w.shape[:n_lead], w.shape[n_lead:]
    k, n = math.prod(inner[:n_in]), math.prod(inner[n_in:])
    if n % STRIP:
        raise ValueError(f"pack: the output width {n} of a {w.shape} weight is not a multiple of {STRIP}")
    strips = w.reshape(*lead, k, n // STRIP, STRIP).swapaxes(-3, -2)
    return strips.reshape(w.shape)


def matmul(x: jax.Array, packed: jax.Array) -> jax.Array:
    """x [M, K] (fp32) @ the matrix packed as [N/8, K, 8] -> [M, N] fp32. Call `load()` (or `available()`) first."""
    m, k = x.shape
    strips, k_packed, width = packed.shape
    if k != k_packed or width != STRIP or x.dtype != jnp.float32 or packed.dtype != jnp.float32:
        raise ValueError(f"packed_matmul.matmul: x {x.dtype}{list(x.shape)} and packed {packed.dtype}"
                         f"{list(packed.shape)}; expected float32 [M, K] and [N/{STRIP}, K, {STRIP}]")
    out = jax.ShapeDtypeStruct((m, strips * STRIP), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out)(x, packed)

