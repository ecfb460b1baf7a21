"""Continuous batching: a fixed number of decode slots, each holding one request at its own length.

    engine = BatchingEngine(generator, tokenizer=tok, max_slots=8)
    engine.start()                                # the scheduling loop, on its own thread
    engine.submit(Request(prompt_ids, RequestParams(max_tokens=64), on_update, tok, tok.stop_ids))

Each step of the loop: requests waiting in the (bounded) queue take free slots; prompts are written into their
slots in chunks, up to `prefill_budget` prompt tokens per step, so that a long prompt does not stall the slots
that are decoding; then one decode step gives every decoding slot its next token. A slot is freed as soon as
its request stops (stop id, stop string, max_tokens, the context) or its caller cancels it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any

import jax
import numpy as np

from llama_jax import sharding as sh
from llama_jax.inference import slots as dev
from llama_jax.inference.generator import Generator, compile_ahead, local_device, next_power_of_two
from llama_jax.inference.requests import Request, RequestError, TokenLogprob

log = logging.getLogger(__name__)

MIN_CHUNK = 16  # the smallest step between prefill buckets: shorter prompts are padded to it
# Decode steps per call while no prompt is waiting: a round trip to the host every few tokens, not every token.
MULTI_STEPS = 4


class QueueFull(RuntimeError):
    """Every slot is busy and the queue holds `max_queue` requests; try again later."""


class EngineError(RuntimeError):
    """The engine cannot run as configured (e.g. the KV cache does not fit the device); one line."""


def check_memory(need: int, slots: int, length: int, device) -> None:
    """Raises EngineError when a device's `need` bytes of the cache for `slots` x `length` do not fit in what it has
    left (no check where the device does not report its memory, as on a CPU)."""
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if need > free:
        raise EngineError(f"the KV cache for {slots} slots x {length} tokens needs {need / 2**30:.1f} GiB per "
                          f"device but the device has {free / 2**30:.1f} GiB free: lower --max-slots or --max-seq-len")


class BatchingEngine:
    """Serves Requests with the weights, config and kernels of a `Generator` (its decoding layout and mesh)."""

    def __init__(self, generator: Generator, *, max_slots: int = 8, max_queue: int = 64, prefill_budget: int = 256,
                 pad_id: int | None = None):
        if max_slots < 1 or max_queue < 0:
            raise EngineError(f"need max_slots >= 1 and max_queue >= 0, got {max_slots} and {max_queue}")
        if prefill_budget < MIN_CHUNK:  # a long prompt's chunks are whole steps of at least MIN_CHUNK tokens
            raise EngineError(f"the prefill budget (--prefill-budget) must be >= {MIN_CHUNK} tokens, got "
                              f"{prefill_budget}")
        self.gen, self.config = generator, generator.config
        self.max_slots, self.max_queue = max_slots, max_queue
        self.max_chunk = next_power_of_two(prefill_budget)
        self.prefill_budget = prefill_budget
        # Chunk buckets in steps of 1/8 of the largest: a prompt's last chunk wastes less than a step on padding
        # (powers of two wasted a quarter of the prefill work on a spread of prompt lengths); earlier chunks are
        # whole steps and need none.
        self.chunk_step = max(MIN_CHUNK, self.max_chunk // 8)
        self.buckets = list(range(self.chunk_step, self.max_chunk + 1, self.chunk_step))
        self.pad_id = generator.pad_id if pad_id is None else pad_id
        # Room for the last chunk's padding beyond the context: a slot's padding takes cache slots too.
        self.cache_len = self.config.max_seq_len + self.chunk_step
        check_memory(generator.cache_bytes_per_device(max_slots, self.cache_len), max_slots, self.cache_len,
                     local_device(generator.mesh))
        self.cache = self._empty_cache()
        self.executables: dict[tuple, Any] = {}
        self.slots: list[Request | None] = [None] * max_slots
        self.index = np.zeros(max_slots, np.int32)  # each slot's next free cache slot
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.counters = collections.Counter()

    # -- the public side (any thread)

    def submit(self, request: Request) -> None:
        """Queues a request; raises RequestError for one that cannot be served, QueueFull when the queue is."""
        limit = self.config.max_seq_len
        if not request.prompt:
            raise RequestError("the prompt is empty")
        if len(request.prompt) >= limit:
            raise RequestError(f"the prompt has {len(request.prompt)} tokens; the context is {limit} tokens and "
                               "leaves no room to generate")
        bad = [t for t in request.prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"the prompt has ids outside [0, {self.config.vocab_size}): {bad[:3]}")
        with self.lock:
            if self.stopping.is_set():
                raise QueueFull("the server is shutting down")
            free = sum(s is None for s in self.slots)
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"{self.max_slots} slots busy and {len(self.waiting)} requests queued")
            self.waiting.append(request)
        self.wake.set()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return dict(slots=self.max_slots, busy=sum(s is not None for s in self.slots), queued=len(self.waiting),
                        compiled=len(self.executables), devices=1 if self.gen.mesh is None else self.gen.mesh.size,
                        **self.counters)

    def start(self) -> "BatchingEngine":
        self.thread = threading.Thread(target=self._loop, name="batching-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Ends the loop; requests still queued or running get an error update."""
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join()
        for r in [*self.waiting, *(s for s in self.slots if s is not None)]:
            r.fail("the server shut down before the request finished")
        self.waiting.clear()
        self.slots = [None] * self.max_slots

    def warmup(self) -> None:
        """Compiles the decode steps and every prefill bucket now, so that no request waits for a compiler."""
        for size in self.buckets:
            self._prefill_fn(size, False)
        for steps in sorted({1, MULTI_STEPS}):
            self._decode_fn(steps)

    # -- the loop (engine thread)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            if not self.step():
                self.wake.wait(0.05)
                self.wake.clear()

    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do."""
        self._admit()
        if not any(self.slots):
            return False
        try:
            self._prefill()
            self._decode()
        except Exception as e:  # a failed step fails its requests, not the server
            log.exception("batching step failed")
            for i, r in enumerate(self.slots):
                if r is not None:
                    r.fail(f"generation failed: {type(e).__name__}: {e}")
                    self.slots[i] = None
            self.cache = self._empty_cache()
        self.counters["steps"] += 1
        return True

    def _admit(self) -> None:
        with self.lock:
            for i, r in enumerate(self.slots):
                if r is not None and (r.finished or r.cancelled.is_set()):
                    self.slots[i] = None
                    self.counters["cancelled" if not r.finished else "finished"] += 1
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled.is_set())
            for i in range(self.max_slots):
                if self.slots[i] is None and self.waiting:
                    self.slots[i], self.index[i] = self.waiting.popleft(), 0

    def _decoding(self, i: int) -> bool:
        r = self.slots[i]
        return r is not None and not r.finished and r.filled == len(r.prompt)

    def _prefill(self) -> None:
        budget = self.prefill_budget
        for i, r in sorted(((i, r) for i, r in enumerate(self.slots) if r is not None and r.filled < len(r.prompt)),
                           key=lambda item: item[1].submitted_at):
            if budget <= 0:
                break
            left = len(r.prompt) - r.filled
            n = min(left, budget, self.max_chunk)
            if n < left:  # not the prompt's last chunk: whole steps only, so that only the last one is padded
                n -= n % self.chunk_step
                if not n:
                    break
            budget -= n
            if r.filled == 0 and any(self._decoding(j) and self.slots[j].generated for j in range(self.max_slots)):
                self.counters["admitted_while_decoding"] += 1
            self._prefill_one(i, r, n)

    def _prefill_one(self, i: int, r: Request, n: int) -> None:
        size = -(-n // self.chunk_step) * self.chunk_step
        pad = size - n
        start, stop = r.filled, r.filled + n
        tokens = np.full(size, self.pad_id, np.int32)
        positions = np.full(size, -1, np.int32)
        targets = np.zeros(size, np.int32)
        tokens[pad:] = r.prompt[start:stop]
        positions[pad:] = np.arange(start, stop)
        targets[pad:] = (r.prompt + [0])[start + 1:stop + 1]
        fn = self._prefill_fn(size, r.params.prompt_logprobs)
        self.cache, sampled, prompt = fn(self.gen.params, self.cache, np.int32(i), tokens, positions, targets,
                                         np.int32(self.index[i]), np.bool_(start == 0), self._sampling([r]))
        self.index[i] += size
        self.counters["prefill_tokens"] += size  # computed, padding included
        r.filled = stop
        if prompt is not None:
            logprobs, top, top_ids = jax.device_get(prompt)
            first = [None] if start == 0 else []
            last = n - 1 if stop == len(r.prompt) else n  # the final position predicts a generated token
            r.add_prompt_logprobs(first + [self._logprob(r, int(targets[pad + j]), logprobs[pad + j], top[pad + j],
                                                         top_ids[pad + j]) for j in range(last)])
        if stop == len(r.prompt):
            self._accept([(i, 0)], sampled)

    def _decode(self) -> None:
        rows = [i for i in range(self.max_slots) if self._decoding(i)]
        if not rows:
            return
        tokens = np.full(self.max_slots, self.pad_id, np.int32)
        positions = np.full(self.max_slots, -1, np.int32)
        for i in rows:
            r = self.slots[i]
            tokens[i], positions[i] = r.generated[-1], len(r.prompt) + len(r.generated) - 1
        requests = [self.slots[i] if i in rows else None for i in range(self.max_slots)]
        steps = MULTI_STEPS if self._can_run_ahead(rows) else 1
        # A copy: the CPU client may read a NumPy argument in place after this call returns, and the index changes.
        self.cache, sampled = self._decode_fn(steps)(self.gen.params, self.cache, tokens, positions,
                                                     self.index.copy(), self._sampling(requests))
        self.index[rows] += steps
        self.counters["decode_steps"] += steps
        self.counters["decode_rows"] += steps * len(rows)  # busy rows: decode_rows / decode_steps of max_slots
        sampled = jax.device_get(sampled)
        for t in range(steps):
            self._accept([(i, i) for i in rows if self.slots[i] is not None], dev.Sampled(*(a[t] for a in sampled)),
                         flush=t == steps - 1)

    def _can_run_ahead(self, rows: list[int]) -> bool:
        """Several steps in one call when no prompt waits for a slot or a prefill, and no row ends before."""
        if len(rows) != sum(r is not None for r in self.slots) or (self.waiting and len(rows) < self.max_slots):
            return False
        return all(self._limit(self.slots[i]) - len(self.slots[i].generated) >= MULTI_STEPS for i in rows)

    def _limit(self, r: Request) -> int:
        return min(r.params.max_tokens, self.config.max_seq_len - len(r.prompt))

    def _accept(self, rows: list[tuple[int, int]], sampled: dev.Sampled, flush: bool = True) -> None:
        """Hands each (slot, row of `sampled`) its token; sends the updates when `flush` (or the request ended)."""
        ids, logprobs, top, top_ids = jax.device_get(sampled)
        for i, j in rows:
            r = self.slots[i]
            r.add_token(self._logprob(r, int(ids[j]), logprobs[j], top[j], top_ids[j]), self._limit(r))
            if flush or r.finished:
                r.flush()
            if r.finished:
                self.slots[i] = None
                self.counters["finished"] += 1

    @staticmethod
    def _logprob(r: Request, token: int, logprob, top, top_ids) -> TokenLogprob:
        k = r.params.logprobs or 0
        return TokenLogprob(token, float(logprob), tuple((int(t), float(p)) for t, p in zip(top_ids[:k], top[:k])))

    def _sampling(self, requests: list[Request | None]) -> dev.SlotSampling:
        """Per-row settings; a free row is greedy (its draw is thrown away)."""
        def column(get, dtype):
            return np.asarray([get(r) if r is not None else 0 for r in requests], dtype)
        return dev.SlotSampling(
            temperature=column(lambda r: r.params.temperature, np.float32),
            top_k=column(lambda r: r.params.top_k, np.int32), top_p=column(lambda r: r.params.top_p, np.float32),
            seeds=column(lambda r: r.seed, np.uint32), counts=column(lambda r: len(r.generated), np.int32),
            want_top=np.bool_(any(r is not None and r.params.logprobs for r in requests)))

    # -- compiled functions

    def _empty_cache(self):
        with self._mesh():
            return dev.empty_cache(self.config, self.max_slots, self.cache_len, self.gen.kv_dtype)

    def _mesh(self):
        return sh.activate(self.gen.mesh) if self.gen.mesh is not None else contextlib.nullcontext()

    def _prefill_fn(self, size: int, all_logits: bool):
        args = (self.gen.params, self.cache, np.int32(0), *(np.zeros(size, np.int32),) * 3, np.int32(0),
                np.bool_(True), self._sampling([None]))
        return self._compiled(("prefill", size, all_logits), dev.prefill_chunk, args, dict(all_logits=all_logits))

    def _decode_fn(self, steps: int):
        zeros = np.zeros(self.max_slots, np.int32)
        args = (self.gen.params, self.cache, zeros, zeros, zeros, self._sampling([None] * self.max_slots))
        return self._compiled(("decode", steps), dev.decode_steps, args, dict(steps=steps))

    def _compiled(self, key, fn, args, static):
        """The executable for `key`, compiled on first use with the Generator's compiler options."""
        if key not in self.executables:
            t0 = time.perf_counter()
            self.executables[key], _ = compile_ahead(fn, args, dict(config=self.config, ops=self.gen.ops, **static),
                                                     self.gen.mesh, self.gen.compiler_options)
            self.counters["compile_ms"] += int(1000 * (time.perf_counter() - t0))
        return self.executables[key]
