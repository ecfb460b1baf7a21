"""Prepared datasets: inputs of every kind tokenised once in parallel, shards atomic and resumable, rows cut at read
time through memory maps, bad input as one-line errors naming the file."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_jax import data
from llama_jax.data import DataError
from llama_jax.dataset import sources
from llama_jax.dataset.prepare import prepare_dataset
from llama_jax.dataset.shuffle import Bijection
from llama_jax.dataset.store import MANIFEST, TokenDataset, TokenRows, write_manifest, write_shard
from llama_jax.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus):
    """The corpus's texts as .txt, .jsonl (field "body"), .jsonl.gz, .jsonl.zst and .parquet files."""
    texts = [p.read_text() for p in sorted(corpus[0].iterdir(), key=lambda p: int(p.stem))]
    root = tmp_path_factory.mktemp("inputs")
    (root / "txt").mkdir()
    for i, t in enumerate(texts[:4]):
        (root / "txt" / f"{i}.txt").write_text(t)
    lines = "".join(json.dumps({"body": t}) + "\n" for t in texts[4:8])
    (root / "a.jsonl").write_text(lines)
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write(lines)
    import zstandard
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": texts[8:]}), root / "d.parquet", row_group_size=1)
    return root, texts


def _encode_all(tok_path, texts):
    tok = load_tokenizer(tok_path)
    return [tok.encode(t, bos=True, eos=True) for t in texts]


def _prepare(inputs_, tok, out, **kw):
    return prepare_dataset([str(p) for p in inputs_], tok, out, progress=False, log=lambda line: None, **kw)


def _documents(ds: TokenDataset) -> list[list[int]]:
    tokens = ds.read(0, ds.num_tokens)
    cuts = np.flatnonzero(tokens["doc_start"]).tolist() + [ds.num_tokens]
    return [tokens["tokens"][a:b].tolist() for a, b in zip(cuts, cuts[1:])]


def test_every_kind_of_input_becomes_the_same_documents(tmp_path, inputs, corpus):
    root, texts = inputs
    out = tmp_path / "ds"
    manifest = _prepare([root / "txt" / "*.txt", root / "a.jsonl", root / "b.jsonl.gz", root / "c.jsonl.zst",
                         root / "d.parquet"], corpus[1], out, text_field="body", workers=1)
    ds = TokenDataset(out)
    want = _encode_all(corpus[1], texts[:4] + texts[4:8] * 3 + texts[8:])
    assert _documents(ds) == want
    assert manifest["num_documents"] == len(want) and manifest["num_tokens"] == sum(map(len, want))
    assert manifest["dtype"] == "uint16" and len(manifest["tokenizer"]["md5"]) == 32
    assert [s["path"] for s in manifest["sources"]][-1].endswith("d.parquet")


def test_workers_and_unit_size_do_not_change_the_dataset(tmp_path, inputs, corpus):
    root, _ = inputs
    # Tiny units split a.jsonl into byte ranges that cut lines in the middle: each line is read exactly once.
    one = _prepare([root], corpus[1], tmp_path / "one", text_field="body", workers=1, unit_bytes=1000)
    two = _prepare([root], corpus[1], tmp_path / "two", text_field="body", workers=2, unit_bytes=1000)
    assert len(one["shards"]) > 10
    assert one["shards"] == two["shards"] and one["num_tokens"] == two["num_tokens"]
    assert _documents(TokenDataset(tmp_path / "one")) == _documents(TokenDataset(tmp_path / "two"))


def test_resume_keeps_finished_shards_and_redoes_the_rest(tmp_path, inputs, corpus):
    root, _ = inputs
    out = tmp_path / "ds"
    full = _prepare([root], corpus[1], out, text_field="body", workers=1, unit_bytes=1000)
    with pytest.raises(DataError, match="already exists; pass --resume"):
        _prepare([root], corpus[1], out, text_field="body", unit_bytes=1000)
    # As a killed run leaves it: no manifest, one shard without its record, another being written.
    (out / MANIFEST).unlink()
    (out / "shard-00003.json").unlink()
    (out / "shard-00005.tokens.tmp").write_bytes(b"partial")
    kept = (out / "shard-00000.json").stat().st_mtime_ns
    again = _prepare([root], corpus[1], out, text_field="body", workers=1, unit_bytes=1000, resume=True)
    assert again == full
    assert (out / "shard-00000.json").stat().st_mtime_ns == kept
    assert (out / "shard-00003.json").is_file() and not list(out.glob("*.tmp"))


def _dataset(tmp_path, docs, shard_sizes, mask=None):
    """A dataset written directly: `docs` token lists spread over shards holding shard_sizes documents each."""
    records, i = [], 0
    for s, n in enumerate(shard_sizes):
        part = docs[i:i + n]
        tokens = np.concatenate([np.asarray(d, np.uint16) for d in part])
        starts = np.cumsum([0] + [len(d) for d in part[:-1]])
        m = None if mask is None else mask[sum(map(len, docs[:i])):][:tokens.size]
        records.append(write_shard(tmp_path, f"shard-{s:05d}", tokens, starts, m))
        i += n
    write_manifest(tmp_path, records, {"md5": "x", "vocab_size": 100, "bos_id": 1, "eos_id": 2, "pad_id": 0},
                   np.uint16, [])
    return TokenDataset(tmp_path)


