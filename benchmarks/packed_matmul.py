"""The packed CPU matmul (kernels/packed_matmul.cc) against XLA's dot on the unpacked weight, by rows of x.

    python benchmarks/packed_matmul.py
    python benchmarks/packed_matmul.py --shape 4096 14336 --rows 1 8 512

A decode step multiplies a few rows by each weight (bound by reading the weight), a prefill chunk many rows
(bound by arithmetic). Prints, per row count, the best of --rounds calls of each (jitted, fp32) as ms and
GFLOP/s, and the largest difference between the two products.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs=2, type=int, default=[768, 2048], metavar=("K", "N"),
                   help="the weight's shape (default: small-100m's MLP input)")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 64, 256, 512])
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from llama_jax.kernels import packed_matmul

    packed_matmul.load()
    k, n = args.shape
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    strips = jax.jit(packed_matmul.pack)(w).reshape(n // packed_matmul.STRIP, k, packed_matmul.STRIP)
    packed, xla = jax.jit(packed_matmul.matmul), jax.jit(jnp.dot)

    def best(f, *a) -> float:
        f(*a).block_until_ready()
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            f(*a).block_until_ready()
            times.append(time.perf_counter() - t)
        return min(times)

    print(f"jax {jax.__version__}; weight {k} x {n} fp32; best of {args.rounds}")
    print("| rows | packed (ms) | packed GFLOP/s | XLA dot (ms) | XLA GFLOP/s | packed / XLA time | max diff |")
    print("|---|---|---|---|---|---|---|")
    for m in args.rows:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32)
        a, b = best(packed, x, strips), best(xla, x, w)
        diff = float(jnp.abs(packed(x, strips) - xla(x, w)).max())
        flops = 2 * m * k * n / 1e9
        print(f"| {m} | {a * 1e3:.3f} | {flops / a:.0f} | {b * 1e3:.3f} | {flops / b:.0f} | {a / b:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
