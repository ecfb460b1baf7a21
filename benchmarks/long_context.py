"""Long prompts: the compiled prefill's memory for the llama3.1-8b shape, and CPU prefill time against Hugging Face.

Table 1 compiles `engine.prefill` for the llama3.1-8b shape (all 32 layers, unrolled as the Generator runs them,
or under nn.scan with --scan-layers; fp32 weights as abstract shapes, nothing allocated) at 8k, 32k and 128k
prompt tokens, batch 1, and prints XLA's `memory_analysis()`. Working memory = arguments + outputs + temporaries
− aliased − weights − KV cache: what prefill needs beyond the weights and the cache it fills. Targets: ≤ 4 GiB at
every length, and at 128k ≤ 1.05 × the 8k value.

Table 2 times prefill (compiled first, best of --rounds) of a small random model (dim 256, 2 layers, 8 heads)
on this machine's CPU: chunked (--prefill-chunk tokens at a time), the prompt in one piece (blockwise attention
still bounds its scores), and the prompt in one piece through the einsum reference attention (the whole
[heads, prompt, prompt] score matrix) where that fits in --einsum-max tokens, and the Generator's time to first
token (what generate.py runs: the packed CPU weights, chunks of --prefill-chunk), next to Hugging Face's (fp32, SDPA
attention, one forward of the prompt with its cache). --time-shape wide uses heads of 128, as
the released Llamas do (dim 2048, 16 heads, 8 KV heads, 2 layers). Table 3 times one decode step's
attention over a long cache, the CPU decode windows against the blockwise loop and the dot over the whole cache,
which is how CPU_WINDOWS_MAX_KEYS was chosen.

    python benchmarks/long_context.py                      # all three tables (a few minutes on a CPU)
    python benchmarks/long_context.py --skip-memory --lengths 1024 4096
    python benchmarks/long_context.py --skip-memory --skip-time       # table 3 alone
    python benchmarks/long_context.py --skip-memory --time-shape wide --lengths 1024 4096 --einsum-max 0

The CLI on a 32k-token prompt, with its peak RSS (a model folder of the small shape, max_seq_len 65536, the
Llama 3 tokenizer, built with llama_jax.checkpoint.save_model):

    /usr/bin/time -v python generate.py --checkpoint /tmp/long-model --prompts-file /tmp/prompt-32k.txt \\
        --max-new-tokens 8 --temperature 0

On a GPU, --gpu times long prompts for the --gpu-preset shape (llama3.1-8b by default; bf16 random weights,
batch 1) at --gpu-lengths tokens (8k, 32k, 128k): time to first token through the Generator (generate() with one
new token, the bucket compiled by a first call, best of --rounds), with the prompt chunks' attention through the
portable blockwise loop and through the fused Pallas kernel (kernels/chunk_attention.py; --no-fused skips it),
next to Hugging Face on the same GPU (SDPA attention, one forward of the prompt with its cache and the argmax of
the last logits; run first, in a child process, so that each side has the GPU's memory to itself). It prints one
markdown table (length; TTFT and prefill tokens/s for each kernel and for HF; speed ratios; "oom" where a side
runs out of memory), then batch-1 decode over a full cache (a prompt of the longest length less
--decode-new-tokens) against its bound, HBM bandwidth (--hbm-tbps, H200 4.8 TB/s) over the bytes one step reads
(the weights and the KV cache), then one decode step's attention as in table 3 (the shape's heads, bf16, at
--gpu-lengths), and the versions. Elsewhere it runs the same on the CPU with a warning (a dry run with small
settings, as below; the fused kernel through Pallas's interpreter).

    python benchmarks/long_context.py --gpu
    python benchmarks/long_context.py --gpu --gpu-preset tiny-llama3 --gpu-lengths 256 512 --decode-new-tokens 8 \\
        --rounds 1
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
sys.path.insert(0, str(ROOT / "tests"))  # hf_reference: the HF config of our shapes, as the tests build it

GIB = 2 ** 30
SMALL = dict(dim=256, n_layers=2, n_heads=8, vocab_size=128256, multiple_of=256, rope_theta=500000.0,
             max_seq_len=65536)
# Table 2's shapes. Heads of 32 make attention most of the work; "wide" has heads of 128, as every released Llama.
TIME_SHAPES = {"small": SMALL,
               "wide": dict(SMALL, dim=2048, n_heads=16, n_kv_heads=8, vocab_size=32000, max_seq_len=32768)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-lengths", nargs="+", type=int, default=[8192, 32768, 131072])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill step (also --gpu)")
    p.add_argument("--einsum-max", type=int, default=4096, help="longest prompt for the einsum reference column")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scores-budget", type=int, default=None,
                   help="table 2's Ops.scores_budget in bytes (default: select_ops's; 0: blocks of 512 queries)")
    p.add_argument("--time-shape", choices=sorted(TIME_SHAPES), default="small",
                   help="table 2's model: small (dim 256, heads of 32) or wide (dim 2048, heads of 128)")
    p.add_argument("--scan-layers", action="store_true", help="table 1 with the layers under nn.scan")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true", help="skip table 2 (prefill time)")
    p.add_argument("--skip-decode", action="store_true", help="skip table 3 (a decode step's attention)")
    p.add_argument("--gpu", action="store_true", help="GPU mode: time to first token against HF, decode over a full "
                   "cache (see above); replaces the CPU tables")
    p.add_argument("--gpu-preset", default="llama3.1-8b", help="with --gpu: the shape to use")
    p.add_argument("--gpu-lengths", nargs="+", type=int, default=[8192, 32768, 131072],
                   help="with --gpu: prompt lengths")
    p.add_argument("--decode-new-tokens", type=int, default=64,
                   help="with --gpu: new tokens of the decode run, whose prompt is the longest length less these")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="with --gpu: memory bandwidth in TB/s (H200)")
    p.add_argument("--no-peer", action="store_true", help="with --gpu: skip the HF peer")
    p.add_argument("--no-fused", action="store_true", help="with --gpu: skip the fused Pallas prefill kernel")
    p.add_argument("--gpu-peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpu-peer", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gpu or args.gpu_peer:
        if args.decode_new_tokens < 2:
            p.error("--decode-new-tokens must be >= 2 (the decode rate counts the tokens after the first)")
        if min(args.gpu_lengths) < 1 or max(args.gpu_lengths) <= args.decode_new_tokens:
            p.error("--gpu-lengths must be positive, and the longest must exceed --decode-new-tokens")
    return args


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


def torch_cpu_peer(args) -> None:
    """--cpu-peer (a child process of table 2): Hugging Face's time to first token on this CPU for each of --lengths,
    fp32, SDPA attention: one forward of the prompt with its cache and the last position's logits, best of
    --rounds; prints "PEER <length> <seconds>" and a "NOTE" with the versions for the parent."""
    import numpy as np
    import torch
    import transformers

    from llama_jax.config import LlamaConfig
    from hf_reference import hf_config

    config = LlamaConfig(**TIME_SHAPES[args.time_shape])
    hf = hf_config(config)
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf).eval()
    print(f"NOTE torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}", flush=True)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for length in args.lengths:
            ids = torch.as_tensor(rng.integers(3, config.vocab_size, (1, length)))
            best = float("inf")
            for _ in range(args.rounds + 1):  # the first call warms torch's allocator and thread pool
                t0 = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
                best = min(best, time.perf_counter() - t0)
            print(f"PEER {length} {best}", flush=True)


def run_peer(flag: str, args, *options: str) -> tuple[dict[int, float | None], list[str], str | None]:
    """A peer side (`flag`: --cpu-peer or --gpu-peer) in a child process of this script: seconds per length (None:
    out of memory), its notes, and its last error line where it failed."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, flag, "--rounds", str(args.rounds), *options],
                          capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    seconds = {int(line.split()[1]): None if line.split()[2] == "oom" else float(line.split()[2])
               for line in lines if line.startswith("PEER ")}
    error = (proc.stderr.strip().splitlines() or ["no output"])[-1] if proc.returncode else None
    return seconds, [line[5:] for line in lines if line.startswith("NOTE ")], error


