"""One decode step of the continuous-batching engine on a CPU with the C++ decode-attention kernel (each row reads
its own filled part of the cache) against XLA's decode windows (every row up to the longest), in one process,
alternating, so that the ratio holds while the machine's speed drifts.

    python benchmarks/decode_attention.py                    # small-100m, 8 slots, 1024-token context
    python benchmarks/decode_attention.py --preset tiny-llama2 --rounds 2

Rows: how full the slots are, as tokens per slot. The step is the whole model (weights, sampling, the cache
write), with random weights; only the attention kernel differs between the columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILLS = {
    "mixed 60-800 (mean 350)": [60, 120, 200, 280, 350, 430, 520, 800],
    "one long, seven short": [50] * 7 + [1000],
    "all at 100": [100] * 8,
    "all at 900": [900] * 8,
}


def step_ms(engine, fn, fills, rounds: int) -> float:
    """Mean wall time of one decode step with the slots filled to `fills` (positions 0..n-1 in each row)."""
    import jax
    import jax.numpy as jnp

    index = np.asarray(fills, np.int32)
    slots = np.arange(engine.cache_len)[None]
    engine.cache = engine.cache._replace(
        positions=jnp.asarray(np.where(slots < index[:, None], slots, -1).astype(np.int32)))
    tokens, sampling = np.full(len(fills), 5, np.int32), engine._sampling([None] * len(fills))
    engine.cache, out = fn(engine.gen.params, engine.cache, tokens, index, index.copy(), sampling)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(rounds):
        # The same step again: the cache's positions stay as set (the step writes at `index`, its own slot).
        engine.cache, out = fn(engine.gen.params, engine.cache, tokens, index, index.copy(), sampling)
        jax.block_until_ready(out)
    return (time.perf_counter() - t0) / rounds * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-100m")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; each times 10 steps per side")
    args = p.parse_args(argv)

    import jax

    from llama_jax.config import preset
    from llama_jax.inference.batching import BatchingEngine
    from llama_jax.inference.generator import Generator
    from llama_jax.kernels import decode_attention
    from llama_jax.model import init_params

    if jax.default_backend() != "cpu" or not decode_attention.KERNEL.available():
        sys.exit("the decode-attention kernel is for CPUs and needs a C++ compiler")
    config = preset(args.preset)
    fills = {name: [min(n, config.max_seq_len - 1) for n in row] for name, row in FILLS.items()}
    gen = Generator(init_params(config, jax.random.key(0)), config)
    # Two engines over one Generator's weights, each compiling its decode step with its own attention kernel.
    engines, fns = {}, {}
    for kernel in ("cpu_rows", "windows"):
        engines[kernel] = BatchingEngine(gen, max_slots=8)
        gen.ops = dataclasses.replace(gen.ops, cache_kernel=kernel)
        fns[kernel] = engines[kernel]._decode_fn(1)
    print(f"{args.preset}, 8 slots of {engines['cpu_rows'].cache_len} cache slots, {jax.devices()[0].device_kind}; "
          f"one decode step, ms (median of {args.rounds} alternating rounds of 10 steps)")
    print(f"{'slots filled':<26} {'kernel':>8} {'windows':>8} {'kernel/windows':>15}")
    for name, row in fills.items():
        times = {k: [] for k in engines}
        for _ in range(args.rounds):
            for kernel, engine in engines.items():
                times[kernel].append(step_ms(engine, fns[kernel], row, 10))
        rows, windows = np.median(times["cpu_rows"]), np.median(times["windows"])
        print(f"{name:<26} {rows:>8.1f} {windows:>8.1f} {rows / windows:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
