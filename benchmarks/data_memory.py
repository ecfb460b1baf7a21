"""A process's own memory while it reads random training batches from a prepared dataset: flat in the corpus size.

Two datasets are written directly (random uint32 tokens in documents of random length; no tokenizer): one of
--big-gb (default 2.1 GB) and one of 20 MB. For each, a fresh process opens it the way train.py does (split,
seeded order, document masking) and reads --batches random batches of --batch x --seq-len tokens, sampling its
RssAnon (anonymous memory: its own heap) and RssFile (pages of the memory maps, which belong to the page cache)
from /proc/self/status after opening and after every batch.

    python benchmarks/data_memory.py
    python benchmarks/data_memory.py --big-gb 8 --batches 400 --workdir /tmp/data_memory   # kept for reruns
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from llama_jax.dataset.store import DOC_DTYPE, MANIFEST, write_atomic, write_manifest  # noqa: E402

VOCAB = 128256  # Llama 3's: uint32 tokens
SHARD_TOKENS = 1 << 27  # 512 MB of uint32 per shard
CHUNK = 1 << 24


def write_dataset(root: Path, num_tokens: int, seed: int = 0) -> None:
    """Shards of random tokens, written chunk by chunk so that this process never holds a shard in memory."""
    if (root / MANIFEST).is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for s, first in enumerate(range(0, num_tokens, SHARD_TOKENS)):
        n = min(SHARD_TOKENS, num_tokens - first)
        name = f"shard-{s:05d}"
        tmp = root / f"{name}.tokens.tmp"
        with open(tmp, "wb") as f:
            for lo in range(0, n, CHUNK):
                f.write(rng.integers(3, VOCAB, min(CHUNK, n - lo), dtype=np.uint32).tobytes())
        os.replace(tmp, root / f"{name}.tokens")
        starts = np.unique(np.r_[0, rng.integers(1, n, max(1, n // 1000))]).astype(DOC_DTYPE)  # ~1000-token docs
        write_atomic(root / f"{name}.docs", starts)
        records.append({"name": name, "tokens": n, "documents": int(starts.size), "loss_mask": False})
    write_manifest(root, records, {"md5": "random", "vocab_size": VOCAB, "bos_id": 1, "eos_id": 2, "pad_id": 0},
                   np.uint32, [])


READER = r"""
import json, sys
import numpy as np
from llama_jax import data
from llama_jax.dataset.store import TokenDataset, TokenRows

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}

path, seq_len, batch, batches = sys.argv[1], *map(int, sys.argv[2:])
train, _ = data.split(TokenRows(TokenDataset(path), seq_len), 0.01, seed=0)
it = data.BatchIterator(train, batch, seed=0, document_mask=True)
opened = status()
peak = dict(opened)
for _ in range(batches):
    fields = next(it).fields()
    assert fields["inputs"].shape == (1, batch, seq_len)
    now = status()
    peak = {k: max(peak[k], now[k]) for k in peak}
print(json.dumps({"rows": len(train), "opened": opened, "peak": peak, "tokens_read": batches * batch * seq_len}))
"""


def measure(path: Path, seq_len: int, batch: int, batches: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", READER, str(path), str(seq_len), str(batch), str(batches)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big-gb", type=float, default=2.1)
    p.add_argument("--small-mb", type=float, default=20)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--workdir", help="where the datasets go and stay (default: a temporary folder, removed)")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="data_memory_"))
    try:
        sizes = {"small": int(args.small_mb * 1e6) // 4, "big": int(args.big_gb * 1e9) // 4}
        print(f"{'dataset':<10} {'tokens':>14} {'GB':>7} {'rows':>10} {'RssAnon open':>13} {'RssAnon peak':>13} "
              f"{'growth':>8} {'RssFile peak':>13}   (MB; {args.batches} batches of {args.batch} x {args.seq_len})")
        for name, tokens in sizes.items():
            write_dataset(work / name, tokens)
            r = measure(work / name, args.seq_len, args.batch, args.batches)
            growth = r["peak"]["RssAnon"] - r["opened"]["RssAnon"]
            print(f"{name:<10} {tokens:>14,} {tokens * 4 / 1e9:>7.2f} {r['rows']:>10,} {r['opened']['RssAnon']:>13.1f} "
                  f"{r['peak']['RssAnon']:>13.1f} {growth:>8.1f} {r['peak']['RssFile']:>13.1f}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
