"""prepare_data.py's throughput: MB/s of text tokenised into a dataset with 1 worker and with all cores, beside
the rate of the tokenizer alone in one process (encode over documents already in memory, no reading or writing).
"cores busy" is CPU seconds (this process and its workers) per second: on a machine shared with other jobs, the
cores a run actually got; "MB/s per core" divides by it.

The corpus is generated: CPython's pydoc topics (79 documents of reference-manual English and code, 6 KB on
average), one per line of .jsonl files of about 4 MB, repeated until --size-mb: the tokenizers see real text in
documents of a usual size, and nothing is downloaded.

    python benchmarks/prepare_data.py               # Llama 2 and Llama 3 tokenizers ($LLAMA_JAX_TOKENIZERS), 48 MB
    python benchmarks/prepare_data.py --tokenizer PATH --size-mb 200 --workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_jax.data import pydoc_topics  # noqa: E402
from llama_jax.dataset.prepare import prepare_dataset  # noqa: E402
from llama_jax.tokenizer import load_tokenizer  # noqa: E402

# Meta's tokenizer files, where the tests look for them: $LLAMA_JAX_TOKENIZERS or ../shared/tokenizers.
TOKENIZER_DIR = Path(os.environ.get("LLAMA_JAX_TOKENIZERS") or ROOT.parent / "shared" / "tokenizers")
TOKENIZERS = [str(TOKENIZER_DIR / family / "tokenizer.model") for family in ("llama2", "llama3")]


def write_corpus(root: Path, size_mb: float) -> list[str]:
    """.jsonl files of ~4 MB, one pydoc topic per line, until size_mb; returns the topics."""
    topics = list(pydoc_topics().values())
    block = "".join(json.dumps({"text": t}) + "\n" for t in topics)
    per_file = max(1, int(4e6 // len(block.encode())))
    files = max(1, round(size_mb * 1e6 / (per_file * len(block.encode()))))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"part-{i:04d}.jsonl").write_text(block * per_file, encoding="utf-8")
    return topics


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the workers, once the pool has joined them)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tokenizer_rate(tok_path: str, docs: list[str], seconds: float = 5.0) -> tuple[float, float, float]:
    """(MB/s, tokens/s, cores busy) of tok.encode alone over documents in memory, for about `seconds`."""
    tok = load_tokenizer(tok_path)
    size, tokens, began, cpu = 0, 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - began < seconds:
        for doc in docs:
            tokens += len(tok.encode(doc, bos=True, eos=True))
            size += len(doc.encode())
    elapsed = time.perf_counter() - began
    return size / 1e6 / elapsed, tokens / elapsed, (cpu_seconds() - cpu) / elapsed


def prepare_rate(tok_path: str, corpus: Path, out: Path, workers: int) -> tuple[float, float, float]:
    """(MB/s, tokens/s, cores busy) of prepare_dataset end to end: listing, reading, tokenising, writing."""
    shutil.rmtree(out, ignore_errors=True)
    size = sum(p.stat().st_size for p in corpus.iterdir())
    began, cpu = time.perf_counter(), cpu_seconds()
    manifest = prepare_dataset([str(corpus)], tok_path, out, workers=workers, progress=False, log=lambda line: None)
    elapsed = time.perf_counter() - began
    return size / 1e6 / elapsed, manifest["num_tokens"] / elapsed, (cpu_seconds() - cpu) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", action="append", help="tokenizer.model (repeatable; default: Llama 2 and 3)")
    p.add_argument("--size-mb", type=float, default=48)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="the 'all cores' run (default: all cores)")
    p.add_argument("--workdir", help="where the corpus and datasets go (default: a temporary folder, removed)")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prepare_bench_"))
    try:
        docs = write_corpus(work / "corpus", args.size_mb)
        size = sum(f.stat().st_size for f in (work / "corpus").iterdir()) / 1e6
        print(f"corpus: {size:.1f} MB of pydoc topics in {len(list((work / 'corpus').iterdir()))} files; "
              f"{os.cpu_count()} cores")
        print(f"{'tokenizer':<12} {'run':<28} {'MB/s':>8} {'M tokens/s':>11} {'cores busy':>11} {'MB/s per core':>14}")
        for tok_path in args.tokenizer or TOKENIZERS:
            name = Path(tok_path).parent.name
            mb, tps, cores = tokenizer_rate(tok_path, docs)
            print(f"{name:<12} {'encode alone, 1 process':<28} {mb:>8.2f} {tps / 1e6:>11.2f} {cores:>11.2f} "
                  f"{mb / cores:>14.2f}", flush=True)
            for workers in sorted({1, args.workers}):
                mb, tps, cores = prepare_rate(tok_path, work / "corpus", work / "dataset", workers)
                label = f"prepare_data, {workers} worker{'s' if workers > 1 else ''}"
                print(f"{name:<12} {label:<28} {mb:>8.2f} {tps / 1e6:>11.2f} {cores:>11.2f} {mb / cores:>14.2f}",
                      flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