def run_cpu_peer(args) -> tuple[dict[int, float], str]:
    """The peer run before our side: torch's idle threads keep spinning for a while after its work and would slow
    XLA's running beside them in one process."""
    seconds, notes, error = run_peer("--cpu-peer", args, "--time-shape", args.time_shape,
                                     "--lengths", *map(str, args.lengths))
    if error:
        sys.exit(f"the Hugging Face peer failed: {error}")
    return seconds, "; ".join(notes)


def time_table(args) -> None:
    import jax
    import numpy as np

    from llama_jax.config import LlamaConfig
    from llama_jax.generation import Generator
    from llama_jax.inference import engine
    from llama_jax.kernels import select_ops
    from llama_jax.model import init_params

    chunk, rounds = args.prefill_chunk, args.rounds
    peer, versions = run_cpu_peer(args)
    config = LlamaConfig(**TIME_SHAPES[args.time_shape], scan_layers=False)
    params = init_params(config, jax.random.key(0))
    blockwise = select_ops(config)
    if args.scores_budget is not None:
        blockwise = dataclasses.replace(blockwise, scores_budget=args.scores_budget)
    einsum = dataclasses.replace(blockwise, attention_block=1 << 30)  # never blockwise: the whole score matrix
    generator = Generator(params, config, prefill_chunk=chunk)  # packs the weights once, as generate.py does
    generator.ops = blockwise
    print(f"\nPrefill wall time on this CPU, dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads of "
          f"{config.head_dim} ({config.kv_heads} KV), fp32, batch 1, best of {rounds} (compilation excluded), scores "
          f"budget {blockwise.scores_budget} bytes; HF: "
          f"{versions}, SDPA, one forward")
    print(f"{'prompt':>8} {f'chunked {chunk}':>12} {'one piece':>12} {'one, einsum':>12} {'generate()':>11} "
          f"{'HF':>8} {'generate() vs HF':>17}   (s)")

    def best_of(call):
        call()  # the first run also pays for thread pools and page faults
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
        return best

    def run(ops, prompt, piece):
        args = _prefill_args(config, 1, prompt, abstract=False)
        exe = engine.prefill.lower(params, *args, **_static(config, ops, prompt, piece)).compile()
        return best_of(lambda: jax.block_until_ready(exe(params, *args).tokens))

    def first_token(prompt):
        """What generate.py's user waits for: the Generator's time to first token, its compilation excluded."""
        ids = _prefill_args(config, 1, prompt, abstract=False)[0].tolist()
        generator.generate(ids, max_new_tokens=1)  # compiles this bucket
        return min(generator.generate(ids, max_new_tokens=1).prefill_seconds for _ in range(rounds))

    for prompt in args.lengths:
        row = [run(blockwise, prompt, chunk), run(blockwise, prompt, prompt)]
        row.append(run(einsum, prompt, prompt) if prompt <= args.einsum_max else np.nan)
        row += [first_token(prompt), peer[prompt]]
        print(f"{prompt:>8} " + " ".join("           —" if np.isnan(t) else f"{t:>12.2f}" for t in row[:3])
              + f" {row[3]:>11.2f} {row[4]:>8.2f} {row[4] / row[3]:>16.2f}x")


