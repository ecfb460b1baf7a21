"""Greedy generation throughput: llama_jax's Generator next to Hugging Face `generate()` (PyTorch, CPU).

Both run the same random weights (a Meta-format state dict mapped to each side, HF with its q/k permutation),
greedy, exactly --new-tokens per row (HF: do_sample=False, min_new_tokens=max_new_tokens; ours: no stop ids),
prompts of --prompt-len random ids, batch 1 and 8, in the same process, one after the other, so the ratio
is what counts, not the absolute speed of the machine. Our time excludes compilation, which is reported in
its own column (the compiled functions are cached per shape bucket, so it is paid once per bucket).
"agree" counts the rows where both sides produced the same tokens (a sanity check), compared up to our first
eos id 2: HF's min_new_tokens forbids eos, so where ours picks it the two legitimately part.

    python benchmarks/generate.py                         # tiny + small-100m, batch 1 and 8, 256 tokens (CPU)
    python benchmarks/generate.py --configs tiny-llama2 --new-tokens 64 --rounds 1
    python benchmarks/generate.py --xla-dots              # the same without the packed CPU matmul kernel
    python benchmarks/generate.py --gpu                   # on a GPU: llama3-8b shape, bf16, batch 1 and 64

--gpu reports decode tokens/s against the weight-streaming bound, HBM bandwidth (H100 SXM 3.35 TB/s by default)
divided by the bytes of the weights, times the batch (each step reads every weight once), and end-to-end tokens/s
next to HF `generate()` on the same GPU (bf16, SDPA attention, its default dynamic cache, random weights of the
same shape; run first, in a child process, so that each side has the GPU's memory to itself).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # hf_reference: the Meta -> HF weight mapping the tests use


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny-llama2", "small-100m"], help="presets (CPU mode)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8 (CPU), 1 64 (--gpu)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2,
                   help="timed rounds per row, each one run of ours then one of HF; the best of each is kept")
    p.add_argument("--single-thread", action="store_true",
                   help="run both sides on one thread (XLA: --xla_cpu_multi_thread_eigen=false, torch: "
                        "set_num_threads(1)); less sensitive to other processes on a shared machine")
    p.add_argument("--scan-layers", action="store_true", help="decode with the scanned layer stack (slower)")
    p.add_argument("--xla-dots", action="store_true",
                   help="CPU mode: multiply by the weights with XLA's dot, not the packed CPU kernel (slower)")
    p.add_argument("--gpu", action="store_true", help="GPU mode: llama3-8b-shaped bf16 random weights, no HF")
    p.add_argument("--gpu-preset", default="llama3-8b", help="with --gpu: the shape to use")
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="with --gpu: memory bandwidth in TB/s (H100 SXM)")
    p.add_argument("--no-peer", action="store_true", help="with --gpu: skip HF generate() on the GPU")
    p.add_argument("--gpu-peer", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _run_ours(gen, prompts, new_tokens):
    """(seconds without compilation, compile seconds, new tokens)."""
    out = gen.generate(prompts, max_new_tokens=new_tokens)
    assert all(len(t) == new_tokens for t in out.tokens), "ours stopped early"
    return out.prefill_seconds + out.decode_seconds, out.compile_seconds, out.tokens


def _run_hf(model, prompts, new_tokens):
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=2,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        seconds = time.perf_counter() - t0
    new = out[:, ids.shape[1]:].tolist()
    assert all(len(t) == new_tokens for t in new), "HF stopped early"
    return seconds, new


def _measure(gen, hf, prompts, new_tokens, rounds):
    """Best-of-rounds for both sides, alternating, so a busy spell on a shared machine hits both alike."""
    _, compile_s, ours_tokens = _run_ours(gen, prompts, new_tokens)  # compiles this bucket
    _run_hf(hf, prompts, 4)  # HF's lazy initialisation
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(_run_ours(gen, prompts, new_tokens)[0])
        seconds, hf_tokens = _run_hf(hf, prompts, new_tokens)
        theirs.append(seconds)
    return min(ours), min(theirs), compile_s, ours_tokens, hf_tokens


def _agree(ours, theirs, eos: int = 2) -> str:
    same = 0
    for a, b in zip(ours, theirs):
        n = a.index(eos) if eos in a else len(a)
        same += a[:n] == b[:n]
    return f"{same}/{len(ours)}"


def cpu_table(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from hf_reference import hf_model_from_meta, random_meta_state
    from llama_jax.config import preset
    from llama_jax.generation import Generator
    from llama_jax.meta_weights import params_from_meta

    batches = args.batches or [1, 8]
    if args.single_thread:
        torch.set_num_threads(1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; greedy, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens",
          flush=True)
    rows = []
    for name in args.configs:
        config = preset(name)
        # tiny presets have a short context; make room for the prompt and every new token.
        config = config.replace(max_seq_len=max(config.max_seq_len, args.prompt_len + args.new_tokens))
        state = random_meta_state(config, seed=0)
        params = jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, config))
        packed = False if args.xla_dots else None  # None: wherever the kernel applies
        gen = Generator(params, config, scan_layers=args.scan_layers, packed_weights=packed)
        del params
        print(f"{name}: weight products by " + ("the packed CPU kernel" if gen.packed_weights else
                                                "XLA's dot"), flush=True)
        hf = hf_model_from_meta(state, config)
        del state
        rng = np.random.default_rng(0)
        for batch in batches:
            prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len)).tolist()
            ours_s, hf_s, compile_s, ours_tokens, hf_tokens = _measure(gen, hf, prompts, args.new_tokens, args.rounds)
            n = batch * args.new_tokens
            rows.append((name, f"{config.num_params() / 1e6:.1f}M", batch, n / ours_s, n / hf_s, hf_s / ours_s,
                         compile_s, _agree(ours_tokens, hf_tokens)))
            print(_fmt(rows[-1]), flush=True)
    print()
    print("| config | params | batch | ours tok/s | HF tok/s | ours / HF | our compile (s) | agree |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_fmt(r))


def _fmt(r):
    name, params, batch, ours, hf, ratio, compile_s, agree = r
    return f"| {name} | {params} | {batch} | {ours:.1f} | {hf:.1f} | **{ratio:.2f}x** | {compile_s:.1f} | {agree} |"


def gpu_config(args):
    from llama_jax.config import preset

    config = preset(args.gpu_preset, dtype="bfloat16", param_dtype="bfloat16")
    return config.replace(max_seq_len=max(config.max_seq_len, args.prompt_len + args.new_tokens))


def hf_gpu_model(config):
    """HF LlamaForCausalLM of `config`'s shape, random bf16 weights, SDPA attention, on the GPU (the CPU for dry
    runs); returns (model, device, sync), sync waiting for the device's queued work."""
    import torch
    import transformers

    from hf_reference import hf_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # noqa: E731 - CPU dry runs
    hf = hf_config(config)
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf).eval()
    return model, device, sync


