"""Batch generation, the host side: checks the prompts, pads them into shape buckets, compiles each bucket once,
and streams or returns the tokens.

    gen = Generator(params, config, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    out = gen.generate([tok.encode(p, bos=True, eos=False) for p in prompts], max_new_tokens=64,
                       sampling=SamplingParams(temperature=0.6, top_p=0.9), seed=0)
    out.tokens[i]        # row i's new ids, without the stop id
    for chunk in gen.stream(prompts_ids, chunk_size=16): ...   # the same loop, returning every 16 tokens

Shapes are bucketed (batch and prompt length to powers of two, prompts beyond one prefill chunk to a multiple of
it, the number of new tokens to a power of two), so a second call with other prompts of similar size reuses the
compiled functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import sharding as sh
from llama_jax.config import LlamaConfig
from llama_jax.inference import engine
from llama_jax.inference.engine import MAX_STOP_IDS, DecodeState, SamplingInputs
from llama_jax.inference.weights import (Layout, decoding_config, decoding_params, is_packed, load_decoding_params,
                                         tensor_size, why_not_packed)
from llama_jax.kernels import decode_compiler_options, select_ops
from llama_jax.kv_cache import cache_bytes
from llama_jax.sampling import GREEDY, SamplingParams


def compile_ahead(fn, args, static: dict, mesh, compiler_options: dict) -> tuple[Any, dict]:
    """`fn` lowered for `args` (under the mesh's logical rules) and compiled with `compiler_options`; returns the
    executable and the options it was compiled with (none, for a jaxlib that does not know one of them)."""
    with sh.activate(mesh) if mesh is not None else contextlib.nullcontext():
        lowered = fn.lower(*args, **static)
    try:
        return lowered.compile(compiler_options=compiler_options), compiler_options
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" not in str(e):
            raise
        return lowered.compile(), {}


def local_device(mesh):
    """The device whose memory a check reads: the first, or on a mesh the first of this process's own."""
    if mesh is None:
        return jax.devices()[0]
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


class GenerationError(ValueError):
    """Generation inputs that cannot be served (empty batch, prompt too long, ...); the message says which."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """Result of `Generator.generate` for the real (unpadded) rows, in input order."""

    tokens: list[list[int]]  # new ids, stop id excluded
    finish_reasons: list[str]  # "stop" (a stop id) or "length" (max_new_tokens or max_seq_len)
    prefill_seconds: float  # time to first token (prefill + first sample), compilation excluded
    decode_seconds: float  # the rest, compilation excluded
    compile_seconds: float  # spent compiling in this call (0 when the bucket was compiled before)
    steps: int  # tokens generated per row before the loop ended (all rows stopped, or the length limit)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """New ids per row since the previous chunk; `done[i]` once row i will get no more."""

    tokens: list[list[int]]
    done: list[bool]


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


class Generator:
    """Holds the parameters, laid out for decoding, and serves generate / stream calls.

    mesh: a `jax.sharding.Mesh` with axes among (data, tensor) (and fsdp, of size 1): weights tensor-parallel
    (heads, mlp and vocab over `tensor`), batch rows over `data`, the KV cache sharded with its KV heads, all
    through the model's logical axes (llama_jax.sharding.RULES). None: one device.
    scan_layers: False (default) unrolls the layers in the compiled functions (the weights are unstacked once,
    here): under a scan, XLA:CPU copies each layer's weights out of the stacked arrays at every step. Unrolling
    costs compile time, linear in n_layers.
    compiler_options: XLA options for every compiled function (default: kernels.decode_compiler_options() for
    the decode loop, XLA's defaults for prefill, whose many-row products they suit).
    packed_weights: multiply by weights packed for the CPU decoding kernel (kernels/packed_matmul). None
    (default) packs them where that applies: a CPU, an fp32 model, the kernel built; True insists
    (GenerationError where it cannot); False keeps XLA's dot. Packing copies the weights once, here.
    prefill_chunk: prompts go through the model this many tokens at a time, so that prefill's memory does not
    grow with the square of the prompt; longer prompts are bucketed to a multiple of it.
    kv_dtype: the KV cache's dtype, e.g. "bfloat16" (default: the compute dtype).
    """

    def __init__(self, params: Any, config: LlamaConfig, **options: Any):
        if is_packed(params):
            raise GenerationError("the parameters are already packed: pass the unpacked ones (the Generator packs "
                                  "them itself)")
        self._configure(config, **options)
        self.params = decoding_params(params, self.layout)

    @classmethod
    def from_checkpoint(cls, model_dir, config: LlamaConfig | None = None, *, adapter=None,
                        **options: Any) -> "Generator":
        """A Generator over a model or run folder, whose parameters are read straight into their decoding layout
        and shards one leaf at a time: no host or device holds a second copy of the weights.

        adapter: a LoRA training run folder trained on `model_dir`; its adapters run beside the base weights,
        unmerged (one device; on a mesh, merge them first with convert_weights.py --adapter).
        """
        from llama_jax.adapters import AdapterInfo, load_adapters
        from llama_jax.checkpoint import load_config

        self = cls.__new__(cls)
        self._configure(config or load_config(model_dir), **options)
        adapters = info = None
        if adapter is not None:
            info = AdapterInfo.read(adapter)
            if info is None:
                raise GenerationError(f"{adapter}: not a LoRA run folder (no adapter.json)")
            if self.mesh is not None:
                raise GenerationError("unmerged adapters run on one device; on a mesh, merge them first "
                                      "(convert_weights.py --input BASE --adapter RUN_DIR --output DIR)")
            info.check_base(model_dir, adapter)
            adapters = load_adapters(adapter, self.layout.stored, info.lora)
        self.params = load_decoding_params(model_dir, self.layout, adapters, info and info.lora)
        return self

    def _configure(self, config: LlamaConfig, *, mesh=None, stop_ids: Sequence[int] = (), pad_id: int = 0,
                   scan_layers: bool = False, min_prompt_bucket: int = 16,
                   compiler_options: dict[str, Any] | None = None, packed_weights: bool | None = None,
                   prefill_chunk: int = 512, kv_dtype: str | None = None) -> None:
        if prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.mesh = None if mesh is None else sh.as_auto_mesh(mesh)
        tensor = tensor_size(self.mesh)
        for name, size in (("n_heads", config.n_heads), ("hidden_dim", config.hidden_dim)):
            if size % tensor:
                raise GenerationError(f"model {name}={size} is not divisible by the mesh's tensor axis ({tensor})")
        reason = None if packed_weights is False else why_not_packed(config, self.mesh)
        if packed_weights and reason:
            raise GenerationError(f"packed_weights=True, but {reason}")
        self.packed_weights = packed_weights is not False and reason is None
        self.config = decoding_config(config, self.mesh, scan_layers)
        self.layout = Layout(config, self.config, self.mesh, self.packed_weights)
        self.ops = select_ops(self.config, mesh=self.mesh)
        stop_ids = sorted(set(int(i) for i in stop_ids))
        if len(stop_ids) > MAX_STOP_IDS:
            raise GenerationError(f"at most {MAX_STOP_IDS} stop ids are supported, got {len(stop_ids)}")
        self.stop_ids = frozenset(stop_ids)
        self._stop_array = jnp.asarray(stop_ids + [-1] * (MAX_STOP_IDS - len(stop_ids)), jnp.int32)
        self.pad_id = int(pad_id)
        self.min_prompt_bucket = min_prompt_bucket
        self.prefill_chunk = prefill_chunk
        self.kv_dtype = jnp.dtype(kv_dtype or self.config.compute_dtype).name
        # (function, input shapes, sampler switches) -> executable.
        self.executables: dict[tuple, Any] = {}
        self.compile_seconds = 0.0  # total spent compiling, for reporting it apart from generation time
        self.compiler_options = dict(decode_compiler_options() if compiler_options is None else compiler_options)
        self.prefill_compiler_options = {} if compiler_options is None else dict(compiler_options)

    # -- inputs

    def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
        """Raises GenerationError for prompts that cannot be served; returns how many tokens each row can get."""
        if len(prompts) == 0:
            raise GenerationError("empty batch: give at least one prompt")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = self.config.max_seq_len
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise GenerationError(f"prompt {i} is empty (encode with bos=True to start from a bos token)")
            if len(p) >= limit:
                raise GenerationError(f"prompt {i} has {len(p)} tokens; max_seq_len={limit} leaves no room to "
                                      "generate")
            bad = [t for t in p if not 0 <= int(t) < self.config.vocab_size]
            if bad:
                raise GenerationError(f"prompt {i} has ids outside [0, {self.config.vocab_size}): {bad[:3]}")
        # Meta's rule: generation stops at max_seq_len for the longest prompt.
        return min(max_new_tokens, limit - max(len(p) for p in prompts))

    def _left_pad(self, prompts: Sequence[Sequence[int]], max_new: int):
        data = 1 if self.mesh is None else self.mesh.shape["data"]
        batch = -(-next_power_of_two(len(prompts)) // data) * data  # rows split evenly over the data axis
        longest, chunk = max(len(p) for p in prompts), self.prefill_chunk
        if longest > chunk:
            length = -(-longest // chunk) * chunk
        else:
            length = next_power_of_two(longest, self.min_prompt_bucket)
        # Padding slots are cache slots too: the prompt and the new tokens must fit in max_seq_len.
        length = min(length, self.config.max_seq_len - max_new)
        tokens = np.full((batch, length), self.pad_id, np.int32)
        positions = np.full((batch, length), -1, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, length - len(p):] = p
            positions[i, length - len(p):] = np.arange(len(p))
        return tokens, positions, np.arange(batch) < len(prompts)

    def _inputs(self, sampling: SamplingParams) -> SamplingInputs:
        return SamplingInputs(jnp.float32(sampling.temperature), jnp.float32(sampling.top_p), self._stop_array,
                              jnp.int32(self.pad_id))

    # -- compiled calls

    def _start(self, prompts, max_new_tokens, sampling: SamplingParams, seed: int):
        max_new = self.check(prompts, max_new_tokens)
        tokens, positions, active = (self._rows(x) for x in self._left_pad(prompts, max_new))
        new_bucket = next_power_of_two(max_new, 8)
        cache_len = min(tokens.shape[1] + new_bucket, self.config.max_seq_len)
        key = ("prefill", tokens.shape, new_bucket, sampling.switches)
        if key not in self.executables:
            self._check_memory(tokens.shape[0], cache_len)
        inputs = self._inputs(sampling)
        args = (self.params, tokens, positions, active, jax.random.key(seed), inputs)
        static = dict(config=self.config, ops=self.ops, switches=sampling.switches, cache_len=cache_len,
                      new_bucket=new_bucket, chunk=self.prefill_chunk, kv_dtype=self.kv_dtype)
        run = self._compiled(key, engine.prefill, args, static)
        return run(*args), max_new, inputs

    def cache_bytes_per_device(self, batch: int, cache_len: int) -> int:
        """What one device holds of a KV cache of `batch` rows x `cache_len` slots in this Generator's layout."""
        cache = cache_bytes(self.config, batch, cache_len, self.kv_dtype)
        if self.mesh is not None:  # rows split over data, KV heads over tensor: each device holds its share
            cache //= self.mesh.shape["data"] * self.mesh.shape["tensor"]
        return cache

    def _check_memory(self, batch: int, cache_len: int) -> None:
        """A KV cache the device cannot hold next to the weights is a GenerationError before anything compiles
        (where JAX reports the device's memory; a CPU's it does not)."""
        device = local_device(self.mesh)
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return
        cache = self.cache_bytes_per_device(batch, cache_len)
        weights = sum(shard.data.nbytes for leaf in jax.tree.leaves(self.params) for shard in leaf.addressable_shards
                      if shard.device == device)
        limit, in_use = stats["bytes_limit"], stats.get("bytes_in_use", weights)
        if cache > limit - in_use:
            mib = 2 ** 20
            raise GenerationError(f"the KV cache of {batch} x {cache_len} slots ({self.kv_dtype}) needs "
                                  f"{cache / mib:,.0f} MiB; the device has {(limit - in_use) / mib:,.0f} MiB free of "
                                  f"{limit / mib:,.0f} MiB (weights {weights / mib:,.0f} MiB): shorten the prompts, "
                                  "the batch or max_new_tokens, or use a smaller kv_dtype")

    def _decode(self, state: DecodeState, until: int, inputs: SamplingInputs, sampling: SamplingParams):
        args = (self.params, state, jnp.int32(until), inputs)
        static = dict(config=self.config, ops=self.ops, switches=sampling.switches)
        key = ("decode", state.tokens.shape, state.cache.positions.shape, sampling.switches)
        return self._compiled(key, engine.decode, args, static)(*args)

    def _rows(self, x: np.ndarray):
        """A host array of batch rows as a global array split over the data axis (each process reads the rows its
        own devices hold); unchanged without a mesh."""
        if self.mesh is None:
            return x
        sharding = NamedSharding(self.mesh, P(sh.BATCH_AXES, *(None,) * (x.ndim - 1)))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def _compiled(self, key, fn, args, static):
        """The executable for `key`, compiled ahead of time on first use (so compile time is measured apart)."""
        if key not in self.executables:
            t0 = time.perf_counter()
            options = "prefill_compiler_options" if key[0] == "prefill" else "compiler_options"
            self.executables[key], used = compile_ahead(fn, args, static, self.mesh, getattr(self, options))
            setattr(self, options, used)
            self.compile_seconds += time.perf_counter() - t0
        return self.executables[key]

    def _trim(self, row: np.ndarray, n: int) -> tuple[list[int], str]:
        ids = [int(t) for t in row[:n]]
        for j, t in enumerate(ids):
            if t in self.stop_ids:
                return ids[:j], "stop"
        return ids, "length"

    # -- public

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                 sampling: SamplingParams = GREEDY, seed: int = 0) -> Generation:
        """New ids for every prompt (lists of ids, bos included), with the whole decode loop on the device."""
        compiled0 = self.compile_seconds
        t0 = time.perf_counter()
        state, max_new, inputs = self._start(prompts, max_new_tokens, sampling, seed)
        jax.block_until_ready(state.tokens)
        t1 = time.perf_counter()
        compile_prefill = self.compile_seconds - compiled0
        if max_new > 1:
            state = self._decode(state, max_new, inputs, sampling)
        tokens, step = jax.device_get((state.tokens, state.step))
        t2 = time.perf_counter()
        compile_decode = self.compile_seconds - compiled0 - compile_prefill
        rows = [self._trim(tokens[i], int(step)) for i in range(len(prompts))]
        return Generation(tokens=[r[0] for r in rows], finish_reasons=[r[1] for r in rows],
                          prefill_seconds=t1 - t0 - compile_prefill, decode_seconds=t2 - t1 - compile_decode,
                          compile_seconds=compile_prefill + compile_decode, steps=int(step))

    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
               sampling: SamplingParams = GREEDY, seed: int = 0, chunk_size: int = 16) -> Iterator[StreamChunk]:
        """Like `generate`, returning to the host every `chunk_size` tokens (the first chunk: the first token).

        Uses the same compiled functions as `generate`; the ids it yields concatenate to generate's output.
        """
        if chunk_size < 1:
            raise GenerationError(f"chunk_size must be >= 1, got {chunk_size}")
        state, max_new, inputs = self._start(prompts, max_new_tokens, sampling, seed)
        n = len(prompts)
        emitted = [0] * n
        stopped = [False] * n
        while True:
            tokens, step = jax.device_get((state.tokens, state.step))
            step = int(step)
            chunk, done = [], []
            for i in range(n):
                ids, reason = self._trim(tokens[i], step)
                new = ids[emitted[i]:] if not stopped[i] else []
                emitted[i] += len(new)
                stopped[i] = stopped[i] or reason == "stop" or step >= max_new
                chunk.append(new)
                done.append(stopped[i])
            yield StreamChunk(tokens=chunk, done=done)
            if all(done):
                return
            state = self._decode(state, min(step + chunk_size, max_new), inputs, sampling)


def generate(params: Any, config: LlamaConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
             sampling: SamplingParams = GREEDY, seed: int = 0, stop_ids: Sequence[int] = (), pad_id: int = 0,
             **generator_kw: Any) -> Generation:
    """One-shot convenience over `Generator(...).generate(...)`."""
    return Generator(params, config, stop_ids=stop_ids, pad_id=pad_id, **generator_kw).generate(
        prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