def decode_table(lengths: list[int], rounds: int, *, heads: int, kv_heads: int, dim: int, dtype: str, block: int,
                 where: str) -> None:
    """One decode step's attention, batch 1, over a heads-first cache of each length, 25% and 90% full (ms, mean
    of 20 x rounds calls): the decode windows against the blockwise loop in `block`-slot blocks and the dot over
    the whole cache."""
    import jax
    import jax.numpy as jnp

    from llama_jax.kernels import attention as attn

    print(f"\nOne decode step's attention on {where}, {heads} heads of {dim} ({kv_heads} KV heads), {dtype}, "
          f"batch 1: the decode windows against the blockwise loop ({block}-slot blocks) and the whole cache, by "
          f"cache length and how full it is")
    print(f"{'cache':>8} {'full':>6} {'windows':>10} {'blockwise':>10} {'whole':>10}   (ms)")
    variants = [
        lambda q, k, v, qp, kp, n: attn.decode_windows(q, k, v, attn.position_mask(qp, kp), n),
        lambda q, k, v, qp, kp, n: attn.blockwise_attention(q, k, v, qp, kp, n, True, block),
        lambda q, k, v, qp, kp, n: attn.einsum_attention(q, k, v, attn.position_mask(qp, kp), heads_first=True),
    ]
    variants = [jax.jit(fn) for fn in variants]
    for length in lengths:
        q, k = jnp.ones((1, 1, heads, dim), dtype), jnp.ones((1, kv_heads, length, dim), dtype)
        for full in (0.25, 0.9):
            filled = int(length * full)
            kp = jnp.where(jnp.arange(length) < filled, jnp.arange(length), -1)[None]
            args = (q, k, k, jnp.full((1, 1), filled - 1, jnp.int32), kp, jnp.int32(filled))
            row = []
            for fn in variants:
                jax.block_until_ready(fn(*args))
                t0 = time.perf_counter()
                for _ in range(20 * rounds):
                    jax.block_until_ready(fn(*args))
                row.append((time.perf_counter() - t0) / (20 * rounds) * 1e3)
            print(f"{length:>8} {full:>6.0%} " + " ".join(f"{ms:>10.3f}" for ms in row), flush=True)