def test_rows_are_windows_of_the_stream_like_pack(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[1, *rng.integers(3, 100, rng.integers(0, 20)), 2] for _ in range(30)]
    stream = np.concatenate(docs)
    mask = rng.random(stream.size) < 0.8
    rows = TokenRows(_dataset(tmp_path, docs, [7, 13, 10], mask=mask.astype(np.uint8)), seq_len=8)
    assert len(rows) == -(-(stream.size - 1) // 8)
    got = rows.gather(np.arange(len(rows)))
    padded = np.r_[stream, np.zeros(len(rows) * 8 + 1 - stream.size, int)]
    starts = np.zeros(padded.size, bool)
    starts[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
    counts = np.r_[mask, np.zeros(padded.size - stream.size, bool)]
    for r in range(len(rows)):
        window = slice(r * 8, r * 8 + 9)
        np.testing.assert_array_equal(got["rows"][r], padded[window])
        np.testing.assert_array_equal(got["doc_start"][r], starts[window])
        # A target counts when it is real, allowed by the stored mask, and not a document's first token.
        np.testing.assert_array_equal(got["loss_mask"][r], (counts & ~starts)[window][1:])
    # Without a stored mask the rows equal `pack` of the same documents in the same order.
    packed = data.pack([np.asarray(d, np.int32) for d in docs], 8, bos_id=1, pad_id=0, seed=0)
    order = np.random.default_rng([0, 0x5EED]).permutation(len(docs))
    (tmp_path / "plain").mkdir()
    reordered = TokenRows(_dataset(tmp_path / "plain", [docs[i] for i in order], [30]), 8)
    whole = reordered.gather(np.arange(len(packed)))
    np.testing.assert_array_equal(whole["rows"], packed.rows)
    np.testing.assert_array_equal(whole["loss_mask"], packed.loss_mask)
    np.testing.assert_array_equal(whole["doc_start"], packed.doc_start)
    assert reordered.identity() != rows.identity()


def test_split_and_order_without_a_list_of_rows(tmp_path):
    docs = [[1, *range(3, 3 + n), 2] for n in range(1, 60)]
    rows = TokenRows(_dataset(tmp_path, docs, [59]), seq_len=16)
    train, held = data.split(rows, 0.1, seed=3)
    ids = lambda part: [tuple(r) for r in part.gather(np.arange(len(part)))["rows"]]  # noqa: E731
    assert len(train) + len(held) == len(rows) and len(held) == round(len(rows) * 0.1)
    assert sorted(ids(train) + ids(held)) == sorted(ids(rows))
    it = data.BatchIterator(train, batch_size=4, seed=1, document_mask=True)
    state = json.loads(json.dumps(it.state()))
    assert state["fingerprint"].startswith(rows.identity())
    batch = next(it).fields()
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    b = Bijection(10**15, seed=0)
    assert (b.inverse(b(np.arange(1000) * 10**12)) == np.arange(1000) * 10**12).all()


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"\xff\xfe not utf-8", "bad.txt: not UTF-8 text"),
    ("bad.jsonl", b'{"text": "fine"}\n\n{"text": 1}\n', 'bad.jsonl:3: expected an object with a string "text"'),
    ("bad.jsonl", b'{"text": "fine"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl.gz", b"not gzip at all", "bad.jsonl.gz: cannot read"),
    ("bad.parquet", b"PAR1 nope", "bad.parquet: not a readable Parquet file"),
])
def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path, corpus, name, content, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("some text\n")
    (tmp_path / "in" / name).write_bytes(content)
    proc = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--input", str(tmp_path / "in"),
                           "--tokenizer", str(corpus[1]), "--output", str(tmp_path / "out"), "--workers", "2"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out" / MANIFEST).exists() and not list((tmp_path / "out").glob("*.tmp"))


def test_truncated_shard_and_missing_inputs(tmp_path, inputs, corpus):
    out = tmp_path / "ds"
    _prepare([inputs[0] / "txt"], corpus[1], out)
    with open(out / "shard-00000.tokens", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="shard-00000.tokens: 10 bytes, the manifest says"):
        TokenDataset(out)
    with pytest.raises(DataError, match="matches no file"):
        sources.expand_inputs([str(tmp_path / "*.nothing")])
    with pytest.raises(DataError, match="no such file or folder"):
        sources.expand_inputs([str(tmp_path / "missing.txt")])


def test_a_killed_prepare_data_leaves_only_whole_shards_and_resumes(tmp_path, inputs, corpus):
    import signal
    import time

    (tmp_path / "in").mkdir()
    lines = (inputs[0] / "a.jsonl").read_text().replace('"body"', '"text"')
    for i in range(6):  # ~1 MB units: six shards at least
        (tmp_path / "in" / f"{i}.jsonl").write_text(lines * max(1, int(1.2e6 // len(lines))))
    args = [sys.executable, str(ROOT / "prepare_data.py"), "--input", str(tmp_path / "in"), "--tokenizer",
            str(corpus[1]), "--output", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    while proc.poll() is None and not list((tmp_path / "out").glob("shard-*.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "out" / MANIFEST).exists()  # killed mid-run
    for record in (tmp_path / "out").glob("shard-*.json"):  # every shard with a record is whole
        counts = json.loads(record.read_text())
        assert (tmp_path / "out" / f"{record.stem}.tokens").stat().st_size == 2 * counts["tokens"]
    assert subprocess.run(args + ["--resume"], env=env, capture_output=True).returncode == 0
    clean = _prepare([tmp_path / "in"], corpus[1], tmp_path / "clean", workers=1)
    assert _documents(TokenDataset(tmp_path / "out")) == _documents(TokenDataset(tmp_path / "clean"))
    assert len(clean["shards"]) >= 6
