"""Training-step throughput: our jitted JAX step vs Hugging Face transformers + torch.optim.AdamW.

Both sides train the same ~134M-parameter model (preset "small-100m": dim 768, 12 layers, 32000 vocab, fp32)
from the same weights on the same batch, with the same optimizer (global-norm clip 1.0, AdamW, weight decay),
in one process, timed in alternating rounds so that background load hits both alike. Before timing, the first
losses of both are checked to agree (the same computation, not just the same shape).

    python benchmarks/train.py                        # CPU: tokens/s of each and the ratio
    python benchmarks/train.py --batch 4 --seq-len 512 --rounds 5
    python benchmarks/train.py --gpu                  # ~1B model on one GPU: MFU of our step (target >= 50% on H100)

--gpu trains Llama 3.2 1B's shape (1.24B parameters) with bf16 compute, fp32 master weights, cuDNN attention
(attention_impl="dot_product_attention") and full-sequence batches; it reports MFU against the device's bf16
dense peak (llama_jax.train.PEAK_FLOPS_BY_KIND) for each --remat policy, next to HF transformers + torch on the
same GPU (bf16 autocast, SDPA attention, fused AdamW; run first, in a child process, so that each side has the
GPU's memory to itself). MFU counts 6 x matmul parameters + 12 x layers x dim x seq FLOPs per token (PaLM).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # hf_reference: the Meta -> HF weight mapping shared with the tests

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llama_jax import sharding as sh  # noqa: E402
from llama_jax import train as T  # noqa: E402
from llama_jax.config import LlamaConfig, preset  # noqa: E402


def jax_trainer(config: LlamaConfig, tc: T.TrainConfig, params, batch):
    """A step closure over our train state (1-device mesh, donated state, like train.py). The batch's rows are
    split into tc.grad_accum micro-batches, as train.py does."""
    opt = T.make_optimizer(tc)
    mesh = sh.make_mesh(sh.MeshShape(1, 1, 1))
    shardings = T.state_shardings(config, opt, mesh)
    bsh = sh.batch_sharding(mesh)
    with sh.activate(mesh):
        state = T.init_state(config, opt, shardings, tc.seed, jax.device_put(params, shardings["params"]))
        step = jax.jit(T.train_step_fn(config, opt, T.lr_schedule(tc), shardings["params"]),
                       in_shardings=(shardings, bsh, bsh, bsh), out_shardings=(shardings, sh.replicated(mesh)),
                       donate_argnums=0)
    inputs = [jax.device_put(jnp.asarray(x.reshape(tc.grad_accum, -1, x.shape[-1])), bsh) for x in batch]
    holder = {"state": state}

    def run(n: int) -> float:
        with sh.activate(mesh):
            for _ in range(n):
                holder["state"], metrics = step(holder["state"], *inputs)
        return float(jax.device_get(metrics["loss"]))

    return run


def torch_trainer(config: LlamaConfig, tc: T.TrainConfig, params, batch):
    import torch

    from hf_reference import hf_model_from_meta
    from llama_jax.meta_weights import params_to_meta

    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
             params_to_meta(jax.tree.map(np.asarray, params), config).items()}
    model = hf_model_from_meta(state, config).train()
    # Same hyper-parameters as optax; torch's AdamW decays every parameter, ours skips norm gains: a negligible
    # difference in work. The learning rate is held at the peak (warmup is not part of the measurement).
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(tc.b1, tc.b2),
                            eps=tc.eps, foreach=True)
    inputs, targets, mask = (torch.as_tensor(x) for x in batch)
    labels = torch.where(mask, targets, torch.full_like(targets, -100)).long()

    def run(n: int) -> float:
        for _ in range(n):
            logits = model(input_ids=inputs.long()).logits
            # Same loss as ours: mean token cross-entropy over the masked-in targets (no internal shift here).
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                     ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def make_batch(config: LlamaConfig, batch: int, seq_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, config.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    return rows[:, :-1], rows[:, 1:], np.ones((batch, seq_len), bool)


def random_params(config: LlamaConfig, seed: int = 0):
    """Numpy random weights (std 0.02, norms 1): no compiled initialiser, identical for both sides."""
    from llama_jax.model import init_params

    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones(s.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
                         else (0.02 * rng.standard_normal(s.shape)).astype(np.float32)), shapes)


def cpu_benchmark(args) -> None:
    import torch

    config = preset("small-100m", dtype="float32", max_seq_len=max(1024, args.seq_len))
    tc = T.TrainConfig(run_dir="-", data="-", steps=1000, warmup_steps=0, lr=3e-4)
    batch = make_batch(config, args.batch, args.seq_len)
    params = random_params(config)
    tokens = args.batch * args.seq_len
    print(f"model small-100m: {config.num_params() / 1e6:.0f}M params, batch {args.batch} x {args.seq_len} = "
          f"{tokens} tokens/step, fp32, {torch.get_num_threads()} torch threads, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}", flush=True)

    sides = {"llama_jax (jit, optax AdamW)": jax_trainer(config, tc, params, batch),
             "HF transformers + torch AdamW": torch_trainer(config, tc, params, batch)}
    first = {name: run(1) for name, run in sides.items()}  # compiles / warms up, and must agree
    a, b = first.values()
    print(f"first-step losses: {a:.5f} vs {b:.5f} (relative difference {abs(a - b) / abs(b):.1e})", flush=True)
    if abs(a - b) > 1e-3 * abs(b):
        raise SystemExit("error: the two sides do not compute the same loss; the comparison would be meaningless")
    times = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, run in sides.items():
            t = time.perf_counter()
            run(args.steps)
            times[name].append((time.perf_counter() - t) / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n.split()[0]} {tokens / times[n][-1]:,.0f} tok/s"
                                                           for n in sides), flush=True)
    rate = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    peer = rate["HF transformers + torch AdamW"]
    print()
    print("| implementation | tokens/s (median of rounds) | vs HF + torch |")
    print("| --- | ---: | ---: |")
    for name, r in rate.items():
        print(f"| {name} | {r:,.0f} | {r / peer:.2f}x |")


def gpu_config(args) -> LlamaConfig:
    return preset(args.gpu_preset, dtype="bfloat16", param_dtype="float32", attention_impl="dot_product_attention",
                  max_seq_len=args.seq_len)


def torch_gpu_peer(args) -> None:
    """--gpu-peer (a child process of --gpu): HF LlamaForCausalLM in its usual fast GPU setup, timed like ours.

    fp32 master weights with bf16 autocast, SDPA attention (flash on Hopper), fused torch AdamW, the same batch
    shape. Prints one line "PEER <tokens/s> <note>" for the parent.
    """
    import torch
    import transformers

    from hf_reference import hf_config

    config = gpu_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # noqa: E731 - CPU dry runs
    hf = hf_config(config)
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf).train()
    inputs, targets, _ = (torch.as_tensor(x, device=device).long() for x in make_batch(config, args.batch,
                                                                                        args.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=device == "cuda")
    note = "no activation checkpointing"
    if args.peer_checkpointing:
        model.gradient_checkpointing_enable()
        note = "gradient checkpointing (out of memory without)"

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    times = []
    for _ in range(args.rounds):
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        times.append((time.perf_counter() - t) / args.steps)
    print(f"PEER {args.batch * args.seq_len / statistics.median(times)} torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {note}", flush=True)


def run_gpu_peer(args) -> tuple[float, str]:
    """The peer in a child process, before JAX takes the GPU's memory (its allocator keeps what it reserves).

    Without activation checkpointing first (HF's default and fastest); where that runs out of memory, again in a
    fresh process with HF's gradient checkpointing.
    """
    import subprocess

    cmd = [sys.executable, __file__, "--gpu-peer", "--gpu-preset", args.gpu_preset, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--rounds", str(args.rounds)]
    for extra in ([], ["--peer-checkpointing"]):
        proc = subprocess.run(cmd + extra, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("PEER ")]
        if proc.returncode == 0 and lines:
            _, rate, note = lines[-1].split(" ", 2)
            return float(rate), note
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "OutOfMemoryError" not in tail:
            break
    return float("nan"), f"failed: {tail[:300]}"


def phase_rates(config: LlamaConfig, params, batch) -> dict[str, float]:
    """tokens/s of the forward pass alone and of forward + backward (no optimizer): where a step's time goes."""
    inputs, targets, mask = (jnp.asarray(x) for x in batch)
    params = jax.device_put(params)

    def mean_loss(p):
        total, count = T.loss_sums(p, inputs, targets, mask, config=config)
        return total / count

    rates = {}
    for name, fn in (("forward only", jax.jit(mean_loss)), ("forward + backward", jax.jit(jax.grad(mean_loss)))):
        jax.block_until_ready(fn(params))
        t = time.perf_counter()
        for _ in range(3):
            out = fn(params)
        jax.block_until_ready(out)
        rates[name] = inputs.size * 3 / (time.perf_counter() - t)
    return rates


def top_kernels(trace_dir: str, top: int = 25) -> None:
    """Sums device time per name in the Perfetto trace jax.profiler wrote, per kind of device thread (CUDA
    streams: kernels; "XLA Ops": HLO ops), and prints the largest."""
    import collections
    import gzip
    import json

    path = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))[-1]
    events = json.loads(gzip.open(path).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and "/device:" in str(e.get("args", {}).get("name", ""))}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in device_pids}
    totals = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            kind = "stream" if threads.get((e["pid"], e.get("tid")), "").startswith("Stream") else \
                threads.get((e["pid"], e.get("tid")), "?")
            totals[kind][e["name"][:100]] += e.get("dur", 0)
    for kind, counter in totals.items():
        whole = sum(counter.values()) or 1
        print(f"\ndevice time on {kind!r} threads: {whole / 1e3:.1f} ms")
        for name, us in counter.most_common(top):
            print(f"{100 * us / whole:5.1f}%  {us / 1e3:8.2f} ms  {name}")


