"""Chat fine-tuning data through the training loader: each record's loss mask covers its assistant tokens only,
as the chat encoder (itself checked against Meta's layouts in test_chat.py) marks them; bad records name their line.
A chat set prepared on disk (prepare_data.py --chat) holds the same ids and masks and trains the same way."""

import json
from pathlib import Path

import numpy as np
import pytest

from llama_jax import train as T
from llama_jax.chat import encode_training_dialog
from llama_jax.data import DataError
from llama_jax.tokenizer import load_tokenizer

LLAMA3 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama3" / "tokenizer.model"
pytestmark = pytest.mark.skipif(not LLAMA3.is_file(), reason=f"real Llama 3 tokenizer not found at {LLAMA3}")

RECORDS = [
    {"messages": [{"role": "system", "content": "Answer in one line."},
                  {"role": "user", "content": "What does the with statement do?"},
                  {"role": "assistant", "content": "It runs a block inside a context manager."}]},
    {"prompt": "What is 2+2?", "completion": "4"},
    {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
                  {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "11, of course."}]},
]


def _load(tmp_path, records):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tc = T.TrainConfig(run_dir=str(tmp_path / "run"), data=str(tmp_path / "chat.jsonl"), tokenizer=str(LLAMA3),
                       seq_len=16)
    return T.load_data(tc, LLAMA3)


def test_loss_mask_covers_each_records_assistant_tokens(tmp_path):
    train, held_out = _load(tmp_path, RECORDS)
    rows = [part.gather(np.arange(len(part))) for part in (train, held_out) if part is not None]
    all_rows = np.concatenate([r["rows"] for r in rows])
    all_mask = np.concatenate([r["loss_mask"] for r in rows])
    tok = load_tokenizer(LLAMA3)
    dialogs = [r["messages"] if "messages" in r else [{"role": "user", "content": r["prompt"]},
                                                      {"role": "assistant", "content": r["completion"]}]
               for r in RECORDS]
    expected_targets = sum(sum(encode_training_dialog(tok, d)[1]) for d in dialogs)
    assert int(all_mask.sum()) == expected_targets  # every assistant token, nothing else
    # Each counted target is an assistant token: its id appears in some record's masked ids.
    masked_ids = {i for d in dialogs for i, m in zip(*encode_training_dialog(tok, d)) if m}
    assert set(all_rows[:, 1:][all_mask].tolist()) <= masked_ids
    assert tok.eot_id in set(all_rows[:, 1:][all_mask].tolist())  # each answer's closing <|eot_id|> is trained on


def test_a_record_without_an_answer_names_its_line(tmp_path):
    records = [RECORDS[0], {"messages": [{"role": "user", "content": "Hello?"}]}]
    with pytest.raises(DataError, match=r"chat.jsonl:2: no assistant message"):
        _load(tmp_path, records)
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[1]) + "\n" + '{"messages": 3}\n')
    tc = T.TrainConfig(run_dir=str(tmp_path / "r"), data=str(tmp_path / "bad.jsonl"), tokenizer=str(LLAMA3))
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected"):
        T.load_data(tc, LLAMA3)


# --- prepared chat datasets (prepare_data.py --chat) -------------------------------------------------------------

LLAMA2 = LLAMA3.parents[1] / "llama2" / "tokenizer.model"
TOKENIZERS = [pytest.param(LLAMA3, id="llama3"),
              pytest.param(LLAMA2, id="llama2", marks=pytest.mark.skipif(not LLAMA2.is_file(), reason="no Llama 2"))]


def _chat_records(n: int = 24) -> list[dict]:
    """RECORDS and pydoc questions, long enough that small units cut the file between (and inside) lines."""
    from llama_jax.chat_data import pydoc_chat

    return (RECORDS + pydoc_chat()[:n])[:n]


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _prepare_chat(inputs, tok, out, **kw):
    from llama_jax.dataset.prepare import prepare_dataset

    kw = {"workers": 1, "progress": False, "log": lambda line: None, **kw}
    return prepare_dataset([str(p) for p in inputs], tok, out, chat=True, **kw)


