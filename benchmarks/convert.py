"""Peak memory and time of converting a Meta checkpoint: our streaming converter vs the naive approach.

Builds a synthetic Meta checkpoint (random weights, Llama 3.2 1B shape by default: 1.24 B parameters, bf16 on
disk like Meta's release (2.47 GB), 2 model-parallel shards, vocab-parallel embedding, tied head), then converts
it twice, each in its own child process whose peak RSS comes from os.wait4 (the kernel's ru_maxrss for that child alone; the parent
imports neither torch nor jax, because a child spawned by a large parent inherits the parent's high-water mark):

  ours   python convert_weights.py (layer by layer, shards memory-mapped and closed after each layer)
  naive  torch.load every shard fully, torch.cat each tensor, params_from_meta, checkpoint.save_model

Both write the same Orbax model folder (checked leaf by leaf at the end unless --no-check).

    python benchmarks/convert.py                          # 2.5 GB under /tmp, ~13 GB RAM for the naive run
    python benchmarks/convert.py --disk-dtype fp32 --no-naive   # 4.9 GB; naive would need ~24 GB
    python benchmarks/convert.py --n-layers 4             # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_synthetic(folder: Path, preset_name: str, n_layers: int | None, shards: int, dtype: str) -> int:
    """Meta-format shards written one at a time (only one shard's tensors exist in memory); returns bytes."""
    import json

    import torch

    from llama_jax.config import preset
    from llama_jax.meta_weights import LAYER_KEYS

    config = preset(preset_name, **({"n_layers": n_layers} if n_layers else {}))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    d, hd, f = config.dim, config.head_dim, config.hidden_dim
    q, kv = config.n_heads * hd, config.kv_heads * hd
    layer = {"attention.wq.weight": ((q, d), 0), "attention.wk.weight": ((kv, d), 0),
             "attention.wv.weight": ((kv, d), 0), "attention.wo.weight": ((d, q), 1),
             "feed_forward.w1.weight": ((f, d), 0), "feed_forward.w2.weight": ((d, f), 1),
             "feed_forward.w3.weight": ((f, d), 0), "attention_norm.weight": ((d,), None),
             "ffn_norm.weight": ((d,), None)}
    specs = {"tok_embeddings.weight": ((config.vocab_size, d), 0)}  # Llama 3: VocabParallelEmbedding
    for i in range(config.n_layers):
        specs.update({f"layers.{i}.{k}": layer[k] for k in LAYER_KEYS})
    specs["norm.weight"] = ((d,), None)
    if not config.tie_embeddings:
        specs["output.weight"] = ((config.vocab_size, d), 0)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    replicated = {}
    for s in range(shards):
        shard = {}
        for name, (shape, axis) in specs.items():
            if axis is None:
                if name not in replicated:
                    replicated[name] = (1 + 0.1 * torch.randn(shape, generator=g)).to(torch_dtype)
                shard[name] = replicated[name].clone()
            else:
                piece = list(shape)
                piece[axis] //= shards
                shard[name] = (torch.randn(piece, generator=g) * 0.02).to(torch_dtype)
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
        del shard
    params = {"dim": d, "n_layers": config.n_layers, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
              "vocab_size": config.vocab_size, "multiple_of": config.multiple_of,
              "ffn_dim_multiplier": config.ffn_dim_multiplier, "norm_eps": config.norm_eps,
              "rope_theta": config.rope_theta, "use_scaled_rope": config.use_scaled_rope}
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(b"synthetic tokenizer placeholder\n")
    return sum(p.stat().st_size for p in folder.glob("consolidated.*.pth"))


def naive_convert(input_dir: Path, output_dir: Path) -> None:
    """The straightforward converter: everything in memory at once."""
    import json

    import torch

    from llama_jax import checkpoint
    from llama_jax.config import LlamaConfig
    from llama_jax.convert import to_numpy
    from llama_jax.meta_weights import params_from_meta

    shards = [torch.load(p, map_location="cpu", weights_only=True)
              for p in sorted(input_dir.glob("consolidated.*.pth"))]
    column = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight",
              "tok_embeddings.weight")  # Llama 3 layout: the embedding is vocab-parallel
    state = {}
    for name in shards[0]:
        if name.endswith("norm.weight"):
            state[name] = shards[0][name]
        else:
            state[name] = torch.cat([s[name] for s in shards], dim=0 if name.endswith(column) else 1)
    state = {k: to_numpy(v) for k, v in state.items()}
    params_json = json.loads((input_dir / "params.json").read_text())
    config = LlamaConfig.from_params_json(input_dir / "params.json", family="llama3.2", max_seq_len=131072,
                                          tie_embeddings="output.weight" not in state,
                                          param_dtype=str(state["norm.weight"].dtype),
                                          dtype=str(state["norm.weight"].dtype))
    assert config.vocab_size == params_json["vocab_size"]
    checkpoint.save_model(output_dir, params_from_meta(state, config), config, input_dir / "tokenizer.model")


