"""Batch generation: one jitted prefill of left-padded prompts, then the whole decode loop on the device.

    gen = Generator(params, config, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    out = gen.generate([tok.encode(p, bos=True, eos=False) for p in prompts], max_new_tokens=64,
                       sampling=SamplingParams(temperature=0.6, top_p=0.9), seed=0)
    out.tokens[i]        # row i's new ids, without the stop id
    for chunk in gen.stream(prompts_ids, chunk_size=16): ...   # the same loop, returning every 16 tokens

Layout: prompts are left-padded to a common length so that every row writes the same cache slot at each step
(KVCache.index is shared); padding has position -1 and is never attended to, and each row's positions count
from 0 at its first real token. Shapes are bucketed (batch and prompt length to powers of two, the number of
new tokens too), so a second call with other prompts of similar size reuses the compiled functions. The
number of new tokens actually produced, the temperature and top-p are traced values; only the bucket sizes,
greedy-or-not and top-k are compiled in.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import packed_matmul
from llama_jax.config import LlamaConfig
from llama_jax.model import KVCache, forward, init_cache, packed_head, unstack_layers
from llama_jax.sampling import GREEDY, SamplingParams, sample_rows

# Incremented at trace time only: tests read it to prove a second call in the same bucket does not recompile.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

# Stop ids are padded to a fixed length so tokenizers with 1 or 3 stop ids share compiled functions.
MAX_STOP_IDS = 8

# XLA:CPU hands dots to YNNPACK by default. Decoding multiplies a few rows by each weight matrix, and there Eigen's
# GEMM (an empty list of YNNPACK fusion types) was faster on our 2-core AVX2 benchmark machine: small-100m at batch
# 8 took 41 ms per step against 49 ms, batch 1 the same. A jaxlib without the option compiles without it.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class GenerationError(ValueError):
    """Generation inputs that cannot be served (empty batch, prompt too long, ...); the message says which."""


class DecodeState(NamedTuple):
    """Everything the decode loop carries, on the device."""

    cache: KVCache
    tokens: jax.Array  # [B, N] new ids; pad after a row stopped
    last: jax.Array  # [B] the latest id, the next step's input
    position: jax.Array  # [B] position of `last`
    done: jax.Array  # [B] bool: the row produced a stop id (or is batch padding)
    step: jax.Array  # scalar: how many columns of `tokens` are filled
    key: jax.Array


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


# --- the two compiled functions ------------------------------------------------------------------------------

def _finished(tokens, stop_ids):
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


@partial(jax.jit, static_argnames=("config", "sampling", "cache_len", "new_bucket"))
def prefill(params, tokens, positions, active, key, temperature, top_p, stop_ids, pad_id, *,
            config: LlamaConfig, sampling: tuple, cache_len: int, new_bucket: int) -> DecodeState:
    """Fills a fresh cache with the prompts and samples each row's first new token.

    tokens, positions: [B, P] left-padded (position -1 = padding); active: [B] False for batch-padding rows.
    """
    TRACE_COUNTS["prefill"] += 1
    batch, prompt_len = tokens.shape
    cache = init_cache(config, batch, cache_len)
    if prompt_len > 1:
        # Only the last position's logits are needed: running the rest separately lets XLA drop their
        # [B, P-1, vocab] output projection as dead code instead of materialising it.
        _, cache = forward(params, tokens[:, :-1], positions[:, :-1], cache, config=config)
    logits, cache = forward(params, tokens[:, -1:], positions[:, -1:], cache, config=config)
    first = _sample(logits[:, 0], key, 0, sampling, temperature, top_p)
    first = jnp.where(active, first, pad_id)
    out = jnp.full((batch, new_bucket), pad_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(cache=cache, tokens=out, last=first, position=positions[:, -1] + 1,
                       done=~active | _finished(first, stop_ids), step=jnp.ones((), jnp.int32), key=key)


@partial(jax.jit, static_argnames=("config", "sampling"), donate_argnames=("state",))
def decode(params, state: DecodeState, until, temperature, top_p, stop_ids, pad_id, *,
           config: LlamaConfig, sampling: tuple) -> DecodeState:
    """Runs decode steps on the device until `until` columns are filled or every row has stopped."""
    TRACE_COUNTS["decode"] += 1

    def cond(s: DecodeState):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeState):
        positions = jnp.where(s.done, -1, s.position)  # stopped rows stop being attended to
        logits, cache = forward(params, s.last[:, None], positions[:, None], s.cache, config=config)
        nxt = _sample(logits[:, 0], s.key, s.step, sampling, temperature, top_p)
        nxt = jnp.where(s.done, pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (0, s.step))
        return DecodeState(cache=cache, tokens=tokens, last=nxt, position=s.position + 1,
                           done=s.done | _finished(nxt, stop_ids), step=s.step + 1, key=s.key)

    return jax.lax.while_loop(cond, body, state)


def _sample(logits, key, step, sampling: tuple, temperature, top_p):
    is_greedy, top_k, use_top_p = sampling  # static, from SamplingParams.static_key()
    return sample_rows(logits, key, step, temperature=temperature, top_k=top_k, top_p=top_p, is_greedy=is_greedy,
                       use_top_p=use_top_p)


# --- host side -----------------------------------------------------------------------------------------------

# Weights that go through model.dense, with their number of input axes.
_PACKED_WEIGHTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w2": 1, "w3": 1, "output": 1}


def _why_not_packed(config: LlamaConfig) -> str | None:
    """Why packed_matmul's kernel cannot serve this model here, or None when it can."""
    if jax.default_backend() != "cpu":
        return f"the kernel is for CPUs and JAX runs on {jax.default_backend()}"
    if config.compute_dtype != jnp.float32 or config.weight_dtype != jnp.float32:
        return f"the kernel is fp32 and the model is dtype={config.dtype}, param_dtype={config.param_dtype}"
    # The output head's width (the vocabulary) is not checked: a head that does not fit stays unpacked.
    widths = (config.n_heads * config.head_dim, config.kv_heads * config.head_dim, config.hidden_dim, config.dim)
    if any(w % packed_matmul.STRIP for w in widths):
        return f"a weight's output width in {widths} is not a multiple of {packed_matmul.STRIP}"
    try:
        packed_matmul.load()
    except packed_matmul.PackedMatmulUnavailable as e:
        return str(e)
    return None


