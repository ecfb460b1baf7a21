"""Text files -> packed token sequences -> deterministic, resumable, per-process batches.

Pure numpy on purpose: the corpus is tokenised into memory once, so the whole loader is "row r of epoch e is
permutation(seed, e)[r]". That makes its state a single integer (samples consumed), gives the same global batch
whatever the number of processes, and lets each process build only the rows its own devices hold. (grain
installs, but its strengths - record-file sources, worker processes - do not apply to an in-memory array.)

Packing: documents are `bos tokens eos`, concatenated in a seeded order and cut into rows of seq_len + 1 tokens
that overlap by one, so every token is a target exactly once. A target is masked out of the loss when it is
padding (the tail of the last row) or a bos (the start of the next document cannot be predicted).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


class DataError(ValueError):
    """Unusable training data; the message names the path or the setting."""


# --- reading ---------------------------------------------------------------------------------------------------

def list_text_files(path: str | Path) -> list[Path]:
    """`path` itself, or every text file (.txt .md .rst .text .jsonl) under the folder, in sorted order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder (expected training text)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
    if not files:
        raise DataError(f"{path}: folder holds no {'/'.join(TEXT_SUFFIXES)}/.jsonl files")
    return files


def read_documents(path: str | Path) -> list[str]:
    """One document per text file; a .jsonl file gives one document per line's "text" field."""
    docs: list[str] = []
    for file in list_text_files(path):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if file.suffix == ".jsonl":
            docs.extend(_jsonl_texts(file, text))
        elif text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"{path}: no non-empty documents")
    return docs


def _jsonl_texts(file: Path, text: str) -> Iterable[str]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{file}:{n}: expected an object with a string "text" field')
        if record["text"].strip():
            yield record["text"]


def pydoc_topics() -> dict[str, str]:
    """The reference-manual topics that ship with every CPython (`pydoc_data/topics.py`): the demo corpus."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def write_pydoc_topics(out_dir: str | Path) -> list[Path]:
    """Writes one .txt file per pydoc topic, so the demo corpus is an ordinary folder of text."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in pydoc_topics().items():
        path = out_dir / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


# --- packing ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Packed:
    """rows: int32 [N, seq_len + 1] token windows; loss_mask: bool [N, seq_len], True where rows[:, 1:] counts."""

    rows: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self):
        n, width = self.rows.shape
        if self.loss_mask.shape != (n, width - 1):
            raise DataError(f"loss_mask {self.loss_mask.shape} does not match rows {self.rows.shape}")

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1] - 1

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.rows.tobytes())
        digest.update(self.loss_mask.tobytes())
        return digest.hexdigest()[:16]

    def take(self, index: np.ndarray) -> Packed:
        return Packed(self.rows[index], self.loss_mask[index])


def tokenize(docs: Sequence[str], encode: Callable[[str], list[int]]) -> list[np.ndarray]:
    """`encode` maps a document to its ids including bos/eos, e.g. `lambda t: tok.encode(t, bos=True, eos=True)`."""
    return [np.asarray(encode(doc), dtype=np.int32) for doc in docs]


def pack(docs: Sequence[np.ndarray], seq_len: int, *, bos_id: int, pad_id: int, seed: int = 0) -> Packed:
    """Concatenates the documents in a seeded order and cuts windows of seq_len + 1 tokens, overlapping by one."""
    if seq_len < 1:
        raise DataError(f"--seq-len={seq_len}: must be >= 1")
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(docs))
    stream = np.concatenate([docs[i] for i in order]) if len(docs) else np.zeros(0, np.int32)
    if stream.size < 2:
        raise DataError("the corpus has fewer than 2 tokens")
    n_rows = -(-(stream.size - 1) // seq_len)
    padded = np.full(n_rows * seq_len + 1, pad_id, np.int32)
    padded[: stream.size] = stream
    real = np.zeros(padded.size, bool)
    real[: stream.size] = True
    # Row r is padded[r*T : r*T + T + 1]: a strided view, no copy until np.ascontiguousarray.
    windows = np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::seq_len][:n_rows]
    real_windows = np.lib.stride_tricks.sliding_window_view(real, seq_len + 1)[::seq_len][:n_rows]
    rows = np.ascontiguousarray(windows)
    loss_mask = real_windows[:, 1:] & (rows[:, 1:] != bos_id)
    return Packed(rows, np.ascontiguousarray(loss_mask))