def measure(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, proc.returncode


def leaf_digests(model_dir: Path) -> None:
    import jax
    import numpy as np

    from llama_jax.checkpoint import load_model

    params, _, _ = load_model(model_dir)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        print(jax.tree_util.keystr(path), hashlib.sha256(np.asarray(leaf).tobytes()).hexdigest())


def child(*args: str) -> str:
    """Runs this script in a child process (keeps torch/jax out of the measuring parent); returns stdout."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=ROOT, check=True,
                         stdout=subprocess.PIPE, text=True)
    return out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llama_jax_convert_bench"))
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--n-layers", type=int, help="override the preset's layer count (smaller, faster run)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--disk-dtype", choices=["fp32", "bf16"], default="bf16",
                   help="dtype of the synthetic shards (Meta ships bf16; fp32 doubles the size)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive peer")
    p.add_argument("--no-check", action="store_true", help="skip comparing the two outputs")
    p.add_argument("--keep", action="store_true", help="keep the files under --workdir")
    p.add_argument("--naive-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    p.add_argument("--generate-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--digest-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_child:
        naive_convert(*args.naive_child)
        return
    if args.generate_child:
        print(write_synthetic(args.generate_child, args.preset, args.n_layers, args.shards, args.disk_dtype))
        return
    if args.digest_child:
        leaf_digests(args.digest_child)
        return

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    meta, ours_dir, naive_dir = work / "meta", work / "ours", work / "naive"
    try:
        t0 = time.perf_counter()
        layers = ["--n-layers", str(args.n_layers)] if args.n_layers else []
        size = int(child("--generate-child", str(meta), "--preset", args.preset, "--shards", str(args.shards),
                         "--disk-dtype", args.disk_dtype, *layers).split()[-1])
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB ({args.preset}"
              f"{f', {args.n_layers} layers' if args.n_layers else ''}, {args.shards} shards, {args.disk_dtype} "
              f"on disk) written in {time.perf_counter() - t0:.0f} s", flush=True)

        rows = []
        baseline = measure([sys.executable, "-c", "import jax, torch, orbax.checkpoint, llama_jax.convert"])
        rows.append(("imports only (jax+torch+orbax)", baseline))
        ours = measure([sys.executable, "convert_weights.py", "--input", str(meta), "--output", str(ours_dir),
                        "--quiet", "--no-verify"])
        rows.append(("ours: convert_weights.py (streaming)", ours))
        if not args.no_naive:
            naive = measure([sys.executable, str(Path(__file__).resolve()), "--naive-child", str(meta),
                             str(naive_dir)])
            rows.append(("naive: load all, torch.cat, save", naive))
        for name, (_, _, rc) in rows:
            if rc != 0:
                raise SystemExit(f"error: {name} exited with {rc}")

        print()
        print(f"{'method':<40} {'ckpt GB':>8} {'peak RSS GB':>12} {'RSS/ckpt':>9} {'time s':>8} {'time/naive':>11}")
        naive_time = rows[2][1][0] if len(rows) > 2 else None
        for name, (seconds, rss, _) in rows:
            rel = f"{seconds / naive_time:.2f}" if naive_time and not name.startswith("imports") else "-"
            print(f"{name:<40} {size / 1e9:>8.2f} {rss / 1e9:>12.2f} {rss / size:>9.1%} {seconds:>8.1f} {rel:>11}")
        import resource

        parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"(measuring parent's own peak RSS, an upper bound on what a child inherits: {parent / 1e6:.0f} MB)")
        ok = ours[1] < 0.6 * size
        print(f"\nours peak RSS / checkpoint size = {ours[1] / size:.1%} "
              f"({'PASS' if ok else 'FAIL'}: target < 60 %)")
        if not args.no_naive and not args.no_check:
            same = child("--digest-child", str(ours_dir)) == child("--digest-child", str(naive_dir))
            print(f"outputs identical leaf by leaf: {same}")
            ok = ok and same
        if not ok:
            raise SystemExit(1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