@partial(jax.jit, static_argnums=(1, 2))
def _pack_one(w, n_in, n_lead):
    return packed_matmul.pack(w, n_in, n_lead)


def _pack_weights(params, config: LlamaConfig):
    """The tree with every weight that model.dense reads packed (see packed_head), the other leaves as they are."""
    packed = {name: n_in for name, n_in in _PACKED_WEIGHTS.items() if name != "output" or packed_head(config)}

    def visit(tree, stacked):
        return {name: visit(sub, stacked or name == "layers") if isinstance(sub, Mapping)
                else _pack_one(sub, packed[name], int(stacked)) if name in packed else sub
                for name, sub in tree.items()}
    return visit(params, False)


class Generator:
    """Holds the parameters (laid out for decoding) and serves generate / stream calls.

    Every compiled call reads the KV cache, and attention over the cache takes model.attention's einsum path on
    every backend (on a CPU, decode steps read only the filled part while it is at most half the cache): on an
    H100 it decodes at 82% of the weight-streaming bound (README), where jax.nn's XLA path would first transpose
    the cache, so there is no attention_impl to choose here.
    scan_layers: False (default) unstacks the layers once here and unrolls them in the compiled functions.
    Under a scan the weights of each layer are sliced out of the stacked arrays at every step, which XLA:CPU
    materialises as a copy: measured 2.2x slower decoding at batch 1 for small-100m. Unrolling costs compile
    time (linear in n_layers) and, while the caller keeps the stacked tree alive, a second copy of the weights.
    compiler_options: XLA options for every compiled function; None means CPU_COMPILER_OPTIONS on a CPU.
    packed_weights: multiply by the weights in llama_jax.packed_matmul's CPU kernel, which reads them faster
    than XLA:CPU's dot (small-100m's decode steps at batch 8: 1.5x as fast on our 2-core machine). None
    (default) packs them where that applies: a CPU, an fp32 model, the kernel built; True insists
    (GenerationError where it cannot); False keeps XLA's dot. Packing makes a copy of the weights, once, here.
    """

    def __init__(self, params: Any, config: LlamaConfig, *, stop_ids: Sequence[int] = (), pad_id: int = 0,
                 scan_layers: bool = False, min_prompt_bucket: int = 16,
                 compiler_options: dict[str, Any] | None = None, packed_weights: bool | None = None):
        if config.packed_weights:
            raise GenerationError("config.packed_weights is already True: pass the unpacked parameters and their "
                                  "config (the Generator packs them itself)")
        if packed_weights is not False:
            reason = _why_not_packed(config)
            if packed_weights and reason:
                raise GenerationError(f"packed_weights=True, but {reason}")
            packed_weights = not reason
        self.config = config.replace(remat_policy="none", scan_layers=scan_layers, packed_weights=packed_weights)
        if not scan_layers and "layers" in params:
            params = unstack_layers(params, config.n_layers)
        self.params = _pack_weights(params, self.config) if packed_weights else params
        stop_ids = sorted(set(int(i) for i in stop_ids))
        if len(stop_ids) > MAX_STOP_IDS:
            raise GenerationError(f"at most {MAX_STOP_IDS} stop ids are supported, got {len(stop_ids)}")
        self.stop_ids = frozenset(stop_ids)
        self._stop_array = jnp.asarray(stop_ids + [-1] * (MAX_STOP_IDS - len(stop_ids)), jnp.int32)
        self.pad_id = int(pad_id)
        self.min_prompt_bucket = min_prompt_bucket
        # (function, batch bucket, prompt bucket or cache shape, new-token bucket, sampler) -> executable.
        self.executables: dict[tuple, Any] = {}
        self.compile_seconds = 0.0  # total spent compiling, for reporting it apart from generation time
        if compiler_options is None:
            compiler_options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else {}
        self.compiler_options = dict(compiler_options)

    # -- inputs

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
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

    def _pack(self, prompts: Sequence[Sequence[int]]):
        batch = next_power_of_two(len(prompts))
        length = next_power_of_two(max(len(p) for p in prompts), self.min_prompt_bucket)
        tokens = np.full((batch, length), self.pad_id, np.int32)
        positions = np.full((batch, length), -1, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, length - len(p):] = p
            positions[i, length - len(p):] = np.arange(len(p))
        active = np.arange(batch) < len(prompts)
        return tokens, positions, active

    def _start(self, prompts, max_new_tokens, sampling: SamplingParams, seed: int):
        max_new = self._check(prompts, max_new_tokens)
        tokens, positions, active = self._pack(prompts)
        new_bucket = next_power_of_two(max_new, 8)
        dyn = self._dynamic(sampling)
        args = (self.params, tokens, positions, active, jax.random.key(seed), *dyn)
        static = dict(config=self.config, sampling=sampling.static_key(), cache_len=tokens.shape[1] + new_bucket,
                      new_bucket=new_bucket)
        run = self._compiled(("prefill", tokens.shape, new_bucket, static["sampling"]), prefill, args, static)
        return run(*args), max_new, dyn

    def _dynamic(self, sampling: SamplingParams):
        return (jnp.float32(sampling.temperature), jnp.float32(sampling.top_p), self._stop_array,
                jnp.int32(self.pad_id))

    def _decode(self, state, until: int, dyn, sampling: SamplingParams) -> DecodeState:
        args = (self.params, state, jnp.int32(until), *dyn)
        static = dict(config=self.config, sampling=sampling.static_key())
        key = ("decode", state.tokens.shape, state.cache.positions.shape, static["sampling"])
        run = self._compiled(key, decode, args, static)
        return run(*args)

    def _compiled(self, key, fn, args, static):
        """The executable for `key`, compiled ahead of time on first use (so compile time is measured apart)."""
        if key not in self.executables:
            t0 = time.perf_counter()
            lowered = fn.lower(*args, **static)
            try:
                self.executables[key] = lowered.compile(compiler_options=self.compiler_options)
            except jax.errors.JaxRuntimeError as e:
                if "No such compile option" not in str(e):
                    raise
                self.compiler_options = {}
                self.executables[key] = lowered.compile()
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
        state, max_new, dyn = self._start(prompts, max_new_tokens, sampling, seed)
        jax.block_until_ready(state.tokens)
        t1 = time.perf_counter()
        compile_prefill = self.compile_seconds - compiled0
        if max_new > 1:
            state = self._decode(state, max_new, dyn, sampling)
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
        state, max_new, dyn = self._start(prompts, max_new_tokens, sampling, seed)
        n = len(prompts)
        emitted = [0] * n
        stopped = [False] * n
        step = 0
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
            state = self._decode(state, min(step + chunk_size, max_new), dyn, sampling)