def split(packed: Packed, eval_fraction: float, seed: int = 0) -> tuple[Packed, Packed | None]:
    """(train, held-out): a seeded random `eval_fraction` of the rows is held out (at least one row)."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"--eval-fraction={eval_fraction}: expected a number in [0, 1)")
    if eval_fraction == 0:
        return packed, None
    n = len(packed)
    n_eval = max(1, int(round(n * eval_fraction)))
    if n_eval >= n:
        raise DataError(f"the corpus packs into only {n} sequence(s); too few to hold out {eval_fraction:.0%} for "
                        f"evaluation (use a shorter --seq-len, more text, or --eval-fraction 0)")
    order = np.random.default_rng([seed, 0xE7A1]).permutation(n)
    return packed.take(np.sort(order[n_eval:])), packed.take(np.sort(order[:n_eval]))


# --- batching --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def sample_rows(num_rows: int, start: int, count: int, seed: int) -> np.ndarray:
    """Row ids of samples start..start+count-1 of the endless stream "each epoch a fresh seeded permutation"."""
    k = np.arange(start, start + count)
    out = np.empty(count, np.int64)
    for epoch in np.unique(k // num_rows):
        sel = (k // num_rows) == epoch
        out[sel] = _epoch_order(num_rows, seed, int(epoch))[k[sel] % num_rows]
    return out


@dataclasses.dataclass(frozen=True)
class Batch:
    """A global batch described by row ids [grad_accum, micro_batch]; -1 is an all-masked padding row.

    Nothing is materialised until `fields(index)` is asked for a slice, which is how each process builds only
    the part of the batch that its own devices hold.
    """

    packed: Packed
    row_ids: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.row_ids.shape, self.packed.seq_len)

    def fields(self, index: tuple = ()) -> dict[str, np.ndarray]:
        """inputs / targets int32 and loss_mask bool, each [accum, micro, seq][index]."""
        index = tuple(index) + (slice(None),) * (3 - len(tuple(index)))
        ids = self.row_ids[index[0], index[1]]
        safe = np.maximum(ids, 0)
        rows = self.packed.rows[safe]
        mask = self.packed.loss_mask[safe] & (ids >= 0)[..., None]
        seq = index[2]
        return {"inputs": rows[..., :-1][..., seq], "targets": rows[..., 1:][..., seq], "loss_mask": mask[..., seq]}


class BatchIterator:
    """Endless training batches; `state()` / `restore()` make a resumed run continue with the next batch."""

    def __init__(self, packed: Packed, batch_size: int, grad_accum: int = 1, seed: int = 0, samples: int = 0):
        if batch_size % grad_accum:
            raise DataError(f"--batch-size={batch_size} is not divisible by --grad-accum={grad_accum}")
        self.packed, self.batch_size, self.grad_accum, self.seed = packed, batch_size, grad_accum, seed
        self.samples = samples

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        rows = sample_rows(len(self.packed), self.samples, self.batch_size, self.seed)
        self.samples += self.batch_size
        return Batch(self.packed, rows.reshape(self.grad_accum, self.batch_size // self.grad_accum))

    def state(self) -> dict[str, Any]:
        return {"samples": self.samples, "seed": self.seed, "num_rows": len(self.packed),
                "seq_len": self.packed.seq_len, "fingerprint": self.packed.fingerprint()}

    def restore(self, state: dict[str, Any]) -> None:
        mine = self.state()
        for key in ("seed", "num_rows", "seq_len", "fingerprint"):
            if state.get(key) != mine[key]:
                raise DataError(f"the checkpoint's data {key} is {state.get(key)!r} but the data now gives "
                                f"{mine[key]!r}: resume with the same --data, --tokenizer, --seq-len and --seed")
        self.samples = int(state["samples"])


def eval_batches(packed: Packed, micro_batch: int, max_batches: int = 0) -> list[Batch]:
    """The held-out rows in order, in [1, micro_batch] batches; the last one is padded with masked rows."""
    n = len(packed) if max_batches <= 0 else min(len(packed), max_batches * micro_batch)
    ids = np.full(-(-n // micro_batch) * micro_batch, -1, np.int64)
    ids[:n] = np.arange(n)
    return [Batch(packed, chunk.reshape(1, micro_batch)) for chunk in ids.reshape(-1, micro_batch)]