def torch_gpu_peer(args) -> None:
    """--gpu-peer (a child process of --gpu): HF `generate()` on the GPU, bf16, SDPA attention, greedy, the same
    shapes; prints "PEER <batch> <tokens/s end to end>" per batch for the parent."""
    import numpy as np
    import torch
    import transformers

    model, device, sync = hf_gpu_model(gpu_config(args))
    hf = model.config
    rng = np.random.default_rng(0)
    print(f"NOTE torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    for batch in args.batches or [1, 64]:
        ids = torch.as_tensor(rng.integers(3, hf.vocab_size, (batch, args.prompt_len)), device=device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=2,
                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        with torch.no_grad():
            model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # lazy initialisation
            best = float("inf")
            for _ in range(args.rounds):
                sync()
                t = time.perf_counter()
                model.generate(ids, **kw)
                sync()
                best = min(best, time.perf_counter() - t)
        print(f"PEER {batch} {batch * args.new_tokens / best}", flush=True)


def run_gpu_peer(args) -> tuple[dict[int, float], str]:
    """The peer in a child process, before JAX takes the GPU's memory (its allocator keeps what it reserves)."""
    import subprocess

    batches = [str(b) for b in (args.batches or [1, 64])]
    cmd = [sys.executable, __file__, "--gpu-peer", "--gpu-preset", args.gpu_preset, "--batches", *batches,
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rates = {int(line.split()[1]): float(line.split()[2]) for line in proc.stdout.splitlines()
             if line.startswith("PEER ")}
    notes = [line[5:] for line in proc.stdout.splitlines() if line.startswith("NOTE ")]
    if proc.returncode != 0:
        notes.append("failed: " + (proc.stderr.strip().splitlines() or ["no output"])[-1])
    return rates, "; ".join(notes)


def gpu_table(args):
    import jax
    import numpy as np

    from llama_jax.generation import Generator
    from llama_jax.model import init_params

    batches = args.batches or [1, 64]
    peer, peer_note = ({}, "not run") if args.no_peer else run_gpu_peer(args)
    print(f"HF peer: {peer_note}", flush=True)
    config = gpu_config(args)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}); {args.gpu_preset} shape, bf16 random "
          f"weights, greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens", flush=True)
    if device.platform != "gpu":
        print("warning: not a GPU; the bandwidth bound below is meaningless here", flush=True)
    gen = Generator(init_params(config, jax.random.key(0)), config, scan_layers=args.scan_layers)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(gen.params))
    per_step_bound = args.hbm_tbps * 1e12 / weight_bytes  # decode steps/s if only weights were read
    print(f"weights {weight_bytes / 1e9:.2f} GB -> bound {per_step_bound:.1f} steps/s at {args.hbm_tbps} TB/s; "
          "attention: einsum over the KV cache", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len)).tolist()
        first = gen.generate(prompts, max_new_tokens=args.new_tokens)
        runs = [gen.generate(prompts, max_new_tokens=args.new_tokens) for _ in range(args.rounds)]
        best = min(runs, key=lambda r: r.decode_seconds)
        # Decode rate: the steps after the first token, all rows; end to end: every new token over prefill+decode.
        decode = batch * (args.new_tokens - 1) / best.decode_seconds
        e2e = batch * args.new_tokens / (best.prefill_seconds + best.decode_seconds)
        bound = batch * per_step_bound
        rows.append((batch, decode, bound, e2e, peer.get(batch, float("nan")), best.prefill_seconds,
                     first.compile_seconds))
        print(rows[-1], flush=True)
    print()
    print("| batch | decode tok/s | HBM bound tok/s | of bound | end-to-end tok/s | HF generate() tok/s | ours / HF "
          "| prefill (s) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, decode, bound, e2e, hf, prefill, compile_s in rows:
        print(f"| {batch} | {decode:.0f} | {bound:.0f} | {decode / bound:.0%} | {e2e:.0f} | {hf:.0f} | "
              f"**{e2e / hf:.1f}x** | {prefill:.3f} | {compile_s:.1f} |", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.single_thread:  # must be set before jax creates its CPU client
        import os

        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    if args.gpu_peer:
        torch_gpu_peer(args)
    elif args.gpu:
        gpu_table(args)
    else:
        cpu_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