def gpu_config(args):
    """The --gpu shape in bf16 with room for the longest prompt and the decode run's new tokens."""
    from benchmarks.generate import gpu_config as shape

    return shape(argparse.Namespace(gpu_preset=args.gpu_preset, prompt_len=max(args.gpu_lengths),
                                    new_tokens=args.decode_new_tokens))


def torch_gpu_peer(args) -> None:
    """--gpu-peer (a child process of --gpu): HF's time to first token on the GPU, bf16, SDPA attention: one forward
    of each prompt with its cache, then the argmax of the last logits; prints "PEER <length> <seconds>" (best of
    --rounds) or "PEER <length> oom" for the parent."""
    import inspect

    import numpy as np
    import torch
    import transformers

    from benchmarks.generate import hf_gpu_model

    model, device, sync = hf_gpu_model(gpu_config(args))
    hf = model.config
    # Only the last position's logits: for a 128k prompt all of them would take 128k x vocab.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    print(f"NOTE torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}"
          + ("" if keep else ", no logits_to_keep: every position's logits"), flush=True)

    def first_token(ids):
        return model(ids, use_cache=True, **keep).logits[:, -1].argmax(-1)

    rng = np.random.default_rng(0)
    with torch.no_grad():
        for i, length in enumerate(args.gpu_lengths):
            ids = torch.as_tensor(rng.integers(3, hf.vocab_size, (1, length)), device=device)
            best = float("inf")
            try:
                if i == 0:
                    first_token(ids)  # lazy initialisation
                for _ in range(args.rounds):
                    sync()
                    t = time.perf_counter()
                    first_token(ids)
                    sync()
                    best = min(best, time.perf_counter() - t)
            except torch.cuda.OutOfMemoryError:
                best = None
            if best is None:  # outside the except block, so the failed forward's tensors are released
                torch.cuda.empty_cache()
            print(f"PEER {length} {'oom' if best is None else best}", flush=True)