@pytest.mark.parametrize("tok_path", TOKENIZERS)
def test_prepared_chat_data_is_the_in_memory_encoding(tmp_path, tok_path):
    import gzip

    from llama_jax.chat_data import encode_dialogs, read_dialogs
    from llama_jax.dataset.store import TokenDataset

    path = _write_jsonl(tmp_path / "chat.jsonl", _chat_records())
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write(path.read_text())
    manifest = _prepare_chat([path, tmp_path / "more.jsonl.gz"], tok_path, tmp_path / "ds", unit_bytes=1500)
    assert len(manifest["shards"]) > 3 and manifest["loss_mask"]
    ids, masks = encode_dialogs(load_tokenizer(tok_path), read_dialogs(path))
    ids, masks = ids * 2, masks * 2  # the .gz file holds the same records
    ds = TokenDataset(tmp_path / "ds")
    got = ds.read(0, ds.num_tokens)
    cuts = np.flatnonzero(got["doc_start"]).tolist() + [ds.num_tokens]
    assert len(cuts) - 1 == len(ids) == manifest["num_documents"]
    for a, b, want_ids, want_mask in zip(cuts, cuts[1:], ids, masks):
        assert got["tokens"][a:b].tolist() == want_ids.tolist()
        assert got["counts"][a:b].tolist() == want_mask.tolist()
    assert manifest["num_loss_tokens"] == sum(int(m.sum()) for m in masks)