def generate(params: Any, config: LlamaConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
             sampling: SamplingParams = GREEDY, seed: int = 0, stop_ids: Sequence[int] = (), pad_id: int = 0,
             **generator_kw: Any) -> Generation:
    """One-shot convenience over `Generator(...).generate(...)`."""
    return Generator(params, config, stop_ids=stop_ids, pad_id=pad_id, **generator_kw).generate(
        prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)


class IncrementalDecoder:
    """Turns a growing id sequence into text deltas for streaming.

    Decodes the whole sequence each time (SentencePiece drops a word's leading space when pieces are decoded
    one by one) and holds back a trailing U+FFFD, which means a multi-byte character is still incomplete.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        return delta


# --- prompts -------------------------------------------------------------------------------------------------

def encode_chat(tokenizer, dialog: Sequence[dict]) -> list[int]:
    """Prompt ids of a dialog in the tokenizer's chat format: Llama 3 for tiktoken, Llama 2 otherwise."""
    from llama_jax.tokenizer import TiktokenTokenizer, encode_llama2_dialog, encode_llama3_dialog

    if isinstance(tokenizer, TiktokenTokenizer):
        return encode_llama3_dialog(tokenizer, dialog)
    return encode_llama2_dialog(tokenizer, dialog)


def fit_dialog(tokenizer, dialog: list[dict], max_len: int) -> tuple[list[dict], list[int]]:
    """Drops the oldest user/assistant exchanges (never the system message nor the last user turn) until the
    encoded dialog is shorter than max_len; returns the kept dialog and its ids (possibly still too long)."""
    dialog = list(dialog)
    ids = encode_chat(tokenizer, dialog)
    head = 1 if dialog and dialog[0]["role"] == "system" else 0
    while len(ids) >= max_len and len(dialog) - head > 1:
        del dialog[head:head + 2]
        ids = encode_chat(tokenizer, dialog)
    return dialog, ids
