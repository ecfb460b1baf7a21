"""Memory of one training step: LoRA adapters on frozen weights against full fine-tuning.

For each shape, the compiled step's memory (`memory_analysis()`: arguments + outputs + temporaries - aliased),
from abstract shapes only, nothing allocated; for small-100m also the measured peak RSS of a process that runs
the step (a child process per side, so neither sees the other's high-water mark).

    python benchmarks/lora_memory.py                       # small-100m (compiled and measured) and llama3.1-8b
    python benchmarks/lora_memory.py --shapes small-100m --rank 16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

GIB = 2 ** 30


def step_memory(preset_name: str, lora_rank: int, batch: int, seq: int, base_dtype: str | None) -> dict:
    import jax
    import jax.numpy as jnp

    from llama_jax import sharding as sh
    from llama_jax import train as T
    from llama_jax.config import preset

    config = preset(preset_name, max_seq_len=max(seq, 256))
    tc = T.TrainConfig(run_dir="-", data="-", steps=10, warmup_steps=0, lora_rank=lora_rank,
                       model=T.ModelSpec(init_from="base" if lora_rank else None, preset=None if lora_rank else "x"))
    lora, optimizer = tc.lora, T.make_optimizer(tc)
    mesh = sh.make_mesh(sh.MeshShape(1, 1, 1), jax.devices()[:1])
    shardings = T.state_shardings(config, optimizer, mesh, lora)
    state = T.abstract_state(config, optimizer, shardings, lora)
    if lora is not None:
        from llama_jax.model import init_params

        base_config = config.replace(param_dtype=base_dtype) if base_dtype else config
        state["base"] = jax.eval_shape(lambda: init_params(base_config, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, batch, seq), jnp.bool_)
    step = jax.jit(T.train_step_fn(config, optimizer, T.lr_schedule(tc), None, lora=lora), donate_argnums=0)
    m = step.lower(state, tokens, tokens, mask).compile().memory_analysis()
    trained = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"total": total, "trained": trained, "temps": m.temp_size_in_bytes}


def measured_peak(preset_name: str, lora_rank: int, batch: int, seq: int, base_dtype: str | None) -> float:
    """Peak RSS (GiB) of a child process that builds the state and runs two steps."""
    code = f"""
import jax, jax.numpy as jnp, numpy as np
from llama_jax import sharding as sh, train as T
from llama_jax.config import preset
from llama_jax.model import init_params
config = preset({preset_name!r}, max_seq_len=max({seq}, 256))
tc = T.TrainConfig(run_dir="-", data="-", steps=10, warmup_steps=0, lora_rank={lora_rank},
                   model=T.ModelSpec(init_from="base" if {lora_rank} else None, preset=None if {lora_rank} else "x"))
lora, opt = tc.lora, T.make_optimizer(tc)
mesh = sh.make_mesh(sh.MeshShape(1, 1, 1), jax.devices()[:1])
shs = T.state_shardings(config, opt, mesh, lora)
base = init_params(config, jax.random.key(1))
state = T.init_state(config, opt, shs, 0, None if lora else base, lora)
if lora: state["base"] = jax.tree.map(lambda a: a.astype({base_dtype!r} or a.dtype), base)
del base
step = jax.jit(T.train_step_fn(config, opt, T.lr_schedule(tc), None, lora=lora), donate_argnums=0)
x = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, {batch}, {seq})), jnp.int32)
for _ in range(2):
    state, m = step(state, x, x, jnp.ones(x.shape, bool))
jax.block_until_ready(m)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"the measuring child failed (status {status})")
    return usage.ru_maxrss * 1024 / GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["small-100m", "llama3.1-8b"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--base-dtype", default="bfloat16", help="LoRA's frozen weights (default bfloat16)")
    args = p.parse_args()
    print(f"one step of {args.batch} x {args.seq_len} tokens, AdamW, fp32 trained parameters; LoRA rank {args.rank} "
          f"on wq,wk,wv,wo,w1,w2,w3 with the base in {args.base_dtype}")
    print("| shape | method | compiled step (GiB) | trained params (GiB) | measured peak RSS (GiB) |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes:
        for name, rank, base_dtype in (("full fine-tuning", 0, None), ("LoRA", args.rank, args.base_dtype)):
            m = step_memory(shape, rank, args.batch, args.seq_len, base_dtype)
            peak = (f"{measured_peak(shape, rank, args.batch, args.seq_len, base_dtype):.2f}" if shape == "small-100m"
                    else "—")
            print(f"| {shape} | {name} | {m['total'] / GIB:.2f} | {m['trained'] / GIB:.3f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
