"""Text files -> packed token sequences -> deterministic, resumable, per-process batches.

Pure numpy on purpose: rows come from a source that can gather any row ids (`Packed`, text tokenised into memory
for small corpora, or `dataset.store.TokenRows`, a prepared dataset read through memory maps), so the whole loader
is "row r of epoch e is bijection(seed, e)(r)". That makes its state a single integer (samples consumed), gives
the same global batch whatever the number of processes, and lets each process build only the rows its own
devices hold. The bijection (dataset.shuffle) is computed per row: no permutation of every row is materialised.

Packing: documents are `bos tokens eos`, concatenated in a seeded order and cut into rows of seq_len + 1 tokens
that overlap by one, so every token is a target exactly once. A target is masked out of the loss when it is
padding (the tail of the last row) or a bos (the start of the next document cannot be predicted). With document
masking, each row also gives segment ids (attention stays inside a document) and positions that restart at 0 where
a document starts, and at the row's first token (docs/design.md says why).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from llama_jax.dataset.shuffle import Bijection

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
    from llama_jax.dataset import sources  # it imports this module

    docs: list[str] = []
    for file in list_text_files(path):
        kind = "jsonl" if file.suffix == ".jsonl" else "text"
        docs.extend(sources.documents(sources.Unit(kind, (str(file),), 0, file.stat().st_size)))
    if not docs:
        raise DataError(f"{path}: no non-empty documents")
    return docs


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
    """rows: int32 [N, seq_len + 1] token windows; loss_mask: bool [N, seq_len], True where rows[:, 1:] counts;
    doc_start: bool [N, seq_len + 1], True where a document starts (None: unknown, no document masking)."""

    rows: np.ndarray
    loss_mask: np.ndarray
    doc_start: np.ndarray | None = None

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

    @functools.cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(self.rows.tobytes())
        digest.update(self.loss_mask.tobytes())
        return digest.hexdigest()[:16]

    def fingerprint(self) -> str:
        """A digest of the rows: an in-memory corpus is small, so hashing it once per run is cheap."""
        return self._fingerprint

    identity = fingerprint

    def take(self, index: np.ndarray) -> Packed:
        starts = None if self.doc_start is None else self.doc_start[index]
        return Packed(self.rows[index], self.loss_mask[index], starts)

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        out = {"rows": self.rows[ids], "loss_mask": self.loss_mask[ids]}
        if self.doc_start is not None:
            out["doc_start"] = self.doc_start[ids]
        return out


class Rows(Protocol):
    """What batches read rows from: `Packed`, `dataset.store.TokenRows`, or a `Subset` of either."""

    seq_len: int

    def __len__(self) -> int: ...

    def identity(self) -> str: ...

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]: ...


class Subset:
    """Rows order.inverse(start .. start + count - 1) of `base`: one side of a split, without a list of its rows."""

    def __init__(self, base: Rows, order: Bijection, start: int, count: int):
        self.base, self.order, self.start, self.count = base, order, start, count
        self.seq_len = base.seq_len

    def __len__(self) -> int:
        return self.count

    def identity(self) -> str:
        return f"{self.base.identity()}:{self.start}+{self.count}"

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.base.gather(self.order.inverse(self.start + np.asarray(ids)))


def segments(doc_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, positions), int32 [..., seq_len], of the inputs of rows whose document starts are doc_start
    [..., seq_len + 1]: a new segment and position 0 at each document start, and position 0 at the row's start."""
    starts = doc_start[..., :-1]
    index = np.arange(starts.shape[-1], dtype=np.int32)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return np.cumsum(starts, axis=-1, dtype=np.int32), (index - last_start).astype(np.int32)


def tokenize(docs: Sequence[str], encode: Callable[[str], list[int]]) -> list[np.ndarray]:
    """`encode` maps a document to its ids including bos/eos, e.g. `lambda t: tok.encode(t, bos=True, eos=True)`."""
    return [np.asarray(encode(doc), dtype=np.int32) for doc in docs]


def pack(docs: Sequence[np.ndarray], seq_len: int, *, bos_id: int, pad_id: int, seed: int = 0,
         masks: Sequence[np.ndarray] | None = None) -> Packed:
    """Concatenates the documents in a seeded order and cuts windows of seq_len + 1 tokens, overlapping by one.
    masks: per document, which of its tokens are trained on (chat: the assistant's); default all but bos."""
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
    real[: stream.size] = True if masks is None else np.concatenate([masks[i] for i in order])
    # Row r is padded[r*T : r*T + T + 1]: a strided view, no copy until np.ascontiguousarray.
    windows = np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::seq_len][:n_rows]
    real_windows = np.lib.stride_tricks.sliding_window_view(real, seq_len + 1)[::seq_len][:n_rows]
    rows = np.ascontiguousarray(windows)
    loss_mask = real_windows[:, 1:] & (rows[:, 1:] != bos_id)
    starts = np.zeros(padded.size, bool)
    starts[np.cumsum([0] + [docs[i].size for i in order[:-1]])] = True
    doc_start = np.lib.stride_tricks.sliding_window_view(starts, seq_len + 1)[::seq_len][:n_rows]
    return Packed(rows, np.ascontiguousarray(loss_mask), np.ascontiguousarray(doc_start))


def loss_share(rows: Rows) -> float | None:
    """The share of the tokens that the loss counts (chat data: the assistant's): of an in-memory corpus's rows,
    or of a prepared dataset's as its manifest counts them; None when the manifest has no count."""
    base = getattr(rows, "base", rows)
    if isinstance(base, Packed):
        return base.num_target_tokens / base.loss_mask.size
    share = getattr(base, "loss_share", None)
    return share() if share is not None else None


