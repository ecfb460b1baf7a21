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
dense peak (llama_jax.train.PEAK_FLOPS_BY_KIND). It does not run by default.
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
    """A step closure over our train state (1-device mesh, donated state, like train.py)."""
    opt = T.make_optimizer(tc)
    mesh = sh.make_mesh(sh.MeshShape(1, 1, 1))
    shardings = T.state_shardings(config, opt, mesh)
    bsh = sh.batch_sharding(mesh)
    with sh.activate(mesh):
        state = T.init_state(config, opt, shardings, tc.seed, jax.device_put(params, shardings["params"]))
        step = jax.jit(T.train_step_fn(config, opt, T.lr_schedule(tc), shardings["params"]),
                       in_shardings=(shardings, bsh, bsh, bsh), out_shardings=(shardings, sh.replicated(mesh)),
                       donate_argnums=0)
    inputs = [jax.device_put(jnp.asarray(x[None]), bsh) for x in batch]
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


def gpu_benchmark(args) -> None:
    devices = jax.devices()
    if devices[0].platform != "gpu":
        raise SystemExit(f"error: --gpu needs a GPU; jax sees {devices[0].platform}")
    config = preset("llama3.2-1b", dtype="bfloat16", param_dtype="float32", attention_impl="dot_product_attention",
                    remat_policy=args.remat, max_seq_len=args.seq_len)
    tc = T.TrainConfig(run_dir="-", data="-", steps=1000, warmup_steps=0, lr=3e-4, grad_accum=args.grad_accum)
    batch = make_batch(config, args.batch, args.seq_len)
    params = random_params(config)
    run = jax_trainer(config, tc, params, batch)
    run(2)  # compile + warm up
    times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        run(args.steps)
        times.append((time.perf_counter() - t) / args.steps)
    tokens = args.batch * args.seq_len
    rate = tokens / statistics.median(times)
    peak, note = T.peak_flops(devices[:1])
    mfu = rate * T.flops_per_token(config, args.seq_len) / peak
    print(f"| model | batch x seq | tokens/s | MFU ({note}) |")
    print("| --- | --- | ---: | ---: |")
    print(f"| llama3.2-1b shape, bf16 compute, remat={args.remat} | {args.batch} x {args.seq_len} | {rate:,.0f} | "
          f"{100 * mfu:.1f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="~1B model MFU on one GPU instead of the CPU comparison")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 2 on CPU, 8 with --gpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 256 / 2048 with --gpu)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default: 3)")
    p.add_argument("--grad-accum", type=int, default=1, help="--gpu: micro-batches per step (default: 1)")
    p.add_argument("--remat", default="dots_no_batch", help="--gpu: remat policy (default: dots_no_batch)")
    args = p.parse_args()
    if args.gpu:
        args.batch, args.seq_len = args.batch or 8, args.seq_len or 2048
        gpu_benchmark(args)
    else:
        args.batch, args.seq_len = args.batch or 2, args.seq_len or 256
        cpu_benchmark(args)


if __name__ == "__main__":
    main()
