"""The prepared dataset on disk, and reading it through memory maps.

    DATASET_DIR/
      manifest.json              format, version, tokenizer (md5, vocab, special ids), counts, sources, shards
      shard-00000.tokens         the tokens of whole documents, one flat uint16 (vocab <= 65536) or uint32 array
      shard-00000.docs           int64 offsets in that array where each document starts
      shard-00000.mask           optional uint8 per token: 0 = never a training target (e.g. a chat prompt)
      shard-00000.json           the shard's counts and the input it came from: written last, so resume trusts it

No sequence length is baked in: rows are cut when read. Every read is a slice of a memory map, so the pages are
the page cache's, and a process's own (anonymous) memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.data import DataError

MANIFEST = "manifest.json"
FORMAT = "llama_jax.tokens"
VERSION = 1
DOC_DTYPE = np.dtype(np.int64)
MASK_DTYPE = np.dtype(np.uint8)


def is_prepared(path: str | Path) -> bool:
    """A folder with a manifest.json is a prepared dataset; anything else is text to tokenise."""
    return (Path(path) / MANIFEST).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def file_md5(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_atomic(path: Path, data: bytes | np.ndarray) -> None:
    """Writes under a temporary name and renames: a killed writer leaves no partial file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes())
    os.replace(tmp, path)