def run_gpu_peer(args) -> tuple[dict[int, float | None], str]:
    """The peer before JAX takes the GPU's memory (its allocator keeps what it reserves); seconds per length (None:
    out of memory) and its notes. A failed peer leaves its lengths out, and the run goes on."""
    seconds, notes, error = run_peer("--gpu-peer", args, "--gpu-preset", args.gpu_preset,
                                     "--gpu-lengths", *map(str, args.gpu_lengths),
                                     "--decode-new-tokens", str(args.decode_new_tokens))
    return seconds, "; ".join(notes + ([f"failed: {error}"] if error else []))


def _out_of_memory(run):
    """run()'s result, or None where the Generator's cache check or XLA finds too little device memory."""
    import jax

    from llama_jax.generation import GenerationError

    try:
        return run()
    except GenerationError as e:
        print(f"  {e}", flush=True)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"  {str(e).splitlines()[0]}", flush=True)
    return None


def gpu_table(args) -> None:
    peer, peer_note = ({}, "not run") if args.no_peer else run_gpu_peer(args)
    import jax
    import numpy as np

    from llama_jax.generation import Generator
    from llama_jax.kv_cache import cache_bytes
    from llama_jax.model import init_params

    config = gpu_config(args)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}); {args.gpu_preset} shape, bf16 random "
          f"weights, batch 1, greedy, prefill chunk {args.prefill_chunk}, best of {args.rounds}", flush=True)
    if device.platform != "gpu":
        print("warning: not a GPU; the times and the bandwidth bound below say nothing about one", flush=True)
    gen = Generator(init_params(config, jax.random.key(0)), config, prefill_chunk=args.prefill_chunk)
    rng = np.random.default_rng(0)

    def first_token(prompt):
        compile_s = gen.generate(prompt, max_new_tokens=1).compile_seconds  # compiles this bucket
        best = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            gen.generate(prompt, max_new_tokens=1)
            best = min(best, time.perf_counter() - t0)
        return best, compile_s

    def ttft(length, chunk_kernel):
        gen.ops = dataclasses.replace(gen.ops, chunk_kernel=chunk_kernel)
        gen.executables.clear()  # compiled with the other kernel
        prompt = np.random.default_rng(length).integers(3, config.vocab_size, (1, length)).tolist()
        try:
            ours = _out_of_memory(lambda: first_token(prompt))
        except Exception as e:  # noqa: BLE001 - a kernel that fails to compile here must not cost the other rows
            if chunk_kernel == "blockwise":
                raise
            print(f"{length} tokens, {chunk_kernel}: failed: {str(e).strip().splitlines()[0]}", flush=True)
            return "failed"
        print(f"{length} tokens, {chunk_kernel}: "
              f"{'oom' if ours is None else f'{ours[0]:.3f} s (compile {ours[1]:.1f} s)'}", flush=True)
        return None if ours is None else ours[0]

    # The portable blockwise loop, and the fused Pallas kernel (LLAMA_JAX_CHUNK_ATTENTION=pallas) where it applies;
    # off a GPU, the same kernel through Pallas's interpreter, so that a dry run takes every step.
    fused = "pallas" if device.platform == "gpu" else "pallas_interpret"
    kernels = ["blockwise"] if args.no_fused else ["blockwise", fused]
    rows = [(length, *(ttft(length, kernel) for kernel in kernels), peer.get(length)) for length in args.gpu_lengths]
    # The decode run below prefills its prompt with the fused kernel where it ran.
    fused_ran = len(kernels) == 2 and all(row[2] != "failed" for row in rows)
    gen.ops = dataclasses.replace(gen.ops, chunk_kernel=kernels[-1] if fused_ran else "blockwise")
    gen.executables.clear()

    def cell(seconds, length):  # seconds, None (out of memory) or "failed"
        if not isinstance(seconds, float):
            return ("oom", "oom") if seconds is None else (seconds, seconds)
        return f"{seconds:.3f}", f"{length / seconds:,.0f}"

    def ratio(theirs, ours):
        return f"**{theirs / ours:.2f}x**" if isinstance(ours, float) and isinstance(theirs, float) else "—"

    print()
    fused_head = " fused TTFT (s) | fused prefill tok/s | fused / portable |" if len(kernels) == 2 else ""
    print(f"| prompt tokens | portable TTFT (s) | portable prefill tok/s |{fused_head} HF TTFT (s) | "
          f"HF prefill tok/s | best of ours / HF |")
    print("|---|---|---|" + "---|" * (3 * (len(kernels) - 1)) + "---|---|---|")
    for length, *ours, hf in rows:
        fused_cells = f" {' | '.join(cell(ours[1], length))} | {ratio(ours[0], ours[1])} |" if len(kernels) == 2 else ""
        best = min((t for t in ours if isinstance(t, float)), default=None)
        if args.no_peer or length not in peer:  # not run, or the peer failed before this length
            theirs, vs_hf = ("—", "—"), "—"
        else:
            theirs, vs_hf = cell(hf, length), ratio(hf, best)
        print(f"| {length} | {' | '.join(cell(ours[0], length))} |{fused_cells} {' | '.join(theirs)} | {vs_hf} |")

    # Each decode step reads every weight and the filled part of the cache once: with the cache full at the end,
    # their bytes over the bandwidth bound batch 1's rate.
    longest, new = max(args.gpu_lengths), args.decode_new_tokens
    prompt = rng.integers(3, config.vocab_size, (1, longest - new)).tolist()
    # The first call compiles; generate() reports its times without compilation.
    runs = _out_of_memory(lambda: [gen.generate(prompt, max_new_tokens=new) for _ in range(args.rounds)])
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(gen.params))
    kv = cache_bytes(config, 1, longest, gen.kv_dtype)
    bound = args.hbm_tbps * 1e12 / (weights + kv)
    print()
    head = f"decode, batch 1, {longest - new}-token prompt + {new} new tokens ({longest} in the cache at the end): "
    foot = (f"bound {bound:.1f} tok/s = {args.hbm_tbps} TB/s / (weights {weights / 1e9:.2f} GB + KV cache "
            f"{kv / 1e9:.2f} GB)")
    if runs is None:
        print(head + f"oom; {foot}")
    else:
        assert all(r.steps == new for r in runs), "generation stopped early"
        best = min(r.decode_seconds for r in runs)
        rate = (new - 1) / best
        print(head + f"{rate:.1f} tok/s, {rate / bound:.0%} of the {foot}")
    # How the decode step above reads its cache (the windows), against the alternatives, one layer at a time.
    decode_table(args.gpu_lengths, args.rounds, heads=config.n_heads, kv_heads=config.n_kv_heads,
                 dim=config.head_dim, dtype="bfloat16", block=gen.ops.attention_block, where=device.device_kind)
    print(f"versions: jax {jax.__version__}, {device.device_kind}; HF peer: {peer_note}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpu_peer:
        torch_gpu_peer(args)
        return 0
    if args.cpu_peer:
        torch_cpu_peer(args)
        return 0
    if args.gpu:
        gpu_table(args)
        return 0
    import jax

    print(f"jax {jax.__version__}, {jax.default_backend()}")
    if not args.skip_memory:
        memory_table(args.memory_lengths, args.prefill_chunk, args.scan_layers)
    if not args.skip_time:
        time_table(args)
    if not args.skip_decode:
        from llama_jax.config import LlamaConfig
        from llama_jax.kernels import select_ops

        config = LlamaConfig(**SMALL)
        decode_table([1024, 2048, 4096, 16384, 65536], args.rounds, heads=config.n_heads, kv_heads=config.kv_heads,
                     dim=config.head_dim, dtype="float32", block=select_ops(config).attention_block,
                     where="this CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