@pytest.mark.parametrize("tok_path", TOKENIZERS)
def test_batches_from_a_prepared_chat_set_train_on_the_answers_only(tmp_path, tok_path):
    from llama_jax.dataset.store import TokenDataset

    records = _chat_records()
    _prepare_chat([_write_jsonl(tmp_path / "chat.jsonl", records)], tok_path, tmp_path / "ds", unit_bytes=1500)
    tok = load_tokenizer(tok_path)
    tc = T.TrainConfig(run_dir=str(tmp_path / "run"), data=str(tmp_path / "ds"), tokenizer=str(tok_path), seq_len=16,
                       eval_fraction=0)
    rows, held_out = T.load_data(tc, tok_path)  # the reader train.py uses: rows cut from the memory maps
    assert held_out is None and tc.uses_document_mask
    got = rows.gather(np.arange(len(rows)))
    # The rows are windows of the stream of records in file order; a target counts exactly where its record's
    # chat encoding marks an assistant token (or the token closing an answer).
    stream, marks = [], []
    for record in records:
        ids, mask = encode_training_dialog(tok, _as_dialog(record))
        stream += ids
        marks += mask
    width = len(rows) * 16 + 1
    stream = np.r_[stream, np.full(width - len(stream), tok.pad_id)]
    marks = np.r_[marks, np.zeros(width - len(marks), bool)]
    for r in range(len(rows)):
        window = slice(r * 16, r * 16 + 17)
        np.testing.assert_array_equal(got["rows"][r], stream[window])
        np.testing.assert_array_equal(got["loss_mask"][r], marks[window][1:])
    # Independently of the encoder's mask: the counted targets of each record decode to its answers and nothing
    # of its prompts, each answer followed by the token that closes it.
    counted = got["rows"][:, 1:][got["loss_mask"]]  # in stream order: row r's targets are tokens 16r+1 .. 16r+16
    close = tok.eot_id if tok_path == LLAMA3 else tok.eos_id
    runs = np.split(counted, np.flatnonzero(counted == close) + 1)[:-1]
    answers = [m["content"].strip() for r in records for m in _as_dialog(r) if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == close and tok.decode(run[:-1].tolist()).strip() == answer
    share = rows.loss_share()
    assert share == TokenDataset(tmp_path / "ds").num_loss_tokens / (len(rows) * 16) and 0 < share < 1
    assert int(got["loss_mask"].sum()) == TokenDataset(tmp_path / "ds").num_loss_tokens


def _as_dialog(record):
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def _prepare_data_cli(*args):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "prepare_data.py"), "--no-progress", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_chat_input_is_one_line_naming_the_file_and_line(tmp_path):
    records = _chat_records()
    _write_jsonl(tmp_path / "chat.jsonl", records[:20] + [{"messages": [{"role": "user", "content": "Hi?"}]}])
    line = _one_error_line(_prepare_data_cli("--chat", "--input", tmp_path / "chat.jsonl", "--tokenizer", LLAMA3,
                                             "--output", tmp_path / "out", "--workers", "2"))
    assert "chat.jsonl:21: no assistant message, so nothing to train on" in line
    assert not (tmp_path / "out" / "manifest.json").exists()
    # A record in a unit that starts inside the file still names its line in the file.
    late = _write_jsonl(tmp_path / "late.jsonl", records[:21])
    late.write_text(late.read_text() + '{"messages": 3}\n')
    with pytest.raises(DataError, match=r"late.jsonl:22: expected \{\"messages\""):
        _prepare_chat([late], LLAMA3, tmp_path / "late", unit_bytes=1000)
    (tmp_path / "json.jsonl").write_text(json.dumps(RECORDS[1]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"json.jsonl:2: not valid JSON"):
        _prepare_chat([tmp_path / "json.jsonl"], LLAMA3, tmp_path / "json")
    # --chat reads .jsonl only; a chat record without --chat says what to do.
    (tmp_path / "notes.txt").write_text("some text\n")
    line = _one_error_line(_prepare_data_cli("--chat", "--input", tmp_path / "notes.txt", "--tokenizer", LLAMA3,
                                             "--output", tmp_path / "out2"))
    assert "notes.txt: --chat reads .jsonl chat records" in line and not (tmp_path / "out2").exists()
    line = _one_error_line(_prepare_data_cli("--input", tmp_path / "json.jsonl", "--tokenizer", LLAMA3,
                                             "--output", tmp_path / "out3"))
    assert 'json.jsonl:1: expected an object with a string "text" field' in line and "--chat" in line


def test_resume_does_not_reuse_shards_read_the_other_way(tmp_path):
    from llama_jax.dataset.store import MANIFEST

    # Records that read both ways: a "text" field and messages.
    records = [{"text": f"Document {i}: " + m["messages"][-1]["content"], **m}
               for i, m in enumerate(r for r in _chat_records() if "messages" in r)]
    path = _write_jsonl(tmp_path / "both.jsonl", records)
    out, log = tmp_path / "ds", []
    kw = {"unit_bytes": 1500, "workers": 1, "progress": False, "log": log.append}
    from llama_jax.dataset.prepare import prepare_dataset

    plain = prepare_dataset([str(path)], LLAMA3, out, **kw)
    assert len(plain["shards"]) > 3 and not plain["loss_mask"]
    n = len(plain["shards"])
    # With the other reading every shard is redone; with the same one all are kept.
    for chat, kept in ((True, False), (False, False), (False, True)):
        (out / MANIFEST).unlink()  # as an interrupted run leaves it
        log.clear()
        again = prepare_dataset([str(path)], LLAMA3, out, resume=True, chat=chat, **kw)
        assert again["loss_mask"] == chat and (again == plain) == (not chat)
        reused = [line for line in log if line.startswith("resuming")]
        assert reused == ([f"resuming: {n} of {n} shards already done"] if kept else []), log
    assert all(json.loads(f.read_text())["chat"] is False for f in out.glob("shard-*.json"))


@pytest.mark.slow
def test_prepare_data_chat_then_train_on_the_folder(tmp_path, corpus):
    from test_train import TINY_FLAGS, ok, run_cli

    _write_jsonl(tmp_path / "chat.jsonl", _chat_records(40))
    proc = _prepare_data_cli("--chat", "--input", tmp_path / "chat.jsonl", "--tokenizer", corpus[1],
                             "--output", tmp_path / "ds")
    assert proc.returncode == 0 and "chat records" in proc.stderr and "in the loss" in proc.stderr, proc.stderr
    flags = [f for f in TINY_FLAGS if f != "--no-progress"]  # the header line is a progress line
    run = ok(run_cli(*flags, "--data", str(tmp_path / "ds"), "--tokenizer", str(corpus[1]), "--steps", "2",
                     "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--run-dir", str(tmp_path / "run")))
    header = next(line for line in run.stderr.splitlines() if line.startswith("model "))
    assert "% of tokens in the loss" in header and "document masking" in header, header
    assert sorted(r["step"] for r in T.read_metrics(tmp_path / "run") if r["split"] == "train") == [1, 2]