def write_shard(root: Path, name: str, tokens: np.ndarray, doc_starts: np.ndarray, mask: np.ndarray | None = None,
                info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes one shard's files, its .json record last; returns that record. Its loss_tokens counts the targets
    the loss will see: tokens the mask allows that do not start a document."""
    starts = np.asarray(doc_starts, DOC_DTYPE)
    allowed = tokens.size if mask is None else int(np.count_nonzero(mask))
    at_starts = starts.size if mask is None else int(np.count_nonzero(np.asarray(mask)[starts]))
    record = {"name": name, "tokens": int(tokens.size), "documents": int(starts.size),
              "loss_mask": mask is not None, "loss_tokens": int(allowed - at_starts), **(info or {})}
    if tokens.size:
        write_atomic(root / f"{name}.tokens", tokens)
        write_atomic(root / f"{name}.docs", starts)
        if mask is not None:
            write_atomic(root / f"{name}.mask", mask.astype(MASK_DTYPE))
    write_atomic(root / f"{name}.json", (json.dumps(record) + "\n").encode())
    return record


def write_manifest(root: Path, shards: list[dict[str, Any]], tokenizer: dict[str, Any], dtype: np.dtype,
                   sources: list[dict[str, Any]]) -> dict[str, Any]:
    manifest = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer, "dtype": np.dtype(dtype).name,
                "num_tokens": sum(s["tokens"] for s in shards), "num_documents": sum(s["documents"] for s in shards),
                "loss_mask": any(s["loss_mask"] for s in shards),
                "num_loss_tokens": (sum(s["loss_tokens"] for s in shards)
                                    if all("loss_tokens" in s for s in shards) else None),
                "sources": sources,
                "shards": [{k: s[k] for k in ("name", "tokens", "documents", "loss_mask")} for s in shards]}
    write_atomic(root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


class TokenDataset:
    """A prepared dataset opened read-only: tokens, document starts and loss mask of any global token range."""

    def __init__(self, root: str | Path, tokenizer_md5: str | None = None):
        self.root = Path(root)
        path = self.root / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
            self.dtype = np.dtype(self.manifest["dtype"])
            shards = [s for s in self.manifest["shards"] if s["tokens"]]
            self.tokenizer = self.manifest["tokenizer"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a readable dataset manifest ({e})") from None
        if (self.manifest.get("format"), self.manifest.get("version")) != (FORMAT, VERSION):
            raise DataError(f"{path}: format {self.manifest.get('format')!r} version "
                            f"{self.manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
        if tokenizer_md5 is not None and self.tokenizer.get("md5") != tokenizer_md5:
            raise DataError(f"{path}: prepared with another tokenizer (md5 {self.tokenizer.get('md5')}, the run's is "
                            f"{tokenizer_md5}); prepare the data again with this --tokenizer")
        self.tokens = [self._map(s, "tokens", self.dtype, s["tokens"]) for s in shards]
        self.docs = [self._map(s, "docs", DOC_DTYPE, s["documents"]) for s in shards]
        self.masks = [self._map(s, "mask", MASK_DTYPE, s["tokens"]) if s.get("loss_mask") else None for s in shards]
        self.bounds = np.cumsum([0] + [s["tokens"] for s in shards])
        self.num_tokens = int(self.bounds[-1])
        self.num_documents = int(self.manifest["num_documents"])
        # Targets the loss counts (a manifest without the count and without masks: every token but documents' first)
        counted = self.manifest.get("num_loss_tokens")
        self.num_loss_tokens = (int(counted) if counted is not None else
                                None if self.manifest.get("loss_mask") else self.num_tokens - self.num_documents)

    def _map(self, shard: dict[str, Any], kind: str, dtype: np.dtype, count: int) -> np.ndarray:
        path = self.root / f"{shard['name']}.{kind}"
        size = path.stat().st_size if path.is_file() else None
        if size != count * dtype.itemsize:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(f"{path}: {found}, the manifest says {count * dtype.itemsize} (truncated or replaced: "
                            f"prepare the data again)")
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def identity(self) -> str:
        """What a checkpoint records of the data: the manifest's digest (counts, tokenizer, sources, shards)."""
        return hashlib.sha256((self.root / MANIFEST).read_bytes()).hexdigest()[:16]

    def _pieces(self, start: int, stop: int):
        """(shard, local start, local stop, global offset) of each shard overlapping [start, stop)."""
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        for s in range(max(first, 0), len(self.tokens)):
            lo, hi = int(self.bounds[s]), int(self.bounds[s + 1])
            if lo >= stop:
                break
            yield s, max(start, lo) - lo, min(stop, hi) - lo, lo

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """tokens (int32), doc_start and counts (bool: 1 where the stored mask allows a target) of [start, stop)."""
        tokens, starts, counts = [], [], []
        for s, lo, hi, base in self._pieces(start, stop):
            tokens.append(np.asarray(self.tokens[s][lo:hi], np.int32))
            docs = self.docs[s]
            first, last = np.searchsorted(docs, lo), np.searchsorted(docs, hi)
            flags = np.zeros(hi - lo, bool)
            flags[np.asarray(docs[first:last]) - lo] = True
            starts.append(flags)
            mask = self.masks[s]
            counts.append(np.ones(hi - lo, bool) if mask is None else np.asarray(mask[lo:hi]) != 0)
        join = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        return {"tokens": join(tokens, np.int32), "doc_start": join(starts, bool), "counts": join(counts, bool)}


class TokenRows:
    """Rows of seq_len + 1 tokens cut from a dataset's token stream at read time, overlapping by one (as `pack`).

    A target counts unless it is padding, a document's first token (its bos cannot be predicted) or masked out
    by the dataset's stored loss mask.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int):
        if seq_len < 1:
            raise DataError(f"--seq-len={seq_len}: must be >= 1")
        if dataset.num_tokens < 2:
            raise DataError(f"{dataset.root}: the dataset has fewer than 2 tokens")
        self.dataset, self.seq_len = dataset, seq_len
        self.pad_id = int(dataset.tokenizer.get("pad_id", 0))

    def __len__(self) -> int:
        return -(-(self.dataset.num_tokens - 1) // self.seq_len)

    def identity(self) -> str:
        return self.dataset.identity()

    def loss_share(self) -> float | None:
        """The share of the rows' token slots that the loss counts (as `Packed` counts it), or None if unknown."""
        counted = self.dataset.num_loss_tokens
        return None if counted is None else counted / (len(self) * self.seq_len)

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """rows int32 [*ids.shape, seq_len + 1], loss_mask bool [..., seq_len], doc_start bool [..., seq_len + 1]."""
        width = self.seq_len + 1
        flat = np.asarray(ids).reshape(-1)
        rows = np.full((flat.size, width), self.pad_id, np.int32)
        doc_start = np.zeros((flat.size, width), bool)
        counts = np.zeros((flat.size, width), bool)
        for i, r in enumerate(flat):
            start = int(r) * self.seq_len
            got = self.dataset.read(start, min(start + width, self.dataset.num_tokens))
            n = got["tokens"].size
            rows[i, :n], doc_start[i, :n], counts[i, :n] = got["tokens"], got["doc_start"], got["counts"]
        loss_mask = counts[:, 1:] & ~doc_start[:, 1:]
        shape = np.shape(ids)
        return {"rows": rows.reshape(*shape, width), "loss_mask": loss_mask.reshape(*shape, width - 1),
                "doc_start": doc_start.reshape(*shape, width)}
