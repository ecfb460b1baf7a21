"""C++ CPU kernels behind XLA's FFI, built on first use with the machine's C++ compiler for its own CPU
(-march=native) and cached under a key of source, compiler, flags, jaxlib and CPU flags. Without a compiler, or
switched off by an environment variable, each kernel is unavailable and its caller keeps XLA's ops.

    kernel = CpuKernel("packed_matmul.cc", "llama_jax_packed_matmul_f32", "LlamaJaxPackedMatmulF32",
                       switch="LLAMA_JAX_PACKED_MATMUL", fallback="decoding uses XLA's dot")
    if kernel.available(): jax.ffi.ffi_call(kernel.target, ...)

LLAMA_JAX_CACHE_DIR moves the build cache (default ~/.cache/llama_jax).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

FLAGS = ("-O3", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")

log = logging.getLogger(__name__)


class KernelUnavailable(RuntimeError):
    """A kernel cannot be built or loaded here; the message says why."""


class CpuKernel:
    """One FFI target built from `source` (a file beside this module) and registered for the CPU backend."""

    def __init__(self, source: str, target: str, symbol: str, *, switch: str, fallback: str):
        self.source = Path(__file__).with_name(source)
        self.target, self.symbol = target, symbol
        self.switch = switch  # an environment variable: "0" turns the kernel off
        self.fallback = fallback  # what runs instead, for the warning
        self.error: KernelUnavailable | bool | None = None  # None: not tried yet; False: registered

    def available(self) -> bool:
        """True when the kernel is built (now, if it was not yet) and registered for this process's CPU backend."""
        try:
            self.load()
        except KernelUnavailable:
            return False
        return True

    def load(self) -> None:
        """Builds (once per machine, source and jaxlib) and registers the FFI target; raises KernelUnavailable,
        the same one on every later call (the build is tried once per process, and a failure logged once)."""
        if self.error is None:
            try:
                self.register()
                self.error = False
            except KernelUnavailable as e:
                self.error = e
                if not self.switched_off():  # a choice is not worth a warning
                    log.warning("%s unavailable (%s); %s", self.source.stem, e, self.fallback)
        if self.error:
            raise KernelUnavailable(str(self.error)) from None

    def switched_off(self) -> bool:
        return os.environ.get(self.switch, "1") == "0"

    def register(self) -> None:
        if self.switched_off():
            raise KernelUnavailable(f"{self.switch}=0")
        try:
            library = self.build()
            handler = getattr(ctypes.cdll.LoadLibrary(str(library)), self.symbol)
            jax.ffi.register_ffi_target(self.target, jax.ffi.pycapsule(handler), platform="cpu")
        except KernelUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - whatever goes wrong, the caller goes on with XLA's ops
            raise KernelUnavailable(f"{type(e).__name__}: {e}") from None

    def build(self) -> Path:
        compiler = shlex.split(os.environ.get("CXX", "")) or [
            next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), "")]
        if not compiler[0]:
            raise KernelUnavailable("no C++ compiler (set CXX or install g++/clang++)")
        compiler_path = shutil.which(compiler[0])
        if not compiler_path:
            raise KernelUnavailable(f"C++ compiler {compiler[0]!r} not found")
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
        cache = Path(os.environ.get("LLAMA_JAX_CACHE_DIR") or Path.home() / ".cache" / "llama_jax")
        # -march=native builds for this CPU, so the CPU is part of the key (a home directory may be shared).
        key = hashlib.sha256(b"\0".join([self.source.read_bytes(), compiler_path.encode(), version.encode(),
                                         " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                         platform.machine().encode(), _cpu_signature()])).hexdigest()[:16]
        library = cache / f"{self.source.stem}-{key}.so"
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
                cmd = [*compiler, *FLAGS, *arch, f"-I{jax.ffi.include_dir()}", str(self.source), "-o", tmp]
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode == 0:
                    os.replace(tmp, library)  # atomic: concurrent builders each publish a whole file
                    return library
                error = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
            raise KernelUnavailable(f"{' '.join(compiler)} failed to build {self.source.name}: {error}")
        except OSError as e:
            raise KernelUnavailable(f"cannot build in {cache}: {e}") from None
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)


def _cpu_signature() -> bytes:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "").encode()
