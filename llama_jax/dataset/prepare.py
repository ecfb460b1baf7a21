"""Tokenise a corpus once, in parallel, into a prepared dataset (store.py's format); resumable and atomic.

Each unit of work (sources.py) becomes one shard, named by its index in the deterministic plan. A worker writes a
shard's files under temporary names, renames them, and writes the shard's .json record last; the manifest is
written only when every shard exists. So a killed run leaves nothing half-written under a final name, and
`--resume` keeps every shard whose record matches its unit and tokenizer.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from llama_jax.data import DataError
from llama_jax.dataset import sources
from llama_jax.dataset.store import DOC_DTYPE, file_md5, token_dtype, write_manifest, write_shard

_WORKER: dict[str, Any] = {}  # the tokenizer and settings of this worker process


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _init_worker(tokenizer_path: str, output: str, text_field: str, md5: str) -> None:
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    _WORKER.update(tok=tok, output=Path(output), text_field=text_field, md5=md5, dtype=token_dtype(tok.vocab_size))


def _tokenize_unit(index: int, unit: sources.Unit) -> dict[str, Any]:
    """Tokenises one unit (documents as bos ... eos) into shard `index`; returns its record."""
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    pieces, starts, count = [], [], 0
    for text in sources.documents(unit, _WORKER["text_field"]):
        ids = np.asarray(tok.encode(text, bos=True, eos=True), dtype)
        starts.append(count)
        count += ids.size
        pieces.append(ids)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    return write_shard(_WORKER["output"], shard_name(index), tokens, np.asarray(starts, DOC_DTYPE),
                       info={"unit": unit.describe(), "tokenizer_md5": _WORKER["md5"]})


def _finished(output: Path, index: int, unit: sources.Unit, md5: str, dtype: np.dtype) -> dict[str, Any] | None:
    """The record of a shard a previous run completed for this same unit and tokenizer, else None."""
    name = shard_name(index)
    try:
        record = json.loads((output / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("unit") != unit.describe() or record.get("tokenizer_md5") != md5:
        return None
    if record["tokens"]:
        for suffix, size in (("tokens", record["tokens"] * dtype.itemsize),
                             ("docs", record["documents"] * DOC_DTYPE.itemsize)):
            path = output / f"{name}.{suffix}"
            if not path.is_file() or path.stat().st_size != size:
                return None
    return record


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich bar over input bytes with the rate in MB/s, or nothing."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("tokenising"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task("tokenising", total=total)
        yield lambda n: bar.update(task, advance=n)


def _can_fork() -> bool:
    """Fork where there is one and no JAX backend runs here: workers then inherit the imported modules and the
    loaded tokenizer, where a spawned worker first spends a second or more importing (llama_jax imports jax). A
    running backend's threads could hold locks that a forked child would inherit held."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bridge is None or not getattr(bridge, "backends_are_initialized", lambda: True)()


def _run_units(todo: list[tuple[int, sources.Unit]], workers: int, init_args: tuple,
               advance: Callable[[int], None]) -> dict[int, dict[str, Any]]:
    """Records of the units in `todo`, tokenised by `workers` processes (in this process when 1)."""
    _init_worker(*init_args)
    if workers == 1:
        records = {}
        for index, unit in todo:
            records[index] = _tokenize_unit(index, unit)
            advance(unit.size)
        return records
    fork = _can_fork()
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork" if fork else "spawn"),
                                  initializer=None if fork else _init_worker, initargs=() if fork else init_args)
    futures = {pool.submit(_tokenize_unit, index, unit): (index, unit) for index, unit in todo}
    records = {}
    try:
        for future in cf.as_completed(futures):
            index, unit = futures[future]
            records[index] = future.result()
            advance(unit.size)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return records


def prepare_dataset(inputs: list[str], tokenizer_path: str | Path, output: str | Path, *, workers: int | None = None,
                    resume: bool = False, text_field: str = "text", progress: bool = True,
                    unit_bytes: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenises `inputs` into the dataset folder `output`; returns its manifest. unit_bytes: input bytes per
    shard (default: sources.unit_bytes_for the inputs)."""
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    md5, dtype = file_md5(tokenizer_path), token_dtype(tok.vocab_size)
    files = sources.expand_inputs(inputs)
    units = sources.plan_units(files, unit_bytes)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not resume:
        raise DataError(f"{output}: already exists; pass --resume to continue it, or choose a new --output")
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.tmp"):  # what a killed run was writing
        stale.unlink()

    records = {i: r for i, u in enumerate(units) if (r := _finished(output, i, u, md5, dtype)) is not None}
    todo = [(i, u) for i, u in enumerate(units) if i not in records]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    total = sum(u.size for _, u in todo)
    if records:
        log(f"resuming: {len(records)} of {len(units)} shards already done")
    began = time.perf_counter()
    with _progress(progress, total) as advance:
        records.update(_run_units(todo, workers, (str(tokenizer_path), str(output), text_field, md5), advance))
    seconds = time.perf_counter() - began
    info = {"md5": md5, "file": Path(tokenizer_path).name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    shards = [records[i] for i in range(len(units))]
    if not sum(s["tokens"] for s in shards):
        raise DataError(f"{', '.join(inputs)}: no non-empty documents")
    manifest = write_manifest(output, shards, info, dtype, [{"path": str(f), "bytes": f.stat().st_size} for f in files])
    rate = total / 1e6 / max(seconds, 1e-9)
    log(f"{output}: {manifest['num_documents']:,} documents, {manifest['num_tokens']:,} tokens ({dtype.name}) in "
        f"{len(units)} shards; {total / 1e6:.1f} MB tokenised in {seconds:.1f} s ({rate:.2f} MB/s, {workers} "
        f"worker{'s' if workers > 1 else ''})")
    return manifest