def gpu_benchmark(args) -> None:
    devices = jax.devices()
    if devices[0].platform != "gpu" and not args.allow_cpu:
        raise SystemExit(f"error: --gpu needs a GPU; jax sees {devices[0].platform}")
    config = gpu_config(args)
    tokens = args.grad_accum * args.batch * args.seq_len
    peak, peak_note = T.peak_flops(devices[:1])
    flops = T.flops_per_token(config, args.seq_len)
    print(f"{args.gpu_preset} shape ({config.num_params() / 1e9:.2f}B params), {args.grad_accum} micro-batch(es) of "
          f"{args.batch} x {args.seq_len} per step, "
          f"bf16 compute, fp32 master weights and AdamW; jax {jax.__version__} on {devices[0].device_kind}; "
          f"peak {peak_note}", flush=True)
    rows = []
    if not args.no_peer:
        rate, note = run_gpu_peer(args)
        rows.append((f"HF transformers + torch AdamW ({note})", rate))
        print(f"peer: {rate:,.0f} tok/s ({note})", flush=True)
    tc = T.TrainConfig(run_dir="-", data="-", steps=1000, warmup_steps=0, lr=3e-4, grad_accum=args.grad_accum)
    batch = make_batch(config, args.grad_accum * args.batch, args.seq_len)
    params = random_params(config)
    for remat in args.remat:
        name = f"llama_jax (remat={remat}, cuDNN attention)"
        try:
            run = jax_trainer(config.replace(remat_policy=remat), tc, params, batch)
            run(2)  # compile + warm up
            if args.profile:
                with jax.profiler.trace(args.profile, create_perfetto_trace=True):
                    run(args.steps)
                top_kernels(args.profile)
            times = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                run(args.steps)
                times.append((time.perf_counter() - t) / args.steps)
            rate = tokens / statistics.median(times)
        except Exception as e:  # noqa: BLE001 - an out-of-memory variant is a row, not the end of the table
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            rate = float("nan")
        finally:
            run = None
        print(f"{name}: {rate:,.0f} tok/s", flush=True)
        rows.append((name, rate))
    peer = rows[0][1] if not args.no_peer else float("nan")
    print()
    print(f"| implementation | tokens/s | MFU ({peak / 1e12:.0f} TFLOP/s peak) | vs HF + torch |")
    print("| --- | ---: | ---: | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {100 * rate * flops / peak:.1f}% | {rate / peer:.2f}x |")
    if args.breakdown:
        # Forward FLOPs are a third of the step's (2N of 6N per token), backward two thirds.
        micro = [x[:args.batch] for x in batch]
        phases = phase_rates(config.replace(remat_policy=args.remat[0]), params, micro)
        print()
        print(f"| phase (remat={args.remat[0]}) | tokens/s | MFU of that phase |")
        print("| --- | ---: | ---: |")
        for (name, rate), share in zip(phases.items(), (1 / 3, 1.0)):
            print(f"| {name} | {rate:,.0f} | {100 * rate * flops * share / peak:.1f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="~1B model MFU on one GPU instead of the CPU comparison")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 2 on CPU, 8 with --gpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 256 / 2048 with --gpu)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default: 3)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="--gpu: micro-batches of --batch rows per optimizer step (default: 1)")
    p.add_argument("--remat", nargs="+", default=["dots_attention"],
                   help="--gpu: remat policies to time, one row each (default: dots_attention)")
    p.add_argument("--gpu-preset", default="llama3.2-1b", help="--gpu: the model shape (default: llama3.2-1b)")
    p.add_argument("--no-peer", action="store_true", help="--gpu: skip the HF + torch row")
    p.add_argument("--allow-cpu", action="store_true", help="--gpu: run even without a GPU (a dry run of the code)")
    p.add_argument("--breakdown", action="store_true",
                   help="--gpu: also time the forward pass and forward + backward of the first --remat alone")
    p.add_argument("--profile", metavar="DIR",
                   help="--gpu: trace --steps steps of each variant with jax.profiler into DIR and print the "
                        "kernels that take the most device time")
    p.add_argument("--gpu-peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peer-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gpu_peer:
        torch_gpu_peer(args)
    elif args.gpu:
        args.batch, args.seq_len = args.batch or 8, args.seq_len or 2048
        gpu_benchmark(args)
    else:
        args.batch, args.seq_len = args.batch or 2, args.seq_len or 256
        cpu_benchmark(args)


if __name__ == "__main__":
    main()
