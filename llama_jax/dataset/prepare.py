"""Tokenise a corpus once, in parallel, into a prepared dataset (store.py's format); resumable and atomic.

Each unit of work (sources.py) becomes one shard, named by its index in the deterministic plan. A worker writes a
shard's files under temporary names, renames them, and writes the shard's .json record last; the manifest is
written only when every shard exists. So a killed run leaves nothing half-written under a final name, and
`--resume` keeps every shard whose record matches its unit, tokenizer and reading (chat records or documents).

With `chat`, each .jsonl line is a chat record, encoded as chat_data encodes it for training in memory, and each
shard gets a .mask file: 1 on the tokens the loss covers (the assistant's), 0 elsewhere.
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

from llama_jax.chat_data import encode_record, parse_record
from llama_jax.data import DataError
from llama_jax.dataset import sources
from llama_jax.dataset.store import DOC_DTYPE, MASK_DTYPE, file_md5, token_dtype, write_manifest, write_shard

_WORKER: dict[str, Any] = {}  # the tokenizer and settings of this worker process


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _reading(text_field: str, chat: bool) -> dict[str, Any]:
    """What a shard's record says of how its input was read: a resumed run keeps only shards read the same way."""
    return {"chat": True} if chat else {"chat": False, "text_field": text_field}


def _init_worker(tokenizer_path: str, output: str, text_field: str, md5: str, chat: bool = False) -> None:
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    _WORKER.update(tok=tok, output=Path(output), text_field=text_field, md5=md5, dtype=token_dtype(tok.vocab_size),
                   chat=chat)


def _encoded(unit: sources.Unit) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(ids, loss mask or None) of each document of a unit: a chat record in the chat format, text as bos ... eos."""
    tok = _WORKER["tok"]
    if _WORKER["chat"]:
        for line, where in sources.jsonl_lines(unit):
            yield encode_record(tok, parse_record(line, where), where)
    else:
        for text in sources.documents(unit, _WORKER["text_field"]):
            yield np.asarray(tok.encode(text, bos=True, eos=True), _WORKER["dtype"]), None


def _tokenize_unit(index: int, unit: sources.Unit) -> dict[str, Any]:
    """Tokenises one unit into shard `index`; returns its record."""
    dtype, chat = _WORKER["dtype"], _WORKER["chat"]
    pieces, masks, starts, count = [], [], [], 0
    for ids, mask in _encoded(unit):
        starts.append(count)
        count += ids.size
        pieces.append(ids.astype(dtype, copy=False))
        masks.append(mask)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    mask = (np.concatenate(masks) if masks else np.zeros(0, bool)) if chat else None
    return write_shard(_WORKER["output"], shard_name(index), tokens, np.asarray(starts, DOC_DTYPE), mask,
                       info={"unit": unit.describe(), "tokenizer_md5": _WORKER["md5"],
                             **_reading(_WORKER["text_field"], chat)})


def _finished(output: Path, index: int, unit: sources.Unit, md5: str, dtype: np.dtype,
              reading: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a shard a previous run completed for this same unit, tokenizer and reading, else None."""
    name = shard_name(index)
    try:
        record = json.loads((output / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("unit") != unit.describe() or record.get("tokenizer_md5") != md5:
        return None
    if _reading(record.get("text_field", "text"), record.get("chat", False)) != reading:
        return None
    if record["tokens"]:
        for suffix, size in (("tokens", record["tokens"] * dtype.itemsize),
                             ("docs", record["documents"] * DOC_DTYPE.itemsize),
                             *((("mask", record["tokens"] * MASK_DTYPE.itemsize),) if record["loss_mask"] else ())):
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
                    resume: bool = False, text_field: str = "text", chat: bool = False, progress: bool = True,
                    unit_bytes: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenises `inputs` into the dataset folder `output`; returns its manifest. chat: the inputs are .jsonl chat
    records, stored with their loss masks. unit_bytes: input bytes per shard (default: sources.unit_bytes_for the
    inputs)."""
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    md5, dtype = file_md5(tokenizer_path), token_dtype(tok.vocab_size)
    files = sources.expand_inputs(inputs)
    if chat:
        for f in files:
            if sources.kind_of(f) != "jsonl":
                raise DataError(f"{f}: --chat reads .jsonl chat records (optionally .gz or .zst), not text or Parquet")
    units = sources.plan_units(files, unit_bytes)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not resume:
        raise DataError(f"{output}: already exists; pass --resume to continue it, or choose a new --output")
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.tmp"):  # what a killed run was writing
        stale.unlink()

    reading = _reading(text_field, chat)
    records = {i: r for i, u in enumerate(units) if (r := _finished(output, i, u, md5, dtype, reading)) is not None}
    todo = [(i, u) for i, u in enumerate(units) if i not in records]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    total = sum(u.size for _, u in todo)
    if records:
        log(f"resuming: {len(records)} of {len(units)} shards already done")
    began = time.perf_counter()
    with _progress(progress, total) as advance:
        records.update(_run_units(todo, workers, (str(tokenizer_path), str(output), text_field, md5, chat), advance))
    seconds = time.perf_counter() - began
    info = {"md5": md5, "file": Path(tokenizer_path).name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    shards = [records[i] for i in range(len(units))]
    if not sum(s["tokens"] for s in shards):
        raise DataError(f"{', '.join(inputs)}: no {'chat records' if chat else 'non-empty documents'}")
    manifest = write_manifest(output, shards, info, dtype, [{"path": str(f), "bytes": f.stat().st_size} for f in files])
    rate = total / 1e6 / max(seconds, 1e-9)
    in_loss = f", {manifest['num_loss_tokens'] / manifest['num_tokens']:.1%} in the loss" if chat else ""
    log(f"{output}: {manifest['num_documents']:,} {'chat records' if chat else 'documents'}, "
        f"{manifest['num_tokens']:,} tokens ({dtype.name}){in_loss} in {len(units)} shards; {total / 1e6:.1f} MB "
        f"tokenised in {seconds:.1f} s ({rate:.2f} MB/s, {workers} worker{'s' if workers > 1 else ''})")
    return manifest