def split(packed: Rows, eval_fraction: float, seed: int = 0) -> tuple[Rows, Rows | None]:
    """(train, held-out): a seeded random `eval_fraction` of the rows is held out (at least one row).

    Row r is held out when a seeded bijection maps it below the held-out count. A `Packed` corpus is split into
    two `Packed` (it is in memory anyway); any other source into two `Subset` views.
    """
    if not 0 <= eval_fraction < 1:
        raise DataError(f"--eval-fraction={eval_fraction}: expected a number in [0, 1)")
    if eval_fraction == 0:
        return packed, None
    n = len(packed)
    n_eval = max(1, int(round(n * eval_fraction)))
    if n_eval >= n:
        raise DataError(f"the corpus packs into only {n} sequence(s); too few to hold out {eval_fraction:.0%} for "
                        f"evaluation (use a shorter --seq-len, more text, or --eval-fraction 0)")
    order = Bijection(n, seed, EVAL_STREAM)
    if isinstance(packed, Packed):
        rank = order(np.arange(n))
        return packed.take(np.flatnonzero(rank >= n_eval)), packed.take(np.flatnonzero(rank < n_eval))
    return Subset(packed, order, n_eval, n - n_eval), Subset(packed, order, 0, n_eval)


# --- batching --------------------------------------------------------------------------------------------------

EVAL_STREAM = 1 << 62  # the bijection that holds rows out; epochs use streams 0, 1, 2, ...


def sample_rows(num_rows: int, start: int, count: int, seed: int) -> np.ndarray:
    """Row ids of samples start..start+count-1 of the endless stream "each epoch a fresh seeded permutation"."""
    k = np.arange(start, start + count)
    out = np.empty(count, np.int64)
    for epoch in np.unique(k // num_rows):
        sel = (k // num_rows) == epoch
        out[sel] = Bijection(num_rows, seed, int(epoch))(k[sel] % num_rows)
    return out


@dataclasses.dataclass(frozen=True)
class Batch:
    """A global batch described by row ids [grad_accum, micro_batch]; -1 is an all-masked padding row.

    Nothing is materialised until `fields(index)` is asked for a slice, which is how each process builds only
    the part of the batch that its own devices hold.
    """

    packed: Rows
    row_ids: np.ndarray
    document_mask: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.row_ids.shape, self.packed.seq_len)

    @property
    def names(self) -> tuple[str, ...]:
        """The fields, in the order the train and eval steps take them."""
        return FIELDS + (SEGMENT_FIELDS if self.document_mask else ())

    def fields(self, index: tuple = ()) -> dict[str, np.ndarray]:
        """inputs / targets int32 and loss_mask bool, each [accum, micro, seq][index]; with document_mask also
        segment_ids and positions (int32)."""
        index = tuple(index) + (slice(None),) * (3 - len(tuple(index)))
        ids = self.row_ids[index[0], index[1]]
        got = self.packed.gather(np.maximum(ids, 0))
        rows, mask = got["rows"], got["loss_mask"] & (ids >= 0)[..., None]
        seq = index[2]
        out = {"inputs": rows[..., :-1][..., seq], "targets": rows[..., 1:][..., seq], "loss_mask": mask[..., seq]}
        if self.document_mask:
            if "doc_start" not in got:
                raise DataError("document masking needs document boundaries, which these rows do not have")
            segment_ids, positions = segments(got["doc_start"])
            out.update(segment_ids=segment_ids[..., seq], positions=positions[..., seq])
        return out


FIELDS = ("inputs", "targets", "loss_mask")
SEGMENT_FIELDS = ("segment_ids", "positions")


class BatchIterator:
    """Endless training batches; `state()` / `restore()` make a resumed run continue with the next batch."""

    def __init__(self, packed: Rows, batch_size: int, grad_accum: int = 1, seed: int = 0, samples: int = 0,
                 document_mask: bool = False):
        if batch_size % grad_accum:
            raise DataError(f"--batch-size={batch_size} is not divisible by --grad-accum={grad_accum}")
        self.packed, self.batch_size, self.grad_accum, self.seed = packed, batch_size, grad_accum, seed
        self.samples, self.document_mask = samples, document_mask

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        rows = sample_rows(len(self.packed), self.samples, self.batch_size, self.seed)
        self.samples += self.batch_size
        return Batch(self.packed, rows.reshape(self.grad_accum, self.batch_size // self.grad_accum),
                     self.document_mask)

    def state(self) -> dict[str, Any]:
        """The position (samples) and what identifies the data: a prepared dataset's manifest digest, or a digest
        of an in-memory corpus's rows."""
        return {"samples": self.samples, "seed": self.seed, "num_rows": len(self.packed),
                "seq_len": self.packed.seq_len, "fingerprint": self.packed.identity()}

    def restore(self, state: dict[str, Any]) -> None:
        mine = self.state()
        for key in ("seed", "num_rows", "seq_len", "fingerprint"):
            if state.get(key) != mine[key]:
                raise DataError(f"the checkpoint's data {key} is {state.get(key)!r} but the data now gives "
                                f"{mine[key]!r}: resume with the same --data, --tokenizer, --seq-len and --seed")
        self.samples = int(state["samples"])


def eval_batches(packed: Rows, micro_batch: int, max_batches: int = 0, document_mask: bool = False) -> list[Batch]:
    """The held-out rows in order, in [1, micro_batch] batches; the last one is padded with masked rows."""
    n = len(packed) if max_batches <= 0 else min(len(packed), max_batches * micro_batch)
    ids = np.full(-(-n // micro_batch) * micro_batch, -1, np.int64)
    ids[:n] = np.arange(n)
    return [Batch(packed, chunk.reshape(1, micro_batch), document_mask) for chunk in ids.reshape(-1, micro_batch)]
