"""Long prompts: the compiled prefill's memory for the llama3.1-8b shape, and CPU prefill time for a small model.

Table 1 compiles `engine.prefill` for the llama3.1-8b shape (all 32 layers, unrolled as the Generator runs them,
or under nn.scan with --scan-layers; fp32 weights as abstract shapes, nothing allocated) at 8k, 32k and 128k
prompt tokens, batch 1, and prints XLA's `memory_analysis()`. Working memory = arguments + outputs + temporaries
− aliased − weights − KV cache: what prefill needs beyond the weights and the cache it fills. Targets: ≤ 4 GiB at
every length, and at 128k ≤ 1.05 × the 8k value.

Table 2 times prefill (compiled first, best of --rounds) of a small random model (dim 256, 2 layers, 8 heads)
on this machine's CPU: chunked (--prefill-chunk tokens at a time), the prompt in one piece (blockwise attention
still bounds its scores), and the prompt in one piece through the einsum reference attention (the whole
[heads, prompt, prompt] score matrix) where that fits in --einsum-max tokens. Table 3 times one decode step's
attention over a long cache, the CPU decode windows against the blockwise loop, which is how
CPU_WINDOWS_MAX_KEYS was chosen.

    python benchmarks/long_context.py                      # all three tables (a few minutes on a CPU)
    python benchmarks/long_context.py --skip-memory --lengths 1024 4096

The CLI on a 32k-token prompt, with its peak RSS (a model folder of the small shape, max_seq_len 65536, the
Llama 3 tokenizer, built with llama_jax.checkpoint.save_model):

    /usr/bin/time -v python generate.py --checkpoint /tmp/long-model --prompts-file /tmp/prompt-32k.txt \\
        --max-new-tokens 8 --temperature 0
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2 ** 30
SMALL = dict(dim=256, n_layers=2, n_heads=8, vocab_size=128256, multiple_of=256, rope_theta=500000.0,
             max_seq_len=65536)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-lengths", nargs="+", type=int, default=[8192, 32768, 131072])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--einsum-max", type=int, default=4096, help="longest prompt for the einsum reference column")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scan-layers", action="store_true", help="table 1 with the layers under nn.scan")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    return p.parse_args(argv)


def _prefill_args(config, batch: int, prompt: int, abstract: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_jax.inference.engine import MAX_STOP_IDS, SamplingInputs

    inputs = SamplingInputs(jnp.float32(0), jnp.float32(1), jnp.full((MAX_STOP_IDS,), -1, jnp.int32), jnp.int32(0))
    if abstract:
        ids = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
        return ids, ids, jax.ShapeDtypeStruct((batch,), jnp.bool_), jax.random.key(0), inputs
    tokens = np.random.default_rng(0).integers(1, config.vocab_size, (batch, prompt)).astype(np.int32)
    positions = np.broadcast_to(np.arange(prompt, dtype=np.int32), (batch, prompt))
    return tokens, positions, np.ones(batch, bool), jax.random.key(0), inputs


def _static(config, ops, prompt: int, chunk: int, new: int = 8):
    import jax.numpy as jnp

    from llama_jax.sampling import GREEDY

    return dict(config=config, ops=ops, switches=GREEDY.switches, cache_len=min(prompt + new, config.max_seq_len),
                new_bucket=new, chunk=chunk, kv_dtype=jnp.dtype(config.compute_dtype).name)


def memory_table(lengths: list[int], chunk: int, scan_layers: bool) -> list[float]:
    import jax
    import numpy as np

    from llama_jax.config import preset
    from llama_jax.inference import engine
    from llama_jax.kernels import select_ops
    from llama_jax.model import init_params, unstack_layers

    config = preset("llama3.1-8b", dtype="float32", param_dtype="float32", scan_layers=scan_layers)
    params = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    if not scan_layers:
        params = jax.eval_shape(functools.partial(unstack_layers, n_layers=config.n_layers), params)
    weights = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))
    ops = select_ops(config)
    print(f"Prefill memory, llama3.1-8b shape ({config.n_layers} layers, scan_layers={scan_layers}), fp32 weights "
          f"{weights / GIB:.1f} GiB, batch 1, prefill chunk {chunk}, attention block {ops.attention_block}, "
          f"backend {jax.default_backend()}")
    print(f"{'prompt':>8} {'cache':>8} {'arguments':>10} {'outputs':>10} {'temps':>10} {'aliased':>10} "
          f"{'KV cache':>10} {'working':>10} {'compile':>8}   (GiB, s)")
    working = []
    for prompt in lengths:
        static = _static(config, ops, prompt, chunk)
        cache = (2 * config.n_layers * config.kv_heads * static["cache_len"] * config.head_dim * 4
                 + static["cache_len"] * 4)
        t0 = time.perf_counter()
        compiled = engine.prefill.lower(params, *_prefill_args(config, 1, prompt, abstract=True), **static).compile()
        seconds = time.perf_counter() - t0
        m = compiled.memory_analysis()
        work = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
                - weights - cache)
        working.append(work / GIB)
        print(f"{prompt:>8} {static['cache_len']:>8} {m.argument_size_in_bytes / GIB:>10.3f} "
              f"{m.output_size_in_bytes / GIB:>10.3f} {m.temp_size_in_bytes / GIB:>10.3f} "
              f"{m.alias_size_in_bytes / GIB:>10.3f} {cache / GIB:>10.3f} {work / GIB:>10.3f} {seconds:>8.1f}")
    flat = working[-1] / working[0]
    print(f"targets: working <= 4 GiB at every length: {'met' if max(working) <= 4 else 'MISSED'} "
          f"(max {max(working):.3f}); {lengths[-1]} <= 1.05 x {lengths[0]}: "
          f"{'met' if flat <= 1.05 else 'MISSED'} ({flat:.3f}x)")
    # For comparison: the whole prompt in one piece through the einsum path (2 layers, to keep the compile short).
    shallow = config.replace(n_layers=2, scan_layers=True)
    params = jax.eval_shape(functools.partial(init_params, shallow), jax.random.key(0))
    einsum = dataclasses.replace(ops, attention_block=1 << 30)
    for prompt in lengths[:2]:
        m = engine.prefill.lower(params, *_prefill_args(shallow, 1, prompt, abstract=True),
                                 **_static(shallow, einsum, prompt, prompt)).compile().memory_analysis()
        print(f"one piece through the einsum path, 2 layers, {prompt} tokens: temporaries "
              f"{m.temp_size_in_bytes / GIB:.1f} GiB")
    return working


def time_table(lengths: list[int], chunk: int, einsum_max: int, rounds: int) -> None:
    import jax
    import numpy as np

    from llama_jax.config import LlamaConfig
    from llama_jax.inference import engine
    from llama_jax.kernels import select_ops
    from llama_jax.model import init_params

    config = LlamaConfig(**SMALL, scan_layers=False)
    params = init_params(config, jax.random.key(0))
    blockwise = select_ops(config)
    einsum = dataclasses.replace(blockwise, attention_block=1 << 30)  # never blockwise: the whole score matrix
    print(f"\nPrefill wall time on this CPU, dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads, "
          f"fp32, batch 1, best of {rounds} (compilation excluded)")
    print(f"{'prompt':>8} {f'chunked {chunk}':>12} {'one piece':>12} {'one, einsum':>12}   (s)")

    def run(ops, prompt, piece):
        args = _prefill_args(config, 1, prompt, abstract=False)
        exe = engine.prefill.lower(params, *args, **_static(config, ops, prompt, piece)).compile()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(exe(params, *args).tokens)
            best = min(best, time.perf_counter() - t0)
        return best

    for prompt in lengths:
        row = [run(blockwise, prompt, chunk), run(blockwise, prompt, prompt)]
        row.append(run(einsum, prompt, prompt) if prompt <= einsum_max else np.nan)
        print(f"{prompt:>8} " + " ".join("           —" if np.isnan(t) else f"{t:>12.2f}" for t in row))


def decode_table(lengths: list[int], rounds: int) -> None:
    import jax
    import jax.numpy as jnp

    from llama_jax.kernels import attention as attn

    heads, dim, block = SMALL["n_heads"], SMALL["dim"] // SMALL["n_heads"], 512
    print(f"\nOne decode step's attention on this CPU, {heads} heads of {dim}, batch 1: the decode windows against "
          f"the blockwise loop ({block}-slot blocks), by cache length and how full it is")
    print(f"{'cache':>8} {'full':>6} {'windows':>10} {'blockwise':>10}   (ms)")
    windows = jax.jit(lambda q, k, v, qp, kp, n: attn.cpu_decode_windows(q, k, v, attn.position_mask(qp, kp), n))
    blockwise = jax.jit(lambda q, k, v, qp, kp, n: attn.blockwise_attention(q, k, v, qp, kp, n, True, block))
    for length in lengths:
        for full in (0.25, 0.9):
            filled = int(length * full)
            q, k = jnp.ones((1, 1, heads, dim)), jnp.ones((1, heads, length, dim))
            kp = jnp.where(jnp.arange(length) < filled, jnp.arange(length), -1)[None]
            args = (q, k, k, jnp.full((1, 1), filled - 1, jnp.int32), kp, jnp.int32(filled))
            row = []
            for fn in (windows, blockwise):
                jax.block_until_ready(fn(*args))
                t0 = time.perf_counter()
                for _ in range(20 * rounds):
                    jax.block_until_ready(fn(*args))
                row.append((time.perf_counter() - t0) / (20 * rounds) * 1e3)
            print(f"{length:>8} {full:>6.0%} {row[0]:>10.3f} {row[1]:>10.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    print(f"jax {jax.__version__}, {jax.default_backend()}")
    if not args.skip_memory:
        memory_table(args.memory_lengths, args.prefill_chunk, args.scan_layers)
    if not args.skip_time:
        time_table(args.lengths, args.prefill_chunk, args.einsum_max, args.rounds)
        decode_table([1024, 2048, 4096, 16384, 65536], args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
